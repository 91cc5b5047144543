"""The mixture search space: projection, sampler properties, and every user error."""

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemini_core.data.mixture import WEIGHT_TOLERANCE
from gemini_core.errors import UserError
from sweeps.space import (
    SpaceConfig,
    caps,
    check_space,
    prior_weights,
    project_to_capped_simplex,
    sample_schedules,
    sample_space,
)

DOMAINS = ("web", "code", "math", "books")
# math is tiny: at the target's 1e8 tokens, max_epochs=4 caps it at 4e6 / 1e8 = 0.04
TOKENS = {"web": 10**9, "code": 2 * 10**8, "math": 10**6, "books": 5 * 10**7}
TARGET = 10**8


def _weights(schedules, stage=None):
    """(N, stages, D) weights, or (N, D) of one stage."""
    w = np.array([s.weight_matrix(DOMAINS) for s in schedules])
    return w if stage is None else w[:, stage]


def _json(schedules) -> str:
    return json.dumps([s.to_dict() for s in schedules])


# ---------------------------------------------------------------------------------------------
# projection


@st.composite
def _box(draw):
    """(w, lower, upper) with sum(lower) <= 1 <= sum(upper), lower <= upper."""
    k = draw(st.integers(1, 8))
    unit = st.floats(0, 1, allow_subnormal=False)
    lo = np.array(draw(st.lists(unit, min_size=k, max_size=k)))
    lo = lo / max(1.0, lo.sum()) * draw(st.floats(0, 1))
    room = np.array(draw(st.lists(unit, min_size=k, max_size=k)))
    hi = np.minimum(1.0, lo + room)
    if hi.sum() < 1:  # widen until feasible
        hi = np.minimum(1.0, lo + (room + 1e-3) * (1 - lo.sum()) / (room + 1e-3).sum() + 1e-9)
    zero = st.just(0.0)
    # below 1e-300 of the largest a weight counts as 0 (projection docstring): not drawn here
    w = np.array(draw(st.lists(st.one_of(zero, st.floats(1e-9, 1e3)),
                               min_size=k, max_size=k)))
    return w, lo, hi


@settings(max_examples=300, deadline=None)
@given(_box())
def test_projection_is_inside_bounds_and_sums_to_one(box):
    w, lo, hi = box
    x = project_to_capped_simplex(w, lo, hi)
    assert abs(x.sum() - 1) <= 1e-9
    assert (x >= lo).all() and (x <= hi).all()


@settings(max_examples=200, deadline=None)
@given(_box())
def test_projection_keeps_ratios_of_free_domains_and_is_scale_free(box):
    w, lo, hi = box
    x = project_to_capped_simplex(w, lo, hi)
    np.testing.assert_allclose(project_to_capped_simplex(w * 7.5, lo, hi), x, atol=1e-12)
    free = (x > lo + 1e-9) & (x < hi - 1e-9) & (w > 0)
    if free.sum() >= 2:
        ratio = x[free] / w[free]
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-6)


@settings(max_examples=200, deadline=None)
@given(_box(), st.floats(0, 1))
def test_projection_is_identity_on_feasible_points(box, t):
    _, lo, hi = box
    # a feasible point: lower plus a share of the headroom that brings the sum to 1
    room = hi - lo
    w = lo + room * (max(0.0, 1 - lo.sum()) / room.sum()) if room.sum() > 0 else lo
    w = w * (1 - t) + project_to_capped_simplex(np.ones_like(lo), lo, hi) * t
    w = project_to_capped_simplex(w, lo, hi)  # exact sum
    np.testing.assert_array_equal(project_to_capped_simplex(w, lo, hi), w)


def test_projection_fills_from_zero_weights_when_the_support_cannot_reach_one():
    x = project_to_capped_simplex(np.array([1.0, 0.0, 0.0]), np.zeros(3), np.array([0.2, 1, 1]))
    np.testing.assert_allclose(x, [0.2, 0.4, 0.4])
    with pytest.raises(ValueError):
        project_to_capped_simplex(np.ones(2), np.zeros(2), np.array([0.3, 0.3]))


# ---------------------------------------------------------------------------------------------
# the sampler


def test_caps_and_validity_at_the_target_scale():
    space = SpaceConfig(trials=40)
    cap = caps(space, DOMAINS, TOKENS, TARGET)
    assert cap == {"web": 1.0, "code": 1.0, "math": 0.04, "books": 1.0}
    schedules = sample_schedules(space, DOMAINS, TOKENS, TARGET)
    assert len(schedules) == 40
    w = _weights(schedules)  # every stage of every schedule
    assert (w[..., DOMAINS.index("math")] <= 0.04).all()
    assert (w[..., DOMAINS.index("math")] == 0.04).any()  # the cap binds: a real test
    assert (w >= 0).all() and np.abs(w.sum(-1) - 1).max() <= 1e-9
    for s in schedules:
        s.validate(DOMAINS)
        for stage in s.stages:
            assert TARGET * stage.weights["math"] <= space.max_epochs * TOKENS["math"]


