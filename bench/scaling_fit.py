"""Scaling-law extrapolation: fit L(N, D) on all but the largest run(s) of the ladder and predict
the held-out ones.

Runs the default ladder (experiments/scaling_ladder.py: 5 widths x 4 token budgets) through
`gx scaling run` (done runs are reused; --sweep takes a finished ladder instead), then fits
Chinchilla's approach 3 on every run except the K of most compute (6·N·D; K = 1: the largest
model at the largest budget) and prints the relative error of the prediction for each held-out
run (target: within 2%), the constants with their 5-95% bootstrap intervals and the
compute-optimal allocation. A stricter second figure holds out the whole largest model size
(every budget of it): an extrapolation in N alone.

usage: python bench/scaling_fit.py [--sweep DIR] [--holdout-largest 1] [--bootstrap 200]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TARGET = 0.02  # relative error of the held-out largest run


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sweep", default="",
                   help="a finished ladder's sweep dir (else run the default ladder)")
    p.add_argument("--corpus", default=str(REPO.parent / "shared" / "corpus"))
    p.add_argument("--runs-root", default=str(REPO / "runs"))
    p.add_argument("--experiment", default="experiments/scaling_ladder.py")
    p.add_argument("--holdout-largest", type=int, default=1)
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--out", default="", help="write the figures here as JSON")
    return p.parse_args()


def run_ladder(args: argparse.Namespace) -> tuple[Path, float]:
    cmd = [sys.executable, "-m", "gx", "--runs-root", args.runs_root, "scaling",
           "run", args.experiment, f"--config.base.data.root={args.corpus}"]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    print(proc.stdout, flush=True)
    if proc.returncode:
        raise SystemExit(f"the ladder failed (exit {proc.returncode})")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("ladder ") and "-> " in x)
    return Path(line.rsplit("-> ", 1)[1].strip()), wall


def main() -> int:
    from sweeps.ladder import format_ladder
    from sweeps.scaling_law import fit_runs
    from sweeps.scaling_table import format_fit, read_table

    args = parse()
    wall = None
    if args.sweep:
        sweep = Path(args.sweep)
    else:
        sweep, wall = run_ladder(args)
    df = read_table(sweep / "ladder.csv")
    print(format_ladder(df))
    if wall is not None:
        print(f"ladder wall time: {wall:.0f}s ({len(df)} runs)")

    result = fit_runs(df, holdout=args.holdout_largest, bootstrap_resamples=args.bootstrap)
    print()
    print(format_fit(result, sweep.name))
    errors = [abs(r["relative_error"]) for r in result["holdout"]]
    worst = max(errors)
    print(f"\nheld-out largest run(s): relative error {', '.join(f'{e:.2%}' for e in errors)} "
          f"(target <= {TARGET:.0%}: {'met' if worst <= TARGET else 'NOT met'})")

    # stricter: the whole largest model size held out (every budget): extrapolation in N alone
    N = df["params"].to_numpy()
    whole = fit_runs(df, holdout=N == N.max(), bootstrap_resamples=0)
    print("largest model size held out at every budget (fit on the smaller sizes only):")
    for r in whole["holdout"]:
        print(f"  N={r['params']:,.0f} D={r['tokens']:,.0f}: loss {r['loss']:.4f}, predicted "
              f"{r['predicted']:.4f}, relative error {r['relative_error']:+.2%}")

    full = fit_runs(df, holdout=0, bootstrap_resamples=0)
    print(f"fit on all {len(df)} runs: " + ", ".join(
        f"{k} {v:.4g}" for k, v in full["constants"].items())
        + f"; a = {full['compute_optimal']['a']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "sweep": str(sweep), "ladder_wall_s": wall, "holdout": result,
            "whole_largest_size": whole["holdout"], "full": full["constants"],
            "max_relative_error": worst, "target_met": bool(worst <= TARGET)},
            indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
