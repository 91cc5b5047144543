"""The mixture search space of a RegMix-style sweep: which MixtureSchedules the proxies train on.

A trial's schedule is a base stage plus, when `anneal` is on, an end-of-training stage:

- Base weights are drawn from a Dirichlet around the *centre*: the prior (natural token shares
  ** prior_power, renormalized, or uniform) projected onto the constraints below. Its
  concentration alpha0 is drawn log-uniformly per sample from `concentration`, and the Dirichlet
  parameter is alpha_d = alpha0 * K * centre_d (K domains), so E[w] = centre and a uniform centre
  has alpha_d = alpha0 for every domain: the range means the same whatever K is (alpha0 < 1 puts
  mass near the simplex's corners, alpha0 >> 1 near the centre). RegMix writes alpha = strength *
  prior (total concentration = strength); its range (0.1, 5) is ours divided by K.
- Constraints, per stage: lower_d = min_weight <= w_d <= cap_d = min(1, max_epochs * tokens_d /
  target_tokens). The cap is the repetition budget at the *target* run's token count (the proxies
  see far fewer tokens; the winner must be usable at full scale). min_weight keeps every domain
  present (a domain with weight 0 tells the regression nothing about its own loss), so each
  domain's cap must be at least min_weight. A stage meeting its cap is conservative for the
  whole run, whose usage is the time average of the stages.
- A draw becomes feasible by `project_to_capped_simplex`, which rescales multiplicatively and
  clips (ratios between domains off their bounds are kept, unlike a Euclidean projection that
  shifts all weights by a constant and zeroes the small ones), then weights are rounded to a
  1e-6 grid inside the bounds with an exact integer sum, so JSON stays short and sums stay 1.
- The end-of-training stage starts at a fraction drawn uniformly from `anneal_start`, and its
  weights are either drawn like the base (independent draw, own alpha0) or, when
  `anneal_boost` names domains, the base weights with those domains multiplied by
  `anneal_boost_factor`, renormalized and projected like any stage.
- Trial 0 is always the centre itself (anneal stage: the centre again, or its boost, starting at
  the middle of the range): a baseline every sweep contains. Then the `anchors`, by default the
  natural (token-proportional) and the uniform mixture, each in every stage, projected onto the
  constraints: the baselines the validation compares the winner against, so the fit sees them
  measured rather than extrapolates to them (uniform beat all 48 sampled trials of a sweep that
  lacked it: bench/results/mixture_quality_*). An anchor that duplicates a kept schedule is skipped.
  Every trial has the same stage structure, so the regression sees the same features for each.
- Duplicates are dropped greedily: a schedule whose distance to a kept one, L1 over all stages'
  weights plus |difference of stage starts|, is below `dedup_tol` (or is exactly 0) is
  redrawn, at most 50 draws per trial in all.

Everything is a pure function of (space, domains, tokens, target_tokens): one
Generator(PCG64(seed)), consumed in a fixed order.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

from gemini_core.data.mixture import MixtureSchedule, Stage
from gemini_core.errors import UserError

PRIORS = ("natural", "uniform")
ANCHORS = PRIORS  # baseline mixtures a space can include as trials of their own
GRID = 10**6  # schedule weights are multiples of 1/GRID: short, stable JSON
DRAWS_PER_TRIAL = 50  # how many candidates a trial may cost before the space counts as too narrow


@dataclasses.dataclass(frozen=True)
class SpaceConfig:
    trials: int = 48
    prior: str = "natural"  # natural | uniform
    prior_power: float = 0.5  # natural shares ** power, renormalized: < 1 flattens a skewed corpus
    # alpha0, drawn log-uniformly per sample; Dirichlet alpha_d = alpha0 * K * centre_d, so
    # alpha0 is the per-domain concentration of a uniform centre (module docstring)
    concentration: tuple[float, float] = (0.1, 5.0)
    min_weight: float = 0.0  # every domain gets at least this in every stage
    max_epochs: float = 4.0  # weight_d * target_tokens <= max_epochs * tokens_d, every stage
    dedup_tol: float = 0.01  # L1 over all stages' weights (+ |start difference|) below this: dup
    # end-of-training stage
    anneal: bool = True
    anneal_start: tuple[float, float] = (0.8, 0.9)  # drawn uniformly; equal ends = fixed
    anneal_boost: tuple[str, ...] = ()  # set: base weights with these boosted; unset: a new draw
    anneal_boost_factor: float = 2.0
    # after the centre: these baselines as trials (natural = token shares, power 1; uniform)
    anchors: tuple[str, ...] = ANCHORS
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# validation


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) \
        and math.isfinite(x)


def _pair(value, key: str) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(map(_is_number, value)):
        raise UserError(f"{key}={value!r}: expected a pair of numbers (low, high)")
    lo, hi = float(value[0]), float(value[1])
    if lo > hi:
        raise UserError(f"{key}={value!r}: low end above high end")
    return lo, hi


def check_data(domains: Sequence[str], tokens: Mapping[str, int], target_tokens: int,
                where: str) -> None:
    if not len(domains):
        raise UserError(f"{where}: no domains to mix")
    seen = set()
    for d in domains:
        if d in seen:
            raise UserError(f"{where}: domain {d!r} listed twice")
        seen.add(d)
    missing = [d for d in domains if d not in tokens]
    if missing:
        raise UserError(f"{where}: domain(s) {', '.join(map(repr, missing))} missing from the "
                        f"data (token counts known for: {', '.join(map(repr, tokens)) or 'none'})")
    for d in domains:
        n = tokens[d]
        if not _is_number(n) or n < 0:
            raise UserError(f"{where}: domain {d!r} has token count {n!r}: expected a number >= 0")
    if not _is_number(target_tokens) or target_tokens <= 0:
        raise UserError(f"{where}: target_tokens={target_tokens!r}: expected a number > 0 (the "
                        "target run's training tokens, which the repetition caps refer to)")


def check_fields(space: SpaceConfig, domains: Sequence[str], where: str, min_trials: int = 1
                 ) -> None:
    """The space's own fields, without the data: also at the config boundary
    (sweeps.config.from_config_dict), so a bad field fails before any data is prepared."""
    K = len(domains)
    if not isinstance(space.trials, (int, np.integer)) or isinstance(space.trials, bool) \
            or space.trials < max(1, min_trials):
        need = f"the fit needs at least {min_trials}" if min_trials > 1 else "must be >= 1"
        raise UserError(f"{where}.trials={space.trials!r}: {need}")
    if space.prior not in PRIORS:
        raise UserError(f"{where}.prior={space.prior!r}: expected one of {', '.join(PRIORS)}")
    if not _is_number(space.prior_power) or space.prior_power < 0:
        raise UserError(f"{where}.prior_power={space.prior_power!r}: expected a number >= 0")
    lo, _ = _pair(space.concentration, f"{where}.concentration")
    if lo <= 0:
        raise UserError(f"{where}.concentration={space.concentration!r}: both ends must be > 0")
    if not _is_number(space.min_weight) or space.min_weight < 0:
        raise UserError(f"{where}.min_weight={space.min_weight!r}: expected a number >= 0")
    if space.min_weight * K > 1:
        raise UserError(f"{where}.min_weight={space.min_weight!r}: {K} domains x min_weight = "
                        f"{space.min_weight * K:g} > 1, so no mixture sums to 1")
    if not _is_number(space.max_epochs) or space.max_epochs <= 0:
        raise UserError(f"{where}.max_epochs={space.max_epochs!r}: expected a number > 0")
    if not _is_number(space.dedup_tol) or space.dedup_tol < 0:
        raise UserError(f"{where}.dedup_tol={space.dedup_tol!r}: expected a number >= 0")
    lo, hi = _pair(space.anneal_start, f"{where}.anneal_start")
    if not (0 < lo and hi < 1):
        raise UserError(f"{where}.anneal_start={space.anneal_start!r}: must lie inside (0, 1), "
                        "a fraction of training steps after the base stage's start")
    if isinstance(space.anneal_boost, str):  # a bare string would be read letter by letter
        raise UserError(f"{where}.anneal_boost={space.anneal_boost!r}: expected a tuple of "
                        "domain names")
    unknown = [d for d in space.anneal_boost if d not in domains]
    if unknown:
        raise UserError(f"{where}.anneal_boost={tuple(space.anneal_boost)!r}: unknown domain(s) "
                        f"{', '.join(map(repr, unknown))} (known: {', '.join(domains)})")
    if space.anneal_boost and not space.anneal:
        raise UserError(f"{where}.anneal_boost={tuple(space.anneal_boost)!r}: set, but "
                        f"{where}.anneal=False has no end-of-training stage to boost")
    if not _is_number(space.anneal_boost_factor) or space.anneal_boost_factor <= 0:
        raise UserError(f"{where}.anneal_boost_factor={space.anneal_boost_factor!r}: expected a "
                        "number > 0")
    if isinstance(space.anchors, str) or any(a not in ANCHORS for a in space.anchors) \
            or len(set(space.anchors)) < len(space.anchors):
        raise UserError(f"{where}.anchors={space.anchors!r}: expected a tuple of distinct names "
                        f"from {', '.join(ANCHORS)} (or () for none)")
    if not isinstance(space.seed, (int, np.integer)) or isinstance(space.seed, bool) \
            or space.seed < 0:
        raise UserError(f"{where}.seed={space.seed!r}: expected an integer >= 0")


def check_space(space: SpaceConfig, domains: Sequence[str], tokens: Mapping[str, int],
                target_tokens: int, where: str = "config.space", *, min_trials: int = 1) -> None:
    """UserError naming the key path for a search space that is malformed, empty or
    contradictory; cheap, so a sweep calls it before Ray starts any trial. `min_trials`: how
    many points the regression fit needs (the fitter knows its feature count)."""
    check_data(domains, tokens, target_tokens, where)
    check_fields(space, domains, where, min_trials)
    if space.prior == "natural" and not any(tokens[d] > 0 for d in domains):
        raise UserError(f"{where}.prior='natural': every domain has 0 tokens")
    cap = caps(space, domains, tokens, target_tokens)
    budget = (f"{where}.max_epochs={space.max_epochs:g} at target_tokens={target_tokens:,}")
    below = [d for d in domains if cap[d] < space.min_weight]
    if below:
        listed = ", ".join(f"{d}: cap {cap[d]:.3g} ({tokens[d]:,} tokens)" for d in below)
        raise UserError(f"{where}.min_weight={space.min_weight:g}: caps that no mixture satisfies:"
                        f" {budget} caps {listed} below min_weight; add data for them, drop them "
                        "from the domains, raise max_epochs, or lower min_weight")
    if sum(cap.values()) < 1:
        listed = ", ".join(f"{d}: {cap[d]:.3g}" for d in domains)
        raise UserError(f"{where}.max_epochs={space.max_epochs:g}: caps that no mixture satisfies:"
                        f" at target_tokens={target_tokens:,} the per-domain caps ({listed}) sum "
                        f"to {sum(cap.values()):.4g} < 1; the data is too small for the target "
                        "run: add data, raise max_epochs, or lower the target's tokens")
    lo_q, hi_q = _grid_bounds(space, domains, cap)
    if (lo_q > hi_q).any() or lo_q.sum() > GRID or hi_q.sum() < GRID:  # feasible in reals,
        # not on the 1e-6 grid (a cap or min_weight finer than the grid, or all at an edge)
        raise UserError(f"{where}.min_weight={space.min_weight!r} and caps "
                        f"({', '.join(f'{d}: {cap[d]:.8g}' for d in domains)}) leave no mixture "
                        f"on the 1/{GRID:,} grid of schedule weights; loosen them slightly")


# ---------------------------------------------------------------------------------------------
# the constraints


def caps(space: SpaceConfig, domains: Sequence[str], tokens: Mapping[str, int],
         target_tokens: int) -> dict[str, float]:
    """Per-domain weight bound: at most max_epochs passes over the domain in the target run."""
    return {d: min(1.0, space.max_epochs * float(tokens[d]) / float(target_tokens))
            for d in domains}


def prior_weights(space: SpaceConfig, domains: Sequence[str], tokens: Mapping[str, int]
                  ) -> dict[str, float]:
    """The prior before the caps: natural token shares ** prior_power (renormalized), or 1/K.
    A domain with no tokens has natural weight 0 (0 ** 0 would give it 1)."""
    if space.prior == "uniform":
        return {d: 1.0 / len(domains) for d in domains}
    if space.prior != "natural":
        raise UserError(f"config.space.prior={space.prior!r}: expected one of "
                        f"{', '.join(PRIORS)}")
    counts_D = np.array([float(tokens[d]) for d in domains])
    if not (counts_D > 0).any():
        raise UserError("config.space.prior='natural': every domain has 0 tokens")
    # shares first: large counts ** power stay well inside float range
    shares_D = counts_D / counts_D.sum()
    raised_D = np.where(shares_D > 0, shares_D ** float(space.prior_power), 0.0)
    raised_D /= raised_D.sum()
    return dict(zip(domains, raised_D.tolist()))


def _anchor_weights(space: SpaceConfig, name: str, domains: Sequence[str],
                    tokens: Mapping[str, int]) -> np.ndarray:
    """(D,) an anchor's weights before the constraints: the natural shares (power 1) or 1/K."""
    w = prior_weights(dataclasses.replace(space, prior=name, prior_power=1.0), domains, tokens)
    return np.array([w[d] for d in domains])


