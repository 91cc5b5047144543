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

What is predicted is any set of metric columns (`metrics`): each domain's held-out loss, and
downstream metrics such as `downstream/gsm8k/bpb`; every domain's weight is a feature of every
metric. The objective (`Objective`) is a weighted mean over metrics (by default the mean of the
domain losses), with constraints such as "no domain's loss more than 1% above the baseline's"
(the natural mixture) — applied by `sweeps.optimize.choose`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import types
from typing import Mapping, Sequence

import numpy as np

from gemini_core.data.mixture import MixtureSchedule
from gemini_core.errors import UserError
from sweeps.regressors import REGRESSORS, Regressor, as_2d, make_regressor
from sweeps.sweep_dir import LOSS

MIN_TRIALS = 4


def features(schedule: MixtureSchedule, domains: Sequence[str]) -> np.ndarray:
    """(F,) = stage weights in domain order, stage after stage, then non-first stage starts."""
    weights_SxD = schedule.weight_matrix(domains)
    starts = np.array([st.start for st in schedule.stages[1:]], np.float64)
    return np.concatenate([weights_SxD.reshape(-1), starts])


# ---------------------------------------------------------------------------------------------
# objective


# the last part of a metric's name says its direction: these are better when higher
HIGHER_IS_BETTER = ("acc", "acc_norm", "exact_match")


def metric_key(metric: str) -> str:
    """A metric's full column name: a bare domain name is its held-out loss, loss/<domain>."""
    return metric if "/" in metric else LOSS + metric


def higher_is_better(metric: str) -> bool:
    last = metric.rsplit("/", 1)[-1]
    return last in HIGHER_IS_BETTER or last.startswith("pass@")


def matching(pattern: str, metrics: Sequence[str]) -> list[int]:
    """Indices of the metrics a name (`math`, `loss/math`, `downstream/gsm8k/bpb`) or a glob
    pattern (`downstream/*/bpb`, `loss/*`) names. A glob never matches a mean of other metrics
    (`loss/mean`, `downstream/mean/bpb`): `downstream/*/bpb` means the tasks, not their mean as
    one more; naming a mean matches it."""
    key = metric_key(pattern)
    return [i for i, m in enumerate(metrics)
            if fnmatch.fnmatchcase(metric_key(m), key)
            and (metric_key(m) == key or "mean" not in metric_key(m).split("/"))]


