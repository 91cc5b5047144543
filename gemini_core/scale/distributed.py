"""Multi-host JAX: one `gx run` process per host, joined by `jax.distributed.initialize`.

Every process runs the same program on the same config (a single-controller view of one global
mesh, as the Gemini reports describe): each computes the same global batch and feeds its own
devices' slices (gemini_core.scale.sharding.Layout.place_batch); orbax writes and restores each
process's shards of a checkpoint. Process 0 alone writes the run directory's records (config,
status, metrics, summary) and W&B; decisions that depend on those files are taken by process 0
and broadcast (`agree`), so hosts without a shared filesystem still act as one.

Settings, config first, then the environment: coordinator address (config, GX_COORDINATOR_
ADDRESS, JAX_COORDINATOR_ADDRESS), number of processes (config, GX_NUM_PROCESSES), process id
(config, GX_PROCESS_ID). mode "env" initializes when a coordinator is known and stays a single
process otherwise; "auto" calls `jax.distributed.initialize()` with whatever is set and lets JAX
detect the rest (Cloud TPU VMs, SLURM, Open MPI, Kubernetes); "off" never initializes.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax
import numpy as np

from gemini_core.config import DistributedConfig
from gemini_core.errors import UserError

ENV_ADDRESS = ("GX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")
ENV_NUM_PROCESSES = "GX_NUM_PROCESSES"
ENV_PROCESS_ID = "GX_PROCESS_ID"


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"${name}={raw!r}: expected an integer") from None


def settings(cfg: DistributedConfig, env: Mapping[str, str] = os.environ) -> dict | None:
    """kwargs for jax.distributed.initialize, or None for a single process (no initialize)."""
    if cfg.mode == "off":
        return None
    address = cfg.coordinator_address or next(
        (env[v].strip() for v in ENV_ADDRESS if env.get(v, "").strip()), "")
    num = cfg.num_processes or _env_int(env, ENV_NUM_PROCESSES)
    pid = cfg.process_id if cfg.process_id >= 0 else _env_int(env, ENV_PROCESS_ID)
    kwargs = {"coordinator_address": address or None, "num_processes": num, "process_id": pid}
    if cfg.mode == "auto":
        return kwargs  # unset ones (None) are detected by JAX
    if not address:
        if num not in (None, 1) or pid not in (None, 0):
            raise UserError(f"config.distributed.coordinator_address='': a process count "
                            f"({num}) or id ({pid}) is set but no coordinator (set it, or "
                            f"${ENV_ADDRESS[0]}, to host:port of process 0)")
        return None
    if num is None or pid is None:
        missing = "num_processes" if num is None else "process_id"
        env_name = ENV_NUM_PROCESSES if num is None else ENV_PROCESS_ID
        raise UserError(f"config.distributed.{missing}: not set, but a coordinator "
                        f"({address}) is; set it or ${env_name} (or mode=auto to let JAX "
                        "detect it)")
    if num < 1 or not 0 <= pid < num:
        raise UserError(f"config.distributed.process_id={pid}: must be in [0, num_processes="
                        f"{num})")
    return kwargs


def initialize(cfg: DistributedConfig) -> bool:
    """Joins the job when configured; call once, before any JAX computation. True if joined."""
    kwargs = settings(cfg)
    if kwargs is None:
        return False
    if jax.distributed.is_initialized():
        return True
    # CPU collectives across processes (tests, CPU clusters) go through gloo; a no-op elsewhere
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    return True


def is_primary() -> bool:
    return jax.process_index() == 0


def agree(value: int) -> int:
    """Process 0's value on every process (a decision taken from files only it may see)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
