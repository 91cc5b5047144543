"""The whole recipe as one pipeline of steps: `gx run experiments/gemini_recipe.py`.

A recipe experiment's get_config returns a ConfigDict with `steps` (name -> step; they run and
are shown upstream first) and `params` (values steps refer to: the raw corpus, W&B on or off).
A step is
  kind        data_prepare | tokenizer | train | distill, or a kind that another package
              registers under the entry point group "gx.recipe_steps" (sweeps/ registers
              `sweep`: gemini_core never imports sweeps)
  experiment  the experiment file the step runs, `path.py[:arg]`, relative to the recipe's folder
  config      fields over that experiment's own, nested as in its config (every field of the
              experiment can be overridden: --config.steps.<step>.config.<field>=value)
  inputs      fields filled from other steps' outputs, nested the same way; each leaf is a
              reference "ref:<step>.<output>" or "ref:params.<key>"
The references make a DAG. A step's fingerprint hashes its resolved config (the references in
place of the values they bring) and its inputs' fingerprints, so a changed field reruns that
step and exactly the steps downstream of it. Under every step is an in-process library call
that itself reuses finished work by content (a prepared data root, a cached tokenizer, a done
run, a done sweep trial): a rerun step costs only what really changed.

State: <runs root>/recipes/<recipe>/<step>.json, written atomically: state (queued | running |
done | failed), pid, host, fingerprint, the config and the input values that produced it, its
outputs, start, end, error. A step is up to date when it is done, its fingerprint matches, its
outputs are still there, and its inputs' values are the upstream steps' current outputs. A step
marked running whose process is gone (killed, crashed, the machine lost) is interrupted, not
trusted: it reruns, and its run resumes from its checkpoints.

`--force STEP` redoes STEP's own work (a run retrained from scratch, a data root rebuilt, a
sweep's fit redone over its trial runs, which are runs of their own and reused when done). The
steps downstream of it rerun only if its outputs changed: a byte-identical data root, or a
retrained run with the same final eval metrics, leaves them up to date.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import socket
import time
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import ml_collections

from gemini_core import config as config_lib
from gemini_core import experiment as experiment_lib
from gemini_core.errors import UserError
from gemini_core.runs.rundir import canonical_json, fingerprint, pid_alive, read_json, write_json_atomic

Log = Callable[[str], None]
EMPTY: Mapping = types.MappingProxyType({})
REF = "ref:"
PARAMS = "params"  # ref:params.<key> reads the recipe's own config.params
ENTRY_POINTS = "gx.recipe_steps"
# --config.steps.<step>.experiment|kind=...: applied before the steps' fields are filled in
_SPEC_OVERRIDE = re.compile(r"^--?config\.steps\.[^.=]+\.(experiment|kind)=")
_STEP_OVERRIDE = re.compile(r"^--?config\.steps\.([^.=]+)\.config\.([^=]+)=")


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


# ---------------------------------------------------------------------------------------------
# plain nested data: flatten, get, set, merge


def _jsonable(obj: Any) -> Any:
    """What a value reads back as from the state file (tuples become lists, proxies dicts)."""
    return json.loads(canonical_json(config_lib.to_json_dict(obj)))


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _has(tree: Mapping, dotted: str) -> bool:
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _get(tree: Mapping, dotted: str) -> Any:
    node = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = tree
    for part in parents:
        node = node[part]
    node[last] = value


def _merge(base: dict, update: Mapping) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and value:
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _defaults(cls: type) -> dict:
    """A dataclass's defaults as plain data (dataclass fields recursed into)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out[f.name] = _defaults(hints[f.name])
        elif f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return _jsonable(out)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# step kinds


@dataclasses.dataclass(frozen=True)
class StepContext:
    runs_root: Path
    name: str
    force: bool  # --force names this step: redo its work, not only reuse it
    overrides: dict  # the fields the recipe sets over the experiment's own (for `gx show`)
    log: Log