def project_to_capped_simplex(w: np.ndarray, lower: np.ndarray, upper: np.ndarray
                              ) -> np.ndarray:
    """The x with lower <= x <= upper, sum(x) = 1 (within 1e-12) closest to w in ratios.

    x_d = clip(c * w_d, lower_d, upper_d) with the one scale c that makes the sum 1: f(c) =
    sum_d clip(c * w_d, ...) is continuous, non-decreasing and piecewise linear with
    breakpoints lower_d / w_d and upper_d / w_d, so c is found exactly by evaluating f at the
    sorted breakpoints and interpolating on the segment that crosses 1 (no iteration, so nothing
    to prove about termination). Domains off their bounds keep their ratios; w_d = 0 stays at
    lower_d, unless the positive part of w cannot reach 1 even at its caps: then it sits at its
    caps and the zero part fills the rest in proportion to its headroom. A feasible w (sum 1,
    inside the bounds) is returned unchanged; w is scale-free (c absorbs any factor).
    """
    w_D = np.asarray(w, dtype=np.float64)
    lo_D = np.asarray(lower, dtype=np.float64)
    hi_D = np.asarray(upper, dtype=np.float64)
    if not (w_D.shape == lo_D.shape == hi_D.shape and w_D.ndim == 1):
        raise ValueError(f"shapes differ or are not 1-D: {w_D.shape}, {lo_D.shape}, {hi_D.shape}")
    if not np.isfinite(w_D).all() or (w_D < 0).any():
        raise ValueError(f"weights must be finite and >= 0: {w_D}")
    if (lo_D > hi_D).any() or (lo_D < 0).any() or lo_D.sum() > 1 + 1e-12 \
            or hi_D.sum() < 1 - 1e-12:
        raise ValueError(f"no x with {lo_D} <= x <= {hi_D} sums to 1")
    if (lo_D <= w_D).all() and (w_D <= hi_D).all() and abs(w_D.sum() - 1) <= 1e-12:
        return w_D.copy()
    # scale-free, so divide by the max: breakpoints and c * w then stay finite, with weights below
    # 1e-300 of the largest (a Dirichlet with tiny alphas underflows to such) counted as 0
    if w_D.max() > 0:
        w_D = w_D / w_D.max()
    pos_D = w_D > 1e-300
    x_D = lo_D.copy()
    reach = hi_D[pos_D].sum() + lo_D[~pos_D].sum()  # f(c) as c -> infinity
    if reach < 1:
        x_D[pos_D] = hi_D[pos_D]
        room_D = np.where(pos_D, 0.0, hi_D - lo_D)
        x_D += room_D * ((1 - reach) / room_D.sum())  # room > 0: sum(upper) >= 1 > reach
    else:
        w_P, lo_P, hi_P = w_D[pos_D], lo_D[pos_D], hi_D[pos_D]
        c_B = np.unique(np.concatenate([[0.0], lo_P / w_P, hi_P / w_P]))
        f_B = np.clip(c_B[:, None] * w_P, lo_P, hi_P).sum(1) + lo_D[~pos_D].sum()
        j = int(np.searchsorted(f_B, 1.0))  # first breakpoint with f >= 1; f(last) = reach >= 1
        j = min(j, len(c_B) - 1)
        if j == 0 or f_B[j] == f_B[j - 1]:
            c = c_B[j]
        else:  # f is linear on [c_{j-1}, c_j]
            c = c_B[j - 1] + (1 - f_B[j - 1]) * (c_B[j] - c_B[j - 1]) / (f_B[j] - f_B[j - 1])
        x_D[pos_D] = np.clip(c * w_P, lo_P, hi_P)
    return _fix_sum(x_D, lo_D, hi_D)


