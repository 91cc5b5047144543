"""Train states convert between the unrolled and the scanned layer layouts, exactly, and a run
continued in the other layout trains on as it would have."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from gemini_core.config import ModelConfig, OptimizerConfig
from gemini_core.train import layer_layout, step_fns

MODEL = ModelConfig(vocab_size=128, d_model=32, num_layers=3, num_heads=2, mlp_dim=64)
OPT = OptimizerConfig(lr=1e-2, warmup_steps=1)  # AdamW, weight decay 0.1 (norm scales: none)
STEPS = 6


def _state(scanned: bool):
    return step_fns.init_state(dataclasses.replace(MODEL, scan_layers=scanned), OPT, STEPS, 0)


def _leaves(state) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def _batches(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(1, 128, (4, 17)).astype(np.int32) for _ in range(n)]


@pytest.mark.parametrize("start_scanned", [False, True])
def test_a_fresh_state_converts_to_the_other_layouts_init_and_back(start_scanned):
    graphdef, state = _state(start_scanned)
    _, other = _state(not start_scanned)
    # the scanned model is initialised as the unrolled blocks stacked: the same numbers
    converted = layer_layout.convert(state, other)
    for got, want in zip(_leaves(converted), _leaves(other)):
        np.testing.assert_array_equal(got, want)
    back = layer_layout.convert(converted, state)
    for got, want in zip(_leaves(back), _leaves(state)):
        np.testing.assert_array_equal(got, want)


def test_a_run_continued_in_the_other_layout_trains_on_as_before():
    batches = _batches(STEPS)
    g_unrolled, unrolled = _state(False)
    g_scanned, like_scanned = _state(True)
    step_u = step_fns.make_train_step(g_unrolled)
    step_s = step_fns.make_train_step(g_scanned)
    losses = []
    for tokens in batches[:3]:
        unrolled, m = step_u(unrolled, tokens)
        losses.append(float(m["loss"]))
    # mid-run: parameters and AdamW moments move to the scanned layout
    scanned = layer_layout.convert(jax.tree.map(lambda x: x.copy(), unrolled), like_scanned)
    mu = nnx.to_pure_dict(scanned)["optimizer"]["opt_state"]
    assert any("blocks" in str(path) for path, _ in jax.tree_util.tree_flatten_with_path(mu)[0])
    for tokens in batches[3:]:
        unrolled, m_u = step_u(unrolled, tokens)
        scanned, m_s = step_s(scanned, tokens)
        assert float(m_s["loss"]) == pytest.approx(float(m_u["loss"]), rel=1e-5)
    # the two layouts sum in another order: float rounding only. (This caught scanned runs
    # decaying their stacked RMSNorm scales, (layers, D) looked like a matrix: optim.decay_mask)
    back = layer_layout.convert(scanned, _state(False)[1])
    for got, want in zip(_leaves(back), _leaves(unrolled)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
