"""What in-loop downstream evaluation adds to the quickstart's training time, in one run.

The quickstart experiment (experiments/quickstart.py: its model, data and 600 steps) with
`config.eval.downstream` = four tasks (default arc_easy, piqa, lambada, gsm8k), limit 200,
every 200 steps: evaluations at steps 200 and 400 and at the end, three in all. Measured here,
on the quickstart's own model, tokenizer and mesh, with the trainer's own pieces:

- training: the run's train step (step_fns.make_train_step on the run's layout) on real batches
  of its sampler; the median of --steps steps after the compile, times 600 steps;
- evaluation: `downstream.InTraining.evaluate` (what the trainer calls) three times on the same
  model; the first pays the compiles of its shapes (kept for the process), the others not.
  With --compilation-cache (every real run has one: trainer.enable_compilation_cache) a second
  process of the same model finds those compiles on disk, as a resumed run, a rerun or a
  sweep's later trials do.

Overhead = the three evaluations / (600 steps of training). Target: <= 10%.

usage: python bench/downstream_overhead.py [--tasks arc_easy,piqa,lambada,gsm8k] [--limit 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import machine

REPO = Path(__file__).resolve().parents[1]
TARGET = 0.10


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="arc_easy,piqa,lambada,gsm8k")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--every", type=int, default=200)
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--corpus", default=str(REPO.parent / "shared" / "corpus"))
    p.add_argument("--runs-root", default=str(Path(tempfile.gettempdir()) / "gx_bench_runs"))
    p.add_argument("--compilation-cache", default="",
                   help="a JAX persistent compilation cache dir, as every run has one (the "
                   "first use fills it: run twice to see a later run's cost); default: none")
    return p.parse_args()


def main() -> int:
    args = parse()
    from gemini_core.train import step_fns
    step_fns.tune_host_malloc()
    import jax
    from flax import nnx

    from gemini_core.data.sampler import Sampler
    from gemini_core.eval import downstream
    from gemini_core.experiment import load_experiment
    from gemini_core.scale import sharding
    from gemini_core.train import trainer

    print(f"machine: {machine.describe()}", flush=True)
    tasks = "(" + ",".join(f"'{t}'" for t in args.tasks.split(",")) + ",)"
    exp = load_experiment(str(REPO / "experiments" / "quickstart.py"), [
        f"--config.data.root={args.corpus}", f"--config.eval.downstream.tasks={tasks}",
        f"--config.eval.downstream.limit={args.limit}",
        f"--config.eval.downstream.every_steps={args.every}"])
    cfg = exp.config
    if args.compilation_cache:  # as run_experiment does: a later run of this model hits it
        trainer.enable_compilation_cache(Path(args.compilation_cache))
    p = trainer.prepare(cfg, Path(args.runs_root), log=print)
    layout = sharding.Layout.from_config(cfg.mesh)
    total = cfg.train.steps
    evaluations = len(range(args.every, total, args.every)) + 1  # in the loop, and the end

    graphdef, state = step_fns.init_state(cfg.model, cfg.optimizer, total, cfg.seed, layout)
    step = step_fns.make_train_step(graphdef, layout)
    sampler = Sampler(p.schedule, cfg.data.domains, p.data.train, total_steps=total,
                              batch_size=cfg.train.batch_size, seq_len=cfg.data.seq_len,
                              seed=cfg.seed)
    t0 = time.perf_counter()
    state, metrics = step(state, sampler.batch(0)[0])
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(1, args.steps + 1):
        t0 = time.perf_counter()
        state, metrics = step(state, sampler.batch(i)[0])
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    train_s = compile_s + total * step_s
    tokens = cfg.train.batch_size * cfg.data.seq_len
    print(f"training: {step_s * 1e3:.0f} ms/step ({tokens / step_s:,.0f} tokens/s), first step "
          f"{compile_s:.1f} s; {total} steps = {train_s:.0f} s", flush=True)

    tasks_in = downstream.InTraining.from_config(cfg.eval.downstream, p.tasks,
                                                 p.data.tokenizer, cfg.data.seq_len, layout,
                                                 cfg.seed)
    model = nnx.merge(graphdef, state).model
    evals = []
    for i in range(evaluations):
        t0 = time.perf_counter()
        results = tasks_in.evaluate(model, final=i == evaluations - 1, log=lambda _: None)
        evals.append(time.perf_counter() - t0)
        print(f"evaluation {i + 1}/{evaluations}: {evals[-1]:.1f} s ("
              + ", ".join(f"{r.task} {r.seconds:.1f} s" for r in results) + ")", flush=True)
    overhead = sum(evals) / train_s
    print(f"\n{len(p.tasks)} tasks x {args.limit} examples, {evaluations} evaluations: "
          f"{sum(evals):.1f} s against {train_s:.0f} s of training = {overhead:.1%} "
          f"(target <= {TARGET:.0%}: {'met' if overhead <= TARGET else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