def test_min_weight_is_respected_and_weights_are_on_the_grid():
    schedules = sample_schedules(SpaceConfig(trials=30, min_weight=0.02), DOMAINS, TOKENS, TARGET)
    w = _weights(schedules)
    assert (w >= 0.02).all()
    assert (w[..., DOMAINS.index("math")] <= 0.04).all()
    np.testing.assert_allclose(w * 1e6, np.round(w * 1e6), atol=1e-6)


def test_reproducible_for_a_seed_and_different_across_seeds():
    space = SpaceConfig(trials=16, seed=3)
    a = sample_schedules(space, DOMAINS, TOKENS, TARGET)
    b = sample_schedules(space, DOMAINS, TOKENS, TARGET)
    c = sample_schedules(dataclasses.replace(space, seed=4), DOMAINS, TOKENS, TARGET)
    assert _json(a) == _json(b)
    assert _json(a) != _json(c)
    assert _json(a[:3]) == _json(c[:3])  # the centre and the anchors do not depend on the seed


def test_first_schedule_is_the_prior():
    space = SpaceConfig(trials=4, anneal_start=(0.8, 0.9))
    prior = prior_weights(space, DOMAINS, TOKENS)
    shares = np.array([TOKENS[d] for d in DOMAINS], float) ** 0.5
    np.testing.assert_allclose([prior[d] for d in DOMAINS], shares / shares.sum())
    first = sample_schedules(space, DOMAINS, TOKENS, TARGET)[0]
    assert [s.start for s in first.stages] == [0.0, 0.85]
    for stage in first.stages:  # the prior is feasible here (math 0.019 < cap 0.04)
        np.testing.assert_allclose([stage.weights[d] for d in DOMAINS],
                                   [prior[d] for d in DOMAINS], atol=1e-6)
    uniform = sample_schedules(SpaceConfig(trials=2, prior="uniform", anneal=False,
                                           max_epochs=100.0), DOMAINS, TOKENS, TARGET)[0]
    assert len(uniform.stages) == 1 and dict(uniform.stages[0].weights) == \
        {d: 0.25 for d in DOMAINS}


def test_prior_over_a_cap_is_projected_onto_it():
    # power 0 = every domain with tokens equally likely; math's cap 0.04 < 0.25
    space = SpaceConfig(trials=2, prior_power=0.0, anneal=False)
    first = sample_schedules(space, DOMAINS, TOKENS, TARGET)[0].stages[0].weights
    assert first["math"] == 0.04
    assert first["web"] == first["code"] == first["books"] == 0.32


def test_duplicates_removed():
    schedules = sample_schedules(SpaceConfig(trials=48, dedup_tol=0.05), DOMAINS, TOKENS, TARGET)
    v = np.array([np.concatenate([[st.start for st in s.stages], m.ravel()])
                  for s, m in zip(schedules, _weights(schedules))])
    dist = np.abs(v[:, None] - v[None]).sum(-1)
    np.fill_diagonal(dist, np.inf)
    assert dist.min() >= 0.05


def test_narrow_space_is_a_clear_error_or_distinct_schedules():
    # a huge concentration pins every draw to the prior: dedup cannot find 10 distinct ones
    narrow = SpaceConfig(trials=10, concentration=(1e7, 1e7), anneal_start=(0.9, 0.9))
    with pytest.raises(UserError, match=r"too narrow.*config\.space\.concentration"):
        sample_schedules(narrow, DOMAINS, TOKENS, TARGET)
    # no dedup tolerance: exact duplicates alone are dropped, the rest differ on the grid
    out = sample_schedules(dataclasses.replace(narrow, dedup_tol=0.0, concentration=(1e4, 1e4)),
                           DOMAINS, TOKENS, TARGET)
    assert len({_json([s]) for s in out}) == 10
    # a single possible mixture (caps sum to exactly 1): the error names the caps
    tight = {"web": 10**7, "code": 10**7, "math": 5 * 10**6}
    with pytest.raises(UserError, match="max_epochs"):
        sample_schedules(SpaceConfig(trials=3, max_epochs=4.0, anneal=False),
                         ("web", "code", "math"), tight, TARGET)


