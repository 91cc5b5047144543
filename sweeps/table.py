"""`gx fit TABLE`: the sweep's fit-and-choose on a results table from anywhere.

A table has one row per run. Columns are matched by declared prefixes:

- `weight/<stage>/<domain>`: the weight of a domain in a stage (or `weight/<domain>` when the
  runs have a single stage). Every stage names the same domains; each row's weights of a stage
  sum to 1 (within 1e-3; they are renormalised exactly).
- `start/<stage>`: the fraction of training at which a stage begins, required for every stage
  but the first (whose start is 0) — a schedule is not defined without it.
- `loss/<domain>`: the held-out loss of a weighted domain. A table may weight more domains
  than it has losses for (runs trained on more domains than they were evaluated on): every
  weight is a feature of every predicted metric. Loss columns of other names (say `loss/mean`)
  are ignored and listed as such.
- any other numeric column the objective names (`--objective downstream/gsm8k/bpb`, or a glob
  such as `downstream/*/bpb`): predicted like the losses.

Stages are ordered by start. Anything else in the table is ignored. A table that does not fit
is one UserError naming the file and the offending column or row (rows are numbered from 1, as
a spreadsheet shows data rows; CSV errors also give the file line).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from gemini_core.data.mixture import MixtureSchedule
from gemini_core.errors import UserError
from sweeps import optimize
from sweeps.fit import (
    REGRESSORS,
    Objective,
    check_trials,
    evaluate_holdout,
    fit,
    matching,
    metric_key,
    objective_values,
)

SUM_TOLERANCE = 1e-3
SINGLE_STAGE = ""  # the stage name of `weight/<domain>` columns


def read_table(path: Path) -> pd.DataFrame:
    """A results table from .csv or .parquet; the path is kept in `attrs` for error messages."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise UserError(f"{path}: unsupported table format {suffix or '(no suffix)'!r} "
                        "(expected .csv or .parquet)")
    if not path.is_file():
        raise UserError(f"{path}: table file not found")
    try:
        df = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: the table is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as e:
        kind = "CSV" if suffix == ".csv" else "parquet"
        raise UserError(f"{path}: not a readable {kind} table ({e})") from None
    if not len(df):
        raise UserError(f"{path}: the table has no rows")
    df.attrs["path"] = str(path)
    df.attrs["csv"] = suffix == ".csv"
    return df


def _where(df: pd.DataFrame) -> str:
    return df.attrs.get("path", "table")


def _row(df: pd.DataFrame, i: int) -> str:
    return _row_name(i, bool(df.attrs.get("csv")))


def _row_name(i: int, csv: bool) -> str:
    return f"row {i + 1}" + (f" (line {i + 2})" if csv else "")


def weight_column(stage: str, domain: str, weight_prefix: str = "weight/") -> str:
    return f"{weight_prefix}{stage}/{domain}" if stage != SINGLE_STAGE \
        else f"{weight_prefix}{domain}"


def _weight_layout(df: pd.DataFrame, weight_prefix: str) -> dict[str, list[str]]:
    """stage -> its domains, in column order; checks the two layouts are not mixed."""
    where = _where(df)
    names = [str(c)[len(weight_prefix):] for c in df.columns
             if str(c).startswith(weight_prefix)]
    if not names:
        raise UserError(f"{where}: no weight columns (expected {weight_prefix}<stage>/<domain> "
                        f"or {weight_prefix}<domain>; columns: {', '.join(map(str, df.columns))})")
    staged = [n for n in names if "/" in n]
    flat = [n for n in names if "/" not in n]
    if staged and flat:
        raise UserError(f"{where}: mixes per-stage and single-stage weight columns "
                        f"({weight_prefix}{staged[0]} and {weight_prefix}{flat[0]}); use one")
    layout: dict[str, list[str]] = {}
    for n in names:
        stage, domain = n.split("/", 1) if staged else (SINGLE_STAGE, n)
        if staged and not stage or not domain:
            raise UserError(f"{where}: column {weight_prefix}{n}: empty stage or domain name")
        layout.setdefault(stage, []).append(domain)
    return layout


