"""`gx scaling`: a ladder of model sizes x token budgets on Ray Tune, and the Chinchilla fit.

The ladder (`run_ladder`): every (size, steps) pair is a real `gemini_core.train.trainer.run_experiment`
of the base experiment with that model and that many steps; its own run dir and fingerprint, so
rerunning the ladder reuses done runs and resumes interrupted ones from their checkpoints. The
data and the tokenizer are prepared once on the driver; the runs not yet done go to Ray Tune,
the most expensive first (the longest jobs started first finish the grid soonest).

The fit (`fit_law`): Chinchilla's approach 3 (Hoffmann et al. 2022, appendix D.2):

    minimise  sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i )

over (a, b, e, alpha, beta), A = e^a, B = e^b, E = e^e, delta = 1e-3, with L-BFGS from a grid of
starting points, keeping the best. The grid is Chinchilla's (alpha, beta in {0, .5, .., 2},
e in {-1, -.5, .., 1}, a, b in {0, 5, .., 25}: 4,500 points); the objective is evaluated at all
of them at once and L-BFGS starts from the `starts` best. Bootstrap intervals resample the runs
with replacement and refit (from the full-data optimum and the 4 best grid points of each
resample); 5-95% percentiles. N is the non-embedding parameter count (Kaplan et al.: with it,
small models fall on one curve; embedding tables dominate the total at this scale).

Sweep dir: <runs root>/sweeps/<name>-<fingerprint[:8]>/ with ladder.json (the runs),
ladder.csv (run_id, size, steps, params (non-embedding), params_total, tokens, loss = final
eval/mean/loss, bpb, flops, failed), fit.json, fit.svg and fit.png.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import ml_collections
import numpy as np

from gemini_core import config as gc_config
from gemini_core.config import ExperimentConfig, to_dataclass
from gemini_core.errors import UserError
from gemini_core.runs.rundir import fingerprint, write_json_atomic
from sweeps.config import ResourcesConfig, check_resources

Log = Callable[[str], None]
LOSS = "loss/"
TABLE_COLUMNS = ("params", "tokens", "loss")
N_CONSTANTS = 5  # E, A, alpha, B, beta
BOOT_STARTS = 4  # grid starts per bootstrap refit, besides the full-data optimum


# ---------------------------------------------------------------------------------------------
# the ladder's typed config


@dataclasses.dataclass(frozen=True)
class ScalingFitConfig:
    bootstrap: int = 200  # resamples of the runs for the 5-95% intervals (0 = none)
    holdout_largest: int = 0  # the K runs of most compute (6·N·D): left out of the fit, predicted
    delta: float = 1e-3  # Huber's delta on log-loss residuals
    starts: int = 64  # L-BFGS starts: the best points of the Chinchilla grid
    seed: int = 0
    # FLOPs for the compute-optimal table; empty = the largest run's 6·N·D times 1, 10, 100, 1000
    budgets: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class LadderConfig:
    name: str
    base: Any  # the experiment every run is (an experiment ConfigDict), name replaced by `name`
    sizes: Mapping[str, Any]  # size name -> fields replacing the base's, e.g. {"model": {...}}
    steps: tuple[int, ...]  # token budgets: steps x batch x seq tokens per run
    fit: ScalingFitConfig = ScalingFitConfig()
    resources: ResourcesConfig = ResourcesConfig()


@dataclasses.dataclass(frozen=True)
class Rung:
    """One run of the ladder."""

    size: str
    steps: int
    config: ExperimentConfig

    @property
    def name(self) -> str:
        return f"{self.size}-s{self.steps}"


def _merge(base: dict, update: Mapping) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, Mapping) else v
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _keys(d: Mapping, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, Mapping):
            out |= _keys(v, f"{prefix}{k}.")
    return out


def rung_config(ladder: LadderConfig, size: str, steps: int) -> ExperimentConfig:
    """The base with the size's fields and `steps`, validated like any user config; an error
    names the ladder's key (config.sizes.<size>.* or config.base.*) and the run."""
    override = _plain(ladder.sizes[size])
    cfg = _merge(_plain(ladder.base), override)
    cfg = _merge(cfg, {"name": ladder.name, "train": {"steps": steps}, "tracking": {
        "job_type": "scaling", "tags": [ladder.name, size, f"steps={steps}"]}})
    try:
        return gc_config.from_config_dict(cfg)
    except UserError as e:
        msg = str(e)
        key = msg.split("=")[0].split(":")[0].removeprefix("config.")
        where = f"config.sizes.{size}." if key in _keys(override) else "config.base."
        raise UserError(f"{msg.replace('config.', where, 1)} (ladder run {size} x {steps} "
                        "steps)") from None


