"""Plain nested data (dicts of dicts, keys addressed as dotted paths): what a recipe's steps'
configs are between the ConfigDict the user wrote and the typed config a step validates."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Mapping

from gemini_core import config as config_lib
from gemini_core.runs.rundir import canonical_json


def jsonable(obj: Any) -> Any:
    """What a value reads back as from the state file (tuples become lists, proxies dicts)."""
    return json.loads(canonical_json(config_lib.to_json_dict(obj)))


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def has_path(tree: Mapping, dotted: str) -> bool:
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def get_path(tree: Mapping, dotted: str) -> Any:
    node = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def set_path(tree: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = tree
    for part in parents:
        node = node[part]
    node[last] = value


def defaults(cls: type) -> dict:
    """A dataclass's defaults as plain data (dataclass fields recursed into)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out[f.name] = defaults(hints[f.name])
        elif f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return jsonable(out)