def _numeric(df: pd.DataFrame, column: str) -> np.ndarray:
    """The column as float64, or a UserError naming the column and the first bad row."""
    col = df[column]
    if pd.api.types.is_bool_dtype(col) or not pd.api.types.is_numeric_dtype(col):
        values = pd.to_numeric(col, errors="coerce")
        bad = np.flatnonzero(values.isna().to_numpy() & col.notna().to_numpy())
        if len(bad) or pd.api.types.is_bool_dtype(col):
            i = int(bad[0]) if len(bad) else 0
            raise UserError(f"{_where(df)}: column {column}, {_row(df, i)}: {col.iloc[i]!r} is "
                            "not a number")
        col = values
    values_N = col.to_numpy(np.float64)
    bad = np.flatnonzero(~np.isfinite(values_N))
    if len(bad):
        i = int(bad[0])
        raise UserError(f"{_where(df)}: column {column}, {_row(df, i)}: missing or not finite "
                        f"({values_N[i]})")
    return values_N


def parse_columns(df: pd.DataFrame, weight_prefix: str = "weight/", loss_prefix: str = "loss/",
                  start_prefix: str = "start/") -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(stages ordered by start, domains) of a results table; checks columns and values.

    A single-stage table has the one stage "" (`weight/<domain>` columns).
    """
    where = _where(df)
    layout = _weight_layout(df, weight_prefix)
    domains = tuple(dict.fromkeys(d for ds in layout.values() for d in ds))
    missing = [weight_column(s, d, weight_prefix) for s in layout for d in domains
               if d not in layout[s]]
    if missing:
        raise UserError(f"{where}: every stage must weight the same domains; missing column(s) "
                        f"{', '.join(missing)}")
    starts = _stage_starts(df, list(layout), start_prefix)
    stages = tuple(sorted(layout, key=lambda s: float(np.median(starts[s]))))
    for s in stages:
        total_N = sum(_numeric(df, weight_column(s, d, weight_prefix)) for d in domains)
        for d in domains:
            column = weight_column(s, d, weight_prefix)
            neg = np.flatnonzero(_numeric(df, column) < 0)
            if len(neg):
                raise UserError(f"{where}: column {column}, {_row(df, int(neg[0]))}: negative "
                                "weight")
        off = np.flatnonzero(np.abs(total_N - 1.0) > SUM_TOLERANCE)
        if len(off):
            i = int(off[0])
            name = f"stage {s!r} " if s != SINGLE_STAGE else ""
            raise UserError(f"{where}: {_row(df, i)}: {name}weights "
                            f"{weight_column(s, '*', weight_prefix)} sum to {total_N[i]:.6g}, "
                            f"not 1 (tolerance {SUM_TOLERANCE:g})")
    for d in domains:
        if f"{loss_prefix}{d}" in df.columns:
            _numeric(df, f"{loss_prefix}{d}")
    first = np.flatnonzero(starts[stages[0]] != 0)
    if len(first):
        i = int(first[0])
        raise UserError(f"{where}: column {start_prefix}{stages[0]}, {_row(df, i)}: the first "
                        f"stage must start at 0, not {starts[stages[0]][i]:g}")
    start_SxN = np.stack([starts[s] for s in stages])
    bad = np.flatnonzero((np.diff(start_SxN, axis=0) <= 0).any(0)) if len(stages) > 1 else []
    if len(bad):
        i = int(bad[0])
        raise UserError(f"{where}: {_row(df, i)}: stage starts "
                        f"{', '.join(f'{start_prefix}{s}={starts[s][i]:g}' for s in stages)} "
                        "are not strictly increasing")
    return stages, domains


def _stage_starts(df: pd.DataFrame, stages: list[str], start_prefix: str
                  ) -> dict[str, np.ndarray]:
    """stage -> (N,) start fractions; the one stage without a start column starts at 0."""
    where = _where(df)
    if stages == [SINGLE_STAGE]:
        return {SINGLE_STAGE: np.zeros(len(df))}
    absent = [s for s in stages if f"{start_prefix}{s}" not in df.columns]
    if len(absent) > 1:
        raise UserError(f"{where}: {len(stages)} stages need the start of every stage but the "
                        f"first: missing column(s) "
                        f"{', '.join(f'{start_prefix}{s}' for s in absent[1:])} (the fraction "
                        "of training at which that stage begins)")
    starts = {}
    for s in stages:
        column = f"{start_prefix}{s}"
        if s in absent:
            starts[s] = np.zeros(len(df))
            continue
        starts[s] = _numeric(df, column)
        out = np.flatnonzero((starts[s] < 0) | (starts[s] >= 1))
        if len(out):
            i = int(out[0])
            raise UserError(f"{where}: column {column}, {_row(df, i)}: {starts[s][i]:g} is not "
                            "a fraction of training in [0, 1)")
    return starts


@dataclasses.dataclass(frozen=True)
class Table:
    path: str
    stages: tuple[str, ...]
    domains: tuple[str, ...]  # weighted
    metrics: tuple[str, ...]  # predicted: a domain's name (its loss column), or a column name
    X_NxF: np.ndarray  # sweeps.fit.features layout
    Y_NxK: np.ndarray
    starts_NxS: np.ndarray
    ignored: tuple[str, ...]  # loss columns of domains without weights

    def schedule(self, i: int) -> MixtureSchedule:
        """The mixture schedule row i trained on."""
        S, D = len(self.stages), len(self.domains)
        w_SxD = self.X_NxF[i, :S * D].reshape(S, D)
        return MixtureSchedule.from_stage_weights(
            [(float(start), dict(zip(self.domains, map(float, w_D))))
             for start, w_D in zip(self.starts_NxS[i], w_SxD)])

    def row(self, i: int) -> str:
        return f"{Path(self.path).name} {_row_name(i, self.path.endswith('.csv'))}"


def load_table(path: Path, weight_prefix: str = "weight/", loss_prefix: str = "loss/",
               start_prefix: str = "start/", objective: Objective = Objective()) -> Table:
    """The table's weights, starts and metrics: every weighted domain's loss column there is,
    and the other columns the objective names."""
    df = read_table(path)
    stages, domains = parse_columns(df, weight_prefix, loss_prefix, start_prefix)
    starts = _stage_starts(df, list(stages), start_prefix)
    starts_NxS = np.stack([starts[s] for s in stages], 1)
    blocks = []
    for s in stages:
        w_NxD = np.stack([_numeric(df, weight_column(s, d, weight_prefix)) for d in domains], 1)
        blocks.append(w_NxD / w_NxD.sum(1, keepdims=True))
    X_NxF = np.concatenate(blocks + [starts_NxS[:, 1:]], 1)
    losses = [d for d in domains if f"{loss_prefix}{d}" in df.columns]
    columns = {d: f"{loss_prefix}{d}" for d in losses}
    columns.update({c: c for c in _named_columns(df, objective, losses, loss_prefix,
                                                 weight_prefix, start_prefix)})
    if not columns:
        raise UserError(f"{_where(df)}: nothing to predict: no {loss_prefix}<domain> column for "
                        f"the weighted domains ({', '.join(domains)}) and no --objective naming "
                        "another column")
    Y_NxK = np.stack([_numeric(df, c) for c in columns.values()], 1)
    ignored = tuple(str(c) for c in df.columns if str(c).startswith(loss_prefix)
                    and str(c)[len(loss_prefix):] not in domains and str(c) not in columns)
    return Table(str(path), stages, domains, tuple(columns), X_NxF, Y_NxK, starts_NxS, ignored)


def _named_columns(df: pd.DataFrame, objective: Objective, losses: Sequence[str],
                   loss_prefix: str, weight_prefix: str, start_prefix: str) -> list[str]:
    """The table's columns the objective and its constraints name (a name or a glob) other
    than the domain losses (`fit.matching`: a glob skips means of others); a name that matches
    nothing is an error listing what is there."""
    numeric = [str(c) for c in df.columns if pd.api.types.is_numeric_dtype(df[c]) and "/" in str(c)
               and str(c) not in {loss_prefix + d for d in losses}
               and not str(c).startswith((weight_prefix, start_prefix))]  # metrics are paths
    found: list[str] = []
    for key in ("targets", "constraints"):
        for name in getattr(objective, key):
            if matching(name, losses):
                continue
            hits = [numeric[i] for i in matching(name, numeric)]
            if not hits:
                listed = ", ".join(loss_prefix + d for d in losses) or "none"
                raise UserError(f"{_where(df)}: objective {key} {name!r}: no such column "
                                f"(loss columns: {listed}; other numeric columns: "
                                f"{', '.join(numeric) or 'none'})")
            found += [c for c in hits if c not in found]
    return found


def _aligned_holdout(train: Table, path: Path, weight_prefix: str, loss_prefix: str,
                     start_prefix: str, objective: Objective) -> Table:
    hold = load_table(path, weight_prefix, loss_prefix, start_prefix, objective)
    if set(hold.stages) != set(train.stages) or set(hold.domains) != set(train.domains):
        raise UserError(f"{path}: holdout table has stages {list(hold.stages)} and domains "
                        f"{list(hold.domains)}; the fitted table {train.path} has stages "
                        f"{list(train.stages)} and domains {list(train.domains)}")
    if hold.stages != train.stages:
        raise UserError(f"{path}: holdout stages start in the order {list(hold.stages)}, the "
                        f"fitted table's in {list(train.stages)}")
    missing = [m for m in train.metrics if m not in hold.metrics]
    if missing:
        raise UserError(f"{path}: holdout table lacks the fitted table's metric column(s) "
                        + ", ".join(metric_key(m) for m in missing))
    perm_D = [hold.domains.index(d) for d in train.domains]
    S, D = len(train.stages), len(train.domains)
    w_NxSxD = hold.X_NxF[:, :S * D].reshape(-1, S, D)[:, :, perm_D]
    X_NxF = np.concatenate([w_NxSxD.reshape(len(w_NxSxD), -1), hold.X_NxF[:, S * D:]], 1)
    perm_K = [hold.metrics.index(m) for m in train.metrics]
    return dataclasses.replace(hold, domains=train.domains, metrics=train.metrics, X_NxF=X_NxF,
                               Y_NxK=hold.Y_NxK[:, perm_K])


def fit_table(path: Path, holdout: Path | None = None, *, weight_prefix: str = "weight/",
              loss_prefix: str = "loss/", start_prefix: str = "start/",
              objective: Objective = Objective(), folds: int = 5, seed: int = 0,
              baseline_row: int | None = None,
              regressors: Sequence[str] = REGRESSORS, samples: int = 100_000,
              refine_steps: int = 200, prefer_measured: bool = True) -> dict:
    """Fit, choose by CV, score the holdout rows, search the uncapped simplex, and keep the best
    measured row (of both tables) when the fit cannot tell its own mixture from it (as a sweep's
    fit.prefer_measured does); prints nothing. The objective's constraints are relative to the
    fit's prediction at `baseline_row`'s mixture (1-based, as errors number rows)."""
    train = load_table(path, weight_prefix, loss_prefix, start_prefix, objective)
    objective.check(train.metrics, where="objective")
    check_trials(len(train.Y_NxK), folds, where=train.path)
    hold = (_aligned_holdout(train, Path(holdout), weight_prefix, loss_prefix, start_prefix,
                             objective) if holdout is not None else None)
    result = fit(train.X_NxF, train.Y_NxK, train.domains, folds=folds, seed=seed,
                 regressors=regressors, objective=objective, metrics=train.metrics)
    baseline = _baseline(train, result, objective, baseline_row)
    S, D = len(train.stages), len(train.domains)
    # the search keeps the stage starts the runs used (their median) and centres its samples
    # on the runs' average mixture
    starts_S = np.median(train.starts_NxS, 0)
    starts_S[0] = 0.0
    center_SxD = train.X_NxF[:, :S * D].reshape(-1, S, D).mean(0)
    template = MixtureSchedule.from_stage_weights(
        [(float(st), dict(zip(train.domains, map(float, w_D / w_D.sum()))))
         for st, w_D in zip(starts_S, center_SxD)])
    fitted = optimize.choose(result, train.domains, template, {}, 0.0, objective, baseline,
                             samples=samples, refine_steps=refine_steps, seed=seed,
                             method="search")
    table, i, measured = _best_row([train] + ([hold] if hold is not None else []), objective)
    schedule, predicted, choice = optimize.prefer_measured(
        result, objective, fitted, (table.schedule(i), measured), table.row(i),
        enabled=prefer_measured)
    return {
        "table": train.path,
        "n_train": len(train.Y_NxK),
        "stages": list(train.stages),
        "domains": list(train.domains),
        "metrics": list(train.metrics),
        "baseline_row": baseline_row,
        "folds": folds,
        "objective": objective.describe(),
        "chosen": result.chosen,
        "cv_mse": result.cv_mse,
        "notes": result.notes,
        "underdetermined": result.underdetermined(),
        "ignored_columns": list(train.ignored),
        "holdout": (dict(evaluate_holdout(result, hold.X_NxF, hold.Y_NxK, objective),
                         table=hold.path) if hold is not None else None),
        "winner": schedule.to_dict(),
        "predicted": predicted,
        "predicted_objective": optimize.objective_of(predicted, objective, train.metrics),
        "best_observed_objective": choice["measured"],
        "choice": choice,
    }


def _baseline(train: Table, result, objective: Objective, row: int | None
              ) -> dict[str, float] | None:
    """The fit's metrics at the baseline row's mixture: what the constraints are relative to
    (predicted, like the mixtures they are compared with)."""
    if row is None:
        if objective.constrained:
            raise UserError(f"objective: the constraints ({objective.describe()}) are relative to "
                            "a baseline run: name its row with --baseline ROW (e.g. the natural "
                            "mixture's)")
        return None
    if isinstance(row, bool) or not isinstance(row, int) or not 1 <= row <= len(train.Y_NxK):
        raise UserError(f"--baseline {row!r}: not a row of {train.path} (1 to "
                        f"{len(train.Y_NxK)})")
    return optimize.predict_schedule(result, train.schedule(row - 1))


def _best_row(tables: Sequence[Table], objective: Objective) -> tuple[Table, int, float]:
    """The table, row and value of the lowest measured objective."""
    table, obj_N = min(((t, objective_values(t.Y_NxK, t.metrics, objective)) for t in tables),
                       key=lambda t_obj: t_obj[1].min())
    i = int(np.argmin(obj_N))
    return table, i, float(obj_N[i])


def _num(x: float, fmt: str = ".4g") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def format_fit_report(result: dict) -> str:
    domains = result["domains"]
    metrics = result.get("metrics", domains)
    names = list(next(iter(result["cv_mse"].values())))
    width = max(8, *(len(metric_key(m)) for m in metrics)) + 2
    lines = [f"fit: {result['table']}: {result['n_train']} runs, {len(domains)} domains, "
             f"{len(result['stages'])} stage(s), {len(metrics)} metric(s); {result['folds']}-fold "
             f"CV; objective: {result['objective']}",
             "",
             "cross-validated MSE per metric and of the objective (* = chosen for every "
             "metric: the simplest within one standard error of the best on the objective)",
             "metric".ljust(width) + "".join(n.rjust(13) for n in names) + "   chosen"]
    chosen = {**result["chosen"], "objective": result["chosen"][metrics[0]]}
    for d in [*metrics, "objective"]:
        row = "".join((_num(result["cv_mse"][d][n], ".3e")
                       + ("*" if n == chosen[d] else " ")).rjust(13) for n in names)
        lines.append((d if d == "objective" else metric_key(d)).ljust(width) + row + "   "
                     + chosen[d])
    for d, note in result.get("notes", {}).items():
        lines.append(f"  note: {d}: loglinear {note}")
    if result.get("underdetermined"):
        lines.append(f"warning: {result['underdetermined']}")
    if result.get("ignored_columns"):
        lines.append("ignored loss columns (no weights): " + ", ".join(result["ignored_columns"]))
    hold = result.get("holdout")
    lines.append("")
    if hold:
        lines.append(f"holdout ({hold['n']} runs from {hold['table']}): Spearman "
                     f"{_num(hold['spearman'], '.3f')}, regret {_num(hold['regret'])}, "
                     f"error of the objective (RMSE) {_num(hold['objective_rmse'])}")
        lines.append("  per-metric Spearman: " + ", ".join(
            f"{metric_key(d)} {_num(v, '.3f')}" for d, v in hold["per_domain_spearman"].items()))
    else:
        lines.append("holdout: none (--holdout TABLE2 scores the fit on runs it never saw)")
    choice = result["choice"]
    source = "the fit's" if choice["from"] == "fit" else f"{choice['from']}, measured"
    lines += ["", optimize.describe_choice(choice), f"chosen mixture ({source}):"]
    stage_names = result["stages"]
    for name, st in zip(stage_names, result["winner"]["stages"]):
        label = f"stage {name}" if name else "stage"
        lines.append(f"  {label} (start {st['start']:.3f}): " + ", ".join(
            f"{d} {st['weights'][d]:.4f}" for d in domains))
    lines.append("predicted: " + ", ".join(
        f"{metric_key(d)} {_num(v)}" for d, v in result["predicted"].items())
        + f"; objective {_num(result['predicted_objective'])} (best run observed: "
        f"{choice['best_measured']}, {_num(result['best_observed_objective'])})")
    return "\n".join(lines)