def _check(ladder: LadderConfig) -> None:
    if not ladder.name:
        raise UserError("config.name='': every ladder needs a name")
    if not isinstance(ladder.base, Mapping) or not ladder.base:
        raise UserError("config.base: the experiment every run trains (a section of keys, e.g. "
                        "an experiment's get_config())")
    if len(ladder.sizes) < 2:
        raise UserError(f"config.sizes: {len(ladder.sizes)} size(s); the fit needs at least 2 "
                        "model sizes")
    for size, fields in ladder.sizes.items():
        if not isinstance(fields, Mapping):
            raise UserError(f"config.sizes.{size}={fields!r}: expected a section of experiment "
                            "fields, e.g. {'model': {'d_model': 64, ...}}")
    if len(set(ladder.steps)) < 2:
        raise UserError(f"config.steps={ladder.steps}: the fit needs at least 2 token budgets")
    for i, s in enumerate(ladder.steps):
        if s < 1:
            raise UserError(f"config.steps[{i}]={s}: must be >= 1")
    if len(set(ladder.steps)) != len(ladder.steps):
        raise UserError(f"config.steps={ladder.steps}: a budget is named twice")
    f = ladder.fit
    if f.bootstrap < 0:
        raise UserError(f"config.fit.bootstrap={f.bootstrap}: must be >= 0")
    if f.starts < 1:
        raise UserError(f"config.fit.starts={f.starts}: must be >= 1")
    if not f.delta > 0:
        raise UserError(f"config.fit.delta={f.delta}: must be > 0")
    runs = len(ladder.sizes) * len(ladder.steps)
    if not 0 <= f.holdout_largest <= runs - N_CONSTANTS:
        raise UserError(f"config.fit.holdout_largest={f.holdout_largest}: must be in "
                        f"[0, {runs - N_CONSTANTS}] ({runs} runs, the fit has "
                        f"{N_CONSTANTS} constants)")
    for i, c in enumerate(f.budgets):
        if not c > 0:
            raise UserError(f"config.fit.budgets[{i}]={c}: FLOPs must be > 0")
    check_resources(ladder.resources)


def from_config_dict(cfg: ml_collections.ConfigDict | Mapping) -> LadderConfig:
    ladder = to_dataclass(cfg, LadderConfig, "config")
    _check(ladder)
    rungs(ladder)  # every run's config is valid now, before any data is read
    return ladder


def rungs(ladder: LadderConfig) -> list[Rung]:
    return [Rung(size, steps, rung_config(ladder, size, steps))
            for size in ladder.sizes for steps in ladder.steps]


# ---------------------------------------------------------------------------------------------
# the law and its fit: pure numpy/scipy on arrays of runs


@dataclasses.dataclass(frozen=True)
class Law:
    """L(N, D) = E + A/N^alpha + B/D^beta, kept in log form (A = e^a, B = e^b, E = e^e)."""

    a: float
    b: float
    e: float
    alpha: float
    beta: float

    @property
    def E(self) -> float:
        return math.exp(self.e)

    @property
    def A(self) -> float:
        return math.exp(self.a)

    @property
    def B(self) -> float:
        return math.exp(self.b)

    def predict(self, N, D) -> np.ndarray:
        logN, logD = np.log(np.asarray(N, np.float64)), np.log(np.asarray(D, np.float64))
        return (np.exp(self.e) + np.exp(self.a - self.alpha * logN)
                + np.exp(self.b - self.beta * logD))

    def constants(self) -> dict[str, float]:
        return {"E": self.E, "A": self.A, "alpha": self.alpha, "B": self.B, "beta": self.beta}

    @staticmethod
    def from_constants(E: float, A: float, alpha: float, B: float, beta: float) -> "Law":
        return Law(math.log(A), math.log(B), math.log(E), alpha, beta)


