"""A recipe's typed config: its name, its steps (kind, experiment file, fields, inputs) and the
params its steps refer to, validated once from the ConfigDict."""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Mapping

import ml_collections

from gemini_core import config as config_lib
from gemini_core.errors import UserError

EMPTY: Mapping = types.MappingProxyType({})
PARAMS = "params"  # ref:params.<key> reads the recipe's own config.params


def _empty():
    return dataclasses.field(default_factory=lambda: EMPTY)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    kind: str
    experiment: str = ""  # path.py[:arg] relative to the recipe's folder; "" for tokenizer steps
    config: Mapping[str, Any] = _empty()
    inputs: Mapping[str, Any] = _empty()


@dataclasses.dataclass(frozen=True)
class RecipeConfig:
    name: str
    steps: Mapping[str, StepConfig]
    params: Mapping[str, Any] = _empty()


def from_config_dict(cfg: ml_collections.ConfigDict | Mapping) -> RecipeConfig:
    recipe = config_lib.to_dataclass(cfg, RecipeConfig, "config")
    if not recipe.name:
        raise UserError("config.name='': every recipe needs a name")
    if not recipe.steps:
        raise UserError("config.steps: declare at least one step")
    if PARAMS in recipe.steps:
        raise UserError(f"config.steps.{PARAMS}: a reserved name (ref:params.<key> reads "
                        "config.params)")
    if "config" in recipe.steps:  # its state file would make the recipe's folder look like a run
        raise UserError("config.steps.config: a reserved name; call the step something else")
    return recipe
