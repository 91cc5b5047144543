"""Sampling many completions of many problems from one policy, in shards, fanned out on Ray.

The E-step (K samples of every train problem) and the held-out evaluation (n samples of every
test problem, and a greedy pass) are both a `SampleJob`: problems are cut into shards of
`shard_problems`; each shard's prompts (every problem K times) are sampled with a seed of the
shard's own (`shard_seed`), so a shard's samples are the same whoever samples it and whenever.
Workers are Ray actors that load the policy's checkpoint once and sample shard after shard
(`workers=0`: the same in this process). The driver verifies each returned shard and writes it
atomically to `<dir>/shards/<index>.jsonl`; a shard on disk is never sampled again. A worker
killed mid-shard is restarted by Ray (it loads the model again) and its shard retried; a killed
command rerun samples only the shards not on disk. The result is the same samples as an
uninterrupted run (tests/test_selftrain.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

from gemini_core.eval.tasks import Example
from gemini_core.runs.rundir import fingerprint
from gemini_core.selftrain.problems import Verify, judge, write_jsonl

Log = Callable[[str], None]
SHARDS = "shards"


@dataclasses.dataclass(frozen=True)
class Sampling:
    """What a worker needs to sample one shard (plain data: it travels to Ray workers)."""
    samples: int  # per problem
    temperature: float  # 0 = greedy
    top_p: float
    top_k: int
    max_new_tokens: int
    stop: tuple[str, ...]
    batch_size: int
    seed: int


@dataclasses.dataclass(frozen=True)
class Sample:
    problem: int  # index into the job's problems
    completion: str
    correct: bool
    error: str = ""  # the verifier's, when it raised


def shard_seed(seed: int, shard: int) -> int:
    return int(fingerprint({"seed": seed, "shard": shard})[:8], 16)


class Worker:
    """Loads a policy run once; samples shards of prompts from it."""

    def __init__(self, run_path: str, cpu: int | None = None):
        if cpu is not None and hasattr(os, "sched_setaffinity"):
            cpus = sorted(os.sched_getaffinity(0))
            os.sched_setaffinity(0, {cpus[cpu % len(cpus)]})
        from gemini_core.eval.loaded_run import load_run
        from gemini_core.runs.rundir import RunDir
        if os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # a Ray worker: the driver's cache
            from gemini_core.train.trainer import enable_compilation_cache
            enable_compilation_cache(Path(os.environ["JAX_COMPILATION_CACHE_DIR"]))
        path = Path(run_path)
        self.loaded = load_run(RunDir(path.parent.parent, path.parent.name, path.name),
                               log=lambda _: None)
        self.model = self.loaded.model

    def sample(self, contexts: Sequence[str], s: Sampling, shard: int) -> list[str]:
        from gemini_core.model import generate as gen
        prompts = [c for c in contexts for _ in range(s.samples)]
        new = min(s.max_new_tokens, self.loaded.seq_len // 2)  # as the downstream tasks cap it
        cfg = gen.SamplingConfig(max_new_tokens=new, temperature=s.temperature, top_k=s.top_k,
                                 top_p=s.top_p, seed=shard_seed(s.seed, shard), stop=s.stop)
        out = gen.generate(self.model, self.loaded.tokenizer, prompts, cfg,
                           batch_size=s.batch_size, max_len=self.loaded.seq_len,
                           layout=self.loaded.layout, log=lambda _: None)
        return [c.text for c in out]


def read_shard(path: Path) -> list[Sample] | None:
    """The shard's samples; None when it is not (completely) written."""
    try:
        return [Sample(**json.loads(line)) for line in path.read_text().splitlines()]
    except (OSError, ValueError, TypeError):
        return None


