"""An experiment file (`experiments/gemini_recipe.py[:arg]`) plus `--config.` overrides -> a
validated RecipeConfig, every step's config filled with its experiment's own first so that any
field can be overridden from the command line."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

import ml_collections

from gemini_core import experiment as experiment_lib
from gemini_core.errors import UserError
from gemini_core.nested import merge
from gx.recipe.config import RecipeConfig, from_config_dict
from gx.recipe.kinds import DataPrepare, Distill, StepKind, Tokenizer, Train
from gx.recipe.sweep_step import SweepStep
from gx.recipe.tree import flatten

# every kind of step a recipe can declare (the kinds are stateless)
STEP_KINDS: Mapping[str, StepKind] = {
    "data_prepare": DataPrepare(), "tokenizer": Tokenizer(), "train": Train(),
    "distill": Distill(), "sweep": SweepStep()}

# --config.steps.<step>.experiment|kind=...: applied before the steps' fields are filled in
_SPEC_OVERRIDE = re.compile(r"^--?config\.steps\.[^.=]+\.(experiment|kind)=")
_STEP_OVERRIDE = re.compile(r"^--?config\.steps\.([^.=]+)\.config\.([^=]+)=")


def _module_config(spec: str) -> ml_collections.ConfigDict:
    path, arg = experiment_lib.split_spec(spec)
    return experiment_lib.call_get_config(experiment_lib.load_module(path), path, arg)


def is_recipe(spec: str) -> bool:
    """A recipe's config has `steps`; any other experiment is one run (`gx run` as before)."""
    return "steps" in _module_config(spec)


def step_file(recipe_dir: Path, spec: str) -> tuple[Path | None, str | None]:
    """A step's `experiment` (`path.py[:arg]`, relative to the recipe's folder): path and arg."""
    if not spec:
        return None, None
    path, arg = experiment_lib.split_spec(spec)
    return (path if path.is_absolute() else recipe_dir / path), arg


def _fill_steps(cfg: ml_collections.ConfigDict, recipe_dir: Path) -> None:
    """Every step's `config` becomes its experiment's full config with the recipe's fields over
    it, so that any field can be overridden from the command line."""
    for name, step in (cfg.get("steps") or {}).items():
        where = f"config.steps.{name}"
        if not isinstance(step, ml_collections.ConfigDict) or "kind" not in step:
            raise UserError(f"{where}: expected a section with kind, experiment, config, inputs")
        if step.kind not in STEP_KINDS:
            raise UserError(f"{where}.kind={step.kind!r}: unknown step kind (known: "
                            f"{', '.join(sorted(STEP_KINDS))})")
        path, arg = step_file(recipe_dir, step.get("experiment", ""))
        base = STEP_KINDS[step.kind].base_config(path, arg, where)
        own = step.get("config")
        own = own.to_dict() if isinstance(own, ml_collections.ConfigDict) else {}
        step.config = ml_collections.ConfigDict(merge(base, own))


def _bound_override(cfg: ml_collections.ConfigDict, override: str) -> None:
    """A field an input fills cannot be set by hand: the input would silently win."""
    match = _STEP_OVERRIDE.match(override)
    if not match:
        return
    name, key = match.groups()
    inputs = cfg.steps.get(name, {}).get("inputs") or {}
    inputs = inputs.to_dict() if isinstance(inputs, ml_collections.ConfigDict) else dict(inputs)
    for bound, text in flatten(inputs).items():
        if key == bound or key.startswith(bound + "."):
            raise UserError(f"config.steps.{name}.config.{key}: filled by input "
                            f"config.steps.{name}.inputs.{bound}={text!r}; override the input "
                            "(or the step it names) instead")


def load_recipe(spec: str, overrides: Sequence[str] = ()) -> tuple[RecipeConfig, Path]:
    """`experiments/gemini_recipe.py[:arg]` + `--config.` overrides -> a validated RecipeConfig
    and the recipe file's path (step experiment files are relative to its folder)."""
    path, _ = experiment_lib.split_spec(spec)
    cfg = experiment_lib.with_schema_defaults(_module_config(spec), path.stem, RecipeConfig)
    first = [o for o in overrides if _SPEC_OVERRIDE.match(o)]
    experiment_lib.apply_overrides(cfg, first)
    _fill_steps(cfg, path.parent)
    rest = [o for o in overrides if o not in first]
    for override in rest:
        _bound_override(cfg, override)
    experiment_lib.apply_overrides(cfg, rest)
    return from_config_dict(cfg), path
