"""A recipe resolved into its graph of steps: each step's full config, its references checked,
the steps in topological order, each fingerprinted and validated with its inputs' values or
placeholders, so that a mistake anywhere is an error before anything runs."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Collection, Mapping

from gemini_core import config as config_lib
from gemini_core.errors import UserError
from gemini_core.nested import merge
from gemini_core.runs.rundir import fingerprint
from gx.recipe.config import RecipeConfig, StepConfig
from gx.recipe.kinds import StepKind
from gx.recipe.load import STEP_KINDS, step_file
from gx.recipe.refs import Ref, param_value, parse_ref, toposort
from gx.recipe.tree import flatten, has_path, jsonable, set_path


@dataclasses.dataclass
class Step:
    name: str
    spec: StepConfig
    kind: StepKind
    merged: dict  # the experiment's config with the step's fields: what it runs
    refs: dict[str, Ref]  # field (dotted) -> the reference that fills it
    config: dict = dataclasses.field(default_factory=dict)  # flat, refs in place: fingerprinted
    input_fps: dict[str, str] = dataclasses.field(default_factory=dict)
    fingerprint: str = ""
    typed: Any = None  # validated, with its inputs' values or placeholders
    overrides: dict = dataclasses.field(default_factory=dict)  # flat: differs from the file's

    @property
    def label(self) -> str:
        return self.spec.experiment or self.spec.kind


@dataclasses.dataclass
class StepGraph:
    recipe: RecipeConfig
    steps: dict[str, Step]  # in topological order
    state_dir: Path  # <runs root>/recipes/<recipe>
    runs_root: Path


def _check_refs(recipe: RecipeConfig, steps: dict[str, Step]) -> None:
    names = ", ".join(steps)
    kinds = {name: step.kind for name, step in steps.items()}
    for step in steps.values():
        for ref in step.refs.values():
            if ref.is_param:
                param_value(recipe, ref)
                continue
            if ref.step not in steps:
                raise UserError(f"{ref.where}={ref.text!r}: unknown step {ref.step!r} (steps: "
                                f"{names})")
            up = steps[ref.step]
            if ref.output not in up.kind.outputs:
                raise UserError(f"{ref.where}={ref.text!r}: step {ref.step} ({up.spec.kind}) "
                                f"has no output {ref.output!r} (outputs: "
                                f"{', '.join(up.kind.outputs)})")
        step.kind.check_refs(step.name, step.refs, kinds)


def _in_step(step: Step, message: str) -> str:
    """A validation message about `config.<field>` names the recipe's key path instead: for a
    field a param fills, the param the user set (config.params.<key>)."""
    for key, ref in step.refs.items():
        for sep in ("=", ":", "."):
            if not message.startswith(f"config.{key}{sep}"):
                continue
            if ref.is_param:
                return (f"config.params.{ref.output}{message[len(f'config.{key}'):]}; step "
                        f"{step.name}'s {key} ({ref.where})")
            return f"{ref.where}={ref.text!r}: {message}"
    if message.startswith("config."):
        return f"config.steps.{step.name}.config.{message[len('config.'):]}"
    return f"config.steps.{step.name} ({step.label}): {message}"


def validate_step(step: Step, values: Mapping[str, Any], pending: Collection[str] = ()) -> Any:
    """The step's typed config with `values` in the fields its inputs fill, its paths checked
    but for the fields in `pending` (placeholders for what upstream steps will write)."""
    cfg = copy.deepcopy(step.merged)
    for key, value in values.items():
        set_path(cfg, key, copy.deepcopy(value))
    try:
        typed = step.kind.validate(cfg)
        step.kind.check_paths(typed, pending)
        return typed
    except UserError as e:
        raise UserError(_in_step(step, str(e))) from None


def _new_step(name: str, spec: StepConfig, recipe_dir: Path) -> Step:
    where = f"config.steps.{name}"
    kind = STEP_KINDS[spec.kind]
    path, arg = step_file(recipe_dir, spec.experiment)
    base = jsonable(kind.base_config(path, arg, where))
    merged = jsonable(merge(base, config_lib.to_json_dict(spec.config)))
    refs = {}
    for key, text in flatten(config_lib.to_json_dict(spec.inputs)).items():
        refs[key] = parse_ref(text, f"{where}.inputs.{key}")
        if not has_path(merged, key):
            raise UserError(f"{where}.inputs.{key}: the step's config has no field {key} "
                            f"({spec.experiment or spec.kind})")
    flat_base = flatten(base)
    overrides = {k: v for k, v in flatten(merged).items()
                 if k not in flat_base or flat_base[k] != v}
    return Step(name, spec, kind, merged, refs, overrides=overrides)


def _fingerprint(recipe: RecipeConfig, step: Step, ordered: Mapping[str, Step]) -> None:
    """Sets the step's identity (its config with the references in place of the values they
    bring, and its inputs' fingerprints) and its typed config with placeholders; upstream
    steps must have theirs already."""
    ident = copy.deepcopy(step.merged)
    placeholders = {}
    for key, ref in step.refs.items():
        set_path(ident, key, ref.text)
        if ref.is_param:
            value = param_value(recipe, ref)
            step.input_fps[key] = fingerprint({"value": value})
            placeholders[key] = value
        else:
            up = ordered[ref.step]
            step.input_fps[key] = up.fingerprint
            placeholders[key] = up.kind.static_outputs(up.typed).get(
                ref.output, f"<{ref.step}.{ref.output}>")
    step.config = {key: value for key, value in jsonable(flatten(ident)).items()
                   if not any(key == f or key.startswith(f + ".")
                              for f in step.kind.not_identity)}
    step.fingerprint = fingerprint({"kind": step.spec.kind, "config": step.config,
                                    "inputs": step.input_fps})
    step.typed = validate_step(step, placeholders, _pending(step))


def _pending(step: Step) -> set[str]:
    """The fields (every leaf, dotted) that upstream steps' outputs fill."""
    keys = [key for key, ref in step.refs.items() if not ref.is_param]
    return {leaf for leaf in flatten(step.merged)
            if any(leaf == key or leaf.startswith(key + ".") for key in keys)}


def build_graph(recipe: RecipeConfig, recipe_path: Path, runs_root: Path) -> StepGraph:
    """Steps, references checked, topological order, fingerprints; every step validated."""
    steps = {name: _new_step(name, spec, Path(recipe_path).parent)
             for name, spec in recipe.steps.items()}
    _check_refs(recipe, steps)
    ordered = {name: steps[name] for name in toposort({n: s.refs for n, s in steps.items()})}
    for step in ordered.values():
        _fingerprint(recipe, step, ordered)
    return StepGraph(recipe, ordered, Path(runs_root) / "recipes" / recipe.name, Path(runs_root))