@dataclasses.dataclass
class Progress:
    total: int
    log: Log
    started: float = dataclasses.field(default_factory=time.perf_counter)
    done: int = 0
    samples: int = 0
    correct: int = 0

    def add(self, samples: Sequence[Sample]) -> None:
        self.done += 1
        self.samples += len(samples)
        self.correct += sum(s.correct for s in samples)
        elapsed = time.perf_counter() - self.started
        rate = self.samples / max(elapsed, 1e-9)
        eta = elapsed / self.done * (self.total - self.done)
        self.log(f"  shard {self.done}/{self.total}: {self.samples:,} samples, "
                 f"{self.correct / max(self.samples, 1):.1%} correct, {rate:.1f} samples/s, "
                 f"eta {eta:.0f}s")


def run_job(run_path: Path, problems: Sequence[Example], s: Sampling, out_dir: Path,
            verify: Verify, *, shard_problems: int, workers: int, log: Log) -> list[Sample]:
    """Every problem's samples (in problem order, then sample order), verified; shards already
    in `out_dir` are read, not sampled."""
    shards = [list(range(a, min(a + shard_problems, len(problems))))
              for a in range(0, len(problems), shard_problems)]
    paths = [out_dir / SHARDS / f"{i:05d}.jsonl" for i in range(len(shards))]
    results: dict[int, list[Sample]] = {}
    for i, path in enumerate(paths):
        done = read_shard(path)
        if done is not None:
            results[i] = done
    todo = [i for i in range(len(shards)) if i not in results]
    if results:
        log(f"  {len(results)} of {len(shards)} shards already sampled ({out_dir})")
    progress = Progress(len(todo), log)

    def finish(i: int, texts: list[str]) -> None:
        samples = [Sample(p, text, *judge(verify, problems[p], text))
                   for p, text in zip((p for p in shards[i] for _ in range(s.samples)), texts)]
        write_jsonl(paths[i], [dataclasses.asdict(x) for x in samples])
        results[i] = samples
        progress.add(samples)

    contexts = lambda i: [problems[p].context for p in shards[i]]  # noqa: E731
    if todo and workers == 0:
        worker = _pool(run_path, 0, log)[0]
        for i in todo:
            finish(i, worker.sample(contexts(i), s, i))
    elif todo:
        _fan_out(_pool(run_path, workers, log), todo, contexts, s, finish)
    return [x for i in range(len(shards)) for x in results[i]]


# the workers of the policy that sampled last: its next job (the held-out evaluation's second
# pass, the next E-step) reuses them instead of loading the model again
_POOL: dict = {}


def _pool(run_path: Path, workers: int, log: Log) -> list:
    key = (str(run_path), workers)
    if _POOL.get("key") == key:
        return _POOL["workers"]
    release()
    if workers == 0:
        pool = [Worker(str(run_path))]
    else:
        import ray

        from gemini_core.scale.ray_local import init_ray
        init_ray(log)
        # one CPU each and XLA's matmuls on one thread: workers share the cores, not fight
        env = {"env_vars": {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false", **{
            k: os.environ[k] for k in ("JAX_COMPILATION_CACHE_DIR",) if k in os.environ}}}
        actor = ray.remote(num_cpus=1, max_restarts=3, max_task_retries=3,
                           runtime_env=env)(Worker)
        pool = [actor.remote(str(run_path), cpu=w) for w in range(workers)]
    _POOL.update(key=key, workers=pool)
    return pool


def release() -> None:
    """Stops the kept workers (their model and Ray processes)."""
    pool, _ = _POOL.pop("workers", None), _POOL.pop("key", None)
    if pool and not isinstance(pool[0], Worker):
        import ray
        for w in pool:
            ray.kill(w)


def _fan_out(pool: list, todo: list[int], contexts: Callable[[int], list[str]], s: Sampling,
             finish: Callable[[int, list[str]], None]) -> None:
    """Shards over the Ray actors, each taking the next shard when it finishes one."""
    import ray
    pending, running = list(todo), {}
    for w in pool[:len(pending)]:
        i = pending.pop(0)
        running[w.sample.remote(contexts(i), s, i)] = (i, w)
    while running:
        ready, _ = ray.wait(list(running), num_returns=1)
        i, w = running.pop(ready[0])
        finish(i, ray.get(ready[0]))
        if pending:
            j = pending.pop(0)
            running[w.sample.remote(contexts(j), s, j)] = (j, w)