def chinchilla_grid() -> np.ndarray:
    """Hoffmann et al.'s starting points, rows of (a, b, e, alpha, beta)."""
    exps = np.arange(0.0, 2.01, 0.5)
    es = np.arange(-1.0, 1.01, 0.5)
    abs_ = np.arange(0.0, 25.01, 5.0)
    return np.array([(a, b, e, al, be) for al, be, e, a, b
                     in itertools.product(exps, exps, es, abs_, abs_)])


def huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


@dataclasses.dataclass(frozen=True)
class _Data:
    """log N, log D centred (so a and alpha are not one ridge), log L."""

    xN: np.ndarray
    xD: np.ndarray
    logL: np.ndarray
    mN: float
    mD: float

    @staticmethod
    def of(N, D, L) -> "_Data":
        logN, logD = np.log(np.asarray(N, np.float64)), np.log(np.asarray(D, np.float64))
        mN, mD = float(logN.mean()), float(logD.mean())
        return _Data(logN - mN, logD - mD, np.log(np.asarray(L, np.float64)), mN, mD)

    def to_centred(self, theta_Px5: np.ndarray) -> np.ndarray:
        """(a, b, e, alpha, beta) -> (a - alpha·mN, b - beta·mD, e, alpha, beta)."""
        out = np.array(theta_Px5, np.float64, copy=True)
        out[..., 0] -= out[..., 3] * self.mN
        out[..., 1] -= out[..., 4] * self.mD
        return out

    def to_law(self, c: np.ndarray) -> Law:
        return Law(float(c[0] + c[3] * self.mN), float(c[1] + c[4] * self.mD), float(c[2]),
                   float(c[3]), float(c[4]))


def _objective(c: np.ndarray, data: _Data, delta: float) -> tuple[float, np.ndarray]:
    """Huber loss of log-residuals and its gradient, in centred parameters."""
    a, b, e, alpha, beta = c
    z0, z1 = a - alpha * data.xN, b - beta * data.xD
    m = np.maximum(np.maximum(z0, z1), e)
    e0, e1, e2 = np.exp(z0 - m), np.exp(z1 - m), np.exp(e - m)
    s = e0 + e1 + e2
    r = m + np.log(s) - data.logL  # LSE(z) - log L
    g = np.clip(r, -delta, delta) / s  # Huber'(r) times the softmax denominators
    g0, g1 = g * e0, g * e1
    grad = np.array([g0.sum(), g1.sum(), (g * e2).sum(), -g0 @ data.xN, -g1 @ data.xD])
    return float(huber(r, delta).sum()), grad


def _grid_objective(c_Gx5: np.ndarray, data: _Data, delta: float) -> np.ndarray:
    """The objective at every grid point at once: (G,)."""
    z_Gx3xn = np.stack([c_Gx5[:, :1] - c_Gx5[:, 3:4] * data.xN,
                        c_Gx5[:, 1:2] - c_Gx5[:, 4:5] * data.xD,
                        np.broadcast_to(c_Gx5[:, 2:3], (len(c_Gx5), len(data.xN)))], axis=1)
    m = z_Gx3xn.max(axis=1)
    r_Gxn = m + np.log(np.exp(z_Gx3xn - m[:, None]).sum(axis=1)) - data.logL
    return huber(r_Gxn, delta).sum(axis=1)


# alpha, beta >= 0: a law whose loss grows with N or D has no compute-optimal allocation
_BOUNDS = [(None, None)] * 3 + [(0.0, None)] * 2


def _lbfgs(data: _Data, starts_Sx5: np.ndarray, delta: float) -> tuple[np.ndarray, float]:
    from scipy.optimize import minimize

    best, best_f = None, math.inf
    for c0 in starts_Sx5:
        res = minimize(_objective, c0, args=(data, delta), jac=True, method="L-BFGS-B",
                       bounds=_BOUNDS, options={"maxiter": 2000})
        if np.all(np.isfinite(res.x)) and res.fun < best_f:
            best, best_f = res.x, float(res.fun)
    return best, best_f


def _best_starts(data: _Data, grid: np.ndarray, k: int, delta: float) -> np.ndarray:
    centred = data.to_centred(grid)
    f = _grid_objective(centred, data, delta)
    return centred[np.argsort(f, kind="stable")[:k]]


