"""Per-domain regressors from a mixture schedule to held-out loss, chosen by K-fold CV.

A trial's features (`features`) are its schedule's weights, stage by stage in domain order, plus
each non-first stage's start fraction. Four regressors compete per domain:

- `linear`: least squares on the features (minimum norm: weights within a stage sum to 1, so
  the columns are collinear with the intercept and there is no unique solution to pick).
- `logweight`: L = c + sum_j b_j log(w_j), w_j domain j's share of all training tokens (the
  stages' weights averaged by the fraction of training each covers): loss as a power law in
  each domain's token count, so D + 1 parameters however many stages. On 48 real small-proxy
  trials CV chose it for 5 of 6 domains, where it ranked held-out losses better than the
  regressor chosen without it on four and as well on math (bench/mixture_quality.py, bench/results/mixture_quality_*).
- `loglinear`: the Data Mixing Laws form L = c + k * exp(t . w) (Ye et al. 2024), fitted by
  `scipy.optimize.least_squares` from a closed-form start (a grid over c; log|L - c| is linear
  in w). Falls back to linear, and says so in `fallback`, when the fit fails.
- `lightgbm`: small trees (few leaves, leaves sized to N) for the few trials a sweep affords;
  a fixed number of rounds — no early stopping, so no held-out trial ever steers the fit.

`fit` scores each on out-of-fold MSE and keeps the simplest one whose CV error is within one
standard error (paired over rows) of the best: with a few dozen trials a more flexible model
"winning" by less than the noise is not evidence. `cv_mse` holds the raw figures. With
`objective` given (what a sweep does), one regressor serves every domain, the one whose
out-of-fold error on the objective itself is lowest: per-domain winners each fit their domain
but their errors add up in the objective, and a bounded form chosen for one domain (loglinear
saturates as w -> 0) lets the search starve that domain. On the 48 600-step small proxies of
bench/mixture_quality.py, per-domain choice ranked held-out mixtures at Spearman 0.59,
objective-level choice (logweight) at 0.93. Without `objective`, each domain picks its own.
The chosen regressor's fold models are kept (`FitResult.fold_models`): how much they disagree at
a mixture says how far the fit's prediction there rests on which runs it saw
(optimize.prefer_measured).

The objective (`Objective`) is the mean of domain losses, or a weighted mean over target
domains, optionally with "no domain predicted worse than the baseline (natural mixture) by more
than x" — the constraint is applied by `sweeps.optimize.choose`.
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Mapping, Sequence

import numpy as np

from gemini_core.data.mixture import MixtureSchedule
from gemini_core.errors import UserError
from sweeps.regressors import REGRESSORS, Regressor, as_2d, make_regressor

MIN_TRIALS = 4


def features(schedule: MixtureSchedule, domains: Sequence[str]) -> np.ndarray:
    """(F,) = stage weights in domain order, stage after stage, then non-first stage starts."""
    weights_SxD = schedule.weight_matrix(domains)
    starts = np.array([st.start for st in schedule.stages[1:]], np.float64)
    return np.concatenate([weights_SxD.reshape(-1), starts])


# ---------------------------------------------------------------------------------------------
# objective


@dataclasses.dataclass(frozen=True)
class Objective:
    targets: Mapping[str, float] = dataclasses.field(default_factory=dict)  # {} = mean of all
    max_worse_than_baseline: float = 0.0  # > 0: no domain predicted worse than baseline * (1+x)

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", types.MappingProxyType(dict(self.targets)))

    def check(self, domains: Sequence[str], where: str = "objective") -> "Objective":
        for d, w in self.targets.items():
            if d not in domains:
                raise UserError(f"{where}.targets.{d}: unknown domain (known: "
                                f"{', '.join(domains)})")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) \
                    or w < 0:
                raise UserError(f"{where}.targets.{d}={w!r}: expected a non-negative number")
        if self.targets and sum(self.targets.values()) <= 0:
            raise UserError(f"{where}.targets: weights sum to 0; give some target a weight > 0")
        x = self.max_worse_than_baseline
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            raise UserError(f"{where}.max_worse_than_baseline={x!r}: expected a fraction >= 0 "
                            "(0.02 = no domain more than 2% worse than the baseline)")
        return self

    def weight_vector(self, domains: Sequence[str]) -> np.ndarray:
        """(D,) weights summing to 1: the objective is weight_D . loss_D."""
        self.check(domains)
        if not self.targets:
            return np.full(len(domains), 1.0 / len(domains))
        w_D = np.array([float(self.targets.get(d, 0.0)) for d in domains])
        return w_D / w_D.sum()

    def describe(self) -> str:
        text = ("mean loss over all domains" if not self.targets else "weighted mean loss of "
                + ", ".join(f"{d}×{w:g}" for d, w in self.targets.items()))
        if self.max_worse_than_baseline > 0:
            text += (f"; no domain more than {self.max_worse_than_baseline:.1%} worse than the "
                     "baseline")
        return text


def objective_values(Y_MxD: np.ndarray, domains: Sequence[str], objective: Objective
                     ) -> np.ndarray:
    """(M,) the objective (lower is better) of each row of per-domain losses."""
    Y_MxD = np.asarray(Y_MxD, np.float64).reshape(-1, len(domains))
    return Y_MxD @ objective.weight_vector(domains)


# ---------------------------------------------------------------------------------------------
# fit and choose by cross-validation


@dataclasses.dataclass(frozen=True)
class Seen:
    """What the fitted rows covered, per domain: its weights (in any stage) and its losses.

    A fit of a few dozen runs says nothing about mixtures far from them: a 6-domain log-weight
    law fitted on 7 tiny proxies predicted multilingual at -4.3 nats at its minimum weight, and
    the search went there. So the choice stays within each domain's range of weights, and a
    mixture whose predicted loss leaves the measured range widened by that range on each side
    (`outside`) is an extrapolation, ranked after every mixture that is not."""
    weight_lo_D: np.ndarray
    weight_hi_D: np.ndarray
    loss_lo_D: np.ndarray
    loss_hi_D: np.ndarray
    start_lo_S1: np.ndarray  # the non-first stages' starts
    start_hi_S1: np.ndarray

    @classmethod
    def of(cls, X_NxF: np.ndarray, Y_NxD: np.ndarray) -> "Seen":
        D = Y_NxD.shape[1]
        n_weights = (X_NxF.shape[1] + 1) // (D + 1) * D
        weights_NSxD = X_NxF[:, :n_weights].reshape(-1, D)
        starts_NxS1 = X_NxF[:, n_weights:]
        return cls(weights_NSxD.min(0), weights_NSxD.max(0), Y_NxD.min(0), Y_NxD.max(0),
                   starts_NxS1.min(0), starts_NxS1.max(0))

    def outside(self, pred_MxD: np.ndarray) -> np.ndarray:
        """(M, D) how far (nats) each predicted loss lies outside its plausible range; 0 inside."""
        spread_D = self.loss_hi_D - self.loss_lo_D
        return np.maximum(np.maximum(self.loss_lo_D - spread_D - pred_MxD,
                                     pred_MxD - self.loss_hi_D - spread_D), 0.0)


@dataclasses.dataclass
class FitResult:
    domains: tuple[str, ...]
    chosen: dict[str, str]  # domain -> regressor picked by K-fold CV
    cv_mse: dict[str, dict[str, float]]  # domain -> {regressor: out-of-fold MSE}
    models: dict[str, Regressor]  # domain -> chosen regressor, fitted on all training rows
    n_features: int = 0
    n_rows: int = 0
    folds: int = 0
    notes: dict[str, str] = dataclasses.field(default_factory=dict)  # domain -> fallback note
    seen: "Seen | None" = None  # what the fitted rows covered: optimize.choose keeps inside
    # domain -> the chosen regressor fitted on each CV fold's training rows
    fold_models: dict[str, list[Regressor]] = dataclasses.field(default_factory=dict)

    def predict(self, X_MxF: np.ndarray) -> np.ndarray:
        """(M, D) predicted per-domain losses."""
        X_MxF = self._check(X_MxF)
        return np.column_stack([self.models[d].predict(X_MxF) for d in self.domains])

    def fold_predict(self, X_MxF: np.ndarray) -> np.ndarray:
        """(K, M, D) the per-domain losses each CV fold's models predict. Where they disagree
        the prediction rests on which rows the fit saw: a point far from them."""
        X_MxF = self._check(X_MxF)
        return np.stack([np.column_stack([self.fold_models[d][k].predict(X_MxF)
                                          for d in self.domains])
                         for k in range(len(self.fold_models[self.domains[0]]))])

    def underdetermined(self, runs: str = "runs") -> str:
        """A warning when the fit saw no more rows than features, else ''."""
        if self.n_rows > self.n_features:
            return ""
        return (f"{self.n_rows} fitted {runs} for {self.n_features} features: the fit can match "
                "them all, so its predictions away from them are not evidence")

    def _check(self, X_MxF: np.ndarray) -> np.ndarray:
        X_MxF = as_2d(X_MxF)
        if self.n_features and X_MxF.shape[1] != self.n_features:
            raise ValueError(f"{X_MxF.shape[1]} features given; the fit used {self.n_features}")
        return X_MxF


def fold_ids(n_rows: int, folds: int, seed: int) -> np.ndarray:
    """(N,) fold of each row: a seeded shuffle dealt round-robin, so fold sizes differ by <= 1."""
    perm_N = np.random.default_rng(seed).permutation(n_rows)
    ids_N = np.empty(n_rows, np.int64)
    ids_N[perm_N] = np.arange(n_rows) % folds
    return ids_N


def _oof_predictions(name: str, X_NxF: np.ndarray, y_N: np.ndarray, ids_N: np.ndarray,
                     folds: int, seed: int, n_domains: int) -> tuple[np.ndarray, list[Regressor]]:
    """(N,) each row's prediction by the model of the fold that left it out, and those models."""
    pred_N, models = np.empty(len(y_N)), []
    for k in range(folds):
        test = ids_N == k
        models.append(make_regressor(name, seed, n_domains).fit(X_NxF[~test], y_N[~test]))
        pred_N[test] = models[k].predict(X_NxF[test])
    return pred_N, models