def test_anneal_start_within_range_and_fixed_when_ends_equal():
    schedules = sample_schedules(SpaceConfig(trials=30, anneal_start=(0.7, 0.95)),
                                 DOMAINS, TOKENS, TARGET)
    starts = [s.stages[1].start for s in schedules]
    assert all(0.7 <= x <= 0.95 for x in starts) and len(set(starts)) > 20
    fixed = sample_schedules(SpaceConfig(trials=10, anneal_start=(0.9, 0.9)),
                             DOMAINS, TOKENS, TARGET)
    assert {s.stages[1].start for s in fixed} == {0.9}
    assert all(len(s.stages) == 1 for s in sample_schedules(
        SpaceConfig(trials=5, anneal=False), DOMAINS, TOKENS, TARGET))


def test_boost_mode_boosts_exactly_the_named_domains():
    # no cap binds: the boost is visible everywhere; no anchors (baselines: one mixture in
    # every stage, tested below)
    space = SpaceConfig(trials=30, anneal_boost=("math", "code"), anneal_boost_factor=2.0,
                        max_epochs=1000.0, anchors=())
    schedules = sample_schedules(space, DOMAINS, TOKENS, TARGET)
    boosted = [DOMAINS.index("math"), DOMAINS.index("code")]
    others = [DOMAINS.index("web"), DOMAINS.index("books")]
    for base, end in _weights(schedules):
        expected = base * np.where(np.isin(np.arange(4), boosted), 2.0, 1.0)
        np.testing.assert_allclose(end, expected / expected.sum(), atol=2e-6)
        assert (end[boosted] >= base[boosted] - 1e-6).all()
        assert (end[others] <= base[others] + 1e-6).all()
    # with caps, a boosted domain stops at its cap and the others still only shrink
    capped = sample_schedules(dataclasses.replace(space, max_epochs=4.0, min_weight=0.01),
                              DOMAINS, TOKENS, TARGET)
    for base, end in _weights(capped):
        assert end[DOMAINS.index("math")] <= 0.04
        assert (end[boosted] >= base[boosted] - 1e-6).all()
        assert (end[others] <= base[others] + 1e-6).all()
        assert (end >= 0.01).all()


def test_sampled_anneal_stage_differs_from_the_base():
    schedules = sample_schedules(SpaceConfig(trials=10), DOMAINS, TOKENS, TARGET)
    w = _weights(schedules)
    # after the centre and the anchors (natural, uniform): one mixture in both stages
    assert (np.abs(w[3:, 0] - w[3:, 1]).sum(-1) > 1e-3).all()


def test_anchors_are_the_baselines_under_the_caps_and_leave_the_draws_alone():
    space = SpaceConfig(trials=10)
    schedules, fixed = sample_space(space, DOMAINS, TOKENS, TARGET)
    assert fixed == {"centre": 0, "natural": 1, "uniform": 2}
    natural, uniform = _weights(schedules[1:3])
    for w, s in zip((natural, uniform), schedules[1:3]):  # one mixture in every stage,
        np.testing.assert_array_equal(w[0], w[1])  # ending where the centre's does
        assert s.stages[1].start == schedules[0].stages[1].start
    shares = np.array([TOKENS[d] for d in DOMAINS], float)
    np.testing.assert_allclose(natural[0], shares / shares.sum(), atol=1e-6)  # under its caps
    # uniform breaks math's cap (0.25 > 0.04): projected onto it, the rest stays equal
    assert dict(zip(DOMAINS, uniform[0])) == pytest.approx(
        {"web": 0.32, "code": 0.32, "math": 0.04, "books": 0.32})
    # the random draws are the same with or without anchors
    plain, plain_fixed = sample_space(dataclasses.replace(space, anchors=()), DOMAINS, TOKENS,
                                      TARGET)
    assert plain_fixed == {"centre": 0}
    assert _json(plain[1:8]) == _json(schedules[3:])
    # a uniform prior makes the centre the uniform anchor: kept once
    flat = SpaceConfig(trials=4, prior="uniform", max_epochs=100.0)
    assert sample_space(flat, DOMAINS, TOKENS, TARGET)[1] == {"centre": 0, "natural": 1}


# ---------------------------------------------------------------------------------------------
# user errors: one message naming the key path, before anything runs


