"""The regressors a sweep's fit chooses among (sweeps.fit): from a trial's features to one
domain's held-out loss. Their forms and why each is there: the sweeps.fit docstring.

Each has `fit(X_NxF, y_N) -> self` and `predict(X_MxF) -> (M,)`; `make_regressor` builds one by
name. REGRESSORS is also the order of simplicity that breaks CV ties.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Protocol

import numpy as np

from gemini_core.errors import UserError

REGRESSORS = ("linear", "logweight", "loglinear", "lightgbm")


class Regressor(Protocol):
    name: str

    def fit(self, X_NxF: np.ndarray, y_N: np.ndarray) -> "Regressor": ...

    def predict(self, X_MxF: np.ndarray) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class _Basis:
    """Whitened coordinates of the rows' span: z = (x - mean) @ V / scale, unit variance each.

    Simplex weights and constant start columns make raw features rank-deficient; in z every
    direction is identifiable, which least_squares needs and which makes one step size fit all.
    """
    mean_F: np.ndarray
    proj_FxR: np.ndarray  # V / scale

    @classmethod
    def of(cls, X_NxF: np.ndarray) -> "_Basis":
        mean_F = X_NxF.mean(0)
        _, s_R, vt_RxF = np.linalg.svd(X_NxF - mean_F, full_matrices=False)
        keep = s_R > max(s_R[:1].max(initial=0.0) * 1e-8, 1e-12)
        scale_R = s_R[keep] / math.sqrt(len(X_NxF))
        return cls(mean_F, vt_RxF[keep].T / scale_R)

    def __call__(self, X_MxF: np.ndarray) -> np.ndarray:
        return (X_MxF - self.mean_F) @ self.proj_FxR


def as_2d(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, np.float64)
    return X.reshape(len(X), -1)


class LinearRegressor:
    name = "linear"

    def fit(self, X_NxF: np.ndarray, y_N: np.ndarray) -> "LinearRegressor":
        X_NxF, y_N = as_2d(X_NxF), np.asarray(y_N, np.float64)
        self.mean_F, self.y_mean = X_NxF.mean(0), float(y_N.mean())
        self.coef_F = np.linalg.lstsq(X_NxF - self.mean_F, y_N - self.y_mean, rcond=None)[0]
        return self

    def predict(self, X_MxF: np.ndarray) -> np.ndarray:
        return self.y_mean + (as_2d(X_MxF) - self.mean_F) @ self.coef_F


def token_shares(X_NxF: np.ndarray, n_domains: int) -> np.ndarray:
    """(N, D) each domain's share of all training tokens, from `features` rows: the stages'
    weights averaged by the fraction of training each stage covers."""
    X_NxF = as_2d(X_NxF)
    n_stages, rest = divmod(X_NxF.shape[1] + 1, n_domains + 1)
    if rest or n_stages < 1:
        raise ValueError(f"{X_NxF.shape[1]} features are not S stages of {n_domains} domains "
                         f"plus S - 1 starts")
    weights_NxSxD = X_NxF[:, :n_stages * n_domains].reshape(len(X_NxF), n_stages, n_domains)
    starts_NxS = np.column_stack([np.zeros(len(X_NxF)), X_NxF[:, n_stages * n_domains:]])
    ends_NxS = np.column_stack([starts_NxS[:, 1:], np.ones(len(X_NxF))])
    return np.einsum("ns,nsd->nd", ends_NxS - starts_NxS, weights_NxSxD)


class LogWeightRegressor:
    """y = c + b . log(w), w = `token_shares` floored at `floor` (a domain a trial never saw
    would otherwise sit at log 0 = -inf)."""
    name = "logweight"
    floor = 1e-4
    stage_blind = True  # sees the stages only through their time-averaged shares

    def __init__(self, n_domains: int) -> None:
        self.n_domains = n_domains

    def _log_shares(self, X_MxF: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(token_shares(X_MxF, self.n_domains), self.floor))

    def fit(self, X_NxF: np.ndarray, y_N: np.ndarray) -> "LogWeightRegressor":
        self.linear = LinearRegressor().fit(self._log_shares(X_NxF), y_N)
        return self

    def predict(self, X_MxF: np.ndarray) -> np.ndarray:
        return self.linear.predict(self._log_shares(X_MxF))


class LogLinearRegressor:
    """y = c + k * exp(t . x) (Data Mixing Laws), fitted in whitened coordinates.

    `params` gives (c, k, t_F) in the original feature space; t is the representative orthogonal
    to directions the trials never vary (so within a stage t sums to 0: only differences of t
    between domains are identifiable when weights sum to 1, the rest is absorbed by k).
    """
    name = "loglinear"
    ridge = 1e-4  # on t in whitened units: keeps an underdetermined fit (N < F + 2) finite
    max_exponent = 50.0

    def __init__(self) -> None:
        self.fallback: str | None = None

    def fit(self, X_NxF: np.ndarray, y_N: np.ndarray) -> "LogLinearRegressor":
        from scipy import optimize

        X_NxF, y_N = as_2d(X_NxF), np.asarray(y_N, np.float64)
        self.fallback, self._linear = None, None
        self.basis = _Basis.of(X_NxF)
        z_NxR = self.basis(X_NxF)
        self.y_mean, self.y_std = float(y_N.mean()), float(y_N.std())
        if self.y_std == 0 or z_NxR.shape[1] == 0:
            return self._fall_back(X_NxF, y_N, "nothing to fit (constant loss or features)")
        ys_N = (y_N - self.y_mean) / self.y_std
        p0 = self._initial_guess(z_NxR, ys_N)
        R = z_NxR.shape[1]

        def residuals(p: np.ndarray) -> np.ndarray:
            fit_N = p[0] + p[1] * np.exp(np.clip(z_NxR @ p[2:], -self.max_exponent,
                                                 self.max_exponent))
            return np.concatenate([fit_N - ys_N, math.sqrt(self.ridge) * p[2:]])

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                sol = optimize.least_squares(residuals, p0, method="trf", x_scale="jac",
                                             max_nfev=200 * (R + 2))
            p = sol.x
        except (ValueError, np.linalg.LinAlgError) as e:  # scipy's ways of saying "no fit"
            return self._fall_back(X_NxF, y_N, f"least_squares failed: {e}")
        self.c, self.k, self.t_R = float(p[0]), float(p[1]), p[2:].copy()
        train_N = self.predict(X_NxF)
        if not np.all(np.isfinite(p)) or not np.all(np.isfinite(train_N)):
            return self._fall_back(X_NxF, y_N, "non-finite parameters")
        # exp can mimic a line only in a limit the optimizer may not reach: never be worse
        # on the training rows than the linear model it generalises
        linear = LinearRegressor().fit(X_NxF, y_N)
        sse, sse_linear = (float(np.sum((f - y_N) ** 2))
                           for f in (train_N, linear.predict(X_NxF)))
        if sse > sse_linear * (1 + 1e-6) + 1e-12 * len(y_N):
            return self._fall_back(X_NxF, y_N, f"no better than linear on the training rows "
                                               f"(SSE {sse:.3g} vs {sse_linear:.3g})", linear)
        return self

    def _initial_guess(self, z_NxR: np.ndarray, ys_N: np.ndarray) -> np.ndarray:
        """Grid over c below (k > 0) and above (k < 0) the data: log|y - c| is linear in z,
        so each c gives k and t in closed form; keep the one with least squared error."""
        A_NxR1 = np.column_stack([np.ones(len(z_NxR)), z_NxR])
        lo, hi = float(ys_N.min()), float(ys_N.max())
        span = hi - lo
        best, best_sse = None, math.inf
        for sign in (1.0, -1.0):
            for gap in np.geomspace(0.02, 20.0, 12) * span:
                c = lo - gap if sign > 0 else hi + gap
                coef = np.linalg.lstsq(A_NxR1, np.log(sign * (ys_N - c)), rcond=None)[0]
                k, t_R = sign * math.exp(coef[0]), coef[1:]
                fit_N = c + k * np.exp(np.clip(z_NxR @ t_R, -self.max_exponent,
                                               self.max_exponent))
                sse = float(np.sum((fit_N - ys_N) ** 2))
                if sse < best_sse:
                    best, best_sse = np.concatenate([[c, k], t_R]), sse
        return best

    def _fall_back(self, X_NxF: np.ndarray, y_N: np.ndarray, why: str,
                   linear: LinearRegressor | None = None) -> "LogLinearRegressor":
        self.fallback = f"fell back to linear: {why}"
        self._linear = linear or LinearRegressor().fit(X_NxF, y_N)
        return self

    def predict(self, X_MxF: np.ndarray) -> np.ndarray:
        if self._linear is not None:
            return self._linear.predict(X_MxF)
        u_M = np.clip(self.basis(as_2d(X_MxF)) @ self.t_R, -self.max_exponent, self.max_exponent)
        return self.y_mean + self.y_std * (self.c + self.k * np.exp(u_M))

    @property
    def params(self) -> tuple[float, float, np.ndarray]:
        """(c, k, t_F) with y = c + k * exp(t_F . x) in the original features."""
        if self._linear is not None:
            raise ValueError(f"loglinear regressor has no law: {self.fallback}")
        t_F = self.basis.proj_FxR @ self.t_R
        c = self.y_mean + self.y_std * self.c
        k = self.y_std * self.k * math.exp(-float(self.basis.mean_F @ t_F))
        return c, k, t_F


class LightGBMRegressor:
    name = "lightgbm"

    def __init__(self, num_leaves: int = 6, rounds: int = 300, learning_rate: float = 0.05,
                 seed: int = 0):
        self.num_leaves, self.rounds, self.learning_rate, self.seed = (
            num_leaves, rounds, learning_rate, seed)

    def params(self, n_rows: int) -> dict:
        return {
            "objective": "regression", "num_leaves": self.num_leaves,
            "learning_rate": self.learning_rate,
            # a leaf needs enough trials to mean something, but a sweep has only a few dozen
            "min_data_in_leaf": max(2, min(20, n_rows // 10)), "min_data_in_bin": 1,
            "min_sum_hessian_in_leaf": 0.0, "lambda_l2": 1.0,
            "deterministic": True, "force_col_wise": True, "num_threads": 1, "verbose": -1,
            "seed": self.seed,
        }

    def fit(self, X_NxF: np.ndarray, y_N: np.ndarray) -> "LightGBMRegressor":
        import lightgbm

        X_NxF, y_N = as_2d(X_NxF), np.asarray(y_N, np.float64)
        params = self.params(len(y_N))
        data = lightgbm.Dataset(X_NxF, y_N, params={"feature_pre_filter": False,
                                                    "min_data_in_bin": 1, "verbose": -1})
        self.booster = lightgbm.train(params, data, num_boost_round=self.rounds)
        return self

    def predict(self, X_MxF: np.ndarray) -> np.ndarray:
        return self.booster.predict(as_2d(X_MxF), num_threads=1)


def make_regressor(name: str, seed: int = 0, n_domains: int = 1) -> Regressor:
    if name == "linear":
        return LinearRegressor()
    if name == "logweight":
        return LogWeightRegressor(n_domains)
    if name == "loglinear":
        return LogLinearRegressor()
    if name == "lightgbm":
        return LightGBMRegressor(seed=seed)
    raise UserError(f"regressor {name!r}: unknown (known: {', '.join(REGRESSORS)})")
