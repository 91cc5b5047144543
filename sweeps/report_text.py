"""`gx compare SWEEP` printed (and the sweep's report.txt): the trials, the fit's choices, the
winner against natural, the validation. Reads the sweep dir only."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from sweeps import optimize
from sweeps.sweep_dir import DOWNSTREAM, LOSS, WEIGHT
from sweeps.validation import format_validation


def format_sweep(sweep_dir: Path) -> str:
    result = json.loads((sweep_dir / "fit.json").read_text())
    meta = json.loads((sweep_dir / "sweep.json").read_text())
    domains = meta["domains"]
    if result.get("method") == "doremi":
        lines = format_doremi(result, domains)
    else:
        lines = format_trials(sweep_dir, result, domains)
    if (sweep_dir / "validate.json").is_file():
        lines.append(format_validation(json.loads((sweep_dir / "validate.json").read_text()),
                                       domains))
    return "\n".join(lines)


def format_doremi(result: dict, domains: Sequence[str]) -> list[str]:
    ref, dro = result["reference"], result["proxy"]
    return [f"DoReMi: reference run {ref['run_id']} (mean loss {ref[LOSS + 'mean']:.4f}), "
            f"Group-DRO proxy {dro['run_id']}",
            "  reference mixture: " + ", ".join(f"{d}={ref['weights'][d]:.3f}" for d in domains),
            "  DoReMi weights (averaged over steps): " + ", ".join(
                f"{d}={result['doremi_weights'][d]:.3f}" for d in domains),
            "  winner (under the caps and minimum weight): " + ", ".join(
                f"{d}={w:.3f}" for d, w in result["winner"]["stages"][0]["weights"].items())]


def describe_choice(result: dict) -> str:
    """fit.json's choice in one line: the fit's mixture or a measured trial, and why."""
    return optimize.describe_choice(result["choice"], result["best_trial"]["objective"])


def format_trials(sweep_dir: Path, result: dict, domains: Sequence[str]) -> list[str]:
    import pandas as pd
    table = pd.read_csv(sweep_dir / "trials.csv", keep_default_na=False)
    lines = [f"sweep {sweep_dir.name}: {len(table)} trials "
             f"({result['n_fit']} fitted, {result['n_holdout']} held out, "
             f"{result['n_failed']} failed)", ""]
    tasks = [m for m in result.get("metrics", ()) if m not in domains]  # the objective's
    head = (f"{'trial':>5}  {'mean':>7}  " + "  ".join(f"{d[:6]:>6}" for d in domains)
            + "".join(f"  {m[len(DOWNSTREAM):]:>{max(len(m) - len(DOWNSTREAM), 7)}}"
                      for m in tasks) + "  weights (base stage)")
    lines.append(head)
    # a failed trial's losses are empty cells: it sorts last
    table = table.loc[pd.to_numeric(table[f"{LOSS}mean"], errors="coerce")
                      .sort_values(na_position="last").index]
    for _, row in table.iterrows():
        losses = "  ".join(f"{_float(row[f'{LOSS}{d}']):>6.3f}" for d in domains)
        weights = " ".join(f"{d[:4]}={float(row[f'{WEIGHT}s0/{d}']):.2f}" for d in domains)
        mark = f"  FAILED: {row['failed']}" if row["failed"] else ""
        scores = "".join(f"  {_float(row[m]):>{max(len(m) - len(DOWNSTREAM), 7)}.4f}"
                         for m in tasks)
        lines.append(f"{int(row['trial']):>5}  {_float(row[f'{LOSS}mean']):>7.4f}  {losses}"
                     f"{scores}  {weights}{mark}")
    lines += ["", f"objective: {result.get('objective') or 'mean loss over all domains'}",
              "fit: " + ", ".join(f"{d} {m}" for d, m in result["chosen"].items())]
    if result["holdout"]:
        h = result["holdout"]
        lines.append(f"held-out trials: Spearman {h['spearman']:.3f}, regret {h['regret']:.4f} "
                     f"(n={h['n']})")
    lines.append("winner (predicted per domain and task metric, natural mixture's in brackets):")
    for k, stage in enumerate(result["winner"]["stages"]):
        lines.append(f"  stage {k} from {stage['start']:.2f}: " + ", ".join(
            f"{d}={w:.3f}" for d, w in stage["weights"].items()))
    lines.append("  " + ", ".join(f"{d} {result['predicted'][d]:.4f} "
                                   f"({result['natural_predicted'][d]:.4f})"
                                   for d in [*domains, *tasks]))
    obj, h = result.get("objective_predicted"), result["holdout"]
    if obj:
        names = ("winner", "natural", "uniform", "best_trial")  # JSON sorts them
        lines.append("  objective predicted: " + ", ".join(
            f"{name.replace('_', ' ')} {obj[name]:.4f}" for name in names if name in obj) + (
            f"; the fit's error on held-out trials {h['objective_rmse']:.4f}"
            if h and math.isfinite(h.get("objective_rmse", math.nan)) else ""))
    if result.get("choice"):
        lines.append(f"  {describe_choice(result)}")
    return lines


def _float(cell) -> float:
    """A loss cell of trials.csv: a failed trial's is empty."""
    try:
        return float(cell)
    except (TypeError, ValueError):
        return math.nan
