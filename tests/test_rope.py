"""RoPE scaling (gemini_core.model.rope): identity at factor 1, each method's formula against
arithmetic written out here from the papers, the config checks, jit and per-row positions."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemini_core.errors import UserError
from gemini_core.model.rope import (
    RopeScaling,
    apply_rope,
    attention_scale,
    inv_freq,
    rope_at,
    rope_tables,
)

K, BASE = 64, 10000.0
POS_L = jnp.arange(4096, dtype=jnp.int32)
EPS32 = float(np.finfo(np.float32).eps)


def unscaled_rope_at(positions, head_dim, base):
    """RoPE as the model computed it before scaling existed, op for op: the reference."""
    inv_freq_K2 = 1.0 / base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angle_K2 = positions.astype(jnp.float32)[..., None] * inv_freq_K2
    angle_K = jnp.concatenate([angle_K2, angle_K2], axis=-1)
    return jnp.cos(angle_K), jnp.sin(angle_K)


@pytest.mark.parametrize("scaling", [
    RopeScaling(),
    RopeScaling("linear", 1.0),
    RopeScaling("ntk", 1.0),
    RopeScaling("yarn", 1.0, original_length=1024),
], ids=lambda s: s.method)
def test_factor_one_equals_the_unscaled_rope_exactly(scaling):
    scaling.check("model.rope")
    want_cos, want_sin = unscaled_rope_at(POS_L, K, BASE)
    cos, sin = rope_at(POS_L, K, BASE, scaling)
    assert cos.shape == sin.shape == (4096, K) and cos.dtype == jnp.float32
    assert np.array_equal(cos, want_cos) and np.array_equal(sin, want_sin)
    t_cos, t_sin = rope_tables(4096, K, BASE, scaling)
    want_t = unscaled_rope_at(jnp.arange(4096, dtype=jnp.float32), K, BASE)
    assert np.array_equal(t_cos, want_t[0]) and np.array_equal(t_sin, want_t[1])


def test_method_none_equals_the_unscaled_rope_under_jit_too():
    ours = jax.jit(rope_at, static_argnums=(1, 2, 3))(POS_L, K, BASE, RopeScaling())
    today = jax.jit(unscaled_rope_at, static_argnums=(1, 2))(POS_L, K, BASE)
    assert np.array_equal(ours[0], today[0]) and np.array_equal(ours[1], today[1])


@pytest.mark.parametrize("s", [4.0, 3.0])
def test_linear_maps_long_positions_onto_short_ones(s):
    cos, sin = rope_at(POS_L * int(s), K, BASE, RopeScaling("linear", s))
    want_cos, want_sin = unscaled_rope_at(POS_L, K, BASE)
    if s == 4.0:  # dividing and multiplying by a power of two is exact in f32
        assert np.array_equal(cos, want_cos) and np.array_equal(sin, want_sin)
    # otherwise two extra roundings of an angle up to p radians (the fastest pair turns 1/token)
    tol_Lx1 = 4 * EPS32 * np.asarray(POS_L, np.float64)[:, None] + 1e-6
    assert np.all(np.abs(np.asarray(cos) - np.asarray(want_cos)) <= tol_Lx1)
    assert np.all(np.abs(np.asarray(sin) - np.asarray(want_sin)) <= tol_Lx1)
    assert np.array_equal(inv_freq(K, BASE, RopeScaling("linear", s)),
                          inv_freq(K, BASE) / np.float32(s))


def test_ntk_scales_the_base():
    # K=64, base 10000, s=4: base' = 10000 * 4^(64/62) = 10000 * 2^(64/31)
    base_prime = 10000.0 * 2.0 ** (64 / 31)
    assert base_prime == pytest.approx(41829.37, rel=1e-6)
    got_K2 = np.asarray(inv_freq(K, BASE, RopeScaling("ntk", 4.0)), np.float64)
    want_K2 = base_prime ** (-np.arange(0, K, 2) / K)
    np.testing.assert_allclose(got_K2, want_K2, rtol=2e-6)
    assert got_K2[0] == 1.0  # the highest frequency is untouched
    # the lowest is stretched by exactly s: base'^(-(K-2)/K) = base^(-(K-2)/K) / s
    assert got_K2[-1] == pytest.approx(BASE ** (-(K - 2) / K) / 4.0, rel=2e-6)


def _yarn_by_hand(s: float, L_orig: int, beta_fast: float = 32.0, beta_slow: float = 1.0):
    """YaRN eqs. 17-18 in f64, one pair at a time: theta_d, lambda_d, r(d), gamma, h(theta_d)."""
    out = []
    for d in range(K // 2):
        theta = BASE ** (-2 * d / K)
        r = L_orig / (2 * math.pi / theta)
        gamma = 0.0 if r < beta_slow else 1.0 if r > beta_fast else (
            (r - beta_slow) / (beta_fast - beta_slow))
        out.append((1 - gamma) * theta / s + gamma * theta)
    return np.array(out)


def test_yarn_inv_freq_against_the_papers_formula():
    s, L_orig = 4.0, 4096
    got_K2 = np.asarray(inv_freq(K, BASE, RopeScaling("yarn", s, original_length=L_orig)))
    np.testing.assert_allclose(got_K2, _yarn_by_hand(s, L_orig), rtol=2e-6)
    plain_K2 = np.asarray(inv_freq(K, BASE))
    # r(d) = 4096/(2 pi) * 10000^(-d/32): > 32 for d <= 10, < 1 for d >= 23
    assert np.array_equal(got_K2[:11], plain_K2[:11])  # extrapolated: unchanged, exactly
    assert np.array_equal(got_K2[23:], plain_K2[23:] / np.float32(s))  # interpolated: / s
    ramp = slice(11, 23)
    assert np.all(plain_K2[ramp] / s < got_K2[ramp]) and np.all(got_K2[ramp] < plain_K2[ramp])
    # pair 16 in the ramp: theta = 0.01, r = 40.96 / (2 pi) = 6.5190, gamma = (r - 1) / 31
    gamma = (40.96 / (2 * math.pi) - 1) / 31
    assert gamma == pytest.approx(0.178032, abs=1e-6)
    assert got_K2[16] == pytest.approx(0.01 * ((1 - gamma) / 4 + gamma), rel=2e-6)
    assert got_K2[16] == pytest.approx(0.0038352, rel=1e-4)


def test_yarn_ramp_bounds_follow_beta():
    s, L_orig = 8.0, 2048
    scaling = RopeScaling("yarn", s, original_length=L_orig, beta_fast=16.0, beta_slow=2.0)
    got_K2 = np.asarray(inv_freq(K, BASE, scaling))
    np.testing.assert_allclose(got_K2, _yarn_by_hand(s, L_orig, 16.0, 2.0), rtol=2e-6)


@pytest.mark.parametrize("s, want", [(4.0, 1.13863), (8.0, 1.20794)])
def test_yarn_attention_temperature(s, want):
    scaling = RopeScaling("yarn", s, original_length=1024)
    assert attention_scale(scaling) == pytest.approx(0.1 * math.log(s) + 1, rel=1e-12)
    assert attention_scale(scaling) == pytest.approx(want, abs=1e-5)
    cos, sin = rope_at(POS_L[:64], K, BASE, scaling)
    # folded into both tables: every pair's (cos, sin) has length mscale, so q.k gets mscale^2
    np.testing.assert_allclose(np.asarray(cos) ** 2 + np.asarray(sin) ** 2, want ** 2, rtol=1e-5)
    for method in ("none", "linear", "ntk"):
        assert attention_scale(RopeScaling(method, 1.0 if method == "none" else s)) == 1.0


def test_yarn_attention_factor_overrides_the_default():
    scaling = RopeScaling("yarn", 4.0, original_length=1024, attention_factor=1.5)
    scaling.check("model.rope")
    assert attention_scale(scaling) == 1.5
    cos, _ = rope_at(POS_L[:8], K, BASE, scaling)
    unscaled, _ = rope_at(POS_L[:8], K, BASE, RopeScaling("yarn", 4.0, original_length=1024))
    np.testing.assert_allclose(cos, unscaled / attention_scale(
        RopeScaling("yarn", 4.0, original_length=1024)) * 1.5, rtol=1e-6)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"method": "rope2"}, "model.rope.method='rope2': must be one of none, linear, ntk, yarn"),
    ({"method": "linear", "factor": 0.5}, "model.rope.factor=0.5: must be a finite number >= 1"),
    ({"method": "ntk", "factor": float("nan")}, "model.rope.factor=nan"),
    ({"method": "ntk", "factor": float("inf")}, "model.rope.factor=inf"),
    ({"factor": 4.0}, "model.rope.factor=4.0: has no effect with model.rope.method='none'"),
    ({"method": "yarn", "factor": 4.0}, "model.rope.original_length=0: yarn needs"),
    ({"method": "linear", "factor": 2.0, "original_length": -1}, "model.rope.original_length=-1"),
    ({"method": "yarn", "factor": 4.0, "original_length": 512, "beta_slow": 0.0},
     "model.rope.beta_slow=0.0: must be > 0"),
    ({"method": "yarn", "factor": 4.0, "original_length": 512, "beta_fast": 1.0},
     "model.rope.beta_fast=1.0: must be > model.rope.beta_slow=1.0"),
    ({"method": "yarn", "factor": 4.0, "original_length": 512, "attention_factor": -1.0},
     "model.rope.attention_factor=-1.0: must be >= 0"),
    ({"method": "linear", "factor": 4.0, "attention_factor": 1.2},
     "model.rope.attention_factor=1.2: only yarn scales attention"),
])
def test_check_names_the_key_and_the_value(kwargs, fragment):
    with pytest.raises(UserError) as info:
        RopeScaling(**kwargs).check("model.rope")
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_check_accepts_good_settings():
    for scaling in (RopeScaling(), RopeScaling("linear", 4.0), RopeScaling("ntk", 8.0),
                    RopeScaling("yarn", 8.0, original_length=4096, attention_factor=1.3)):
        scaling.check("model.rope")


def test_per_row_positions_and_jit():
    scaling = RopeScaling("yarn", 4.0, original_length=512)
    # rows at their own positions: a decode step, or positions restarting per packed document
    pos_BxL = jnp.stack([jnp.arange(16), jnp.arange(100, 116),
                         jnp.concatenate([jnp.arange(6), jnp.arange(10)])]).astype(jnp.int32)
    jitted = jax.jit(functools.partial(rope_at, head_dim=K, base=BASE, scaling=scaling))
    cos_BxLxK, sin_BxLxK = jitted(pos_BxL)
    assert cos_BxLxK.shape == sin_BxLxK.shape == (3, 16, K)
    # jit fuses the angle arithmetic differently from eager ops: an ulp of angles up to ~116
    atol = 4 * EPS32 * 116
    for b in range(3):
        row_cos, row_sin = rope_at(pos_BxL[b], K, BASE, scaling)
        np.testing.assert_allclose(cos_BxLxK[b], row_cos, atol=atol)
        np.testing.assert_allclose(sin_BxLxK[b], row_sin, atol=atol)
    # the third row restarts at token 6: its second document's tables are the first row's
    np.testing.assert_array_equal(cos_BxLxK[2, 6:], cos_BxLxK[0, :10])
    # the scaled tables still drive the same rotation
    x_BxLxHxK = np.random.default_rng(0).standard_normal((3, 16, 2, K)).astype(np.float32)
    y_BxLxHxK = np.asarray(apply_rope(jnp.asarray(x_BxLxHxK), cos_BxLxK, sin_BxLxK))
    np.testing.assert_allclose(np.linalg.norm(y_BxLxHxK, axis=-1),
                               attention_scale(scaling) * np.linalg.norm(x_BxLxHxK, axis=-1),
                               rtol=1e-5)
