"""Orbax checkpoints of the train state: async, keep the last N, exact restore.

A checkpoint is only visible once orbax has finalized it (it writes to a temporary folder and
renames), so a process killed mid-save leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging

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


class Checkpointer:
    def __init__(self, directory: Path, keep: int, async_save: bool = True):
        # cleanup_tmp_directories: the temporary folder of a save a kill cut short goes at the
        # next start (it is never picked up as a checkpoint, but it holds disk)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        # async: the device->host copy happens now, the file writes overlap with training
        self._manager.save(step, args=ocp.args.StandardSave(state))

    def restore(self, step: int, like: Any) -> Any:
        # `like`'s shardings come along (ShapeDtypeStruct.sharding): each process reads only its
        # devices' shards, onto the mesh of this run, whatever mesh or process count saved it
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
