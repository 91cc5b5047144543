"""Orbax checkpoints of the train state: async, keep the last N, exact restore, verified resume.

A checkpoint is only visible once orbax has finalized it (it writes to a temporary folder and
renames), so a process killed mid-save leaves the previous checkpoint as the latest one. Damage
from outside (a truncated or deleted file: a full disk, a copy cut short) is found before a
resume uses a checkpoint: the newest one is read back whole (`verify`), and a damaged one is
moved aside to `<step>.damaged` so that the run resumes from the newest intact one, saying which
and why. A read-only user (`gx eval`) gets one line naming the damage instead.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from gemini_core.errors import DamagedCheckpoint

Log = Callable[[str], None]
DAMAGED_SUFFIX = ".damaged"  # orbax takes only all-digit (or prefix_<digits>) names for steps
TMP_MARK = ".orbax-checkpoint-tmp"  # <step>.orbax-checkpoint-tmp-<time>: a save not finalized


# Orbax splits the writing of a replicated array over its replicas, one compiled slice per
# replica and array; for small arrays (norm scales, step counts, every parameter of a
# data-parallel run of a small model) that costs more than it saves: 72 compiles per save on 8
# CPU devices for a 1-layer model. Replicated arrays under 1 MiB per slice are written whole.
def _register_array_handler() -> None:
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax warns on every override
    try:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=2**20),
            override=True)
    finally:
        absl_logging.set_verbosity(verbosity)


_register_array_handler()


def step_dirs(directory: Path) -> dict[int, Path]:
    """Finalized checkpoints by step (orbax's temporary folders and damaged ones left out)."""
    if not Path(directory).is_dir():
        return {}
    return {int(p.name): p for p in Path(directory).iterdir() if p.name.isdigit() and p.is_dir()}


def _read_metadata(item: Path) -> dict:
    meta = json.loads((item / "_METADATA").read_text())
    if not isinstance(meta, dict) or not isinstance(meta.get("tree_metadata"), dict):
        raise ValueError("_METADATA has no tree_metadata")
    return meta


def _array_spec(item: Path, meta: dict, key: str) -> dict:
    """The TensorStore spec orbax wrote an array with (zarr or zarr3, in OCDBT or plain files)."""
    driver = "zarr3" if meta.get("use_zarr3") else "zarr"
    if meta.get("use_ocdbt", True):
        kvstore = {"driver": "ocdbt", "base": f"file://{item.absolute()}", "path": key}
    else:
        kvstore = {"driver": "file", "path": str(item.absolute() / key)}
    return {"driver": driver, "kvstore": kvstore}


def verify(step_dir: Path) -> str | None:
    """Why the checkpoint in `step_dir` cannot be restored whole; None when it can.

    Reads every array back, one at a time (host memory: the largest array), so a truncated or
    missing data file is found; orbax stores no checksums, so a flipped bit inside an array is
    not."""
    import tensorstore as ts

    for name in ("_CHECKPOINT_METADATA", "default/_METADATA"):
        if not (step_dir / name).is_file():
            return f"{name} is missing"
    item = step_dir / "default"
    try:
        json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())
        meta = _read_metadata(item)
    except (ValueError, OSError) as e:
        return f"its metadata is unreadable: {_first_line(e)}"
    for leaf in meta["tree_metadata"].values():
        value = leaf.get("value_metadata", {}) if isinstance(leaf, dict) else {}
        if value.get("skip_deserialize") or value.get("value_type") not in (
                "jax.Array", "np.ndarray"):
            continue  # scalars and strings live in _METADATA itself
        key = ".".join(str(k["key"]) for k in leaf.get("key_metadata", ()))
        try:
            ts.open(_array_spec(item, meta, key), open=True, read=True).result().read().result()
        except Exception as e:  # TensorStore raises ValueError/OSError flavours per backend
            return f"{key}: {_first_line(e)}"
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _remove_unfinished(directory: Path) -> None:
    """The temporary folder of a save a kill cut short (never picked up as a checkpoint, but it
    holds disk). Done here, before orbax starts, rather than by orbax's cleanup_tmp_directories:
    that runs in a thread which, in a process that ends soon after (`gx eval` on a run without a
    checkpoint), dies at interpreter shutdown with a traceback."""
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        if TMP_MARK in path.name and path.name.split(".", 1)[0].isdigit():
            shutil.rmtree(path, ignore_errors=True)