def _single_threaded():
    """L-BFGS on 5 parameters: BLAS threads only add wake-up costs (50x slower on a busy
    2-core machine), so they are held to one for the fit."""
    import scipy.optimize  # noqa: F401  (loads scipy's own BLAS first, so the limit covers it)
    from threadpoolctl import threadpool_limits
    return threadpool_limits(1)


@dataclasses.dataclass(frozen=True)
class Fit:
    law: Law
    objective: float
    n: int
    starts: int
    delta: float


def fit_law(N, D, L, *, delta: float = 1e-3, starts: int = 64,
            grid: np.ndarray | None = None, extra_starts: list[Law] = ()) -> Fit:
    """Chinchilla's approach 3 on runs (N_i, D_i, L_i); see the module docstring."""
    N, D, L = (np.asarray(x, np.float64) for x in (N, D, L))
    if not (N.shape == D.shape == L.shape and N.ndim == 1):
        raise ValueError(f"N, D, L must be 1-d arrays of one length: {N.shape}, {D.shape}, "
                         f"{L.shape}")
    if len(N) < N_CONSTANTS:
        raise UserError(f"the fit needs at least {N_CONSTANTS} runs ({N_CONSTANTS} constants); "
                        f"got {len(N)}")
    if np.any(~np.isfinite(np.stack([N, D, L]))) or np.any(np.stack([N, D, L]) <= 0):
        raise UserError("params, tokens and loss must be finite and > 0 for every fitted run")
    data = _Data.of(N, D, L)
    grid = chinchilla_grid() if grid is None else grid
    init = _best_starts(data, grid, starts, delta)
    if extra_starts:
        extra = np.array([[w.a, w.b, w.e, w.alpha, w.beta] for w in extra_starts])
        init = np.concatenate([data.to_centred(extra), init])
    with _single_threaded():
        best, f = _lbfgs(data, init, delta)
    return Fit(data.to_law(best), f, len(N), len(init), delta)


