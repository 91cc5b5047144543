"""The Chinchilla scaling-law fit of a table of runs (`gx scaling fit`; a ladder's fit.json).

The law is gemini_core's (`compute_plan.LossFit`: L(N, D) = E + A/N^alpha + B/D^beta, the one
`gx plan` uses with Chinchilla's published constants); here it is fitted. The fit (`fit_law`):
Chinchilla's approach 3 (Hoffmann et al. 2022, appendix D.2):

    minimise  sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i )

over (a, b, e, alpha, beta), A = e^a, B = e^b, E = e^e, delta = 1e-3, with L-BFGS from a grid of
starting points, keeping the best. The grid is Chinchilla's (alpha, beta in {0, .5, .., 2},
e in {-1, -.5, .., 1}, a, b in {0, 5, .., 25}: 4,500 points); the objective is evaluated at all
of them at once and L-BFGS starts from the `starts` best. Bootstrap intervals resample the runs
with replacement and refit (from the full-data optimum and the 4 best grid points of each
resample); 5-95% percentiles. N is the non-embedding parameter count (Kaplan et al.: with it,
small models fall on one curve; embedding tables dominate the total at this scale).
Tables of runs in and fit.json out: sweeps.scaling_table.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time

import numpy as np

from gemini_core.errors import UserError
from gemini_core.scale.compute_plan import TRAIN_FLOPS_PER_PARAM_TOKEN, LossFit

TABLE_COLUMNS = ("params", "tokens", "loss")
CONSTANTS = ("E", "A", "alpha", "B", "beta")
N_CONSTANTS = len(CONSTANTS)
BOOT_STARTS = 4  # grid starts per bootstrap refit, besides the full-data optimum


@dataclasses.dataclass(frozen=True)
class ScalingFitConfig:
    bootstrap: int = 200  # resamples of the runs for the 5-95% intervals (0 = none)
    holdout_largest: int = 0  # the K runs of most compute (6·N·D): left out of the fit, predicted
    delta: float = 1e-3  # Huber's delta on log-loss residuals
    starts: int = 64  # L-BFGS starts: the best points of the Chinchilla grid
    seed: int = 0
    # FLOPs for the compute-optimal table; empty = the largest run's 6·N·D times 1, 10, 100, 1000
    budgets: tuple[float, ...] = ()


# ---------------------------------------------------------------------------------------------
# the law in the fit's log form: A = e^a, B = e^b, E = e^e


def law_from_log(a: float, b: float, e: float, alpha: float, beta: float) -> LossFit:
    return LossFit(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)


def log_form(law: LossFit) -> np.ndarray:
    """(a, b, e, alpha, beta): the fit's parameters of a law."""
    return np.array([math.log(law.A), math.log(law.B), math.log(law.E), law.alpha, law.beta])


def constants(law: LossFit) -> dict[str, float]:
    return {k: float(getattr(law, k)) for k in CONSTANTS}


def predict(law: LossFit, N, D) -> np.ndarray:
    return law.loss(np.asarray(N, np.float64), np.asarray(D, np.float64))


# ---------------------------------------------------------------------------------------------
# the fit: pure numpy/scipy on arrays of runs


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

    def to_law(self, c: np.ndarray) -> LossFit:
        return law_from_log(float(c[0] + c[3] * self.mN), float(c[1] + c[4] * self.mD),
                            float(c[2]), float(c[3]), float(c[4]))


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
    law: LossFit
    objective: float
    n: int
    starts: int
    delta: float


def fit_law(N, D, L, *, delta: float = 1e-3, starts: int = 64,
            grid: np.ndarray | None = None, extra_starts: list[LossFit] = ()) -> Fit:
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
        extra = np.array([log_form(w) for w in extra_starts])
        init = np.concatenate([data.to_centred(extra), init])
    with _single_threaded():
        best, f = _lbfgs(data, init, delta)
    return Fit(data.to_law(best), f, len(N), len(init), delta)


def _percentiles(values: np.ndarray, lo: float = 5, hi: float = 95) -> list[float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return [math.nan, math.nan]
    return [float(np.percentile(values, lo)), float(np.percentile(values, hi))]


def bootstrap(N, D, L, fit: Fit, *, resamples: int, seed: int = 0) -> list[LossFit]:
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


def compute_optimal(law: LossFit, C) -> dict[str, np.ndarray]:
    """argmin over N·D = C/6 of L(N, D) (`LossFit.compute_optimal_params`): N_opt ~ C^a,
    D_opt ~ C^b with a = beta/(alpha+beta), b = alpha/(alpha+beta)."""
    C = np.asarray(C, np.float64)
    s = law.alpha + law.beta
    if law.alpha <= 0 or law.beta <= 0:
        nan = np.full_like(C, math.nan)
        return {"a": math.nan, "b": math.nan, "N_opt": nan, "D_opt": nan, "tokens_per_param": nan}
    a, b = law.beta / s, law.alpha / s
    N_opt = law.compute_optimal_params(C)
    D_opt = C / (TRAIN_FLOPS_PER_PARAM_TOKEN * N_opt)
    return {"a": a, "b": b, "N_opt": N_opt, "D_opt": D_opt, "tokens_per_param": D_opt / N_opt}


# ---------------------------------------------------------------------------------------------
# a table of runs (pandas: columns params, tokens, loss, run_id) -> the fit as JSON


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

    pred = predict(law, N, D)
    rel = (pred - L) / L

    def rows(mask) -> list[dict]:
        return [{"run_id": str(df["run_id"].iloc[i]), "params": float(N[i]),
                 "tokens": float(D[i]), "loss": float(L[i]), "predicted": float(pred[i]),
                 "relative_error": float(rel[i]),
                 "predicted_interval": interval(lambda w: float(predict(w, N[i], D[i])))}
                for i in np.flatnonzero(mask)]

    fitted = constants(law)
    log_a, log_b, log_e = log_form(law)[:3]
    return {
        "form": "L(N, D) = E + A / N^alpha + B / D^beta",
        "params": params_kind,
        "constants": fitted,
        "log_constants": {"a": float(log_a), "b": float(log_b), "e": float(log_e)},
        "intervals": {k: interval(lambda w, k=k: float(getattr(w, k))) for k in CONSTANTS},
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
