"""The Ray replica of a run's newest good state: a detached actor per node holds it in the object
store, so a trainer that Ray restarts after a crash resumes from memory instead of a checkpoint
on disk. Only under Ray (a sweep trial, a Ray job): a plain `gx run` never imports Ray.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import jax

REPLICA_NAMESPACE = "gx"
HOLDER_PREFIX = "gx-replicas-"  # + the id of the node whose trainers it serves


def running_ray():
    """Ray, when this process already runs under it (a sweep trial, a Ray job); else None. Never
    imports it: `import ray` alone costs a second, and a plain `gx run` has no use for it."""
    ray = sys.modules.get("ray")
    if ray is None or not getattr(ray, "is_initialized", lambda: False)():
        return None
    return ray


_HOLDER_CLS = None


def _holder_class(ray):
    global _HOLDER_CLS
    if _HOLDER_CLS is None:
        @ray.remote(num_cpus=0, max_restarts=0)
        class ReplicaHolder:
            """The newest good snapshot of each unfinished run whose trainer runs on one node, in
            the object store, owned by this actor. Detached, it outlives the trainers, so a
            trainer Ray restarts after a crash resumes from memory instead of disk. One per node
            for all its trainers (a sweep's trials), not one process per run."""

            def __init__(self):
                self._runs: dict[str, tuple[str, int, list]] = {}

            def put(self, key: str, fp: str, step: int, host: list) -> int:
                self._runs[key] = (fp, step, [ray.put(host)])
                return step

            def step(self, key: str, fp: str) -> int | None:
                fp_held, step, _ = self._runs.get(key, (None, None, None))
                return step if fp_held == fp else None

            def newest(self, key: str, fp: str, after: int):
                fp_held, step, ref = self._runs.get(key, (None, -1, None))
                if fp_held != fp or step <= after:
                    return None
                return step, ray.get(ref[0])

            def drop(self, key: str) -> None:
                self._runs.pop(key, None)

            def node(self) -> str:
                return ray.get_runtime_context().get_node_id()

        _HOLDER_CLS = ReplicaHolder
    return _HOLDER_CLS


def replica_key(run_id: str, run_dir: Path) -> str:
    # the same run id in another runs root is another run: its replica must never be taken
    key = f"{run_id}@{hashlib.sha256(str(Path(run_dir).absolute()).encode()).hexdigest()[:12]}"
    # multi-host: each process holds its own shards of the state
    return f"{key}/p{jax.process_index()}" if jax.process_count() > 1 else key


def replica_holder(ray):
    """The holder for trainers on this node: started once (then found by name), on another node
    when the cluster has one (soft affinity: the same node if that one goes away), so losing the
    trainer's machine does not lose the copy."""
    here = ray.get_runtime_context().get_node_id()
    opts = {"name": HOLDER_PREFIX + here[:16], "namespace": REPLICA_NAMESPACE,
            "lifetime": "detached", "get_if_exists": True}
    others = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here)
    if others:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        pick = others[int(hashlib.sha256(here.encode()).hexdigest(), 16) % len(others)]
        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=pick, soft=True)
    return _holder_class(ray).options(**opts).remote()


def replica_holders(ray) -> list:
    """Every holder in the cluster: a restarted trainer may land on another node."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a.get("namespace") == REPLICA_NAMESPACE and a["name"].startswith(HOLDER_PREFIX)]
    out = []
    for name in sorted(names):
        try:
            out.append(ray.get_actor(name, namespace=REPLICA_NAMESPACE))
        except ValueError:  # gone in between
            continue
    return out


def replica_step(run_id: str, run_dir: Path, fp: str) -> int | None:
    """The newest step a holder keeps for this run (None: none, or not under Ray)."""
    ray = running_ray()
    if ray is None:
        return None
    steps = [ray.get(h.step.remote(replica_key(run_id, run_dir), fp)) for h in replica_holders(ray)]
    return max((s for s in steps if s is not None), default=None)
