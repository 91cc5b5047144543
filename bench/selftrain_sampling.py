"""E-step sampling throughput: samples/s with 1 and with 2 Ray workers (and in this process),
the KV-cache decode of a gx run, on the same problems and seeds.

    python bench/selftrain_sampling.py RUN [--problems 200] [--samples 8] [--runs-root runs]

RUN: a base run with a word-problem domain (experiments/rest_em.py:role=base). Each setting
samples every problem `--samples` times at T=1 into a fresh folder (nothing reused), after one
warm-up shard per setting (model load and compilation are not counted: workers load once per
job and sample for minutes). Prints a table; the target is >= 1.7x from 1 to 2 workers on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from gemini_core.runs.rundir import find_run, runs_root
from gemini_core.selftrain import problems, sampling
from gemini_core.selftrain.config import ProblemsConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--shard", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--runs-root", default=None)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    root = runs_root(args.runs_root)
    base = find_run(root, args.run)
    cfg = base.config()
    domain = next(iter(cfg["data"]["synthetic"].values()))
    ranges = {k: domain[k] for k in ("min_steps", "max_steps", "max_operand", "ops")}
    with tempfile.TemporaryDirectory() as tmp:
        splits = problems.word_problem_splits(
            ProblemsConfig(train=args.problems, valid=1, test=1, **ranges), cfg, Path(tmp), 64)
        verify = problems.verifier(splits.spec)
        s = sampling.Sampling(args.samples, 1.0, 1.0, 0, 64, ("\n",), args.batch_size, seed=0)
        rows = []
        for workers in (0, 1, 2):
            warm = Path(tmp) / f"warm{workers}"
            sampling.run_job(base.path, splits.train[:args.shard], s, warm, verify,
                             shard_problems=args.shard, workers=workers, log=lambda _: None)
            start = time.perf_counter()
            out = sampling.run_job(base.path, splits.train, s, Path(tmp) / f"w{workers}", verify,
                                   shard_problems=args.shard, workers=workers,
                                   log=lambda _: None)
            seconds = time.perf_counter() - start
            rows.append((workers, len(out), seconds, sum(x.correct for x in out) / len(out)))
        sampling.release()
    one = next(r for r in rows if r[0] == 1)
    print(f"{'workers':<22}{'samples':>8}{'seconds':>9}{'samples/s':>11}{'vs 1 worker':>13}"
          f"{'correct':>9}")
    for workers, n, seconds, correct in rows:
        label = "in-process (0)" if workers == 0 else f"{workers} Ray worker(s)"
        print(f"{label:<22}{n:>8}{seconds:>9.1f}{n / seconds:>11.1f}"
              f"{(n / seconds) / (one[1] / one[2]):>12.2f}x{correct:>9.1%}")


if __name__ == "__main__":
    main()
