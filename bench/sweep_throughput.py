"""Sweep throughput: proxy trials per hour with 1 and with 2 concurrent trials, in one run, and
the seconds to the first step (compile) of the first trial vs the later ones.

Both sweeps are the same sweep (experiments/mixture_sweep.py, `--size small`: the default
sweep's 2-layer d=64 proxy, or `tiny`: the test-scale one), each in a fresh runs root with
a cold JAX compilation cache, run through `gx sweep --no-validate`. Trials per hour = trials /
wall seconds of the trial stage; parallel efficiency = (rate with 2 / rate with 1) / 2. That
stage also pays fixed costs once (Ray and its workers starting, the first compile into a cold
cache), so the steady-state rate is given too: trials finished after each worker's first, over
the time from the k-th finish (k = concurrent trials) to the last (finish = the run's
summary.json written).

Before the sweeps, the machine's own ceiling: a fixed single-thread XLA workload (the proxy's
largest matmul, its LM head, forward and backward) timed alone on one CPU, then as two
processes at once, each pinned to a CPU of its own. Their speed together over twice the lone
speed bounds any sweep's parallel efficiency on this machine (shared caches, memory bandwidth,
or virtual CPUs that share a physical core all show in it).

usage: python bench/sweep_throughput.py [--size small] [--trials 12] [--steps 600] [--out F]
(the defaults are the default sweep's proxy and bench/results/sweep_throughput_*'s figures: about 26 minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_EFFICIENCY = 0.85


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", default=str(REPO.parent / "shared" / "corpus"))
    p.add_argument("--size", default="small", help="experiments/mixture_sweep.py size")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--out", default="")
    return p.parse_args()


# the proxy's LM head at the default sweep's shapes: (B*T, d) @ (d, vocab), forward + backward
_CEILING_WORK = r"""
import os, sys, time
os.sched_setaffinity(0, [int(sys.argv[1])])
os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false"
import jax, jax.numpy as jnp
x_NxD = jnp.ones((2048, 64)) * 0.01
w_DxV = jnp.ones((64, 2048)) * 0.01
step = jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.tanh(x @ w))))
step(w_DxV, x_NxD).block_until_ready()
print("ready", flush=True)
sys.stdin.readline()  # go: all processes start timing together
t0, n = time.perf_counter(), 0
while time.perf_counter() - t0 < float(sys.argv[2]):
    w_DxV = w_DxV - 1e-3 * step(w_DxV, x_NxD); w_DxV.block_until_ready(); n += 1
print(n / (time.perf_counter() - t0), flush=True)
"""


def _steps_per_s(cpus: list[int], seconds: float) -> list[float]:
    procs = [subprocess.Popen([sys.executable, "-c", _CEILING_WORK, str(c), str(seconds)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for c in cpus]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    return [float(p.communicate()[0]) for p in procs]


def machine_ceiling(seconds: float = 20.0) -> dict:
    """Two single-CPU compute processes at once vs one alone: the best 2-vs-1 efficiency."""
    cpus = sorted(os.sched_getaffinity(0))[:2]
    alone = _steps_per_s(cpus[:1], seconds)[0]
    both = _steps_per_s(cpus, seconds)
    ceiling = sum(both) / (2 * alone)
    print(f"machine ceiling: one single-CPU XLA process alone {alone:.0f} steps/s; two at once "
          f"on CPUs {cpus} {both[0]:.0f} + {both[1]:.0f} steps/s: efficiency at most "
          f"{ceiling:.2f}", flush=True)
    return {"alone_steps_per_s": alone, "both_steps_per_s": both, "ceiling": ceiling}


def sweep(args: argparse.Namespace, concurrent: int, work: Path) -> dict:
    runs = work / f"runs-{concurrent}"
    cmd = [sys.executable, "-m", "gx", "--runs-root", str(runs), "sweep",
           f"experiments/mixture_sweep.py:size={args.size}", "--no-validate",
           f"--config.proxy.data.root={args.corpus}", f"--config.space.trials={args.trials}",
           f"--config.proxy.train.steps={args.steps}", "--config.proxy.tracking.wandb=false",
           # checkpoints every third of the run, as the experiment sets them for its own steps
           f"--config.proxy.train.checkpoint_every={max(args.steps // 3, 1)}",
           f"--config.resources.max_concurrent={concurrent}", "--config.fit.folds=2",
           "--config.fit.samples=2000"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"sweep with {concurrent} concurrent trials failed:\n{proc.stderr[-3000:]}")
    sweep_dir = next((runs / "sweeps").iterdir())
    fit = json.loads((sweep_dir / "fit.json").read_text())
    trials_s = fit["seconds"]["trials"]
    firsts, ends = [], []  # (start time, seconds to the first step) per trial; finish times
    for status in (runs / f"mixture_sweep_{args.size}").glob("*/status.json"):
        st = json.loads(status.read_text())
        summary = status.parent / "summary.json"
        firsts.append((st["start"], json.loads(summary.read_text())["perf/first_step_s"]))
        ends.append(summary.stat().st_mtime)
    firsts.sort()
    ends.sort()
    steady_s = ends[-1] - ends[concurrent - 1]
    result = {"concurrent": concurrent, "wall_s": wall, "trials_s": trials_s,
              "trials_per_hour": args.trials / trials_s * 3600,
              "steady_per_hour": (args.trials - concurrent) / steady_s * 3600,
              "first_step_s": [f for _, f in firsts]}
    print(f"{concurrent} concurrent: {args.trials} trials in {trials_s:.1f}s "
          f"({result['trials_per_hour']:.0f} trials/hour, steady state "
          f"{result['steady_per_hour']:.0f}; whole command {wall:.0f}s); seconds to "
          f"the first step: first trial {firsts[0][1]:.1f}, later trials median "
          f"{statistics.median(f for _, f in firsts[1:]):.1f}", flush=True)
    return result


def main() -> int:
    args = parse()
    work = Path(tempfile.mkdtemp(prefix="gx-bench-sweep-"))
    ceiling = machine_ceiling()
    one, two = sweep(args, 1, work), sweep(args, 2, work)
    efficiency = two["trials_per_hour"] / one["trials_per_hour"] / 2
    steady = two["steady_per_hour"] / one["steady_per_hour"] / 2
    lines = ["| concurrent trials | trials/hour | steady state | first trial: s to first step "
             "| later trials: median s |", "|---|---|---|---|---|"]
    for r in (one, two):
        lines.append(f"| {r['concurrent']} | {r['trials_per_hour']:.0f} | {r['steady_per_hour']:.0f} "
                     f"| {r['first_step_s'][0]:.1f} | {statistics.median(r['first_step_s'][1:]):.1f} |")
    lines += ["", f"parallel efficiency 2 vs 1: {efficiency:.2f} over the trial stage, {steady:.2f} "
              f"in steady state (target >= {TARGET_EFFICIENCY}: "
              f"{'met' if efficiency >= TARGET_EFFICIENCY else 'NOT met'} over the stage, "
              f"{'met' if steady >= TARGET_EFFICIENCY else 'NOT met'} in steady state); "
              f"this machine's ceiling {ceiling['ceiling']:.2f}"]
    text = "\n".join(lines)
    print()
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps({"one": one, "two": two, "efficiency": efficiency,
                                              "steady_efficiency": steady, "ceiling": ceiling},
                                             indent=1))
        Path(args.out).with_suffix(".md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
