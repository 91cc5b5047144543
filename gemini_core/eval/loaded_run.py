"""A finished (or checkpointed) run, loaded for inference: its model, tokenizer and mesh.

Every reader of a run's weights goes through `load_run`: `gx eval` (held-out data and downstream
tasks), `gx generate`, the lm-evaluation-harness adapter. The checkpoint is restored onto the
run's mesh preset and rules over the devices here (data parallel when they do not fit), so a
model trained sharded is evaluated sharded; the run's directory is only read, never changed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from flax import nnx

from gemini_core.config import MeshConfig, OptimizerConfig, model_from_json
from gemini_core.data.media_data import load_media
from gemini_core.data.tokenizer import Tokenizer
from gemini_core.errors import DamagedCheckpoint, DamagedFile, UserError
from gemini_core.runs.checkpoint import Checkpointer
from gemini_core.runs.rundir import RunDir
from gemini_core.scale import sharding
from gemini_core.train import step_fns

Log = Callable[[str], None]

# what readers take from a run's config.json, by section
_NEEDED = {"data": ("valid_file", "domains", "seq_len", "text_field", "on_bad_record",
                    "num_workers"),
           "train": ("eval_batches", "batch_size", "keep_checkpoints", "steps"),
           "model": (), "optimizer": ()}


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    run: RunDir
    cfg: dict  # the run's config.json
    tokenizer: Tokenizer
    layout: sharding.Layout
    graphdef: nnx.GraphDef  # of the train state (model + optimizer)
    state: Any  # the restored train state, on `layout`
    step: int

    @property
    def model(self):
        """The Transformer with the restored parameters (shares the state's arrays)."""
        return nnx.merge(self.graphdef, self.state).model

    @property
    def seq_len(self) -> int:
        return int(self.cfg["data"]["seq_len"])

    def media(self):
        """The run's modality data (gemini_core.data.media_data.MediaData), None without any:
        its held-out items' labels and captions, from the data cache the run recorded."""
        path = self.cfg.get("paths", {}).get("media_cache")
        if not self.cfg["model"].get("media"):
            return None
        if not path or not (Path(path) / "manifest.json").is_file():
            raise UserError(f"{self.run.path}: its media data {path!r} is gone (the data cache "
                            "was removed): rerun the config to rebuild it")
        return load_media(Path(path))


def run_config(run: RunDir) -> dict:
    """The run's config.json, with the fields readers need present (one line naming a missing
    one)."""
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


def run_tokenizer(run: RunDir, cfg: dict) -> Tokenizer:
    path = Path(cfg.get("paths", {}).get("tokenizer", ""))
    if not (path / "spm.model").is_file():
        raise UserError(f"{run.path}: the run's tokenizer {path} is gone (was the data cache "
                        "deleted?); rerun the experiment to rebuild it")
    return Tokenizer(path)


def run_layout(cfg: dict, log: Log) -> sharding.Layout:
    """The run's preset and rules on the devices here, the preset's axis taking what the others
    leave; pure data parallel when they do not fit (fsdp_tp needs 2 devices for `model`)."""
    mesh = cfg.get("placement", {}).get("mesh", {})
    wanted = MeshConfig(preset=mesh.get("preset", "dp"),
                        rules=mesh.get("rules") or MeshConfig().rules)
    try:
        layout = sharding.Layout.from_config(wanted)
    except UserError as e:
        log(f"the run's mesh does not fit the devices here ({e}); data parallel instead")
        layout = sharding.Layout.from_config(MeshConfig())
    if layout.mesh.size > 1:
        log(f"{wanted.preset} mesh over {layout.mesh.size} devices "
            f"({', '.join(f'{a}={n}' for a, n in layout.sizes.items())})")
    return layout


def _restore(run: RunDir, cfg: dict, layout: sharding.Layout):
    try:
        model_cfg = model_from_json(cfg["model"])
        opt_cfg = OptimizerConfig(**cfg["optimizer"])
    except TypeError as e:  # a field added or removed by hand
        raise DamagedFile(run.path / "config.json", str(e),
                          "run the same `gx run` command to rewrite it") from None
    # read-only: reading never moves, creates or cleans anything in the run's checkpoints
    ckpt = Checkpointer(run.checkpoints, keep=cfg["train"]["keep_checkpoints"], read_only=True)
    try:
        try:
            step = ckpt.latest_step()
        except DamagedCheckpoint as e:
            raise DamagedCheckpoint(e.path, e.step, e.problem,
                                    f"`gx run` the experiment again to resume {run.run_id} from "
                                    "its newest intact checkpoint, then evaluate") from None
        if step is None:
            raise UserError(f"{run.run_id} has no checkpoint yet ({run.checkpoints}): train it "
                            "first (`gx run`), or wait for its first checkpoint")
        graphdef, like = step_fns.init_state(model_cfg, opt_cfg, cfg["train"]["steps"], cfg["seed"],
                                             layout)
        return graphdef, ckpt.restore(step, like), step
    finally:
        ckpt.close()


def load_run(run: RunDir, log: Log = print) -> LoadedRun:
    """The run's newest intact checkpoint with its tokenizer, on the run's mesh here."""
    cfg = run_config(run)
    tokenizer = run_tokenizer(run, cfg)
    layout = run_layout(cfg, log)
    graphdef, state, step = _restore(run, cfg, layout)
    return LoadedRun(run, cfg, tokenizer, layout, graphdef, state, step)