class StepKind:
    """What one kind of step does. Another package adds a kind by subclassing this and naming
    the class under the entry point group "gx.recipe_steps" in its pyproject.toml."""

    outputs: tuple[str, ...] = ()
    schema: type | None = None  # the typed config of its experiment files (schema defaults)
    # fields that say how the work runs, not what it computes: as the work's own identity
    # leaves them out, so does the step's fingerprint (changing them reruns nothing)
    not_identity: tuple[str, ...] = ()

    def base_config(self, path: Path | None, arg: str | None, where: str) -> dict:
        """The experiment file's config with the schema's defaults, as plain data."""
        if path is None:
            raise UserError(f"{where}.experiment='': name the experiment file this step runs")
        module = experiment_lib.load_module(path)
        cfg = experiment_lib.call_get_config(module, path, arg)
        return experiment_lib.with_schema_defaults(cfg, path.stem, self.schema).to_dict()

    def validate(self, cfg: dict) -> Any:
        """The typed config; UserError naming `config.<field>` on any mistake."""
        raise NotImplementedError

    def check_refs(self, step: "Step", steps: Mapping[str, "Step"]) -> None:
        """Kind-specific rules on what its inputs must be (see Distill)."""

    def static_outputs(self, typed: Any) -> dict:
        """Outputs known before the step runs (from its config alone)."""
        return {}

    def run(self, typed: Any, ctx: StepContext) -> dict:
        raise NotImplementedError

    def check(self, outputs: dict) -> str | None:
        """Why recorded outputs cannot be trusted any more (gone, replaced); None if fine."""
        return None

    def describe(self, outputs: dict) -> str:
        """One short line for `gx ls`."""
        return ""


class DataPrepare(StepKind):
    """`gx data prepare`: a cleaned data root (gemini_core/curation)."""

    outputs = ("data_root", "fingerprint", "content")
    not_identity = ("workers", "strict")

    @property
    def schema(self):
        from gemini_core.data.curation.config import CurationConfig
        return CurationConfig

    def validate(self, cfg: dict) -> Any:
        from gemini_core.data.curation import config as curation_config
        c = curation_config.from_config_dict(cfg)
        if not c.data.root:
            raise UserError("config.data.root='': the raw corpus folder")
        return c

    def run(self, typed: Any, ctx: StepContext) -> dict:
        from gemini_core.data.curation import pipeline
        out = pipeline.prepare(typed, ctx.runs_root, force=ctx.force, log=ctx.log)
        return {"data_root": str(out), "fingerprint": pipeline.read_report(out)["fingerprint"],
                "content": _tree_digest(out)}

    def check(self, outputs: dict) -> str | None:
        report = read_json(Path(outputs["data_root"]) / "report.json")
        if report is None:
            return f"data root {outputs['data_root']} is gone"
        if report.get("fingerprint") != outputs["fingerprint"]:
            return f"data root {outputs['data_root']} was rebuilt from another config"
        return None

    def describe(self, outputs: dict) -> str:
        return outputs.get("data_root", "")


