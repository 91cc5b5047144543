"""Choose the winning mixture: search the (capped) simplex of every stage under a fitted model.

`choose` samples many schedules — Dirichlet draws around the template's weights at several
concentrations, from near-vertices to near-centre, each stage independently, projected onto
{min_weight <= w_d <= cap_d, sum w = 1} and into each domain's range of weights in the fitted
runs (no corner of the simplex no run visited) — scores them with the fit's predicted
objective, and then either refines the best few by random local steps that are kept when they
improve ("search"), or averages the top k ("topk", as RegMix does: an average of good mixtures is less
tied to one model's quirks than the argmin). With one end stage whose start the trials
varied (`space.anneal_start`) and a fit that sees starts, the search is repeated at 5 starts
spread over the range they tried and the best is kept; otherwise the template's starts stay.

The constraints ("no domain's loss, or task's bpb, predicted worse than the baseline's by more
than x": fit.Objective) rank every feasible schedule before any infeasible one; among infeasible
ones the least violation wins, with a warning, so a sweep always ends with a usable winner.json
(or, with the objective's `penalty`, add penalty x the worst excess to its score).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from gemini_core.data.mixture import MixtureSchedule
from gemini_core.errors import UserError
from sweeps.fit import FitResult, Objective, features, objective_values, violations

INFEASIBLE = 1e9  # score offset of a schedule that breaks the baseline constraint
IMPLAUSIBLE = 2e9  # ... whose predicted losses leave what the fit saw (fit.Seen): after all
_CONCENTRATIONS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)  # Dirichlet total concentration / D
_CHUNK = 20_000  # rows scored at once: bounds the feature matrix's memory


def project_capped_simplex(v_NxD: np.ndarray, lower_D: np.ndarray, upper_D: np.ndarray,
                           iters: int = 64) -> np.ndarray:
    """Euclidean projection of each row onto {lower <= w <= upper, sum w = 1}.

    The projection is clip(v - tau, lower, upper) for the one tau that makes the row sum to 1;
    the sum is monotone in tau, so bisection finds it (vectorised over rows).
    """
    v_NxD = np.asarray(v_NxD, np.float64)
    tau_lo_N = (v_NxD - upper_D).min(1)  # every coordinate at its upper bound: sum >= 1
    tau_hi_N = (v_NxD - lower_D).max(1)  # every coordinate at its lower bound: sum <= 1
    for _ in range(iters):
        tau_N = 0.5 * (tau_lo_N + tau_hi_N)
        above_N = np.clip(v_NxD - tau_N[:, None], lower_D, upper_D).sum(1) > 1.0
        tau_lo_N = np.where(above_N, tau_N, tau_lo_N)
        tau_hi_N = np.where(above_N, tau_hi_N, tau_N)
    w_NxD = np.clip(v_NxD - (0.5 * (tau_lo_N + tau_hi_N))[:, None], lower_D, upper_D)
    # the last ulps of the sum go to the coordinates with room to take them
    free_NxD = (w_NxD > lower_D) & (w_NxD < upper_D)
    n_free_N = free_NxD.sum(1)
    fix_N = np.where(n_free_N > 0, (1.0 - w_NxD.sum(1)) / np.maximum(n_free_N, 1), 0.0)
    return np.clip(w_NxD + free_NxD * fix_N[:, None], lower_D, upper_D)


def _bounds(domains: Sequence[str], caps: Mapping[str, float], min_weight: float
            ) -> tuple[np.ndarray, np.ndarray]:
    for d, cap in caps.items():
        if d not in domains:
            raise UserError(f"caps.{d}: unknown domain (known: {', '.join(domains)})")
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0 <= cap <= 1:
            raise UserError(f"caps.{d}={cap!r}: expected a weight in [0, 1]")
    if isinstance(min_weight, bool) or not isinstance(min_weight, (int, float)) \
            or not 0 <= min_weight < 1:
        raise UserError(f"min_weight={min_weight!r}: expected a weight in [0, 1)")
    lower_D = np.full(len(domains), float(min_weight))
    upper_D = np.array([float(caps.get(d, 1.0)) for d in domains])
    for d, cap in zip(domains, upper_D):
        if cap < min_weight:
            raise UserError(f"caps.{d}={cap:g}: below min_weight={min_weight:g}")
    if lower_D.sum() > 1 + 1e-9:
        raise UserError(f"min_weight={min_weight:g}: {len(domains)} domains at that minimum "
                        f"already sum to {lower_D.sum():g} > 1")
    if upper_D.sum() < 1 - 1e-9:
        raise UserError(f"caps: sum to {upper_D.sum():g} < 1, so no mixture fits under them "
                        f"({', '.join(f'{d}={c:g}' for d, c in zip(domains, upper_D))})")
    return lower_D, upper_D


class _Scorer:
    """Scores (M, S, D) stage weights: the predicted objective, or INFEASIBLE + violation, or
    IMPLAUSIBLE + how far a predicted metric lies outside what the fit saw."""

    def __init__(self, result: FitResult, starts: Sequence[float], objective: Objective,
                 baseline: Mapping[str, float] | None):
        self.result, self.starts = result, np.asarray(starts[1:], np.float64)
        self.objective = objective
        self.weight_K = objective.weight_vector(result.metrics)
        self.baseline_K = None
        if objective.constrained:
            if baseline is None:
                raise UserError(f"objective: the constraints ({objective.describe()}) need the "
                                "baseline's metrics (the natural mixture's run)")
            missing = [m for m in result.metrics if m not in baseline]
            if missing:
                raise UserError(f"baseline: no value for {', '.join(missing)}")
            self.baseline_K = np.array([float(baseline[m]) for m in result.metrics])
            # fixed for the search: not matched again at every scoring of a batch
            self.sign_K = objective.signs(result.metrics)
            self.bound_K = objective.bounds(result.metrics)

    def features(self, W_MxSxD: np.ndarray) -> np.ndarray:
        M = len(W_MxSxD)
        return np.concatenate([W_MxSxD.reshape(M, -1), np.broadcast_to(self.starts,
                                                                        (M, len(self.starts)))], 1)

    def __call__(self, W_MxSxD: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, preds = [], []
        for i in range(0, len(W_MxSxD), _CHUNK):
            pred_MxD = self.result.predict(self.features(W_MxSxD[i:i + _CHUNK]))
            score_M = pred_MxD @ self.weight_K
            if self.baseline_K is not None:
                violation_M = violations(pred_MxD, self.baseline_K, self.sign_K, self.bound_K)
                score_M = (score_M + self.objective.penalty * violation_M
                           if self.objective.penalty > 0 else
                           np.where(violation_M > 0, INFEASIBLE + violation_M, score_M))
            if self.result.seen is not None:
                outside_M = self.result.seen.outside(pred_MxD).max(1)
                score_M = np.where(outside_M > 0, IMPLAUSIBLE + outside_M, score_M)
            scores.append(score_M)
            preds.append(pred_MxD)
        return np.concatenate(scores), np.concatenate(preds)


class _Tiled:
    """A scorer of (M, 1, D) weights: the one mixture repeated over the template's S stages."""

    def __init__(self, scorer: _Scorer, n_stages: int):
        self.scorer, self.n_stages = scorer, n_stages

    def __call__(self, W_Mx1xD: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.scorer(np.repeat(W_Mx1xD, self.n_stages, axis=1))


def _template(stage_template: MixtureSchedule | None, domains: Sequence[str]
              ) -> tuple[list[float], np.ndarray | None]:
    """Stage starts, and the template's (S, D) weights when it has concrete ones."""
    if stage_template is None or not stage_template.stages:
        return [0.0], None
    starts = [st.start for st in stage_template.stages]
    if not all(isinstance(st.weights, Mapping) for st in stage_template.stages):
        return starts, None  # named weights ("natural") unresolved: sample around uniform
    return starts, stage_template.weight_matrix(domains)


def _sample(rng: np.random.Generator, n: int, center_SxD: np.ndarray) -> np.ndarray:
    """(n, S, D) Dirichlet draws around each stage's centre at mixed concentrations."""
    S, D = center_SxD.shape
    conc_N = rng.choice(_CONCENTRATIONS, size=n) * D
    # half the centre, half uniform: a domain the centre leaves at 0 can still be drawn
    alpha_NxSxD = conc_N[:, None, None] * (0.5 * center_SxD + 0.5 / D)[None]
    g_NxSxD = rng.gamma(alpha_NxSxD)
    total_NxS = g_NxSxD.sum(-1, keepdims=True)
    return np.where(total_NxS > 0, g_NxSxD / np.where(total_NxS > 0, total_NxS, 1), 1.0 / D)


def _project(W_MxSxD: np.ndarray, lower_D: np.ndarray, upper_D: np.ndarray) -> np.ndarray:
    M, S, D = W_MxSxD.shape
    return project_capped_simplex(W_MxSxD.reshape(M * S, D), lower_D, upper_D).reshape(M, S, D)


def _refine(W_KxSxD: np.ndarray, score_K: np.ndarray, scorer: _Scorer, rng: np.random.Generator,
            lower_D: np.ndarray, upper_D: np.ndarray, steps: int, proposals: int = 32
            ) -> tuple[np.ndarray, np.ndarray]:
    """(1+P) evolution strategy from each of K starts: Gaussian steps, projected back onto the
    capped simplex, kept when better; the step grows after a success and shrinks after a miss."""
    K, S, D = W_KxSxD.shape
    sigma_K = np.full(K, 0.05)
    W_KxSxD, score_K = W_KxSxD.copy(), score_K.copy()
    for _ in range(steps):
        noise = rng.normal(size=(K, proposals, S, D)) * sigma_K[:, None, None, None]
        cand = _project((W_KxSxD[:, None] + noise).reshape(K * proposals, S, D), lower_D, upper_D)
        cand_score = scorer(cand)[0].reshape(K, proposals)
        best_P = cand_score.argmin(1)
        new_K = cand_score[np.arange(K), best_P]
        better_K = new_K < score_K
        W_KxSxD[better_K] = cand.reshape(K, proposals, S, D)[better_K, best_P[better_K]]
        score_K = np.where(better_K, new_K, score_K)
        sigma_K = np.clip(np.where(better_K, sigma_K * 1.3, sigma_K * 0.8), 1e-4, 0.3)
    return W_KxSxD, score_K


def _trust_region(result: FitResult, lower_D: np.ndarray, upper_D: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The bounds narrowed to each domain's range of weights in the fitted rows (`fit.Seen`).
    Rows that themselves break the bounds (a table from elsewhere) leave them as they are."""
    if result.seen is None:
        return lower_D, upper_D
    lo_D = np.maximum(lower_D, result.seen.weight_lo_D)
    hi_D = np.minimum(upper_D, result.seen.weight_hi_D)
    if (lo_D > hi_D).any() or lo_D.sum() > 1 + 1e-9 or hi_D.sum() < 1 - 1e-9:
        return lower_D, upper_D
    return lo_D, hi_D


def choose(result: FitResult, domains: Sequence[str], stage_template: MixtureSchedule | None,
           caps: Mapping[str, float], min_weight: float, objective: Objective,
           baseline: Mapping[str, float] | None = None, *, samples: int = 100_000,
           refine_steps: int = 200, seed: int = 0, method: str = "search", top_k: int = 100,
           refine_starts: int = 8) -> tuple[MixtureSchedule, dict[str, float]]:
    """The schedule minimising the predicted objective under its constraints (relative to the
    `baseline` metrics), and its predicted metrics."""
    domains = tuple(domains)
    if domains != tuple(result.domains):
        raise ValueError(f"domains {domains} differ from the fit's {result.domains}")
    if method not in ("search", "topk"):
        raise UserError(f"method={method!r}: expected search or topk")
    if samples < 1:
        raise UserError(f"samples={samples}: expected >= 1")
    objective.check(result.metrics)
    lower_D, upper_D = _trust_region(result, *_bounds(domains, caps, min_weight))
    starts, template_SxD = _template(stage_template, domains)
    S, D = len(starts), len(domains)
    if result.n_features and result.n_features != S * D + S - 1:
        raise ValueError(f"the template's {S} stage(s) x {D} domains give {S * D + S - 1} "
                         f"features; the fit used {result.n_features}")
    # a fit that sees only each domain's share of all tokens cannot tell an end stage from the
    # base: it gets one mixture for every stage, and the end stage's start does not matter to it
    stage_blind = all(getattr(m, "stage_blind", False) for m in result.models.values())
    found = []
    for starts in [starts] if stage_blind else _start_grid(result, starts):
        scorer = _Scorer(result, starts, objective, baseline)
        best_SxD = _search(scorer, template_SxD, S, lower_D, upper_D, stage_blind,
                           np.random.default_rng(seed), samples, method, top_k, refine_starts,
                           refine_steps)
        (score,), pred_1xD = scorer(best_SxD[None])
        found.append((score, starts, best_SxD, pred_1xD[0]))
    best_score, starts, best_SxD, pred_D = min(found, key=lambda f: f[0])
    if best_score >= IMPLAUSIBLE:
        warnings.warn("every mixture searched has a predicted metric outside the range the "
                      "fitted runs measured (widened by that range): the fit extrapolates "
                      "everywhere",
                      stacklevel=2)
    elif best_score >= INFEASIBLE:
        warnings.warn(f"no mixture found meets the constraints ({objective.describe()}); the "
                      f"winner breaks them least (by {best_score - INFEASIBLE:.3%})",
                      stacklevel=2)
    schedule = MixtureSchedule.from_stage_weights(
        [(start, {d: float(w) for d, w in zip(domains, w_D)})
         for start, w_D in zip(starts, best_SxD)]).validate(domains, where="winner")
    return schedule, {m: float(v) for m, v in zip(result.metrics, pred_D)}


def _start_grid(result: FitResult, starts: list[float]) -> list[list[float]]:
    """The stage starts to search: the template's, or, with one end stage whose start the
    fitted runs varied (space.anneal_start), 5 values spread over the range they tried."""
    seen = result.seen
    if len(starts) != 2 or seen is None or not seen.start_hi_S1[0] > seen.start_lo_S1[0]:
        return [starts]
    return [[0.0, float(x)] for x in np.linspace(seen.start_lo_S1[0], seen.start_hi_S1[0], 5)]


def _search(scorer: _Scorer, template_SxD: np.ndarray | None, S: int, lower_D: np.ndarray,
            upper_D: np.ndarray, stage_blind: bool, rng: np.random.Generator, samples: int,
            method: str, top_k: int, refine_starts: int, refine_steps: int) -> np.ndarray:
    """The (S, D) stage weights the scorer ranks best, at its stage starts."""
    D = len(lower_D)
    center_SxD = template_SxD if template_SxD is not None else np.full((S, D), 1.0 / D)
    if stage_blind:  # one mixture, repeated over the stages
        scorer = _Tiled(scorer, S)
        shares_D = np.diff([0.0, *scorer.scorer.starts, 1.0]) @ center_SxD
        center_SxD, template_SxD = shares_D[None], (
            None if template_SxD is None else shares_D[None])
    W_MxSxD = _sample(rng, samples, center_SxD)
    # the template itself and the uniform mixture are always candidates: the baseline is
    # feasible by construction when the model predicts it well
    fixed = ([np.full(center_SxD.shape, 1.0 / D)]
             + ([template_SxD] if template_SxD is not None else []))
    W_MxSxD = _project(np.concatenate([np.stack(fixed), W_MxSxD]), lower_D, upper_D)
    score_M, _ = scorer(W_MxSxD)
    order_M = np.argsort(score_M, kind="stable")
    if method == "topk":
        top = order_M[:max(1, min(top_k, len(order_M)))]
        feasible = top[score_M[top] < INFEASIBLE]
        best_SxD = W_MxSxD[feasible if len(feasible) else top].mean(0)
        best_SxD = _project(best_SxD[None], lower_D, upper_D)[0]  # convex: only float dust
    else:
        starts_K = order_M[:max(1, min(refine_starts, len(order_M)))]
        W_KxSxD, score_K = _refine(W_MxSxD[starts_K], score_M[starts_K], scorer, rng,
                                   lower_D, upper_D, refine_steps)
        best_SxD = W_KxSxD[int(np.argmin(score_K))]
    return np.broadcast_to(best_SxD, (S, D))


def predict_schedule(result: FitResult, schedule: MixtureSchedule) -> dict[str, float]:
    """Predicted metrics of one schedule."""
    pred_K = result.predict(features(schedule, result.domains)[None])[0]
    return {m: float(v) for m, v in zip(result.metrics, pred_K)}


def objective_of(values: Mapping[str, float], objective: Objective,
                 metrics: Sequence[str]) -> float:
    """The objective of one set of metric values."""
    return float(objective_values(np.array([[values[m] for m in metrics]]), metrics,
                                  objective)[0])


def prefer_measured(result: FitResult, objective: Objective,
                    fitted: tuple[MixtureSchedule, dict[str, float]],
                    measured: tuple[MixtureSchedule, float], label: str, enabled: bool = True
                    ) -> tuple[MixtureSchedule, dict[str, float], dict]:
    """The fit's (schedule, predicted losses), unless it is predicted better than the best
    measured run (its schedule and measured objective, named `label`) by less than the fit's
    error there: then that run, a loss measured rather than an extrapolation the fit cannot
    tell apart from it. Also returns the choice's record.

    The error is the cross-validated RMSE on the objective, which measures the fit at mixtures
    like the runs', combined with the spread of the CV folds' models at the fit's mixture,
    which grows as that mixture leaves the runs (a 7-run linear fit predicted a tiny sweep's
    mixture 0.22 nats better than its best run, 5x its CV error, and it measured no better)."""
    schedule, predicted = fitted
    best, best_objective = measured
    cv_error = math.sqrt(result.cv_mse["objective"][result.chosen[result.metrics[0]]])
    spread = _fold_spread(result, objective, schedule)
    gain = best_objective - objective_of(predicted, objective, result.metrics)
    choice = {"from": "fit", "best_measured": label, "measured": best_objective,
              "predicted_gain": gain, "margin": math.hypot(cv_error, spread),
              "cv_error": cv_error, "fold_spread": spread,
              "extrapolated": _extrapolated(result, predicted)}
    if (gain >= choice["margin"] and not choice["extrapolated"]) or not enabled:
        return schedule, predicted, choice
    return best, predict_schedule(result, best), {**choice, "from": label}


def prefer_baseline(result: FitResult, objective: Objective,
                    chosen: tuple[MixtureSchedule, dict[str, float], dict],
                    baseline: tuple[MixtureSchedule, float], label: str
                    ) -> tuple[MixtureSchedule, dict[str, float], dict]:
    """The choice so far (as prefer_measured returns it), unless it leads the baseline run's
    measured objective (the natural mixture's, named `label`) by less than the fit's error:
    then the baseline, as nothing is known to beat it. A single proxy's lead over another is
    within its seed noise as often as not (a GSM8K sweep's best trial led natural by 0.005 bits,
    the fit's error was 0.145, and at target scale natural was 2.8% better)."""
    schedule, predicted, choice = chosen
    value = (objective_of(predicted, objective, result.metrics) if choice["from"] == "fit"
             else choice["measured"])
    base, base_value = baseline
    lead = base_value - value
    record = {**choice, "baseline": label, "baseline_measured": base_value,
              "lead_over_baseline": lead}
    if lead >= choice["margin"] or schedule.to_dict() == base.to_dict():
        return schedule, predicted, record
    return base, predict_schedule(result, base), {**record, "from": label, "kept_baseline": True}


def _fold_spread(result: FitResult, objective: Objective, schedule: MixtureSchedule) -> float:
    """The std of the objective the CV folds' models predict for `schedule`."""
    if not result.fold_models:
        return 0.0
    pred_FxK = result.fold_predict(features(schedule, result.domains)[None])[:, 0]
    return float(objective_values(pred_FxK, result.metrics, objective).std(ddof=1))


def _extrapolated(result: FitResult, predicted: Mapping[str, float]) -> dict[str, float]:
    """The metrics whose predicted value lies outside what the fit saw (fit.Seen.outside)."""
    if result.seen is None:
        return {}
    pred_K = np.array([predicted[m] for m in result.metrics])
    out_K = result.seen.outside(pred_K[None])[0]
    return {m: float(p) for m, p, o in zip(result.metrics, pred_K, out_K) if o > 0}


def describe_choice(choice: Mapping, measured: float | None = None) -> str:
    """The choice in one line: the fit's mixture or a measured run, and why."""
    measured = choice.get("measured", measured)  # fit.json of sweeps before it was recorded
    within = "within" if choice["predicted_gain"] < choice["margin"] else "beyond"
    line = (f"choice: {choice['from']}: the fit's mixture was predicted "
            f"{choice['predicted_gain']:+.4f} better than {choice['best_measured']}'s measured "
            f"{measured:.4f}, {within} the fit's error {choice['margin']:.4f}")
    if "cv_error" in choice:  # recorded since the folds' spread joined the CV error
        line += (f" (CV error {choice['cv_error']:.4f}, its fold models' spread at that "
                 f"mixture {choice['fold_spread']:.4f})")
    if choice.get("extrapolated"):
        line += ("; its predicted " + ", ".join(f"{d} {v:.4f}" for d, v in
                                                  choice["extrapolated"].items())
                 + " lie outside the losses the fitted runs measured: an extrapolation")
    if choice.get("kept_baseline"):
        line += (f"; the best of those leads {choice['baseline']}'s measured "
                 f"{choice['baseline_measured']:.4f} by {choice['lead_over_baseline']:+.4f}, "
                 "within that error: the baseline is kept (fit.prefer_baseline)")
    return line


def _plain(obj):
    """JSON-ready: numpy scalars and arrays to Python, NaN to null (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_plain(v) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_winner(path: Path, schedule: MixtureSchedule, predicted: Mapping[str, float],
                 extra: dict) -> None:
    """winner.json: the MixtureSchedule JSON plus "predicted" and "fit" (load ignores them)."""
    path = Path(path)
    obj = schedule.to_dict()
    obj["predicted"] = _plain(dict(predicted))
    obj["fit"] = _plain(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)  # a reader never sees half a winner
