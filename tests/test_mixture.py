"""MixtureSchedule JSON contract and the sampler: counts, windows, determinism, repetition.

Token arrays are synthetic: token = domain base + position, so every row of a batch tells which
domain and which offset it came from.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemini_core.data import mixture
from gemini_core.data.mixture import MixtureSchedule, Stage, domain_counts
from gemini_core.data.sampler import Sampler
from gemini_core.errors import UserError

DESIGN_EXAMPLE = """
{"stages": [{"start": 0.0, "weights": {"web": 0.5, "code": 0.3, "math": 0.2}},
            {"start": 0.9, "weights": {"web": 0.3, "code": 0.3, "math": 0.4}}]}
"""
DOMAINS = ("web", "code", "math")
BASE = 1_000_000  # domain d's tokens are d * BASE + position


def synthetic_tokens(sizes: dict[str, int], dtype=np.uint32) -> dict[str, np.ndarray]:
    return {d: (np.arange(n) + i * BASE).astype(dtype) for i, (d, n) in enumerate(sizes.items())}


# ---------------------------------------------------------------------------------------------
# the JSON contract


def test_design_example_parses_and_validates():
    sched = MixtureSchedule.from_dict(json.loads(DESIGN_EXAMPLE)).validate(DOMAINS)
    assert [s.start for s in sched.stages] == [0.0, 0.9]
    assert sched.weights_at(0.95, DOMAINS) == (0.3, 0.3, 0.4)
    assert sched.to_dict() == json.loads(DESIGN_EXAMPLE)


def test_dump_load_round_trip_is_exact(tmp_path):
    sched = MixtureSchedule.from_stage_weights([
        (0.0, {"web": 0.1 + 0.2, "code": 1 / 3, "math": 1 - (0.1 + 0.2) - 1 / 3}),
        (0.123456789012345, {"web": 1e-3, "code": 0.999, "math": 0.0}),
        (0.9, {"math": 1.0})])
    sched.validate(DOMAINS)
    sched.dump(tmp_path / "s.json")
    loaded = MixtureSchedule.load(tmp_path / "s.json")
    assert loaded == sched
    assert loaded.to_dict() == sched.to_dict()
    assert MixtureSchedule.from_dict(json.loads(json.dumps(sched.to_dict()))) == sched


def test_stage_copies_callers_weights():
    weights = {"web": 1.0}
    sched = MixtureSchedule.constant(weights)
    weights["web"] = 0.5
    assert sched.stages[0].weights["web"] == 1.0
    assert Stage(0, {"web": 1.0}).start == 0.0


def _stage(start, **weights):
    return {"start": start, "weights": weights}


BAD_SCHEDULES = [
    ([_stage(0.0, web=0.5, code=0.5), _stage(0.5, web=1.1, code=-0.1)],
     "stages[1].weights.code=-0.1"),
    ([_stage(0.0, web=0.5, code=0.5 + 2e-6)], "stages[0].weights: sum to 1.000002"),
    ([_stage(0.0, web=0.5, poetry=0.5)], "stages[0].weights.poetry: unknown domain"),
    ([_stage(0.1, web=1.0)], "stages[0].start=0.1: must be 0.0"),
    ([_stage(0.0, web=1.0), _stage(0.5, web=1.0), _stage(0.5, code=1.0)],
     "stages[2].start=0.5: stage starts must be strictly increasing"),
    ([_stage(0.0, web=1.0), _stage(0.5, web=1.0), _stage(0.3, code=1.0)],
     "stages[2].start=0.3: stage starts must be strictly increasing"),
    ([_stage(0.0, web=1.0), _stage(1.0, code=1.0)], "stages[1].start=1.0: must be in [0, 1)"),
    ([_stage(0.0, web=1.0), _stage(-0.5, code=1.0)], "stages[1].start=-0.5: must be in [0, 1)"),
    ([_stage(0.0, web="lots", code=0.0)], "stages[0].weights.web='lots': expected a number"),
    ([{"start": 0.0}], "stages[0]: expected the keys start, weights and optionally seq_len "
                       "(got start)"),
    ([_stage(0.0, web=1.0), {"weights": {"web": 1.0}}],
     "stages[1]: expected the keys start, weights and optionally seq_len (got weights)"),
    ([{"start": 0.0, "weights": {"web": 1.0}, "seq_len": 0}],
     "stages[0].seq_len=0: expected a whole number of tokens >= 1"),
    ([{"start": 0.0, "weights": {"web": 1.0}, "seq_len": 64.0}],
     "stages[0].seq_len=64.0: expected a whole number of tokens >= 1"),
    ([_stage(True, web=1.0)], "stages[0].start=True: expected a number"),
    ([{"start": 0.0, "weights": [1.0]}], "stages[0].weights: expected a mapping"),
]


@pytest.mark.parametrize("stages,message", BAD_SCHEDULES)
def test_every_schedule_mistake_names_stage_and_domain(stages, message, tmp_path):
    path = tmp_path / "winner.json"
    path.write_text(json.dumps({"stages": stages}))
    with pytest.raises(UserError) as e:
        MixtureSchedule.load(path).validate(DOMAINS, where=str(path))
    assert str(e.value).startswith(f"{path}.{message}"), str(e.value)


def test_weights_within_tolerance_are_accepted():
    MixtureSchedule.constant({"web": 0.5, "code": 0.5 + 5e-7}).validate(DOMAINS)


@pytest.mark.parametrize("text,message", [
    ("{", "not valid JSON"), ('{"stages": {}}', "expected {\"stages\""),
    ('{"stages": []}', "no stages")])
def test_malformed_files_are_user_errors(text, message, tmp_path):
    path = tmp_path / "s.json"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        MixtureSchedule.load(path).validate(DOMAINS)
    with pytest.raises(UserError, match="not found"):
        MixtureSchedule.load(tmp_path / "missing.json")


def test_named_weights_must_be_resolved_before_sampling():
    with pytest.raises(UserError, match=r"stages\[0\].weights='natural'"):
        MixtureSchedule((Stage(0.0, "natural"),)).validate(DOMAINS)


# ---------------------------------------------------------------------------------------------
# counts per step


def test_quantized_weights_are_exact_and_keep_zeros_and_tiny_weights():
    scale = 1 << 40
    q = mixture.quantize_weights([0.5, 1e-15, 0.0, 0.3, 0.2 + 1e-7], scale)
    assert sum(q) == scale and q[2] == 0 and q[1] >= 1
    assert mixture.quantize_weights([1.0], 7) == [7]


def reference_counts(q_D: list[int], scale: int, batch: int, n_steps: int) -> np.ndarray:
    """The rule as the module docstring states it, one step at a time in exact integers."""
    N_D = [0] * len(q_D)
    cum = []
    for k in range(1, n_steps + 1):
        C_D = [k * batch * q for q in q_D]  # ideal cumulative counts, in units of 1 / scale
        ideal_D = [C - N * scale for C, N in zip(C_D, N_D)]  # B * w_d + r_d
        n_D = [max(0, x // scale) for x in ideal_D]
        below = [d for d, (n, x) in enumerate(zip(n_D, ideal_D)) if n * scale < x]
        # deadline: whole steps until C_d reaches N_d + n_d + 1, then the real-valued time
        gap = {d: (N_D[d] + n_D[d] + 1) * scale - C_D[d] for d in below}
        due = {d: (-(-gap[d] // (batch * q_D[d])), float(gap[d]) / float(batch * q_D[d]), d)
               for d in below}
        leftover = batch - sum(n_D)
        assert 0 <= leftover <= len(below)
        for d in sorted(below, key=due.get)[:leftover]:
            n_D[d] += 1
        N_D = [N + n for N, n in zip(N_D, n_D)]
        cum.append(list(N_D))
    return np.array(cum, dtype=np.int64).reshape(n_steps, len(q_D))


def test_textbook_largest_remainder_would_go_negative_but_ours_stays_in_quota():
    # the Alabama paradox: with leftovers to the largest fractional parts, domain 0 gets -1 at
    # step 20; earliest-deadline-first keeps every count >= 0 and within floor/ceil of ideal
    weights = [Fraction(1, 6), Fraction(3, 10), Fraction(4, 15), Fraction(4, 15)]
    carry, negative = [Fraction(0)] * 4, False
    for _ in range(40):
        ideal = [w + r for w, r in zip(weights, carry)]
        n = [math.floor(x) for x in ideal]
        for d in sorted(range(4), key=lambda d: (-(ideal[d] - n[d]), d))[:1 - sum(n)]:
            n[d] += 1
        negative |= min(n) < 0
        carry = [x - c for x, c in zip(ideal, n)]
    assert negative
    sched = MixtureSchedule.constant(dict(zip("abcd", map(float, weights))))
    counts_TxD = domain_counts(sched, "abcd", total_steps=600, batch_size=1)
    assert counts_TxD.min() >= 0 and (counts_TxD.sum(1) == 1).all()
    ideal_TxD = np.arange(1, 601)[:, None] * np.array([float(w) for w in weights])
    assert np.abs(counts_TxD.cumsum(0) - ideal_TxD).max() < 1


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_vectorised_counts_match_the_stepwise_rule_across_chunks(batch):
    rng = np.random.default_rng(batch)
    scale = mixture.weight_scale(2000)
    for _ in range(4):
        w = rng.random(6) ** 3
        w[rng.random(6) < 0.3] = 0.0
        w[0] = 1e-3
        q = mixture.quantize_weights(w, scale)
        want = reference_counts(q, scale, batch, 700)
        for chunk in (1, 37, 700, 1 << 15):
            got = mixture.stage_cumulative(q, scale, batch, 700, chunk=chunk)
            np.testing.assert_array_equal(got, want)


@st.composite
def schedules(draw):
    n_domains = draw(st.integers(1, 5))
    domains = tuple(f"d{i}" for i in range(n_domains))
    starts = sorted(set(draw(st.lists(st.floats(0.001, 0.999), max_size=2))))
    stages = []
    for start in [0.0] + starts:
        raw = draw(st.lists(st.one_of(st.just(0.0), st.just(1e-3), st.floats(1e-4, 1.0)),
                            min_size=n_domains, max_size=n_domains))
        if sum(raw) == 0:
            raw[draw(st.integers(0, n_domains - 1))] = 1.0
        total = sum(raw)
        stages.append((start, {d: w / total for d, w in zip(domains, raw)}))
    return MixtureSchedule.from_stage_weights(stages).validate(domains), domains


TOL = 1e-6  # weights are quantised to 1/2^40 or finer: far below this over these runs


@settings(max_examples=50, deadline=None)
@given(schedules(), st.integers(1, 64), st.integers(1, 400))
def test_counts_properties(sched_domains, batch, total_steps):
    sched, domains = sched_domains
    counts_TxD = domain_counts(sched, domains, total_steps, batch)
    assert counts_TxD.shape == (total_steps, len(domains))
    assert (counts_TxD.sum(1) == batch).all() and counts_TxD.min() >= 0

    steps_T = np.arange(total_steps)
    stage_T = np.array([sched.stage_index(s / total_steps) for s in steps_T])
    w_SxD = sched.weight_matrix(domains) / sched.weight_matrix(domains).sum(1, keepdims=True)
    w_TxD = w_SxD[stage_T]
    assert not counts_TxD[w_TxD == 0].any()  # a zero weight is never sampled

    first = sched.first_steps(total_steps)
    assert [int(np.searchsorted(first, s, side="right")) - 1 for s in steps_T] == stage_T.tolist()
    scale = mixture.weight_scale(total_steps)
    n_stages_used = 0
    for i in np.unique(stage_T):
        sel = stage_T == i
        n_stages_used += 1
        realized_KxD = counts_TxD[sel].cumsum(0)
        # the proved bound, exactly, for the quantised weights: at every step of a stage
        # floor(ideal) <= realized <= ceil(ideal) ...
        q_D = mixture.quantize_weights(w_SxD[i], scale)
        for k, row in enumerate(realized_KxD.tolist(), start=1):
            for N, q in zip(row, q_D):  # N >= floor(C) and N <= ceil(C), C = k * B * q / scale
                ideal = k * batch * q
                assert N * scale <= ideal + scale - 1 and ideal <= N * scale + scale - 1
        # ... so against the real weights |realized - ideal| < 1 on stage prefixes and < 2 over
        # any window [a, b) inside the stage
        ideal_KxD = (batch * w_TxD[sel]).cumsum(0)
        err_KxD = np.vstack([np.zeros((1, len(domains))), realized_KxD - ideal_KxD])
        assert (np.abs(err_KxD) < 1 + TOL).all()
        assert (err_KxD.max(0) - err_KxD.min(0) < 2 + TOL).all()
        # a tiny positive weight is never starved: floor(ideal) on every prefix (an ideal within
        # TOL of an integer may be on either side of it after quantisation)
        assert (realized_KxD >= np.floor(ideal_KxD - TOL)).all()
    total_err_D = counts_TxD.sum(0) - (batch * w_TxD).sum(0)
    assert (np.abs(total_err_D) < n_stages_used + TOL).all()


def test_tiny_weight_gets_its_long_run_share():
    sched = MixtureSchedule.constant({"web": 0.699, "code": 0.3, "math": 1e-3})
    counts_TxD = domain_counts(sched, DOMAINS, total_steps=5000, batch_size=8)
    math_T = counts_TxD[:, 2]
    assert math_T.sum() == 40  # 5000 * 8 * 1e-3
    for end in (125, 126, 1000, 4999):  # one sequence per 125 steps, on schedule
        assert math_T[:end].sum() >= math.floor(end * 8 * 1e-3 + TOL)


def test_stage_boundaries_use_the_fraction_of_total_steps():
    sched = MixtureSchedule.from_stage_weights(
        [(0.0, {"web": 1.0}), (0.3, {"code": 1.0}), (0.31, {"math": 1.0}), (0.9, {"web": 1.0})])
    sched.validate(DOMAINS)
    assert sched.first_steps(10) == [0, 3, 4, 9]  # stage 0.3 owns step 3; 0.31 starts at 4
    assert sched.first_steps(3) == [0, 1, 1, 3]  # stage 0.3 owns no step; 0.9 none either
    counts_TxD = domain_counts(sched, DOMAINS, total_steps=10, batch_size=2)
    assert counts_TxD.argmax(1).tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2, 0]


# ---------------------------------------------------------------------------------------------
# the sampler


def small_sampler(seed: int = 0, **kw) -> Sampler:
    sched = MixtureSchedule.from_stage_weights(
        [(0.0, {"web": 0.5, "code": 0.3, "math": 0.2}), (0.75, {"web": 0.2, "math": 0.8})])
    args = dict(total_steps=40, batch_size=8, seq_len=15, seed=seed)
    args.update(kw)
    return Sampler(sched, DOMAINS, synthetic_tokens({"web": 900, "code": 500, "math": 300}),
                   **args)


def test_batches_are_pure_functions_of_the_step():
    a, b = small_sampler(), small_sampler()
    order = list(range(40))
    random.Random(0).shuffle(order)
    want = {s: a.batch(s) for s in range(40)}
    for s in order:
        tokens, domain = b.batch(s)
        np.testing.assert_array_equal(tokens, want[s][0])
        np.testing.assert_array_equal(domain, want[s][1])
    assert want[0][0].dtype == np.int32 and want[0][0].shape == (8, 16)
    other = small_sampler(seed=1)
    assert not all(np.array_equal(other.batch(s)[0], want[s][0]) for s in range(40))


def test_batches_match_in_a_fresh_process():
    code = (
        "import hashlib, sys; sys.path.insert(0, 'tests'); import test_mixture as t; "
        "s = t.small_sampler(); "
        "print(hashlib.sha256(b''.join(s.batch(i)[0].tobytes() for i in (39, 7, 22))).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1])
    s = small_sampler()
    want = hashlib.sha256(b"".join(s.batch(i)[0].tobytes() for i in (39, 7, 22))).hexdigest()
    assert out.stdout.strip() == want


def test_rows_are_whole_windows_without_replacement_within_an_epoch():
    sizes = {"web": 900, "code": 500, "math": 300}
    s = small_sampler()
    width = s.seq_len + 1
    drawn: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for step in range(s.total_steps):
        tokens_BxW, domain_B = s.batch(step)
        assert np.array_equal(domain_B, np.sort(domain_B))  # grouped by domain, in order
        assert np.array_equal(np.bincount(domain_B, minlength=3), s.counts(step))
        for row, d in zip(tokens_BxW, domain_B):
            start = int(row[0]) - d * BASE
            assert 0 <= start and start + width <= sizes[DOMAINS[d]]  # inside its own array
            np.testing.assert_array_equal(row, np.arange(start, start + width) + d * BASE)
            drawn[d].append(start)
    for d, starts in drawn.items():
        n_windows = (sizes[DOMAINS[d]] - s.seq_len) // width
        epochs = [starts[i:i + n_windows] for i in range(0, len(starts), n_windows)]
        assert len(epochs) >= 2  # the run wraps every domain
        for epoch in epochs:
            assert len(set(epoch)) == len(epoch)  # no window twice in an epoch
            assert len({x % width for x in epoch}) == 1  # one shift per epoch
        full = [e for e in epochs if len(e) == n_windows]
        assert len({tuple(e) for e in full}) == len(full)  # a fresh shift or order each epoch


def test_memmap_uint16_tokens(tmp_path):
    path = tmp_path / "web.bin"
    np.arange(2000, dtype=np.uint16).tofile(path)
    tokens = {"web": np.memmap(path, dtype=np.uint16, mode="r")}
    s = Sampler(MixtureSchedule.constant({"web": 1.0}), ("web",), tokens, total_steps=5,
                batch_size=4, seq_len=31, seed=3)
    tokens_BxW, domain_B = s.batch(4)
    assert tokens_BxW.dtype == np.int32 and tokens_BxW.shape == (4, 32)
    assert (np.diff(tokens_BxW, axis=1) == 1).all() and not domain_B.any()


def test_epochs_and_repetition_warnings_on_a_hand_computed_case():
    sched = MixtureSchedule.constant({"web": 0.5, "code": 0.5})
    tokens = synthetic_tokens({"web": 100, "code": 1000})
    s = Sampler(sched, ("web", "code"), tokens, total_steps=10, batch_size=4, seq_len=9, seed=0)
    # windows of 10 tokens with up to 9 of shift room: 9 per epoch of web, 99 of code; 2 each/step
    assert s.epochs() == {"web": 20 / 9, "code": 20 / 99}
    assert s.epochs(5) == {"web": 10 / 9, "code": 10 / 99}
    assert s.epochs(0) == {"web": 0.0, "code": 0.0}
    (warning,) = s.repetition_warnings(2.0)
    assert "'web'" in warning and "2.22 epochs" in warning and "100 tokens available" in warning
    assert s.repetition_warnings(3.0) == []
    assert s.weights(9) == (0.5, 0.5) and s.stage(9) == 0
    with pytest.raises(ValueError):
        s.counts(10)


def test_domain_too_short_is_a_user_error_unless_never_drawn():
    sched = MixtureSchedule.constant({"web": 0.5, "code": 0.5, "math": 0.0})
    short = synthetic_tokens({"web": 1000, "code": 3 * 15 + 1, "math": 5})
    with pytest.raises(UserError, match=r"domain 'code' has 46 tokens: too few for seq_len=15"):
        Sampler(sched, DOMAINS, short, total_steps=4, batch_size=4, seq_len=15, seed=0)
    ok = synthetic_tokens({"web": 1000, "code": 3 * 15 + 2})  # math: weight 0, no data at all
    s = Sampler(sched, DOMAINS, ok, total_steps=4, batch_size=4, seq_len=15, seed=0)
    assert s.epochs()["math"] == 0.0 and s.batch(3)[0].shape == (4, 16)


def test_mixture_weights_for_logging_follow_the_stages():
    s = small_sampler()
    assert s.weights(0) == (0.5, 0.3, 0.2) and s.weights(29) == (0.5, 0.3, 0.2)
    assert s.weights(30) == (0.2, 0.0, 0.8) and s.stage(39) == 1
    assert not s.counts_table()[30:, 1].any()


def test_running_sample_index_across_cumulative_blocks():
    sched = MixtureSchedule.from_stage_weights([(0.0, {"web": 0.7, "code": 0.3}),
                                                (0.6, {"web": 0.1, "math": 0.9})])
    s = Sampler(sched, DOMAINS, synthetic_tokens({"web": 5000, "code": 5000, "math": 5000}),
                total_steps=1000, batch_size=3, seq_len=7, seed=0)
    cum_TxD = np.vstack([np.zeros((1, 3), np.int64), np.cumsum(s.counts_table(), axis=0)])
    for step in (0, 1, 255, 256, 257, 511, 512, 999, 1000):
        np.testing.assert_array_equal(s.drawn_before(step), cum_TxD[step])
    assert s.epochs() == {d: cum_TxD[-1, i] / ((5000 - 7) // 8) for i, d in enumerate(DOMAINS)}


def test_unresolved_schedule_still_serialises():
    assert MixtureSchedule((Stage(0.0, "natural"),)).to_dict() == {
        "stages": [{"start": 0.0, "weights": "natural"}]}
