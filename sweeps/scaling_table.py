"""`gx scaling fit`: a table of runs (a ladder's ladder.csv, or any CSV/parquet with columns
params, tokens, loss) -> <stem>.json (the fit, sweeps.scaling_law), its text report and a plot
(<stem>.svg, <stem>.png)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gemini_core.config import to_dataclass
from gemini_core.errors import UserError
from gemini_core.runs.rundir import write_json_atomic
from gemini_core.scale.compute_plan import LossFit
from sweeps.scaling_law import N_CONSTANTS, TABLE_COLUMNS, ScalingFitConfig, fit_runs, predict

Log = Callable[[str], None]


def read_table(path: Path):
    """A CSV (or parquet) with columns params, tokens, loss (and optionally run_id, failed);
    rows with a `failed` note are left out. UserError naming missing columns or bad cells."""
    import pandas as pd

    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        df = (pd.read_parquet(path) if path.suffix == ".parquet"
              else pd.read_csv(path, keep_default_na=False, na_values=[""]))
    except Exception as e:  # the user's file: one line, not our traceback
        raise UserError(f"{path}: cannot read it as a table: {type(e).__name__}: {e}") from None
    missing = [c for c in TABLE_COLUMNS if c not in df.columns]
    if missing:
        has = ", ".join(map(str, df.columns)) or "none"
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} (needs "
                        f"{', '.join(TABLE_COLUMNS)}; has {has})")
    if "failed" in df.columns:
        df = df[df["failed"].fillna("").astype(str) == ""].assign(failed="")
    for col in TABLE_COLUMNS:
        values = pd.to_numeric(df[col], errors="coerce")
        bad = df.index[~(np.isfinite(values) & (values > 0))]
        if len(bad):
            # a CSV's line number: the header is line 1
            raise UserError(f"{path}:{int(bad[0]) + 2}: {col}={df.loc[bad[0], col]!r}: expected "
                            "a finite number > 0")
        df[col] = values.astype(np.float64)
    if "run_id" not in df.columns:
        df["run_id"] = [f"row{i + 2}" for i in df.index]
    return df.reset_index(drop=True)




def _g(x: float) -> str:
    if not math.isfinite(x):
        return "nan"
    return f"{x:.4g}" if 1e-3 <= abs(x) < 1e5 else f"{x:.3e}"


def _iv(interval: list) -> str:
    lo, hi = interval
    return "" if lo is None or not math.isfinite(lo) else f"[{_g(lo)}, {_g(hi)}]"


def _json_safe(obj: Any) -> Any:
    """NaN (no bootstrap, no allocation) as null: fit.json stays strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def format_fit(result: dict, source: str = "") -> str:
    c, iv = result["constants"], result["intervals"]
    m = result["method"]
    lines = [f"scaling fit {source}".rstrip() + f": {result['form']}",
             f"  N = {result['params']}, D = training tokens, "
             "L = final eval/mean/loss (nats/token)",
             f"  {result['n_fit']} runs fitted, {result['n_holdout']} held out; Huber "
             f"delta={m['huber_delta']:g} on log-loss, L-BFGS from the {m['starts']} best of "
             f"{m['grid_points']:,} grid points (objective {m['objective']:.3e})",
             f"  {'constant':<9} {'value':>10}   5%-95% ({result['bootstrap']['resamples']} "
             "bootstrap resamples of the runs)"]
    for k in ("E", "A", "alpha", "B", "beta"):
        lines.append(f"  {k:<9} {_g(c[k]):>10}   {_iv(iv[k])}")
    fitted = np.array([abs(r["relative_error"]) for r in result["fitted"]])
    lines.append(f"  fitted runs: |relative error| median {np.median(fitted):.2%}, "
                 f"max {fitted.max():.2%}")
    if result["holdout"]:
        lines.append("held out (largest by compute 6·N·D), predicted by the fit:")
        lines.append(f"  {'run':<26} {'N':>10} {'D':>10} {'loss':>7} {'predicted':>9} "
                     f"{'5%-95%':>15} {'rel. error':>10}")
        for r in result["holdout"]:
            lines.append(f"  {r['run_id']:<26} {r['params']:>10,.0f} {r['tokens']:>10,.0f} "
                         f"{r['loss']:>7.4f} {r['predicted']:>9.4f} "
                         f"{_iv(r['predicted_interval']):>15} {r['relative_error']:>+10.2%}")
    co = result["compute_optimal"]
    lines.append(f"compute-optimal allocation ({co['flops']}): N_opt ~ C^a, D_opt ~ C^b, "
                 f"a = beta/(alpha+beta) = {_g(co['a'])} {_iv(co['a_interval'])}, "
                 f"b = {_g(co['b'])}")
    lines.append(f"  {'C (FLOPs)':>10} {'N_opt':>11} {'D_opt':>11} {'tokens/param':>12}  5%-95%")
    for row in co["budgets"]:
        lines.append(f"  {row['C']:>10.3g} {row['N_opt']:>11.3g} {row['D_opt']:>11.3g} "
                     f"{row['tokens_per_param']:>12.3g}  {_iv(row['tokens_per_param_interval'])}")
    return "\n".join(lines)