def _check_weight(where: str, w) -> None:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        raise UserError(f"{where}={w!r}: expected a non-negative number")


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a mixture is chosen for (lower is better), over any recorded metric: a domain's name
    (its held-out loss), a column such as `downstream/gsm8k/bpb`, or a glob pattern
    (`downstream/*/bpb`: the mean over the tasks), each with a weight. A metric that is better
    when higher (acc, exact_match, pass@k) enters with its sign flipped. Empty `targets`: the
    mean loss over the domains.

    Constraints are relative to a baseline (the natural mixture): `constraints` maps a metric or
    pattern to the largest worsening allowed (0.01 = 1% worse), and `max_worse_than_baseline`
    is the same for every domain's loss. They are hard limits (`penalty` 0: a mixture that
    breaks one ranks after every one that does not), or with `penalty` > 0 a cost added to the
    objective: penalty x the worst relative excess."""
    targets: Mapping[str, float] = dataclasses.field(default_factory=dict)
    max_worse_than_baseline: float = 0.0
    constraints: Mapping[str, float] = dataclasses.field(default_factory=dict)
    penalty: float = 0.0

    def __post_init__(self) -> None:
        for name in ("targets", "constraints"):
            object.__setattr__(self, name, types.MappingProxyType(dict(getattr(self, name))))

    def check(self, metrics: Sequence[str], where: str = "objective") -> "Objective":
        """Every name matches a metric; weights and bounds are numbers. The error lists what
        is there."""
        for key in ("targets", "constraints"):
            for name, w in getattr(self, key).items():
                if not matching(name, metrics):
                    raise UserError(f"{where}.{key}.{name}: no such metric (available: "
                                    f"{', '.join(map(metric_key, metrics))})")
                _check_weight(f"{where}.{key}.{name}", w)
        if self.targets and sum(self.targets.values()) <= 0:
            raise UserError(f"{where}.targets: weights sum to 0; give some target a weight > 0")
        if not self.targets and not matching(LOSS + "*", metrics):
            raise UserError(f"{where}.targets: empty means the mean domain loss, and there is "
                            f"no domain loss to average; name a metric (available: "
                            f"{', '.join(map(metric_key, metrics))})")
        _check_weight(f"{where}.penalty", self.penalty)
        x = self.max_worse_than_baseline
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            raise UserError(f"{where}.max_worse_than_baseline={x!r}: expected a fraction >= 0 "
                            "(0.02 = no domain more than 2% worse than the baseline)")
        return self

    def weight_vector(self, metrics: Sequence[str]) -> np.ndarray:
        """(K,) signed weights, |weights| summing to 1: the objective is weight_K . value_K. A
        pattern's weight is shared equally by the metrics it matches."""
        self.check(metrics)
        w_K = np.zeros(len(metrics))
        if not self.targets:
            losses = matching(LOSS + "*", metrics)
            w_K[losses] = 1.0 / len(losses)
            return w_K
        for name, w in self.targets.items():
            idx = matching(name, metrics)
            w_K[idx] += float(w) / len(idx)
        return w_K / w_K.sum() * self.signs(metrics)

    @classmethod
    def parse(cls, targets: str = "", constraints: Sequence[str] = (), penalty: float = 0.0
              ) -> "Objective":
        """From the command line: `--objective downstream/gsm8k/bpb` or
        `--objective "downstream/*/bpb=1,loss/math=0.5"`, `--constraint "loss/*=0.01"`."""
        def pairs(text: str, flag: str, default: float | None) -> dict[str, float]:
            out = {}
            for item in filter(None, (t.strip() for t in text.split(","))):
                name, eq, value = item.rpartition("=") if "=" in item else (item, "", "")
                if not eq and default is None:
                    raise UserError(f"{flag} {item!r}: expected METRIC=FRACTION, e.g. "
                                    "'loss/*=0.01' (no metric more than 1% worse)")
                try:
                    out[name.strip()] = float(value) if eq else default
                except ValueError:
                    raise UserError(f"{flag} {item!r}: {value!r} is not a number") from None
            return out
        bounds: dict[str, float] = {}
        for text in constraints:
            bounds.update(pairs(text, "--constraint", None))
        return cls(pairs(targets, "--objective", 1.0), constraints=bounds, penalty=penalty)

    @staticmethod
    def signs(metrics: Sequence[str]) -> np.ndarray:
        """(K,) +1 for a metric better when lower, -1 for one better when higher."""
        return np.array([-1.0 if higher_is_better(m) else 1.0 for m in metrics])

    def bounds(self, metrics: Sequence[str]) -> np.ndarray:
        """(K,) the largest relative worsening allowed per metric; NaN = unconstrained."""
        x_K = np.full(len(metrics), np.nan)
        rules = list(self.constraints.items())
        if self.max_worse_than_baseline > 0:
            rules.append((LOSS + "*", self.max_worse_than_baseline))
        for name, x in rules:
            idx = matching(name, metrics)
            x_K[idx] = np.fmin(x_K[idx], float(x))
        return x_K

    def metrics(self, domains: Sequence[str], columns: Sequence[str]) -> list[str]:
        """What a fit for this objective predicts: every domain's loss, and the `columns`
        (task metrics) its targets or constraints name."""
        named = [*self.targets, *self.constraints]
        return [*domains, *(c for c in columns if any(matching(n, [c]) for n in named))]

    @property
    def constrained(self) -> bool:
        return bool(self.constraints) or self.max_worse_than_baseline > 0

    def describe(self) -> str:
        def term(name: str, w: float) -> str:
            return metric_key(name) + (" (higher is better)" if higher_is_better(name) else "") \
                + (f"×{w:g}" if len(self.targets) > 1 else "")
        text = ("mean loss over all domains" if not self.targets else
                ("weighted mean of " if len(self.targets) > 1 else "")
                + ", ".join(term(n, w) for n, w in self.targets.items()))
        limits = [(LOSS + "*", self.max_worse_than_baseline)] * (self.max_worse_than_baseline > 0)
        limits += list(self.constraints.items())
        if limits:
            text += "; subject to " + ", ".join(
                f"{metric_key(n)} no more than {x:.1%} worse than the baseline" for n, x in limits)
            text += f" (a penalty of {self.penalty:g} x the excess)" if self.penalty else ""
        return text


def objective_values(Y_MxK: np.ndarray, metrics: Sequence[str], objective: Objective
                     ) -> np.ndarray:
    """(M,) the objective (lower is better) of each row of metric values."""
    Y_MxK = np.asarray(Y_MxK, np.float64).reshape(-1, len(metrics))
    return Y_MxK @ objective.weight_vector(metrics)