def _quarantine(step_dir: Path) -> Path:
    """Moves a damaged checkpoint out of orbax's sight, kept for inspection (delete it freely)."""
    target = step_dir.with_name(step_dir.name + DAMAGED_SUFFIX)
    n = 1
    while target.exists():
        n += 1
        target = step_dir.with_name(f"{step_dir.name}{DAMAGED_SUFFIX}{n}")
    os.replace(step_dir, target)
    return target


class Checkpointer:
    """`read_only`: for a reader of another run's checkpoints (`gx eval`, a distillation
    teacher): creates, cleans and moves nothing, and a damaged newest checkpoint is an error."""

    def __init__(self, directory: Path, keep: int, async_save: bool = True, *,
                 read_only: bool = False, log: Log = print):
        self._directory = Path(directory).absolute()
        self._read_only = read_only
        self._log = log
        self._verified = False
        if not read_only and jax.process_index() == 0:
            _remove_unfinished(self._directory)
        # not orbax's own read_only option: it warns twice on every use; a reader never saves
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep, enable_async_checkpointing=async_save,
            create=not read_only)
        self._manager = None
        if not read_only or self._directory.is_dir():
            self._manager = ocp.CheckpointManager(self._directory, options=self._options)

    def latest_step(self) -> int | None:
        """The newest step to resume from. The first call verifies it: a damaged one is moved
        aside (read-only: raises DamagedCheckpoint) and the next older one is tried."""
        if self._manager is None:
            return None
        if not self._verified:
            self._verify_latest()
            self._verified = True
        return self._manager.latest_step()

    def _verify_latest(self) -> None:
        steps = step_dirs(self._directory)
        damaged: list[str] = []
        chosen = None
        if jax.process_index() == 0:
            for step in sorted(steps, reverse=True):
                problem = verify(steps[step])
                if problem is None:
                    chosen = step
                    break
                if self._read_only:
                    raise DamagedCheckpoint(steps[step], step, problem)
                moved = _quarantine(steps[step])
                damaged.append(f"step {step} ({problem}; moved to {moved.name})")
        if jax.process_count() > 1:  # process 0 decided and moved; the others follow
            from jax.experimental import multihost_utils
            multihost_utils.broadcast_one_to_all(np.int64(-1 if chosen is None else chosen))
        if damaged or jax.process_count() > 1:
            self._manager.reload()
        if damaged:
            where = (f"resuming from step {chosen}, the newest intact one" if chosen is not None
                     else "no intact checkpoint is left: starting from step 0")
            self._log(f"warning: damaged checkpoint {'; '.join(damaged)} in {self._directory}: "
                      f"{where}")

    def save(self, step: int, state: Any) -> None:
        # async: the device->host copy happens now, the file writes overlap with training
        self._manager.save(step, args=ocp.args.StandardSave(state))

    def restore(self, step: int, like: Any) -> Any:
        # `like`'s shardings come along (ShapeDtypeStruct.sharding): each process reads only its
        # devices' shards, onto the mesh of this run, whatever mesh or process count saved it
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception:
            # damage that appeared since latest_step() verified it: one line, not TensorStore's
            problem = verify(self._directory / str(step))
            if problem is None:
                raise
            raise DamagedCheckpoint(self._directory / str(step), step, problem) from None

    def wait(self) -> None:
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self) -> None:
        if self._manager is None:
            return
        self._manager.wait_until_finished()
        self._manager.close()
