"""`gx eval RUN --data DIR`: a finished run's final checkpoint on another folder of domains.

The folder is tokenized with the run's own tokenizer (from the data cache recorded in the
run's config.json), into a temporary directory, and evaluated exactly as training evaluates:
fixed windows of seq_len+1 tokens from the start of each domain file, loss and bits per byte.
The result is printed and saved as `eval/<name>.json` in the run dir. The checkpoint is
restored onto the run's mesh preset and rules over the devices here (data parallel when they do
not fit), so a model trained sharded is evaluated sharded.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Callable

from gemini_core.config import MeshConfig, ModelConfig, OptimizerConfig
from gemini_core.data.tokenizer import Tokenizer
from gemini_core.data.tokens import encode_split
from gemini_core.errors import DamagedCheckpoint, DamagedFile, UserError
from gemini_core.eval.domain_loss import EvalSet, evaluate, format_table
from gemini_core.runs.checkpoint import Checkpointer
from gemini_core.runs.rundir import RunDir, write_json_atomic
from gemini_core.scale import sharding
from gemini_core.train import step_fns

Log = Callable[[str], None]


def _tokenizer(run: RunDir, cfg: dict) -> Tokenizer:
    path = Path(cfg.get("paths", {}).get("tokenizer", ""))
    if not (path / "spm.model").is_file():
        raise UserError(f"{run.path}: the run's tokenizer {path} is gone (was the data cache "
                        "deleted?); rerun the experiment to rebuild it")
    return Tokenizer(path)


def _layout(cfg: dict, log: Log) -> sharding.Layout:
    """The run's preset and rules on the devices here, the preset's axis taking what the others
    leave; pure data parallel when they do not fit (fsdp_tp needs 2 devices for `model`)."""
    mesh = cfg.get("placement", {}).get("mesh", {})
    wanted = MeshConfig(preset=mesh.get("preset", "dp"),
                        rules=mesh.get("rules") or MeshConfig().rules)
    try:
        layout = sharding.Layout.from_config(wanted)
    except UserError as e:
        log(f"eval: the run's mesh does not fit the devices here ({e}); data parallel instead")
        layout = sharding.Layout.from_config(MeshConfig())
    if layout.mesh.size > 1:
        log(f"eval: {wanted.preset} mesh over {layout.mesh.size} devices "
            f"({', '.join(f'{a}={n}' for a, n in layout.sizes.items())})")
    return layout


def _restore(run: RunDir, cfg: dict, layout: sharding.Layout):
    try:
        model_cfg = ModelConfig(**cfg["model"])
        opt_cfg = OptimizerConfig(**cfg["optimizer"])
    except TypeError as e:  # a field added or removed by hand
        raise DamagedFile(run.path / "config.json", str(e),
                          "run the same `gx run` command to rewrite it") from None
    # read-only: evaluating never moves, creates or cleans anything in the run's checkpoints
    ckpt = Checkpointer(run.checkpoints, keep=cfg["train"]["keep_checkpoints"], read_only=True)
    try:
        try:
            step = ckpt.latest_step()
        except DamagedCheckpoint as e:
            raise DamagedCheckpoint(e.path, e.step, e.problem,
                                    f"`gx run` the experiment again to resume {run.run_id} from "
                                    "its newest intact checkpoint, then evaluate") from None
        if step is None:
            raise UserError(f"{run.run_id} has no checkpoint yet ({run.checkpoints})")
        graphdef, like = step_fns.init_state(model_cfg, opt_cfg, cfg["train"]["steps"], cfg["seed"],
                                          layout)
        return graphdef, ckpt.restore(step, like), step
    finally:
        ckpt.close()


# what eval reads from a run's config.json, by section
_NEEDED = {"data": ("valid_file", "domains", "seq_len", "text_field", "on_bad_record",
                    "num_workers"),
           "train": ("eval_batches", "batch_size", "keep_checkpoints", "steps"),
           "model": (), "optimizer": ()}


def _config(run: RunDir) -> dict:
    """The run's config.json, with the fields eval reads present (one line naming a missing one)."""
    cfg = run.config()
    if not cfg:
        raise UserError(f"{run.path}: no config.json; not a run directory")
    missing = [] if "seed" in cfg else ["seed"]
    for section, keys in _NEEDED.items():
        part = cfg.get(section)
        missing += [section] if not isinstance(part, dict) else [
            f"{section}.{k}" for k in keys if k not in part]
    missing += [s for s in ("paths", "placement") if not isinstance(cfg.get(s, {}), dict)]
    if missing:
        raise DamagedFile(run.path / "config.json", f"no valid field {missing[0]}",
                          "run the same `gx run` command to rewrite it")
    return cfg


def evaluate_run(run: RunDir, data_dir: Path, *, split: str | None = None,
                 batches: int | None = None, log: Log = print) -> dict[str, float]:
    if batches is not None and batches <= 0:
        raise UserError(f"--batches={batches}: must be a positive number of batches per domain")
    if not data_dir.is_dir():
        what = "not a directory" if data_dir.exists() else "no such directory"
        raise UserError(f"--data={str(data_dir)!r}: {what} (a folder with one folder per domain)")
    cfg = _config(run)
    data, train = cfg["data"], cfg["train"]
    split = split or data["valid_file"]
    batches = batches or train["eval_batches"]
    tokenizer = _tokenizer(run, cfg)
    layout = _layout(cfg, log)
    graphdef, state, step = _restore(run, cfg, layout)
    with tempfile.TemporaryDirectory(dir=run.path) as tmp:
        encoded = encode_split(tokenizer, data_dir, data["domains"], split, Path(tmp),
                               split="eval", text_field=data["text_field"],
                               on_bad_record=data["on_bad_record"],
                               num_workers=data["num_workers"], log=log)
        evalset = EvalSet.build({d: e.tokens for d, e in encoded.items()},
                                tokenizer.token_bytes(), seq_len=data["seq_len"],
                                batch_size=train["batch_size"], batches=batches)
        metrics = evaluate(step_fns.make_eval_step(graphdef, layout), state, evalset,
                           train["batch_size"])
        sources = {d: e.entry["sha256"] for d, e in encoded.items()}
    log(f"{run.run_id} at step {step} on {data_dir} ({split}, {evalset.tokens:,} tokens):")
    log(format_table(metrics))
    name = hashlib.sha256(repr(sorted(sources.items())).encode()).hexdigest()[:12]
    out = run.path / "eval" / f"{split.split('.')[0]}-{name}.json"
    write_json_atomic(out, {"run_id": run.run_id, "step": step, "data": str(data_dir.absolute()),
                            "split": split, "sources": sources, "batches": batches,
                            "metrics": metrics})
    log(f"saved {out}")
    return metrics