def worsening(Y_MxK: np.ndarray, baseline_K: np.ndarray, sign_K: np.ndarray) -> np.ndarray:
    """(M, K) each metric's change against the baseline relative to it, > 0 = worse
    (`Objective.signs`); against a baseline at 0 (an accuracy nobody reaches), the difference."""
    base_K = np.asarray(baseline_K, np.float64)
    scale_K = np.where(base_K != 0, np.abs(base_K), 1.0)
    return sign_K * (np.asarray(Y_MxK, np.float64) - base_K) / scale_K


def violations(Y_MxK: np.ndarray, baseline_K: np.ndarray, sign_K: np.ndarray,
               bound_K: np.ndarray) -> np.ndarray:
    """(M,) how far each row breaks its worst constraint (`Objective.bounds`: NaN = none),
    relative to the baseline; 0 = none broken."""
    on = ~np.isnan(bound_K)
    if not on.any():
        return np.zeros(len(Y_MxK))
    excess_MxK = worsening(np.asarray(Y_MxK)[:, on], np.asarray(baseline_K)[on], sign_K[on])
    return np.maximum(excess_MxK - bound_K[on], 0.0).max(1)


# ---------------------------------------------------------------------------------------------
# fit and choose by cross-validation


@dataclasses.dataclass(frozen=True)
class Seen:
    """What the fitted rows covered: each domain's weights (in any stage), each metric's values.

    A fit of a few dozen runs says nothing about mixtures far from them: a 6-domain log-weight
    law fitted on 7 tiny proxies predicted multilingual at -4.3 nats at its minimum weight, and
    the search went there. So the choice stays within each domain's range of weights, and a
    mixture whose predicted loss leaves the measured range widened by that range on each side
    (`outside`) is an extrapolation, ranked after every mixture that is not."""
    weight_lo_D: np.ndarray
    weight_hi_D: np.ndarray
    loss_lo_K: np.ndarray  # per predicted metric (a domain's loss, a task's bpb, ...)
    loss_hi_K: np.ndarray
    start_lo_S1: np.ndarray  # the non-first stages' starts
    start_hi_S1: np.ndarray

    @classmethod
    def of(cls, X_NxF: np.ndarray, Y_NxK: np.ndarray, n_domains: int) -> "Seen":
        D = n_domains
        n_weights = (X_NxF.shape[1] + 1) // (D + 1) * D
        weights_NSxD = X_NxF[:, :n_weights].reshape(-1, D)
        starts_NxS1 = X_NxF[:, n_weights:]
        return cls(weights_NSxD.min(0), weights_NSxD.max(0), Y_NxK.min(0), Y_NxK.max(0),
                   starts_NxS1.min(0), starts_NxS1.max(0))

    def outside(self, pred_MxK: np.ndarray) -> np.ndarray:
        """(M, K) how far each predicted metric lies outside its plausible range; 0 inside."""
        spread_K = self.loss_hi_K - self.loss_lo_K
        return np.maximum(np.maximum(self.loss_lo_K - spread_K - pred_MxK,
                                     pred_MxK - self.loss_hi_K - spread_K), 0.0)


@dataclasses.dataclass
class FitResult:
    domains: tuple[str, ...]  # the weighted domains: the features
    metrics: tuple[str, ...]  # what is predicted: a domain's name is its loss, else a column
    chosen: dict[str, str]  # metric -> regressor picked by K-fold CV
    cv_mse: dict[str, dict[str, float]]  # metric -> {regressor: out-of-fold MSE}
    models: dict[str, Regressor]  # metric -> chosen regressor, fitted on all training rows
    n_features: int = 0
    n_rows: int = 0
    folds: int = 0
    notes: dict[str, str] = dataclasses.field(default_factory=dict)  # metric -> fallback note
    seen: "Seen | None" = None  # what the fitted rows covered: optimize.choose keeps inside
    # metric -> the chosen regressor fitted on each CV fold's training rows
    fold_models: dict[str, list[Regressor]] = dataclasses.field(default_factory=dict)

    def predict(self, X_MxF: np.ndarray) -> np.ndarray:
        """(M, K) predicted metrics."""
        X_MxF = self._check(X_MxF)
        return np.column_stack([self.models[m].predict(X_MxF) for m in self.metrics])

    def fold_predict(self, X_MxF: np.ndarray) -> np.ndarray:
        """(folds, M, K) the metrics each CV fold's models predict. Where they disagree the
        prediction rests on which rows the fit saw: a point far from them."""
        X_MxF = self._check(X_MxF)
        return np.stack([np.column_stack([self.fold_models[m][k].predict(X_MxF)
                                          for m in self.metrics])
                         for k in range(len(self.fold_models[self.metrics[0]]))])

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


