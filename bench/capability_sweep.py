"""Mixtures chosen for a capability, measured: the figures of finished capability sweeps.

Run the sweeps first (their trials are shared: the same proxies score every task, so a second
objective costs only its own winner's validation runs), e.g.

    gx sweep experiments/mixture_sweep.py:size=mini,objective=gsm8k \
        --config.proxy.data.root=../shared/corpus --config.space.anneal=False \
        --config.validate.scales=target --config.validate.rank_trials=8

then `python bench/capability_sweep.py SWEEP_DIR [SWEEP_DIR ...]` prints, per sweep, against the
issue's targets (at the sweep's target scale, seed means ± 2 sigma of seed noise):

- the winner vs natural and vs uniform on the objective (single capability: >= 10% better
  beyond 2 sigma, mean domain loss <= 2% worse than natural's; suite: >= 3% better);
- tasks outside the objective on which the winner is worse than natural beyond 2 sigma;
- decision accuracy across scales (validate.rank_trials): pairs ordered alike, Spearman;
- what scoring the tasks adds to a proxy trial: the tasks' seconds (downstream.json, their
  loading, scoring and compiles) over the trial's training time (its logged tokens/s).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import machine

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sweeps.sweep_dir import LOSS, load_sweep  # noqa: E402
from sweeps.validation import verdict  # noqa: E402


def train_seconds(run: Path, cfg: dict) -> float:
    """The run's training time from its logged throughput: every logged interval's tokens over
    its tokens/s (compiles, start-up and evaluations left out)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    per_step = cfg["train"]["batch_size"] * cfg["data"]["seq_len"]
    logged = [(r["step"], r["perf/tokens_per_sec"]) for r in rows if "perf/tokens_per_sec" in r]
    seconds, last = 0.0, 0
    for step, rate in logged:
        seconds += (step - last) * per_step / rate
        last = step
    return seconds


def proxy_cost(s) -> tuple[float, float, int]:
    """Median task-scoring seconds (downstream.json) and training seconds over the trials."""
    import statistics

    tasks, train = [], []
    for run_id in s.table["run_id"]:
        run = s.run_dir(str(run_id))
        if run is None or not (run / "downstream.json").is_file():
            continue
        scored = json.loads((run / "downstream.json").read_text())
        records = scored.get("tasks", scored)
        tasks.append(sum(r.get("seconds", 0.0) for r in records.values() if isinstance(r, dict)))
        train.append(train_seconds(run, json.loads((run / "config.json").read_text())))
    if not tasks:
        return float("nan"), float("nan"), 0
    return statistics.median(tasks), statistics.median(train), len(tasks)


def report(sweep_dir: Path) -> list[str]:
    s = load_sweep(sweep_dir)
    v = s.validate or {}
    lines = [f"## {s.name}", f"objective: {v.get('objective') or s.fit.get('objective')}"]
    for scale, sv in (v.get("scales") or {}).items():
        cands = sv["candidates"]
        for name, c in (sv.get("objective_vs") or {}).items():
            lines.append(f"{scale}: winner vs {name:<10} objective {c['relative']:+7.2%} "
                         f"(gap {c['gap']:+.4f}, 2 sigma {2 * c['sigma']:.4f}): "
                         f"{verdict(c)}")
        w, n = (cands[k]["mean"][f"{LOSS}mean"] for k in ("winner", "natural"))
        lines.append(f"{scale}: mean domain loss, winner vs natural: {w / n - 1:+.2%}")
        worse = [k for k, c in (sv.get("tasks_vs_natural") or {}).items()
                 if c.get("loses_by_2_sigma")]
        lines.append(f"{scale}: task metrics worse than natural beyond 2 sigma: "
                     f"{', '.join(worse) or 'none'} (of {len(sv.get('tasks_vs_natural') or {})})")
    d = v.get("decision")
    if d:
        lines.append(f"decision accuracy: {d['pair_agreement']:.0%} of {d['pairs']} pairs, "
                     f"Spearman {d['spearman']:.2f} ({len(d['trials'])} trials, "
                     f"{d['seeds']} target seed(s))")
    task_s, trial_s, n = proxy_cost(s)
    lines.append(f"proxy trial: scoring the tasks {task_s:.1f} s, training {trial_s:.1f} s "
                 f"(+{task_s / trial_s:.0%}; medians of {n} trials)")
    return lines


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    print(machine.describe())
    for path in argv:
        print("\n".join(report(Path(path))) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
