"""Nested plain-data configs (dicts of dicts, as `config.to_json_dict` gives them): the one rule
for laying a partial override over a base, used wherever that happens (a sweep's target scale, a
scaling ladder's sizes, a recipe step's own fields)."""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections


def plain(value: Any) -> Any:
    """Plain dicts and lists all the way down (ConfigDicts, mapping proxies, tuples unrolled)."""
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def merge(base: Mapping, update: Mapping) -> dict:
    """`update` over `base`, recursively, as a new dict (neither is changed). A mapping merges
    into a mapping; anything else, an empty mapping included, replaces the value: `{}` is how a
    user says "none", not "no change"."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and value:
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out