def _tree_digest(root: Path) -> str:
    """The content of a prepared data root: its data files, not its report (timings)."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        if path.parent == Path(root) and path.name.startswith("report."):
            continue
        h.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class TokenizerStepConfig:
    """A tokenizer step: the data it is trained on and its settings (DataConfig's fields)."""

    root: str
    tokenizer: config_lib.TokenizerConfig
    domains: tuple[str, ...] = config_lib.DEFAULT_DOMAINS
    train_file: str = "trainer.jsonl.gz"
    valid_file: str = "valid.jsonl.gz"
    text_field: str = "text"
    on_bad_record: str = "error"
    cache_dir: str = ""  # "" = <runs root>/.cache, where training steps look for it
    num_workers: int = 0

    def data(self) -> config_lib.DataConfig:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return config_lib.DataConfig(seq_len=1, **fields)


class Tokenizer(StepKind):
    """The tokenizer trained on the prepared mix (and that data's token arrays), cached by
    content. Its `settings` output is what training steps bind to `data.tokenizer`, so they find
    this very tokenizer in the cache; each checks after its run that it did."""

    outputs = ("settings", "fingerprint", "path", "vocab_size", "manifest")

    def base_config(self, path: Path | None, arg: str | None, where: str) -> dict:
        if path is not None:
            raise UserError(f"{where}.experiment={str(path)!r}: a tokenizer step takes no "
                            "experiment file; its fields are under config")
        base = _defaults(TokenizerStepConfig)
        base.update(root="", tokenizer=_defaults(config_lib.TokenizerConfig))
        return base

    def validate(self, cfg: dict) -> Any:
        tc = config_lib.to_dataclass(cfg, TokenizerStepConfig, "config")
        if tc.tokenizer.sample_weights == "mixture":
            raise UserError("config.tokenizer.sample_weights='mixture': a tokenizer step has no "
                            "mixture; use natural or uniform (one tokenizer for every mixture)")
        config_lib.check_data(tc.data())
        return tc

    def static_outputs(self, typed: Any) -> dict:
        return {"settings": _jsonable(typed.tokenizer)}

    def run(self, typed: Any, ctx: StepContext) -> dict:
        from gemini_core.data.tokens import prepare_data
        data = typed.data()
        cache = Path(data.cache_dir).absolute() if data.cache_dir else ctx.runs_root / ".cache"
        prepared = prepare_data(data, data.tokenizer.sample_weights, cache, log=ctx.log)
        return {**self.static_outputs(typed), "fingerprint": prepared.tokenizer.fingerprint,
                "path": str(prepared.tokenizer.path), "vocab_size": prepared.tokenizer.vocab_size,
                "manifest": prepared.manifest_hash}

    def check(self, outputs: dict) -> str | None:
        if not (Path(outputs["path"]) / "spm.model").is_file():
            return f"tokenizer {outputs['path']} is gone"
        return None

    def describe(self, outputs: dict) -> str:
        return f"tokenizer {outputs.get('fingerprint', '')[:12]} vocab {outputs.get('vocab_size')}"


def run_tokenizer(run_dir: Path) -> str | None:
    """The content fingerprint of the tokenizer a run trained with."""
    cfg = read_json(Path(run_dir) / "config.json") or {}
    path = (cfg.get("paths") or {}).get("tokenizer")
    meta = read_json(Path(path) / "tokenizer.json") if path else None
    return (meta or {}).get("fingerprint")


class Train(StepKind):
    """A training run: `gemini_core.train.trainer.run_experiment` (reuses a done run, resumes one)."""

    outputs = ("run_id", "run_dir", "tokenizer", "eval_mean_loss", "eval_mean_bpb")
    schema = config_lib.ExperimentConfig
    not_identity = ("faults", "mesh", "distributed")  # as trainer.identity

    def validate(self, cfg: dict) -> Any:
        return config_lib.from_config_dict(cfg)

    def run(self, typed: Any, ctx: StepContext) -> dict:
        from gemini_core.train import trainer
        summary = trainer.run_experiment(typed, ctx.runs_root, force=ctx.force,
                                       overrides=ctx.overrides, log=ctx.log)
        run_dir = ctx.runs_root / typed.name / summary["run_id"]
        return {"run_id": summary["run_id"], "run_dir": str(run_dir),
                "tokenizer": run_tokenizer(run_dir),
                # the run's result: a forced retraining that ends the same changes nothing
                "eval_mean_loss": summary.get("eval/mean/loss"),
                "eval_mean_bpb": summary.get("eval/mean/bpb")}

    def check(self, outputs: dict) -> str | None:
        state = (read_json(Path(outputs["run_dir"]) / "status.json") or {}).get("state")
        if state != "done":
            return f"run {outputs['run_id']} is {state or 'gone'}"
        return None

    def describe(self, outputs: dict) -> str:
        loss = outputs.get("eval_mean_loss")
        return outputs.get("run_id", "") + (f"  eval/mean/loss {loss:.4f}" if loss else "")


class Distill(Train):
    """A student trained towards a teacher: a train step whose `distill.teacher` is the run id
    of an upstream train step (gemini_core/distill.py)."""

    def check_refs(self, step: "Step", steps: Mapping[str, "Step"]) -> None:
        ref = step.refs.get("distill.teacher")
        where = f"config.steps.{step.name}.inputs.distill.teacher"
        if ref is None:
            raise UserError(f"{where}: a distill step takes its teacher from a train step's "
                            "output: set it to 'ref:<train step>.run_id'")
        if ref.step == PARAMS or not isinstance(steps[ref.step].kind, Train) \
                or ref.output != "run_id":
            raise UserError(f"{where}={ref.text!r}: the teacher must be a train step's run_id "
                            "('ref:<train step>.run_id')")


BUILTIN: dict[str, Callable[[], StepKind]] = {
    "data_prepare": DataPrepare, "tokenizer": Tokenizer, "train": Train, "distill": Distill}


def step_kinds() -> dict[str, StepKind]:
    """The built-in kinds plus those registered under "gx.recipe_steps" (e.g. sweep)."""
    from importlib.metadata import entry_points
    kinds = {name: make() for name, make in BUILTIN.items()}
    for ep in entry_points(group=ENTRY_POINTS):
        obj = ep.load()
        kinds[ep.name] = obj() if isinstance(obj, type) else obj
    return kinds


# ---------------------------------------------------------------------------------------------
# loading a recipe


def _module_config(spec: str) -> ml_collections.ConfigDict:
    path, arg = experiment_lib.split_spec(spec)
    return experiment_lib.call_get_config(experiment_lib.load_module(path), path, arg)


def is_recipe(spec: str) -> bool:
    """A recipe's config has `steps`; any other experiment is one run (`gx run` as before)."""
    return "steps" in _module_config(spec)


def _step_file(recipe_dir: Path, spec: str) -> tuple[Path | None, str | None]:
    if not spec:
        return None, None
    path, arg = experiment_lib.split_spec(spec)
    return (path if path.is_absolute() else recipe_dir / path), arg


def _fill_steps(cfg: ml_collections.ConfigDict, recipe_dir: Path, kinds: dict) -> None:
    """Every step's `config` becomes its experiment's full config with the recipe's fields over
    it, so that any field can be overridden from the command line."""
    for name, step in (cfg.get("steps") or {}).items():
        where = f"config.steps.{name}"
        if not isinstance(step, ml_collections.ConfigDict) or "kind" not in step:
            raise UserError(f"{where}: expected a section with kind, experiment, config, inputs")
        if step.kind not in kinds:
            raise UserError(f"{where}.kind={step.kind!r}: unknown step kind (known: "
                            f"{', '.join(sorted(kinds))})")
        path, arg = _step_file(recipe_dir, step.get("experiment", ""))
        base = kinds[step.kind].base_config(path, arg, where)
        own = step.get("config")
        own = own.to_dict() if isinstance(own, ml_collections.ConfigDict) else {}
        step.config = ml_collections.ConfigDict(_merge(base, own))


def _bound_override(cfg: ml_collections.ConfigDict, override: str) -> None:
    """A field an input fills cannot be set by hand: the input would silently win."""
    match = _STEP_OVERRIDE.match(override)
    if not match:
        return
    name, key = match.groups()
    inputs = cfg.steps.get(name, {}).get("inputs") or {}
    inputs = inputs.to_dict() if isinstance(inputs, ml_collections.ConfigDict) else dict(inputs)
    for bound, text in _flatten(inputs).items():
        if key == bound or key.startswith(bound + "."):
            raise UserError(f"config.steps.{name}.config.{key}: filled by input "
                            f"config.steps.{name}.inputs.{bound}={text!r}; override the input "
                            "(or the step it names) instead")


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


def load_recipe(spec: str, overrides: Sequence[str] = ()) -> tuple[RecipeConfig, Path]:
    """`experiments/gemini_recipe.py[:arg]` + `--config.` overrides -> a validated RecipeConfig."""
    path, _ = experiment_lib.split_spec(spec)
    cfg = experiment_lib.with_schema_defaults(_module_config(spec), path.stem, RecipeConfig)
    first = [o for o in overrides if _SPEC_OVERRIDE.match(o)]
    experiment_lib.apply_overrides(cfg, first)
    _fill_steps(cfg, path.parent, step_kinds())
    rest = [o for o in overrides if o not in first]
    for override in rest:
        _bound_override(cfg, override)
    experiment_lib.apply_overrides(cfg, rest)
    return from_config_dict(cfg), path


# ---------------------------------------------------------------------------------------------
# the plan: steps, references, order, fingerprints


@dataclasses.dataclass(frozen=True)
class Ref:
    text: str  # ref:<step>.<output>
    step: str  # a step's name, or PARAMS
    output: str  # the output's name (a key path into config.params for PARAMS)
    where: str  # config.steps.<step>.inputs.<key>


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
class Plan:
    recipe: RecipeConfig
    steps: dict[str, Step]  # in topological order
    state_dir: Path
    runs_root: Path


def _parse_ref(text: Any, where: str) -> Ref:
    if not isinstance(text, str) or not text.startswith(REF) or "." not in text[len(REF):]:
        raise UserError(f"{where}={text!r}: expected a reference 'ref:<step>.<output>' or "
                        "'ref:params.<key>'")
    step, _, output = text[len(REF):].partition(".")
    return Ref(text, step, output, where)


def _param(recipe: RecipeConfig, ref: Ref) -> Any:
    params = config_lib.to_json_dict(recipe.params)
    if not _has(params, ref.output):
        known = ", ".join(_flatten(params)) or "none"
        raise UserError(f"{ref.where}={ref.text!r}: config.params has no {ref.output} "
                        f"(params: {known})")
    value = _get(params, ref.output)
    if value in ("", None):
        raise UserError(f"config.params.{ref.output}={value!r}: must be set (used by "
                        f"{ref.where}), e.g. --config.params.{ref.output}=...")
    return value


def _check_refs(recipe: RecipeConfig, steps: dict[str, Step]) -> None:
    names = ", ".join(steps)
    for step in steps.values():
        for ref in step.refs.values():
            if ref.step == PARAMS:
                _param(recipe, ref)
                continue
            if ref.step not in steps:
                raise UserError(f"{ref.where}={ref.text!r}: unknown step {ref.step!r} (steps: "
                                f"{names})")
            up = steps[ref.step]
            if ref.output not in up.kind.outputs:
                raise UserError(f"{ref.where}={ref.text!r}: step {ref.step} ({up.spec.kind}) "
                                f"has no output {ref.output!r} (outputs: "
                                f"{', '.join(up.kind.outputs)})")
        step.kind.check_refs(step, steps)


def _toposort(steps: dict[str, Step]) -> list[str]:
    """Upstream first (by name where the references leave a choice: a ConfigDict keeps its keys
    sorted); a cycle is an error naming the reference that closes it."""
    order: list[str] = []
    state: dict[str, str] = {}  # visiting | done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        state[name] = "visiting"
        for ref in steps[name].refs.values():
            if ref.step == PARAMS:
                continue
            if state.get(ref.step) == "visiting":
                cycle = path[path.index(ref.step):] + [name, ref.step] if ref.step in path \
                    else [name, ref.step]
                raise UserError(f"{ref.where}={ref.text!r}: a cycle: "
                                f"{' -> '.join(reversed(cycle))}")
            visit(ref.step, path + [name])
        state[name] = "done"
        order.append(name)

    for name in steps:
        visit(name, [])
    return order


def _in_step(step: Step, message: str) -> str:
    """A validation message about `config.<field>` names the recipe's key path instead."""
    for key, ref in step.refs.items():
        for sep in ("=", ":", "."):
            if message.startswith(f"config.{key}{sep}"):
                return f"{ref.where}={ref.text!r}: {message}"
    if message.startswith("config."):
        return f"config.steps.{step.name}.config.{message[len('config.'):]}"
    return f"config.steps.{step.name} ({step.label}): {message}"


def _validate(step: Step, values: Mapping[str, Any]) -> Any:
    cfg = copy.deepcopy(step.merged)
    for key, value in values.items():
        _set(cfg, key, copy.deepcopy(value))
    try:
        return step.kind.validate(cfg)
    except UserError as e:
        raise UserError(_in_step(step, str(e))) from None


def build_plan(recipe: RecipeConfig, recipe_path: Path, runs_root: Path) -> Plan:
    """Steps, references checked, topological order, fingerprints; every step validated with
    its inputs' values or placeholders: a mistake anywhere is an error before anything runs."""
    kinds = step_kinds()
    steps: dict[str, Step] = {}
    for name, spec in recipe.steps.items():
        where = f"config.steps.{name}"
        kind = kinds[spec.kind]
        path, arg = _step_file(Path(recipe_path).parent, spec.experiment)
        base = _jsonable(kind.base_config(path, arg, where))
        merged = _jsonable(_merge(base, config_lib.to_json_dict(spec.config)))
        refs = {}
        for key, text in _flatten(config_lib.to_json_dict(spec.inputs)).items():
            refs[key] = _parse_ref(text, f"{where}.inputs.{key}")
            if not _has(merged, key):
                raise UserError(f"{where}.inputs.{key}: the step's config has no field {key} "
                                f"({spec.experiment or spec.kind})")
        flat_base = _flatten(base)
        overrides = {k: v for k, v in _flatten(merged).items()
                     if k not in flat_base or flat_base[k] != v}
        steps[name] = Step(name, spec, kind, merged, refs, overrides=overrides)
    _check_refs(recipe, steps)
    ordered = {name: steps[name] for name in _toposort(steps)}
    for step in ordered.values():
        ident = copy.deepcopy(step.merged)
        placeholders = {}
        for key, ref in step.refs.items():
            _set(ident, key, ref.text)
            if ref.step == PARAMS:
                value = _param(recipe, ref)
                step.input_fps[key] = fingerprint({"value": value})
                placeholders[key] = value
            else:
                up = ordered[ref.step]
                step.input_fps[key] = up.fingerprint
                placeholders[key] = up.kind.static_outputs(up.typed).get(
                    ref.output, f"<{ref.step}.{ref.output}>")
        step.config = {key: value for key, value in _jsonable(_flatten(ident)).items()
                       if not any(key == f or key.startswith(f + ".")
                                  for f in step.kind.not_identity)}
        step.fingerprint = fingerprint({"kind": step.spec.kind, "config": step.config,
                                        "inputs": step.input_fps})
        step.typed = _validate(step, placeholders)
    return Plan(recipe, ordered, Path(runs_root) / "recipes" / recipe.name, Path(runs_root))


# ---------------------------------------------------------------------------------------------
# state and decisions


def _state_path(plan: Plan, name: str) -> Path:
    return plan.state_dir / f"{name}.json"


def read_state(plan: Plan, name: str) -> dict | None:
    try:
        return read_json(_state_path(plan, name))
    except ValueError:  # written atomically, so only a hand edit breaks it: rerun the step
        return None


def _alive(rec: dict | None) -> bool:
    return bool(rec and rec.get("state") == "running" and rec.get("pid") != os.getpid()
                and pid_alive(rec.get("pid"), rec.get("host")))


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def config_diff(old: Mapping, new: Mapping, limit: int = 12) -> list[str]:
    """The flattened fields whose values differ: `key: old -> new`."""
    lines = []
    for key in sorted(set(old) | set(new)):
        if key not in old:
            lines.append(f"{key}: new field = {_show(new[key])}")
        elif key not in new:
            lines.append(f"{key}: removed (was {_show(old[key])})")
        elif old[key] != new[key]:
            lines.append(f"{key}: {_show(old[key])} -> {_show(new[key])}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more fields"]
    return lines


def decide(plan: Plan, step: Step, rec: dict | None, forced: bool,
           known: Mapping[str, dict | None]) -> tuple[str, list[str]]:
    """("run" | "up to date" | "maybe", reasons). `known`: each upstream step's current outputs,
    or None where they are not known yet (it would run first)."""
    reasons = ["forced (--force)"] if forced else []
    if rec is None or "fingerprint" not in rec:
        return "run", reasons + ["new: this step has not run yet"]
    state = rec.get("state")
    if state == "running":
        gone = "is gone" if rec.get("host") == socket.gethostname() else \
            "is not on this host (assumed gone)"
        reasons.append(f"interrupted: marked running by pid {rec.get('pid')} on "
                       f"{rec.get('host')}, which {gone}")
    elif state == "failed":
        reasons.append(f"failed last time: {(rec.get('error') or '?')[:300]}")
    elif state == "queued":
        reasons.append("queued by a run that did not get to it")
    elif state != "done":
        reasons.append(f"unknown state {state!r}")
    maybe = []
    if rec.get("fingerprint") != step.fingerprint:
        changed = config_diff(rec.get("config") or {}, step.config)
        recorded = rec.get("inputs") or {}
        for key, ref in step.refs.items():
            old = recorded.get(key) or {}
            if old.get("fingerprint") == step.input_fps[key] or old.get("ref") != ref.text:
                continue  # unchanged, or the reference itself changed (in the diff above)
            if ref.step == PARAMS:
                changed.append(f"input {key} <- {ref.text} changed: "
                               f"{_show(old.get('value'))} -> {_show(_param(plan.recipe, ref))}")
            else:
                changed.append(f"input {key} <- {ref.text} changed: step {ref.step} changed")
        reasons += changed or [f"fingerprint changed ({step.spec.kind} step definition)"]
    elif state == "done":
        problem = step.kind.check(rec.get("outputs") or {})
        if problem:
            reasons.append(f"outputs not trusted: {problem}")
        for key, ref in step.refs.items():
            if ref.step == PARAMS:
                continue
            current = known.get(ref.step)
            if current is None:
                maybe.append(ref.step)
            elif current.get(ref.output) != ((rec.get("inputs") or {}).get(key) or {}).get("value"):
                reasons.append(f"input {key} <- {ref.text} has a new value: step {ref.step} "
                               "reran with other outputs")
    if reasons:
        return "run", reasons
    if maybe:
        ups = ", ".join(sorted(set(maybe)))
        return "maybe", [f"runs only if {ups} gives other outputs when it reruns"]
    return "up to date", []


def _busy(plan: Plan, records: Mapping[str, dict | None]) -> None:
    for name, rec in records.items():
        if _alive(rec):
            raise UserError(f"recipe {plan.recipe.name}: step {name} is being run by pid "
                            f"{rec['pid']} on {rec['host']} (since {rec.get('start')}); wait "
                            f"for it, or stop it first ({_state_path(plan, name)})")


VERDICTS = {"run": "would run", "up to date": "up to date", "maybe": "may run",
            "running": "running"}


def dry_run(plan: Plan, force: str | None) -> str:
    """Which steps would run and why; reads only the state files, runs nothing."""
    width = max(map(len, plan.steps))
    lines = [f"recipe {plan.recipe.name}: {len(plan.steps)} steps, state in {plan.state_dir}"
             " (dry run: nothing runs)"]
    known: dict[str, dict | None] = {}
    for step in plan.steps.values():
        rec = read_state(plan, step.name)
        if _alive(rec):
            verdict, reasons = "running", [f"by pid {rec['pid']} on {rec['host']} since "
                                           f"{rec.get('start')}"]
        else:
            verdict, reasons = decide(plan, step, rec, force == step.name, known)
        known[step.name] = (rec or {}).get("outputs") if verdict == "up to date" else None
        lines.append(f"  {step.name:<{width}}  {VERDICTS[verdict]:<10}  "
                     f"{step.spec.kind} {step.spec.experiment}".rstrip())
        lines += [f"  {'':<{width}}    {reason}" for reason in reasons]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# running


def _write(plan: Plan, name: str, rec: dict) -> None:
    write_json_atomic(_state_path(plan, name), rec)


def _input_values(plan: Plan, step: Step, outputs: Mapping[str, dict]) -> dict[str, Any]:
    return {key: _param(plan.recipe, ref) if ref.step == PARAMS else
            outputs[ref.step][ref.output] for key, ref in step.refs.items()}


def _check_tokenizer(plan: Plan, step: Step, out: dict, outputs: Mapping[str, dict]) -> None:
    """A step bound to a tokenizer step's settings must have used that very tokenizer
    (distillation compares distributions over token ids: a silent mismatch would be wrong)."""
    for key, ref in step.refs.items():
        if ref.step == PARAMS or not isinstance(plan.steps[ref.step].kind, Tokenizer):
            continue
        want, got = outputs[ref.step]["fingerprint"], out.get("tokenizer")
        if got and got != want:
            raise UserError(f"step {step.name}: trained with tokenizer {got[:12]}, not step "
                            f"{ref.step}'s {want[:12]} ({key} <- {ref.text}): give it the "
                            f"tokenizer step's data (root, domains, train_file, text_field)")


def run_step(plan: Plan, step: Step, index: int, reasons: list[str], forced: bool,
             outputs: Mapping[str, dict], previous: dict | None, log: Log) -> dict:
    values = _input_values(plan, step, outputs)
    typed = _validate(step, values)
    rec = {"recipe": plan.recipe.name, "step": step.name, "index": index,
           "kind": step.spec.kind, "experiment": step.spec.experiment, "state": "running",
           "pid": os.getpid(), "host": socket.gethostname(), "start": _now(),
           "fingerprint": step.fingerprint, "config": step.config,
           "inputs": {key: {"ref": ref.text, "fingerprint": step.input_fps[key],
                            "value": _jsonable(values[key])} for key, ref in step.refs.items()},
           "outputs": {}, "reasons": reasons, "runs": (previous or {}).get("runs", 0) + 1}
    _write(plan, step.name, rec)
    log(f"recipe: [{index + 1}/{len(plan.steps)}] {step.name} ({step.spec.kind} {step.label}): "
        f"running: {'; '.join(reasons)}")
    t0 = time.perf_counter()
    ctx = StepContext(plan.runs_root, step.name, forced,
                      {**step.overrides, **{k: v["value"] for k, v in rec["inputs"].items()}},
                      log)
    try:
        out = _jsonable(step.kind.run(typed, ctx))
        _check_tokenizer(plan, step, out, outputs)
    except BaseException as e:
        rec.update(state="failed", end=_now(), error=f"{type(e).__name__}: {e}"[:2000])
        _write(plan, step.name, rec)
        raise
    rec.update(state="done", end=_now(), seconds=round(time.perf_counter() - t0, 2),
               outputs=out, summary=step.kind.describe(out))
    _write(plan, step.name, rec)
    log(f"recipe: {step.name} done in {rec['seconds']:.1f}s: {rec['summary']}")
    return out


def execute(plan: Plan, force: str | None = None, log: Log = print) -> dict[str, dict]:
    """Runs what is missing, in order; returns each step's outputs."""
    records = {name: read_state(plan, name) for name in plan.steps}
    _busy(plan, records)
    outputs: dict[str, dict] = {}
    ran = []
    # steps sure to run are marked queued first, so `gx ls` shows what this run has ahead
    certain: dict[str, dict | None] = {}
    for index, step in enumerate(plan.steps.values()):
        rec = records[step.name]
        verdict, _ = decide(plan, step, rec, force == step.name, certain)
        certain[step.name] = (rec or {}).get("outputs") if verdict == "up to date" else None
        if verdict == "run":
            _write(plan, step.name, {**(rec or {}), "recipe": plan.recipe.name,
                                     "step": step.name, "index": index,
                                     "kind": step.spec.kind, "experiment": step.spec.experiment,
                                     "state": "queued", "pid": os.getpid(),
                                     "host": socket.gethostname(), "queued": _now()})
    for index, step in enumerate(plan.steps.values()):
        rec = records[step.name]
        verdict, reasons = decide(plan, step, rec, force == step.name, outputs)
        if verdict == "up to date":
            log(f"recipe: [{index + 1}/{len(plan.steps)}] {step.name}: up to date "
                f"({rec.get('summary') or rec.get('fingerprint', '')[:12]})")
            outputs[step.name] = rec["outputs"]
            continue
        outputs[step.name] = run_step(plan, step, index, reasons, force == step.name, outputs,
                                      rec, log)
        ran.append(step.name)
    log(f"recipe {plan.recipe.name}: {len(ran)} of {len(plan.steps)} steps ran"
        + (f" ({', '.join(ran)})" if ran else ", all up to date") + f"; state in {plan.state_dir}")
    return outputs


def main(spec: str, overrides: Sequence[str], runs_root: Path, *, force: str | bool = False,
         dry_run_only: bool = False, log: Log = print) -> int:
    """`gx run RECIPE [--dry-run] [--force STEP]`."""
    recipe, path = load_recipe(spec, overrides)
    steps = ", ".join(recipe.steps)
    if force is True:
        raise UserError(f"--force: name the recipe step to rerun, --force STEP (steps: {steps})")
    if force and force not in recipe.steps:
        raise UserError(f"--force {force}: no such step in recipe {recipe.name} (steps: {steps})")
    plan = build_plan(recipe, path, runs_root)
    if dry_run_only:
        log(dry_run(plan, force or None))
        return 0
    execute(plan, force or None, log)
    return 0


# ---------------------------------------------------------------------------------------------
# gx ls


def shown_state(rec: dict) -> str:
    """`running` whose process is gone from this host is shown as interrupted."""
    state = rec.get("state", "?")
    if state == "running" and rec.get("host") == socket.gethostname() \
            and not pid_alive(rec.get("pid"), rec.get("host")):
        return "interrupted"
    return state


def format_states(runs_root: Path, name: str | None = None) -> str:
    """Each recipe's steps: state, what they produced, when; "" when there is none."""
    base = Path(runs_root) / "recipes"
    if not base.is_dir():
        return ""
    blocks = []
    for rdir in sorted(p for p in base.iterdir() if p.is_dir()):
        if name and rdir.name != name:
            continue
        recs = []
        for path in rdir.glob("*.json"):
            try:
                recs.append(json.loads(path.read_text()))
            except ValueError:
                recs.append({"step": path.stem, "state": "unreadable"})
        recs.sort(key=lambda r: (r.get("index", 1 << 30), r.get("step", "")))
        head = ("step", "kind", "state", "output", "time")
        rows = [(r.get("step", "?"), r.get("kind", "?"), shown_state(r), r.get("summary") or "-",
                 r.get("end") or r.get("start") or r.get("queued") or "") for r in recs]
        widths = [max(len(str(row[i])) for row in rows + [head]) for i in range(len(head))]
        lines = [f"recipe {rdir.name} ({rdir})"]
        lines += ["  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
                  for row in [head] + rows]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