def _percentiles(values: np.ndarray, lo: float = 5, hi: float = 95) -> list[float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return [math.nan, math.nan]
    return [float(np.percentile(values, lo)), float(np.percentile(values, hi))]


def bootstrap(N, D, L, fit: Fit, *, resamples: int, seed: int = 0) -> list[Law]:
    """Refits on runs drawn with replacement, each from the full-data optimum and its own
    BOOT_STARTS best grid points."""
    N, D, L = (np.asarray(x, np.float64) for x in (N, D, L))
    rng = np.random.default_rng(seed)
    grid = chinchilla_grid()
    laws = []
    for _ in range(resamples):
        idx = rng.integers(0, len(N), len(N))
        laws.append(fit_law(N[idx], D[idx], L[idx], delta=fit.delta, starts=BOOT_STARTS,
                            grid=grid, extra_starts=[fit.law]).law)
    return laws


# ---------------------------------------------------------------------------------------------
# compute-optimal allocation


def compute_optimal(law: Law, C) -> dict[str, np.ndarray]:
    """argmin over N·D = C/6 of L(N, D): N_opt = G (C/6)^a, D_opt = (C/6)^b / G with
    a = beta/(alpha+beta), b = alpha/(alpha+beta), G = (alpha A / (beta B))^(1/(alpha+beta))."""
    C = np.asarray(C, np.float64)
    s = law.alpha + law.beta
    if law.alpha <= 0 or law.beta <= 0:
        nan = np.full_like(C, math.nan)
        return {"a": math.nan, "b": math.nan, "N_opt": nan, "D_opt": nan, "tokens_per_param": nan}
    a, b = law.beta / s, law.alpha / s
    logG = (math.log(law.alpha / law.beta) + law.a - law.b) / s
    logC6 = np.log(C / 6.0)
    N_opt, D_opt = np.exp(logG + a * logC6), np.exp(b * logC6 - logG)
    return {"a": a, "b": b, "N_opt": N_opt, "D_opt": D_opt, "tokens_per_param": D_opt / N_opt}


# ---------------------------------------------------------------------------------------------
# a table of runs -> fit.json, the report, the plot


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


def holdout_mask(N: np.ndarray, D: np.ndarray, k: int) -> np.ndarray:
    """The k runs of most compute 6·N·D (ties: larger N first) -> True."""
    order = np.lexsort((-N, -(N * D)))
    mask = np.zeros(len(N), bool)
    mask[order[:k]] = True
    return mask


def fit_runs(df, *, holdout: np.ndarray | int = 0, bootstrap_resamples: int = 200,
             delta: float = 1e-3, starts: int = 64, seed: int = 0,
             budgets=(),
             params_kind: str = "non-embedding parameters") -> dict:
    """The fit of a table of runs, its intervals, held-out predictions and the compute-optimal
    allocation, as a JSON-able dict. `holdout`: a count (the largest runs by compute) or a mask."""
    N, D, L = (df[c].to_numpy(np.float64) for c in TABLE_COLUMNS)
    held = holdout_mask(N, D, holdout) if np.isscalar(holdout) else np.asarray(holdout, bool)
    if (~held).sum() < N_CONSTANTS:
        raise UserError(f"{int(held.sum())} runs held out leave {int((~held).sum())} to fit; "
                        f"the fit needs at least {N_CONSTANTS}")
    t0 = time.perf_counter()
    fit = fit_law(N[~held], D[~held], L[~held], delta=delta, starts=starts)
    law = fit.law
    laws = bootstrap(N[~held], D[~held], L[~held], fit, resamples=bootstrap_resamples,
                     seed=seed) if bootstrap_resamples else []
    # by default around the ladder's own compute: extrapolating a few hundred thousand
    # parameters to LLM budgets says little
    budgets = (np.asarray(budgets, np.float64) if len(budgets)
               else 6 * float((N * D).max()) * 10.0 ** np.arange(4))
    opt = compute_optimal(law, budgets)

    def interval(f) -> list[float]:
        return _percentiles(np.array([f(w) for w in laws])) if laws else [math.nan, math.nan]

    pred = law.predict(N, D)
    rel = (pred - L) / L

    def rows(mask) -> list[dict]:
        return [{"run_id": str(df["run_id"].iloc[i]), "params": float(N[i]),
                 "tokens": float(D[i]), "loss": float(L[i]), "predicted": float(pred[i]),
                 "relative_error": float(rel[i]),
                 "predicted_interval": interval(lambda w: float(w.predict(N[i], D[i])))}
                for i in np.flatnonzero(mask)]

    constants = law.constants()
    return {
        "form": "L(N, D) = E + A / N^alpha + B / D^beta",
        "params": params_kind,
        "constants": constants,
        "log_constants": {"a": law.a, "b": law.b, "e": law.e},
        "intervals": {k: interval(lambda w, k=k: w.constants()[k]) for k in constants},
        "bootstrap": {"resamples": len(laws), "percentiles": [5, 95], "seed": seed},
        "method": {"huber_delta": delta, "optimizer": "L-BFGS-B (alpha, beta >= 0)",
                   "grid_points": len(chinchilla_grid()), "starts": fit.starts,
                   "bootstrap_starts": BOOT_STARTS + 1, "objective": fit.objective},
        "n_fit": int((~held).sum()), "n_holdout": int(held.sum()),
        "fitted": rows(~held), "holdout": rows(held),
        "compute_optimal": {
            "flops": "C = 6 N D",
            "a": opt["a"], "b": opt["b"],
            "a_interval": interval(lambda w: compute_optimal(w, budgets[:1])["a"]),
            "budgets": [{"C": float(c), "N_opt": float(n), "D_opt": float(d),
                         "tokens_per_param": float(t),
                         "tokens_per_param_interval": interval(
                             lambda w, c=c: float(compute_optimal(w, [c])["tokens_per_param"][0]))}
                        for c, n, d, t in zip(budgets, opt["N_opt"], opt["D_opt"],
                                              opt["tokens_per_param"])]},
        "seconds": time.perf_counter() - t0,
    }


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

    law = Law(**result["log_constants"], alpha=result["constants"]["alpha"],
              beta=result["constants"]["beta"])
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
            curve = law.predict(grid, v) if ax is axes[0] else law.predict(v, grid)
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
# the ladder: runs on Ray Tune


@dataclasses.dataclass(frozen=True)
class Planned:
    rung: Rung
    run_id: str
    run_dir: Path
    params: int  # non-embedding
    params_total: int
    tokens: int


@dataclasses.dataclass(frozen=True)
class LadderPlan:
    ladder: LadderConfig
    runs: list[Planned]
    dir: Path
    runs_root: Path


def plan_ladder(ladder: LadderConfig, runs_root: Path, log: Log = print) -> LadderPlan:
    """Data and tokenizer once (every run shares them), every run's identity, the sweep dir."""
    from gemini_core.scale import flops
    from gemini_core.train import trainer

    runs_root = Path(runs_root).absolute()
    planned = []
    for i, rung in enumerate(rungs(ladder)):
        root = rung.config.data.root
        if not root or not Path(root).is_dir():
            raise UserError(f"config.base.data.root={root!r}: set it to the corpus folder, e.g. "
                            "--config.base.data.root=../shared/corpus")
        # the first prepares data and tokenizer (or finds them cached); the rest hit the cache
        p = trainer.prepare(rung.config, runs_root, log=log if i == 0 else lambda _: None)
        counts = flops.param_counts(rung.config.model)
        tokens = rung.config.train.steps * rung.config.train.batch_size * rung.config.data.seq_len
        planned.append(Planned(rung, p.run.run_id, p.run.path, counts["non_embedding"],
                               counts["total"], tokens))
    fp = fingerprint({"runs": [p.run_id for p in planned]})  # run ids carry every field + data
    return LadderPlan(ladder, planned, runs_root / "sweeps" / f"{ladder.name}-{fp[:8]}", runs_root)


def _job_config(cfg: ExperimentConfig) -> dict:
    plain = gc_config.to_json_dict(cfg)
    plain["model"].pop("vocab_size")  # comes from data.tokenizer.vocab_size
    for key in ("root", "cache_dir", "schedule"):  # Tune runs each trial in a dir of its own
        if plain["data"][key]:
            plain["data"][key] = str(Path(plain["data"][key]).absolute())
    return plain


def run_rung(config: dict, runs_root: str, cpus: int, progress_every_s: float = 0.0) -> None:
    """The Ray Tune function trainable: one ladder run on CPUs of its own, reported once at its
    end (and its progress on the way)."""
    from sweeps.cpus import trial_cpus
    with trial_cpus(cpus):  # before JAX starts: XLA's thread flag
        from ray import tune

        from gemini_core.train import step_fns, trainer
        from sweeps.runner import progress_log
        step_fns.tune_host_malloc()
        job = config["job"]
        cfg = gc_config.from_config_dict(job["config"])
        summary = trainer.run_experiment(cfg, Path(runs_root),
                                       log=progress_log(job["name"], progress_every_s))
        loss = float(summary["eval/mean/loss"])
        tune.report({"name": job["name"], "run_id": summary["run_id"],
                     "failed": "" if math.isfinite(loss) else "non-finite loss",
                     f"{LOSS}mean": loss})


def _run_on_tune(plan: LadderPlan, pending: list[Planned], log: Log) -> dict[str, str]:
    """Runs `pending` on Ray Tune; returns run name -> error ('' when it finished)."""
    from ray import tune

    from sweeps.runner import _live_table, tune_trainable

    res = plan.ladder.resources
    trainable, concurrent = tune_trainable(run_rung, res, log, runs_root=str(plan.runs_root))
    # most compute first: the longest runs start first, so the grid ends soonest
    pending = sorted(pending, key=lambda p: -p.params * p.tokens)
    jobs = [{"name": p.rung.name, "config": _job_config(p.rung.config)} for p in pending]
    # a fresh Tuner each time: the runs themselves resume (run dirs, checkpoints), and only
    # the runs not yet done are in it
    path = plan.dir / "tune"
    shutil.rmtree(path, ignore_errors=True)
    tuner = tune.Tuner(
        trainable, param_space={"job": tune.grid_search(jobs)},
        # reused worker processes, as the mixture sweep's: a run after the first skips process
        # start and imports
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, reuse_actors=True),
        run_config=tune.RunConfig(
            name="runs", storage_path=str(path), verbose=0,
            callbacks=[_live_table("ladder", len(jobs), log, res.progress_every_s)],
            failure_config=tune.FailureConfig(max_failures=res.max_failures)))
    log(f"ladder: {len(jobs)} runs to train, {concurrent} at a time, {res.cpus_per_trial} CPU each")
    from sweeps.runner import fit_results
    return {name: failed for name, (_, failed) in fit_results(tuner).items()}


