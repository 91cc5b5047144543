"""Faults inside one training process: in-memory snapshots and rollback, silent-data-corruption
(SDC) checks, preemption by SIGTERM, and a replica of the newest good state in a Ray actor.

The Gemini reports recover from failures by restoring redundant in-memory copies of the model
state instead of reading a checkpoint back, and recompute steps to catch hardware that computes
wrongly without crashing. Here, as the train loop (gemini_core.train.trainer._loop) uses it:

    guard.begin(start, state)              the starting state is the first snapshot
    guard.step(compute, state, step)       the step; computed twice and compared when a check is due
    guard.settle(step, metrics)            one step late: a non-finite loss or gradient norm
                                           raises Rollback(step, state) to the newest good snapshot
    guard.after_step(done, state)          every `snapshot_every` steps a copy to host memory
    guard.stop_requested()                 SIGTERM arrived: checkpoint and stop (errors.Preempted)

Rollback is exact. The batch at step s is a pure function of (seed, s, schedule, manifest) and
the step is deterministic, so replaying from a snapshot computes bit for bit what a fault-free
run would have: a transient fault costs the replayed steps and nothing else, and a non-finite
step that comes back at the same step after a rollback is not transient (bad data, a diverged
run): the run stops at once with a message saying so, instead of rolling back forever.

A snapshot is only trusted once the step before it is known good (its metrics are fetched one
step late), so rollbacks and the Ray replica only ever use states that led to finite steps.
Checkpoints on disk stay the recovery for whole-job restarts; the in-memory copies are for
faults the process survives, and the replica for a process Ray restarts.

Pieces: state_copies (host copies, bit fingerprints), replica (the Ray replica), fault_hooks
(the test hooks GX_TEST_FLIP_BIT and GX_TEST_NAN).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from gemini_core.config import FaultsConfig
from gemini_core.errors import TrainingStopped
from gemini_core.scale.fault_hooks import ENV_FLIP, ENV_NAN, flip_bit, parse_hook, pick_leaf, poison
from gemini_core.scale.replica import replica_holder, replica_holders, replica_key, running_ray
from gemini_core.scale.state_copies import differing_devices, fingerprint, to_device, to_host

Log = Callable[[str], None]
EVENTS_FILE = "faults.jsonl"  # one JSON object per fault event, in the run directory


class Rollback(Exception):
    """Raised by Guard.settle: training continues at step `step` (0-based) from `state`."""

    def __init__(self, step: int, state: Any):
        super().__init__(f"rollback to step {step}")
        self.step, self.state = step, state


@dataclasses.dataclass
class Snapshot:
    step: int  # steps done: the state before 0-based step `step`
    host: concurrent.futures.Future  # -> to_host(...)
    replicated: bool = False


class Guard:
    """Snapshots, rollback, SDC checks and SIGTERM handling for one training process."""

    def __init__(self, cfg: FaultsConfig, run_dir: Path, *, run_id: str, fingerprint: str,
                 log: Log = print):
        self.cfg, self.log = cfg, log
        self.run_id, self.fp = run_id, fingerprint
        self.key = replica_key(run_id, run_dir)
        self.events_path = Path(run_dir) / EVENTS_FILE
        self.flip_hook = parse_hook(ENV_FLIP, os.environ.get(ENV_FLIP), flip=True)
        self.nan_hook = parse_hook(ENV_NAN, os.environ.get(ENV_NAN), flip=False)
        self.counts = {"rollbacks": 0, "snapshots": 0, "sdc_checks": 0, "sdc_mismatches": 0}
        self.preempt_requested = False
        self._prev_handler: Any = None
        self._snapshots: list[Snapshot] = []
        self._failed: dict[int, int] = {}  # 1-based step that was non-finite -> rolled back to
        self._good_through = -1  # newest 0-based step whose metrics were finite
        self._logged_through = -1  # newest 0-based step whose metrics went to the log
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gx-snapshot")
        self._replica = None
        self._announced = False

    # -- lifecycle

    def __enter__(self) -> Guard:
        # only the main thread may install handlers (a Ray Tune trial runs in a worker thread:
        # there Ray itself handles termination)
        if threading.current_thread() is threading.main_thread():
            self._prev_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        if self._prev_handler is not None:
            signal.signal(signal.SIGTERM, self._prev_handler)
            self._prev_handler = None
        # pending host copies and replica pushes finish: a trainer failing right after a good
        # snapshot still leaves it with the replica
        self._pool.shutdown(wait=True)

    def _on_sigterm(self, signum, frame) -> None:
        # a flag only: printing here could re-enter a write the main thread was in the middle of
        self.preempt_requested = True
        signal.signal(signal.SIGTERM, self._prev_handler or signal.SIG_DFL)  # a second one kills
        self._prev_handler = None

    def stop_requested(self) -> bool:
        """SIGTERM reached this process, or, multi-host, any process: all stop after the same
        step (one tiny collective a step, only with several processes)."""
        stop = self.preempt_requested
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            stop = bool(np.asarray(multihost_utils.process_allgather(np.int32(stop))).any())
        if stop and not self._announced:
            self._announced = True
            self.log("SIGTERM: finishing this step, then a checkpoint and exit (SIGTERM again "
                     "stops at once)")
        return stop

    def begin(self, start: int, state: Any) -> None:
        """Records the state's layout and snapshots the starting state (known good)."""
        paths_leaves, self._treedef = jax.tree_util.tree_flatten_with_path(state)
        self._names = [jax.tree_util.keystr(k) for k, _ in paths_leaves]
        leaves = [x for _, x in paths_leaves]
        self._like = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
        self._shardings = [x.sharding for x in leaves]
        # a copy on the device, dispatched asynchronously: the next step may donate `state`
        # while the copy is fetched to host memory in the background
        self._copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t),
                             out_shardings=jax.tree.map(lambda x: x.sharding, state))
        self._good_through = self._logged_through = start - 1
        if self.flip_hook is not None:
            self._flip_leaf = pick_leaf(self._names, leaves, self.flip_hook.leaf)
        if self.cfg.replica and running_ray() is not None:
            self._replica = replica_holder(running_ray())
        if self.cfg.snapshot_every:
            self.take_snapshot(start, state)

    def finish(self) -> None:
        """The run is done (called after the `with`: the pushes were all sent, and a holder runs
        one caller's calls in order): its replica is no longer needed."""
        if self._replica is not None:
            self._replica.drop.remote(self.key)
            self._replica = None

    def summary(self) -> dict[str, int]:
        return {f"faults/{k}": v for k, v in self.counts.items()}

    # -- restoring from the replica when a trainer restarts

    def restore_newer(self, step: int, state: Any) -> tuple[int, Any]:
        """The replica's state when it is newer than `step` (the latest checkpoint)."""
        ray = running_ray() if self.cfg.replica else None
        if ray is None:
            return step, state
        t0 = time.perf_counter()
        key = self.key
        held = [(s, h) for h in replica_holders(ray)
                if (s := ray.get(h.step.remote(key, self.fp))) is not None and s > step]
        if not held:
            return step, state
        got = ray.get(max(held, key=lambda sh: sh[0])[1].newest.remote(key, self.fp, step))
        if got is None:  # replaced or dropped in between
            return step, state
        rstep, host = got
        leaves, treedef = jax.tree.flatten(state)
        restored = jax.tree.unflatten(treedef, to_device(
            host, leaves, [x.sharding for x in leaves]))
        jax.block_until_ready(restored)
        seconds = time.perf_counter() - t0
        self._event("replica_restore", step=rstep, checkpoint_step=step, seconds=round(seconds, 4))
        self.log(f"faults: resuming from the in-memory replica at step {rstep} (newer than the "
                 f"checkpoint at step {step}; {seconds:.2f}s)")
        return rstep, restored

    # -- the step

    def step(self, compute: Callable[[Any], tuple[Any, Any]], state: Any,
             step: int) -> tuple[Any, Any]:
        """compute(state) -> (new state, metrics): 0-based step `step` (its batch bound in)."""
        n = step + 1
        if self.nan_hook is not None and self.nan_hook.due(n):
            state = self._map_leaf(state, pick_leaf(self._names, jax.tree.leaves(state), None),
                                   poison)
        sdc = self.cfg.sdc_check_every
        if sdc and n % sdc == 0:
            return self.checked_step(compute, state, step)
        new_state, metrics = compute(state)
        return self._maybe_flip(n, new_state), metrics

    def _map_leaf(self, state: Any, i: int, fn: Callable) -> Any:
        leaves, treedef = jax.tree.flatten(state)
        leaves[i] = fn(leaves[i])
        return jax.tree.unflatten(treedef, leaves)

    def _maybe_flip(self, n: int, state: Any) -> Any:
        if self.flip_hook is None or not self.flip_hook.due(n):
            return state
        return self._map_leaf(state, self._flip_leaf, lambda x: flip_bit(x, self.flip_hook.bit))

    def checked_step(self, compute: Callable, state: Any, step: int) -> tuple[Any, Any]:
        """Computes the step twice from the same state and batch; equal fingerprints of the
        new states or the step is redone (up to sdc_max_mismatches in the process)."""
        n = step + 1
        self.counts["sdc_checks"] += 1
        while True:
            backup = self._copy(state)
            new_a, metrics_a = compute(state)
            new_a = self._maybe_flip(n, new_a)
            new_b, _ = compute(self._copy(backup))
            fp_a, fp_b = np.asarray(fingerprint(new_a)), np.asarray(fingerprint(new_b))
            if np.array_equal(fp_a, fp_b):
                return new_a, metrics_a
            bad = np.flatnonzero(fp_a != fp_b).tolist()
            la, lb = jax.tree.leaves(new_a), jax.tree.leaves(new_b)
            devices = sorted({d for i in bad for d in differing_devices(la[i], lb[i])})
            self.counts["sdc_mismatches"] += 1
            k, limit = self.counts["sdc_mismatches"], self.cfg.sdc_max_mismatches
            leaves = [self._names[i] for i in bad]
            self._event("sdc_mismatch", step=n, devices=devices, leaves=leaves, mismatches=k)
            where = f"device(s) {', '.join(devices) or '?'}"
            self.log(f"faults: SDC check at step {n}: the recomputed step differs from the first "
                     f"on {where} in {len(bad)} state leaf(s) ({leaves[0]}, ...); "
                     f"mismatch {k}/{limit}" + ("; redoing the step" if k < limit else ""))
            if k >= limit:
                raise TrainingStopped(
                    f"silent data corruption: {k} recomputed steps disagreed with the first "
                    f"(faults.sdc_max_mismatches={limit}), the last at step {n} on {where}: "
                    f"this hardware computes inconsistently. Move the job to other devices; the "
                    f"same command resumes from the last checkpoint (events: {self.events_path})")
            state = backup

    # -- one step late: check, then log

    def settle(self, step: int, metrics: Any) -> dict | None:
        """Fetches step `step`'s metrics; raises Rollback (or TrainingStopped) when a scalar
        metric (the loss, the gradient norm) is not finite. Returns them for the log, or None
        when the step was logged before a rollback (a replayed step computes the same values)."""
        fetched = dict(jax.device_get(metrics))
        # the loss named first when it is one of them; then grad_norm, a distilled step's kl, ...
        for name in sorted(fetched, key=lambda k: (k != "loss", k)):
            value = fetched[name]
            if np.ndim(value) == 0 and not math.isfinite(float(value)):
                self._rollback(step, name, float(value))
        self._good_through = max(self._good_through, step)
        self._prune()
        if step <= self._logged_through:
            return None
        self._logged_through = step
        return fetched

    def _rollback(self, step: int, what: str, value: float) -> None:
        n = step + 1
        if n in self._failed:
            raise TrainingStopped(
                f"non-finite {what} ({value}) at step {n} again after rolling back to step "
                f"{self._failed[n]} and replaying the same batches: it recurs deterministically, "
                f"so it is not a transient fault but the data at step {n} or a diverged run "
                f"(lower optimizer.lr, lengthen optimizer.warmup_steps, or look at the batch of "
                f"step {n}, a pure function of seed and step)")
        limit = self.cfg.max_rollbacks
        if self.counts["rollbacks"] >= limit:
            raise TrainingStopped(
                f"non-finite {what} ({value}) at step {n}: gave up after {limit} rollback(s) to "
                f"in-memory snapshots (faults.max_rollbacks={limit}); the same command resumes "
                f"from the last checkpoint (events: {self.events_path})")
        good = [s for s in self._snapshots if s.step <= step]
        if not good:
            raise TrainingStopped(
                f"non-finite {what} ({value}) at step {n} and no in-memory snapshot to roll "
                f"back to (faults.snapshot_every={self.cfg.snapshot_every})")
        snap = good[-1]
        self._snapshots = good
        t0 = time.perf_counter()
        state = jax.block_until_ready(self.restore(snap))
        seconds = time.perf_counter() - t0
        self.counts["rollbacks"] += 1
        self._failed[n] = snap.step
        self._good_through = min(self._good_through, snap.step - 1)  # replayed from here
        self._event("rollback", step=n, what=what, to_step=snap.step, seconds=round(seconds, 4))
        self.log(f"faults: non-finite {what} at step {n}: rolled back to the in-memory snapshot "
                 f"of step {snap.step} in {seconds:.2f}s; replaying {n - snap.step} step(s)")
        raise Rollback(snap.step, state)

    def restore(self, snap: Snapshot) -> Any:
        host = snap.host.result()
        return jax.tree.unflatten(self._treedef, to_device(host, self._like, self._shardings))

    # -- snapshots

    def after_step(self, done: int, state: Any) -> None:
        every = self.cfg.snapshot_every
        if every and done % every == 0 and all(s.step != done for s in self._snapshots):
            self.take_snapshot(done, state)

    def take_snapshot(self, done: int, state: Any) -> Snapshot:
        """A copy of `state` (after `done` steps), fetched to host memory in the background."""
        copy = jax.tree.leaves(self._copy(state))
        snap = Snapshot(done, self._pool.submit(to_host, copy))
        self._snapshots.append(snap)
        self.counts["snapshots"] += 1
        self._prune()
        return snap

    def _prune(self) -> None:
        """Keeps the newest good snapshot (the step before it was finite) and newer ones not
        yet known good; hands the newest good one to the replica."""
        good = [s for s in self._snapshots if s.step <= self._good_through + 1]
        if not good:
            return
        newest = good[-1]
        self._snapshots = [s for s in self._snapshots if s.step >= newest.step]
        if self._replica is not None and not newest.replicated:
            newest.replicated = True
            self._pool.submit(self._push, newest)

    def _push(self, snap: Snapshot) -> None:
        try:
            host = snap.host.result()
            self._replica.put.remote(self.key, self.fp, snap.step, host)
        except Exception as e:  # the replica is a second line of defence: never stop training
            self.log(f"warning: faults: the Ray replica could not take step {snap.step}: "
                     f"{type(e).__name__}: {e}")

    # -- events

    def _event(self, event: str, **fields: Any) -> None:
        if jax.process_index() != 0:
            return
        row = {"event": event, "time": round(time.time(), 3), **fields}
        # whole lines, flushed: a kill leaves at worst a torn last line
        with open(self.events_path, "a") as f:
            f.write(json.dumps(row, separators=(",", ":")) + "\n")


def read_events(run_dir: Path) -> list[dict]:
    """The fault events of a run (rollback, sdc_mismatch, replica_restore), a torn line skipped."""
    try:
        lines = (Path(run_dir) / EVENTS_FILE).read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