def _fix_sum(x_D: np.ndarray, lo_D: np.ndarray, hi_D: np.ndarray) -> np.ndarray:
    """Moves the float residual of sum(x) = 1 (a few ulps) onto the domains with most room."""
    r = 1.0 - x_D.sum()
    room_D = hi_D - x_D if r > 0 else x_D - lo_D
    for d in np.argsort(-room_D, kind="stable").tolist():
        if r == 0:
            break
        step = math.copysign(min(abs(r), room_D[d]), r)
        x_D[d] = min(max(x_D[d] + step, lo_D[d]), hi_D[d])
        r = 1.0 - x_D.sum()
    return x_D


def _grid_bounds(space: SpaceConfig, domains: Sequence[str], cap: Mapping[str, float]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Bounds in units of 1/GRID such that q / GRID, as a float, stays inside the real bounds."""
    lo_q, hi_q = [], []
    for d in domains:
        lo, hi = math.ceil(space.min_weight * GRID), math.floor(cap[d] * GRID)
        if lo / GRID < space.min_weight:  # the product rounded down past an integer
            lo += 1
        if hi / GRID > cap[d]:
            hi -= 1
        lo_q.append(lo)
        hi_q.append(hi)
    return np.array(lo_q, np.int64), np.array(hi_q, np.int64)


def _to_grid(x_D: np.ndarray, lo_q: np.ndarray, hi_q: np.ndarray) -> np.ndarray:
    """Integers q with lo_q <= q <= hi_q and sum(q) = GRID, within ~1 unit of x * GRID:
    floor, then largest remainders take the missing units (smallest give back any excess)."""
    exact_D = x_D * GRID
    q_D = np.clip(np.floor(exact_D).astype(np.int64), lo_q, hi_q)
    while (gap := GRID - int(q_D.sum())) != 0:  # each pass moves >= 1 unit: sum bounds are
        rem_D = exact_D - q_D  # feasible (check_space), so some domain always has room
        if gap > 0:
            open_D = np.flatnonzero(q_D < hi_q)
            if not len(open_D):
                raise AssertionError("grid bounds infeasible (check_space should have said)")
            chosen = open_D[np.argsort(-rem_D[open_D], kind="stable")][:gap]
            q_D[chosen] += 1
        else:
            open_D = np.flatnonzero(q_D > lo_q)
            if not len(open_D):
                raise AssertionError("grid bounds infeasible (check_space should have said)")
            chosen = open_D[np.argsort(rem_D[open_D], kind="stable")][:-gap]
            q_D[chosen] -= 1
    return q_D


# ---------------------------------------------------------------------------------------------
# sampling


@dataclasses.dataclass(frozen=True)
class _Bounds:
    lo_D: np.ndarray
    hi_D: np.ndarray
    lo_q: np.ndarray
    hi_q: np.ndarray

    def feasible(self, w_D: np.ndarray) -> np.ndarray:
        """On the grid, inside the bounds, summing to exactly GRID units."""
        x_D = project_to_capped_simplex(w_D, self.lo_D, self.hi_D)
        return _to_grid(x_D, self.lo_q, self.hi_q) / GRID


def _draw(rng: np.random.Generator, centre_D: np.ndarray, space: SpaceConfig) -> np.ndarray:
    """One Dirichlet draw around the centre, alpha0 log-uniform in `concentration`."""
    lo, hi = space.concentration
    alpha0 = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    support = np.flatnonzero(centre_D > 0)  # a zero-centre domain (cap 0) stays at 0
    w_D = np.zeros_like(centre_D)
    w_D[support] = rng.dirichlet(alpha0 * len(centre_D) * centre_D[support])
    # tiny alphas can underflow every gamma; projection turns an all-zero draw into a feasible one
    return np.nan_to_num(w_D, nan=0.0)


def _start(space: SpaceConfig, fraction: float) -> float:
    lo, hi = map(float, space.anneal_start)
    start = lo + (hi - lo) * fraction
    rounded = round(start, 6)  # short JSON, unless rounding leaves the declared range
    return rounded if lo <= rounded <= hi and 0 < rounded < 1 else start


def _schedule(domains: Sequence[str], stages: list[tuple[float, np.ndarray]]
              ) -> MixtureSchedule:
    return MixtureSchedule(tuple(Stage(start, dict(zip(domains, w_D.tolist())))
                                 for start, w_D in stages))


def _vector(stages: list[tuple[float, np.ndarray]]) -> np.ndarray:
    """What dedup compares: every stage's start and weights, concatenated."""
    return np.concatenate([np.concatenate([[start], w_D]) for start, w_D in stages])


def boost_factors(domains: Sequence[str], boosted: Sequence[str], factor: float) -> np.ndarray:
    """(D,) the multiplier of each domain's weight in an end stage that boosts `boosted`."""
    return np.array([factor if d in boosted else 1.0 for d in domains])


def sample_schedules(space: SpaceConfig, domains: Sequence[str], tokens: Mapping[str, int],
                     target_tokens: int) -> list[MixtureSchedule]:
    """`space.trials` distinct, validated schedules: the centre, the anchors, then draws."""
    return sample_space(space, domains, tokens, target_tokens)[0]


def sample_space(space: SpaceConfig, domains: Sequence[str], tokens: Mapping[str, int],
                 target_tokens: int) -> tuple[list[MixtureSchedule], dict[str, int]]:
    """The schedules of `sample_schedules`, and the trial index of each fixed one: "centre" and
    every anchor kept (module docstring).

    Raises UserError for a bad space (check_space) or one too narrow to give `trials` distinct
    schedules within DRAWS_PER_TRIAL * trials draws.
    """
    check_space(space, domains, tokens, target_tokens)
    domains = tuple(domains)
    cap = caps(space, domains, tokens, target_tokens)
    lo_q, hi_q = _grid_bounds(space, domains, cap)
    bounds = _Bounds(np.full(len(domains), float(space.min_weight)),
                     np.array([cap[d] for d in domains]), lo_q, hi_q)
    prior_D = np.array([prior_weights(space, domains, tokens)[d] for d in domains])
    centre_D = bounds.feasible(prior_D)
    boost_D = boost_factors(domains, space.anneal_boost, space.anneal_boost_factor)

    def anneal_weights(base_D: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        if space.anneal_boost:
            return bounds.feasible(base_D * boost_D)
        return centre_D if rng is None else bounds.feasible(_draw(rng, centre_D, space))

    def stages(base_D: np.ndarray, start: float, rng: np.random.Generator | None
               ) -> list[tuple[float, np.ndarray]]:
        if not space.anneal:
            return [(0.0, base_D)]
        return [(0.0, base_D), (start, anneal_weights(base_D, rng))]

    mid = _start(space, 0.5)
    fixed = {"centre": stages(centre_D, mid, None)}
    for name in space.anchors:  # the same mixture in every stage, as validation runs it
        anchor_D = bounds.feasible(_anchor_weights(space, name, domains, tokens))
        fixed[name] = [(0.0, anchor_D)] + ([(mid, anchor_D)] if space.anneal else [])
    kept: list[list[tuple[float, np.ndarray]]] = []
    vectors_NxV = np.empty((space.trials, len(_vector(fixed["centre"]))))

    def keep(candidate: list[tuple[float, np.ndarray]]) -> bool:
        v = _vector(candidate)
        dist_N = np.abs(vectors_NxV[:len(kept)] - v).sum(1)
        if (dist_N < space.dedup_tol).any() or (dist_N == 0).any():
            return False
        vectors_NxV[len(kept)] = v
        kept.append(candidate)
        return True

    index = {}
    for name, candidate in list(fixed.items())[:space.trials]:
        if keep(candidate):
            index[name] = len(kept) - 1
    rng = np.random.Generator(np.random.PCG64(space.seed))
    budget = DRAWS_PER_TRIAL * space.trials
    draws = 0
    while len(kept) < space.trials and draws < budget:
        draws += 1
        base_D = bounds.feasible(_draw(rng, centre_D, space))
        start = _start(space, rng.uniform()) if space.anneal else 0.0
        keep(stages(base_D, start, rng))
    if len(kept) < space.trials:
        raise UserError(
            f"config.space: too narrow for trials={space.trials}: {draws:,} draws gave only "
            f"{len(kept)} schedules at least config.space.dedup_tol={space.dedup_tol:g} apart "
            "(L1 over all stages' weights and starts). Widen config.space.concentration (a "
            f"lower low end spreads mixtures further from the prior; now "
            f"{tuple(space.concentration)}), loosen the caps (config.space.max_epochs="
            f"{space.max_epochs:g}) or config.space.min_weight={space.min_weight:g}, lower "
            "dedup_tol, or ask for fewer trials")
    return [_schedule(domains, st).validate(domains, f"config.space trial {i}")
            for i, st in enumerate(kept)], index
