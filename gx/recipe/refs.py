"""References between steps ("ref:<step>.<output>", "ref:params.<key>"): parsing, the values
params bring, and the order they make (upstream first; a cycle is a user error)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from gemini_core import config as config_lib
from gemini_core.errors import UserError
from gx.recipe.config import PARAMS, RecipeConfig
from gx.recipe.tree import flatten, get_path, has_path

REF = "ref:"


@dataclasses.dataclass(frozen=True)
class Ref:
    text: str  # ref:<step>.<output>
    step: str  # a step's name, or PARAMS
    output: str  # the output's name (a key path into config.params for PARAMS)
    where: str  # config.steps.<step>.inputs.<key>

    @property
    def is_param(self) -> bool:
        return self.step == PARAMS


def parse_ref(text: Any, where: str) -> Ref:
    if not isinstance(text, str) or not text.startswith(REF) or "." not in text[len(REF):]:
        raise UserError(f"{where}={text!r}: expected a reference 'ref:<step>.<output>' or "
                        "'ref:params.<key>'")
    step, _, output = text[len(REF):].partition(".")
    return Ref(text, step, output, where)


def param_value(recipe: RecipeConfig, ref: Ref) -> Any:
    """The value a `ref:params.<key>` brings; a user error if it is missing or unset."""
    params = config_lib.to_json_dict(recipe.params)
    if not has_path(params, ref.output):
        known = ", ".join(flatten(params)) or "none"
        raise UserError(f"{ref.where}={ref.text!r}: config.params has no {ref.output} "
                        f"(params: {known})")
    value = get_path(params, ref.output)
    if value in ("", None):
        raise UserError(f"config.params.{ref.output}={value!r}: must be set (used by "
                        f"{ref.where}), e.g. --config.params.{ref.output}=...")
    return value


def toposort(refs: Mapping[str, Mapping[str, Ref]]) -> list[str]:
    """Step names upstream first, given each step's references (by name where they leave a
    choice: a ConfigDict keeps its keys sorted); a cycle is an error naming the reference that
    closes it."""
    order: list[str] = []
    state: dict[str, str] = {}  # visiting | done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        state[name] = "visiting"
        for ref in refs[name].values():
            if ref.is_param:
                continue
            if state.get(ref.step) == "visiting":
                cycle = path[path.index(ref.step):] + [name, ref.step] if ref.step in path \
                    else [name, ref.step]
                raise UserError(f"{ref.where}={ref.text!r}: a cycle: "
                                f"{' -> '.join(reversed(cycle))}")
            visit(ref.step, path + [name])
        state[name] = "done"
        order.append(name)

    for name in refs:
        visit(name, [])
    return order