def _pick(sq_err: dict[str, np.ndarray]) -> str:
    """The simplest regressor within one paired standard error of the lowest CV MSE."""
    mse = {name: float(e.mean()) for name, e in sq_err.items()}
    best = min(mse, key=lambda n: (mse[n], REGRESSORS.index(n)))
    for name in sorted(sq_err, key=REGRESSORS.index):
        diff_N = sq_err[name] - sq_err[best]
        se = float(diff_N.std(ddof=1)) / math.sqrt(len(diff_N)) if len(diff_N) > 1 else 0.0
        if name == best or diff_N.mean() <= se:
            return name
    return best


def check_trials(n_rows: int, folds: int, where: str = "fit") -> None:
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise UserError(f"{where}: folds={folds!r}: expected an integer >= 2")
    need = max(folds, MIN_TRIALS)
    if n_rows < need:
        raise UserError(f"{where}: {n_rows} trials are fewer trials than the fit needs "
                        f"({need}: at least {MIN_TRIALS} and at least one per fold, "
                        f"folds={folds}); run more trials or lower folds")


def fit(X_NxF: np.ndarray, Y_NxD: np.ndarray, domains: Sequence[str], *, folds: int = 5,
        seed: int = 0, regressors: Sequence[str] = REGRESSORS, prefer_simpler: bool = True,
        objective: "Objective | None" = None) -> FitResult:
    """Fits every regressor per domain, keeps the one K-fold CV prefers, per domain or, given
    `objective`, one for all domains (module docstring)."""
    domains = tuple(domains)
    X_NxF = as_2d(X_NxF)
    Y_NxD = np.asarray(Y_NxD, np.float64).reshape(len(X_NxF), -1)
    if Y_NxD.shape[1] != len(domains):
        raise ValueError(f"{Y_NxD.shape[1]} loss columns for {len(domains)} domains")
    if not regressors:
        raise UserError("fit: no regressors given (known: " + ", ".join(REGRESSORS) + ")")
    for name in regressors:
        make_regressor(name)  # unknown names fail before any fitting
    if not (np.all(np.isfinite(X_NxF)) and np.all(np.isfinite(Y_NxD))):
        raise UserError("fit: features or losses contain NaN or infinity")
    check_trials(len(X_NxF), folds)
    ids_N = fold_ids(len(X_NxF), folds, seed)
    # out-of-fold predictions and the fold models, per regressor and domain
    oof = {name: [_oof_predictions(name, X_NxF, Y_NxD[:, d], ids_N, folds, seed, len(domains))
                  for d in range(len(domains))] for name in regressors}
    resid = {name: np.column_stack([pred_N for pred_N, _ in per_domain]) - Y_NxD
             for name, per_domain in oof.items()}

    def pick(sq_err: dict[str, np.ndarray]) -> str:
        mse = {name: float(e.mean()) for name, e in sq_err.items()}
        return _pick(sq_err) if prefer_simpler else min(mse, key=mse.get)

    cv_mse = {domain: {name: float((r_NxD[:, d] ** 2).mean()) for name, r_NxD in resid.items()}
              for d, domain in enumerate(domains)}
    if objective is not None:
        weight_D = objective.weight_vector(domains)
        sq_err = {name: (r_NxD @ weight_D) ** 2 for name, r_NxD in resid.items()}
        cv_mse["objective"] = {name: float(e.mean()) for name, e in sq_err.items()}
        chosen = dict.fromkeys(domains, pick(sq_err))
    else:
        chosen = {domain: pick({name: r_NxD[:, d] ** 2 for name, r_NxD in resid.items()})
                  for d, domain in enumerate(domains)}
    models, notes = {}, {}
    for d, domain in enumerate(domains):
        models[domain] = make_regressor(chosen[domain], seed, len(domains)).fit(X_NxF, Y_NxD[:, d])
        if getattr(models[domain], "fallback", None):
            notes[domain] = models[domain].fallback
    return FitResult(domains, chosen, cv_mse, models, n_features=X_NxF.shape[1],
                     n_rows=len(X_NxF), folds=folds, notes=notes, seen=Seen.of(X_NxF, Y_NxD),
                     fold_models={domain: oof[chosen[domain]][d][1]
                                  for d, domain in enumerate(domains)})


