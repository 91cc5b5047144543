"""What each kind of recipe step does: its config schema, validation, outputs, how it runs its
library call, and when its recorded outputs can no longer be trusted. The sweep kind lives in
sweep_step.py; load.STEP_KINDS lists them all."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

from gemini_core import config as config_lib
from gemini_core import experiment as experiment_lib
from gemini_core.errors import UserError
from gemini_core.runs.rundir import read_json
from gx.recipe.refs import Ref
from gx.recipe.tree import defaults, jsonable

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class StepContext:
    runs_root: Path
    name: str
    force: bool  # --force names this step: redo its work, not only reuse it
    overrides: dict  # the fields the recipe sets over the experiment's own (for `gx show`)
    log: Log


class StepKind:
    """What one kind of step does. A new kind subclasses this and is added to load.STEP_KINDS."""

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

    def check_paths(self, typed: Any, pending: Collection[str]) -> None:
        """The paths the step reads exist and are of the right kind (in a dry run too), but for
        the fields in `pending` (dotted): upstream steps' outputs, not written yet."""

    def check_refs(self, name: str, refs: Mapping[str, Ref],
                   kinds: Mapping[str, "StepKind"]) -> None:
        """Kind-specific rules on what step `name`'s inputs must be (see Distill); `kinds`: the
        kind of every step of the recipe, by name."""

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
    """`gx data prepare`: a cleaned data root (gemini_core/data/curation)."""

    outputs = ("data_root", "fingerprint", "content")
    not_identity = ("workers", "strict")

    @property
    def schema(self):
        from gemini_core.data.curation.config import CurationConfig
        return CurationConfig

    def base_config(self, path: Path | None, arg: str | None, where: str) -> dict:
        from gemini_core.data.curation.config import without_off_sections
        return without_off_sections(super().base_config(path, arg, where))  # fingerprints kept

    def validate(self, cfg: dict) -> Any:
        from gemini_core.data.curation import config as curation_config
        return curation_config.from_config_dict(cfg, paths=False)

    def check_paths(self, typed: Any, pending: Collection[str]) -> None:
        from gemini_core.data.curation import config as curation_config
        curation_config.check_paths(typed, skip=pending)

    def run(self, typed: Any, ctx: StepContext) -> dict:
        from gemini_core.data.curation import pipeline
        out = pipeline.prepare(typed, ctx.runs_root, force=ctx.force, log=ctx.log)
        return {"data_root": str(out), "fingerprint": pipeline.read_report(out)["fingerprint"],
                "content": tree_digest(out)}

    def check(self, outputs: dict) -> str | None:
        report = read_json(Path(outputs["data_root"]) / "report.json")
        if report is None:
            return f"data root {outputs['data_root']} is gone"
        if report.get("fingerprint") != outputs["fingerprint"]:
            return f"data root {outputs['data_root']} was rebuilt from another config"
        return None

    def describe(self, outputs: dict) -> str:
        return outputs.get("data_root", "")


def data_without(data: config_lib.DataConfig, pending: Collection[str],
                 prefix: str) -> config_lib.DataConfig:
    """`data` with its path fields that are in `pending` (as `<prefix><field>`) left unset, so
    that config_lib.check_paths passes over them."""
    return dataclasses.replace(data, **{f: "" for f in ("root", "schedule", "cache_dir")
                                        if prefix + f in pending})


def tree_digest(root: Path) -> str:
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
    train_file: str = "train.jsonl.gz"
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
        base = defaults(TokenizerStepConfig)
        base.update(root="", tokenizer=defaults(config_lib.TokenizerConfig))
        return base

    def validate(self, cfg: dict) -> Any:
        tc = config_lib.to_dataclass(cfg, TokenizerStepConfig, "config")
        if tc.tokenizer.sample_weights == "mixture":
            raise UserError("config.tokenizer.sample_weights='mixture': a tokenizer step has no "
                            "mixture; use natural or uniform (one tokenizer for every mixture)")
        config_lib.check_data(tc.data())
        return tc

    def check_paths(self, typed: Any, pending: Collection[str]) -> None:
        try:
            config_lib.check_paths(data_without(typed.data(), pending, ""))
        except UserError as e:  # its fields are at the top of the step's config, not under data
            raise UserError(str(e).replace("config.data.", "config.", 1)) from None

    def static_outputs(self, typed: Any) -> dict:
        return {"settings": jsonable(typed.tokenizer)}

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

    def check_paths(self, typed: Any, pending: Collection[str]) -> None:
        config_lib.check_paths(data_without(typed.data, pending, "data."))

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
    of an upstream train step (gemini_core/train/distill.py)."""

    def check_refs(self, name: str, refs: Mapping[str, Ref],
                   kinds: Mapping[str, StepKind]) -> None:
        ref = refs.get("distill.teacher")
        where = f"config.steps.{name}.inputs.distill.teacher"
        if ref is None:
            raise UserError(f"{where}: a distill step takes its teacher from a train step's "
                            "output: set it to 'ref:<train step>.run_id'")
        if ref.is_param or not isinstance(kinds[ref.step], Train) or ref.output != "run_id":
            raise UserError(f"{where}={ref.text!r}: the teacher must be a train step's run_id "
                            "('ref:<train step>.run_id')")