def fit(X_NxF: np.ndarray, Y_NxK: np.ndarray, domains: Sequence[str], *, folds: int = 5,
        seed: int = 0, regressors: Sequence[str] = REGRESSORS, prefer_simpler: bool = True,
        objective: "Objective | None" = None, metrics: Sequence[str] | None = None
        ) -> FitResult:
    """Fits every regressor per metric (Y's columns: `metrics`, by default each domain's loss),
    keeps the one K-fold CV prefers, per metric or, given `objective`, one for all (module
    docstring). Every domain's weights are features of every metric: a table may weight more
    domains than it has losses for."""
    domains = tuple(domains)
    metrics = tuple(metrics) if metrics is not None else domains
    X_NxF = as_2d(X_NxF)
    Y_NxK = np.asarray(Y_NxK, np.float64).reshape(len(X_NxF), -1)
    if Y_NxK.shape[1] != len(metrics):
        raise ValueError(f"{Y_NxK.shape[1]} metric columns for {len(metrics)} metrics")
    if not regressors:
        raise UserError("fit: no regressors given (known: " + ", ".join(REGRESSORS) + ")")
    for name in regressors:
        make_regressor(name)  # unknown names fail before any fitting
    if not (np.all(np.isfinite(X_NxF)) and np.all(np.isfinite(Y_NxK))):
        raise UserError("fit: features or metrics contain NaN or infinity")
    check_trials(len(X_NxF), folds)
    ids_N = fold_ids(len(X_NxF), folds, seed)
    D = len(domains)
    # out-of-fold predictions and the fold models, per regressor and metric
    oof = {name: [_oof_predictions(name, X_NxF, Y_NxK[:, k], ids_N, folds, seed, D)
                  for k in range(len(metrics))] for name in regressors}
    resid = {name: np.column_stack([pred_N for pred_N, _ in per_metric]) - Y_NxK
             for name, per_metric in oof.items()}

    def pick(sq_err: dict[str, np.ndarray]) -> str:
        mse = {name: float(e.mean()) for name, e in sq_err.items()}
        return _pick(sq_err) if prefer_simpler else min(mse, key=mse.get)

    cv_mse = {metric: {name: float((r_NxK[:, k] ** 2).mean()) for name, r_NxK in resid.items()}
              for k, metric in enumerate(metrics)}
    if objective is not None:
        weight_K = objective.weight_vector(metrics)
        sq_err = {name: (r_NxK @ weight_K) ** 2 for name, r_NxK in resid.items()}
        cv_mse["objective"] = {name: float(e.mean()) for name, e in sq_err.items()}
        chosen = dict.fromkeys(metrics, pick(sq_err))
    else:
        chosen = {metric: pick({name: r_NxK[:, k] ** 2 for name, r_NxK in resid.items()})
                  for k, metric in enumerate(metrics)}
    models, notes = {}, {}
    for k, metric in enumerate(metrics):
        models[metric] = make_regressor(chosen[metric], seed, D).fit(X_NxF, Y_NxK[:, k])
        if getattr(models[metric], "fallback", None):
            notes[metric] = models[metric].fallback
    return FitResult(domains, metrics, chosen, cv_mse, models, n_features=X_NxF.shape[1],
                     n_rows=len(X_NxF), folds=folds, notes=notes,
                     seen=Seen.of(X_NxF, Y_NxK, D),
                     fold_models={metric: oof[chosen[metric]][k][1]
                                  for k, metric in enumerate(metrics)})


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
    """Spearman and regret of the objective on rows never used in fitting, plus per metric."""
    Y_MxD = np.asarray(Y_hold, np.float64).reshape(len(X_hold), -1)
    pred_MxD = result.predict(X_hold)
    pred_M = objective_values(pred_MxD, result.metrics, objective)
    actual_M = objective_values(Y_MxD, result.metrics, objective)
    return {
        "n": len(Y_MxD),
        "spearman": spearman(pred_M, actual_M),
        "regret": regret(pred_M, actual_M) if len(Y_MxD) else math.nan,
        # the size of a predicted gain the fit can tell from its own error
        "objective_rmse": float(np.sqrt(np.mean((pred_M - actual_M) ** 2))) if len(Y_MxD)
        else math.nan,
        "per_domain_spearman": {d: spearman(pred_MxD[:, i], Y_MxD[:, i])
                                for i, d in enumerate(result.metrics)},
        "per_domain_mse": {d: float(np.mean((pred_MxD[:, i] - Y_MxD[:, i]) ** 2))
                           for i, d in enumerate(result.metrics)},
    }