# ---------------------------------------------------------------------------------------------
# held-out evaluation


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation (ties averaged); NaN when either side is constant or has < 2 values."""
    from scipy import stats

    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(stats.spearmanr(a, b).statistic)


def regret(pred_M: np.ndarray, actual_M: np.ndarray) -> float:
    """Actual objective of the row the model ranks best, minus the best actual (>= 0)."""
    pred_M, actual_M = np.asarray(pred_M, np.float64), np.asarray(actual_M, np.float64)
    return float(actual_M[int(np.argmin(pred_M))] - actual_M.min())


def evaluate_holdout(result: FitResult, X_hold: np.ndarray, Y_hold: np.ndarray,
                     objective: Objective) -> dict:
    """Spearman and regret of the objective on rows never used in fitting, plus per domain."""
    Y_MxD = np.asarray(Y_hold, np.float64).reshape(len(X_hold), -1)
    pred_MxD = result.predict(X_hold)
    pred_M = objective_values(pred_MxD, result.domains, objective)
    actual_M = objective_values(Y_MxD, result.domains, objective)
    return {
        "n": len(Y_MxD),
        "spearman": spearman(pred_M, actual_M),
        "regret": regret(pred_M, actual_M) if len(Y_MxD) else math.nan,
        # the size of a predicted gain the fit can tell from its own error
        "objective_rmse": float(np.sqrt(np.mean((pred_M - actual_M) ** 2))) if len(Y_MxD)
        else math.nan,
        "per_domain_spearman": {d: spearman(pred_MxD[:, i], Y_MxD[:, i])
                                for i, d in enumerate(result.domains)},
        "per_domain_mse": {d: float(np.mean((pred_MxD[:, i] - Y_MxD[:, i]) ** 2))
                           for i, d in enumerate(result.domains)},
    }