def _summary(p: Planned) -> dict:
    path = p.run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def run_state(p: Planned) -> str:
    path = p.run_dir / "status.json"
    return json.loads(path.read_text()).get("state", "") if path.is_file() else ""


def ladder_table(plan: LadderPlan, errors: Mapping[str, str]):
    import pandas as pd

    records = []
    for p in plan.runs:
        s = _summary(p) if run_state(p) == "done" else {}
        loss = float(s.get("eval/mean/loss", math.nan))
        failed = errors.get(p.rung.name) or ("" if math.isfinite(loss) else
                                             f"not done ({run_state(p) or 'never started'})")
        records.append({"run_id": p.run_id, "size": p.rung.size, "steps": p.rung.steps,
                        "params": p.params, "params_total": p.params_total, "tokens": p.tokens,
                        "loss": loss, "bpb": float(s.get("eval/mean/bpb", math.nan)),
                        "flops": 6.0 * p.params * p.tokens, "failed": failed})
    return pd.DataFrame.from_records(records)


def run_ladder(ladder: LadderConfig, runs_root: Path, *, log: Log = print) -> Path:
    t0 = time.perf_counter()
    plan = plan_ladder(ladder, runs_root, log)
    plan.dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(plan.dir / "ladder.json", {
        "ladder": gc_config.to_json_dict(ladder), "runs_root": str(plan.runs_root),
        "runs": [{"name": p.rung.name, "size": p.rung.size, "steps": p.rung.steps,
                  "run_id": p.run_id, "params": p.params, "params_total": p.params_total,
                  "tokens": p.tokens} for p in plan.runs]})
    pending = [p for p in plan.runs if run_state(p) != "done"]
    log(f"ladder {plan.dir.name}: {len(ladder.sizes)} sizes x {len(ladder.steps)} budgets = "
        f"{len(plan.runs)} runs ({len(plan.runs) - len(pending)} already done) -> {plan.dir}")
    errors = _run_on_tune(plan, pending, log) if pending else {}
    table = ladder_table(plan, errors)
    table.to_csv(plan.dir / "ladder.csv", index=False)
    for _, row in table[table["failed"] != ""].iterrows():
        log(f"ladder: {row['run_id']} ({row['size']} x {row['steps']} steps) left out of the "
            f"fit: {row['failed']}")
    log(format_ladder(table))
    log(f"ladder: runs took {time.perf_counter() - t0:.0f}s")
    ok = table[table["failed"] == ""]
    f = ladder.fit
    if len(ok) - f.holdout_largest < N_CONSTANTS:
        raise UserError(f"ladder: only {len(ok)} of {len(table)} runs finished; the fit needs "
                        f"at least {N_CONSTANTS + f.holdout_largest} ({plan.dir / 'ladder.csv'})")
    fit_and_write(ok.reset_index(drop=True), plan.dir, "fit", holdout_largest=f.holdout_largest,
                  bootstrap_resamples=f.bootstrap, delta=f.delta, starts=f.starts, seed=f.seed,
                  budgets=f.budgets, source=plan.dir.name, log=log)
    return plan.dir


def format_ladder(table) -> str:
    """Loss of every run: sizes down, budgets across."""
    steps = sorted(table["steps"].unique())
    tokens = {s: int(table[table["steps"] == s]["tokens"].iloc[0]) for s in steps}
    lines = [f"{'size':<8} {'N (non-emb)':>12} " + " ".join(f"{tokens[s]:>10,}" for s in steps)
             + "   <- D (tokens); final eval/mean/loss"]
    for size in table.sort_values(["params", "steps"])["size"].unique():
        rows = table[table["size"] == size]
        cells = []
        for s in steps:
            row = rows[rows["steps"] == s]
            note = str(row["failed"].iloc[0]) if "failed" in row and not row.empty else ""
            failed = row.empty or note not in ("", "nan")
            cells.append(f"{'failed':>10}" if failed else f"{float(row['loss'].iloc[0]):>10.4f}")
        lines.append(f"{size:<8} {int(rows['params'].iloc[0]):>12,} " + " ".join(cells))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# `gx scaling fit SWEEP`: a sweep dir, a sweep name, or a table of results from elsewhere


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