@pytest.mark.parametrize("change, message", [
    (dict(trials=0), r"config\.space\.trials=0: must be >= 1"),
    (dict(prior="flat"), r"config\.space\.prior='flat'"),
    (dict(prior_power=-1.0), r"config\.space\.prior_power=-1\.0"),
    (dict(min_weight=0.3), r"config\.space\.min_weight=0\.3: 4 domains x min_weight"),
    (dict(min_weight=0.05), r"config\.space\.min_weight=0\.05: caps that no mixture satisfies"
                            r".*math: cap 0\.04"),
    (dict(max_epochs=0.0), r"config\.space\.max_epochs=0\.0"),
    (dict(concentration=(0.0, 5.0)), r"config\.space\.concentration=\(0\.0, 5\.0\): both ends"),
    (dict(concentration=(5.0, 0.1)), r"config\.space\.concentration=\(5\.0, 0\.1\): low end"),
    (dict(concentration=(1.0,)), r"config\.space\.concentration=\(1\.0,\): expected a pair"),
    (dict(anneal_start=(0.0, 0.9)), r"config\.space\.anneal_start=\(0\.0, 0\.9\): must lie"),
    (dict(anneal_start=(0.8, 1.0)), r"config\.space\.anneal_start=\(0\.8, 1\.0\): must lie"),
    (dict(anneal_start=(0.9, 0.8)), r"config\.space\.anneal_start=\(0\.9, 0\.8\): low end"),
    (dict(anneal_boost=("maths",)), r"config\.space\.anneal_boost=\('maths',\): unknown "
                                    r"domain\(s\) 'maths'"),
    (dict(anneal_boost="math"), r"config\.space\.anneal_boost='math': expected a tuple"),
    (dict(anneal_boost=("math",), anneal=False), r"config\.space\.anneal=False has no"),
    (dict(anneal_boost_factor=0.0), r"config\.space\.anneal_boost_factor=0\.0"),
    (dict(dedup_tol=-0.1), r"config\.space\.dedup_tol=-0\.1"),
    (dict(seed=-1), r"config\.space\.seed=-1: expected an integer >= 0"),
    (dict(anchors=("natral",)), r"config\.space\.anchors=\('natral',\): expected a tuple of "
                                r"distinct names from natural, uniform"),
    (dict(anchors=("uniform", "uniform")), r"config\.space\.anchors=\('uniform', 'uniform'\)"),
    (dict(anchors="uniform"), r"config\.space\.anchors='uniform'"),
])
def test_check_space_errors_name_the_key(change, message):
    space = dataclasses.replace(SpaceConfig(), **change)
    with pytest.raises(UserError, match=message):
        check_space(space, DOMAINS, TOKENS, TARGET)
    with pytest.raises(UserError, match=message):  # the sampler checks first, too
        sample_schedules(space, DOMAINS, TOKENS, TARGET)


def test_caps_no_mixture_satisfies_name_domains_and_caps():
    small = {d: 10**6 for d in DOMAINS}  # 4 epochs x 1e6 / 1e8 = 0.04 each, 0.16 in all
    with pytest.raises(UserError, match=r"config\.space\.max_epochs=4: caps that no mixture "
                                        r"satisfies.*web: 0\.04.*sum to 0\.16 < 1"):
        check_space(SpaceConfig(), DOMAINS, small, TARGET)


def test_data_errors_name_the_domain():
    with pytest.raises(UserError, match=r"config\.space: domain\(s\) 'books' missing from the "
                                        r"data"):
        check_space(SpaceConfig(), DOMAINS, {d: TOKENS[d] for d in DOMAINS[:3]}, TARGET)
    with pytest.raises(UserError, match=r"sweep\.space: domain 'web' listed twice"):
        check_space(SpaceConfig(), ("web", "web"), TOKENS, TARGET, where="sweep.space")
    with pytest.raises(UserError, match=r"target_tokens=0"):
        check_space(SpaceConfig(), DOMAINS, TOKENS, 0)
    with pytest.raises(UserError, match=r"prior='natural': every domain has 0 tokens"):
        check_space(SpaceConfig(max_epochs=1e9), DOMAINS, {d: 0 for d in DOMAINS}, TARGET)
    with pytest.raises(UserError, match=r"config\.space\.min_weight=1e-07 and caps \(a: 4\.8e-07"
                                        r".* leave no mixture on the 1/1,000,000 grid"):
        check_space(SpaceConfig(min_weight=1e-7), ("a", "b"), {"a": 12, "b": 10**9}, TARGET)
    with pytest.raises(UserError, match=r"config\.space\.trials=8: the fit needs at least 12"):
        check_space(SpaceConfig(trials=8), DOMAINS, TOKENS, TARGET, min_trials=12)


def test_a_domain_without_tokens_gets_weight_zero():
    tokens = dict(TOKENS, books=0)
    for prior in ("natural", "uniform"):
        schedules = sample_schedules(SpaceConfig(trials=10, prior=prior), DOMAINS, tokens, TARGET)
        assert (_weights(schedules)[..., DOMAINS.index("books")] == 0).all()
        assert all(abs(sum(st.weights.values()) - 1) <= WEIGHT_TOLERANCE
                   for s in schedules for st in s.stages)
    with pytest.raises(UserError, match=r"min_weight=0\.01: caps that no mixture.*books: cap 0 "):
        check_space(SpaceConfig(min_weight=0.01), DOMAINS, tokens, TARGET)