def plot_fit(df, result: dict, out_stem: Path) -> list[Path]:
    """Loss vs N, one colour per token budget D: the runs (held-out ones hollow) and the fitted
    iso-D curves; beside it loss vs D per N. Writes <stem>.svg and <stem>.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    law = LossFit(**result["constants"])
    held = {r["run_id"] for r in result["holdout"]}
    N, D, L = (df[c].to_numpy(np.float64) for c in TABLE_COLUMNS)
    is_held = df["run_id"].astype(str).isin(held).to_numpy()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    for ax, x, other, xlabel, olabel in ((axes[0], N, D, "N (non-embedding parameters)", "D"),
                                         (axes[1], D, N, "D (training tokens)", "N")):
        values = np.unique(other)
        colors = plt.cm.viridis(np.linspace(0, 0.9, len(values)))
        grid = np.geomspace(x.min() / 1.3, x.max() * 1.3, 100)
        for v, color in zip(values, colors):
            sel = other == v
            curve = predict(law, grid, v) if ax is axes[0] else predict(law, v, grid)
            ax.plot(grid, curve, color=color, lw=1.2, label=f"{olabel} = {v:,.3g}")
            ax.scatter(x[sel & ~is_held], L[sel & ~is_held], color=color, s=22, zorder=3)
            ax.scatter(x[sel & is_held], L[sel & is_held], facecolors="none",
                       edgecolors=color, s=60, lw=1.5, zorder=3)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # labels collide
        ax.set_xlabel(xlabel)
        ax.set_ylabel("final eval loss (nats/token)")
        ax.legend(fontsize=7, frameon=False)
        ax.grid(alpha=0.3, which="both")
    c = result["constants"]
    fig.suptitle(f"L = {c['E']:.3f} + {c['A']:.3g}/N^{c['alpha']:.3f} + "
                 f"{c['B']:.3g}/D^{c['beta']:.3f}  (points: runs; hollow: held out)", fontsize=10)
    paths = [Path(f"{out_stem}.svg"), Path(f"{out_stem}.png")]
    fig.savefig(paths[0])
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def fit_and_write(df, out_dir: Path, stem: str, *, holdout_largest: int, bootstrap_resamples: int,
                  delta: float = 1e-3, starts: int = 64, seed: int = 0,
                  budgets=(), source: str = "",
                  params_kind: str = "non-embedding parameters", log: Log = print) -> dict:
    result = fit_runs(df, holdout=holdout_largest, bootstrap_resamples=bootstrap_resamples,
                      delta=delta, starts=starts, seed=seed, budgets=budgets,
                      params_kind=params_kind)
    write_json_atomic(out_dir / f"{stem}.json", _json_safe(result))
    plots = plot_fit(df, result, out_dir / stem)
    log(format_fit(result, source))
    log(f"wrote {out_dir / f'{stem}.json'}, {', '.join(str(p) for p in plots)}")
    return result


# ---------------------------------------------------------------------------------------------
# `gx scaling fit SWEEP`: a ladder's sweep dir, its name, or a table of results from elsewhere


def find_table(root: Path, target: str) -> tuple[Path, Path, str]:
    """-> (table, output dir, output stem)."""
    path = Path(target)
    if path.is_file():
        return path, path.parent, f"{path.stem}.fit"
    if (path / "ladder.csv").is_file():
        return path / "ladder.csv", path, "fit"
    if path.suffix in (".csv", ".parquet"):
        raise UserError(f"{path}: no such file")
    # a ladder's name (the newest of its sweep dirs), else a unique-enough prefix
    found = sorted((root / "sweeps").glob(f"{target}-*/ladder.csv")
                   or (root / "sweeps").glob(f"{target}*/ladder.csv"),
                   key=lambda p: p.stat().st_mtime)
    if not found:
        raise UserError(f"{target}: not a table, a ladder's sweep dir, or the name of a finished "
                        f"ladder under {root / 'sweeps'}")
    return found[-1], found[-1].parent, "fit"


def fit_target(root: Path, target: str, *, holdout_largest: int | None = None,
               bootstrap_resamples: int | None = None, log: Log = print) -> dict:
    """`gx scaling fit`: a ladder's own fit settings unless the flags say otherwise."""
    table_path, out_dir, stem = find_table(root, target)
    df = read_table(table_path)
    fit_cfg, kind = ScalingFitConfig(), "the table's params column"
    ladder_json = out_dir / "ladder.json"
    if stem == "fit" and ladder_json.is_file():
        fit_cfg = to_dataclass(json.loads(ladder_json.read_text())["ladder"]["fit"],
                                ScalingFitConfig, f"{ladder_json}:ladder.fit")
        kind = "non-embedding parameters"
    holdout = fit_cfg.holdout_largest if holdout_largest is None else holdout_largest
    resamples = fit_cfg.bootstrap if bootstrap_resamples is None else bootstrap_resamples
    if holdout < 0 or len(df) - holdout < N_CONSTANTS:
        raise UserError(f"--holdout-largest {holdout}: {table_path} has {len(df)} finished "
                        f"runs; at least {N_CONSTANTS} must remain to fit")
    if resamples < 0:
        raise UserError(f"--bootstrap {resamples}: must be >= 0")
    return fit_and_write(df, out_dir, stem, holdout_largest=holdout,
                         bootstrap_resamples=resamples, delta=fit_cfg.delta,
                         starts=fit_cfg.starts, seed=fit_cfg.seed, budgets=fit_cfg.budgets,
                         source=str(table_path), params_kind=kind, log=log)
