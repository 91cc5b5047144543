"""The model's layers against their definitions: RoPE (a rotation: norms kept, q·k a function of
the position difference only, the angles of the rotate-half convention), RMSNorm against numpy,
and bf16 compute against f32."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemini_core.config import ModelConfig
from gemini_core.model.rope import apply_rope, rope_tables
from gemini_core.model.transformer import RMSNorm, Transformer

K, L, BASE = 16, 40, 10_000.0
MODEL = ModelConfig(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
                    vocab_size=61, init_std=0.1)


def at_every_position(v_K: np.ndarray) -> jax.Array:
    """The same vector at each of L positions, as a (1, L, 1, K) array."""
    return jnp.broadcast_to(jnp.asarray(v_K, jnp.float32), (1, L, 1, K))


def rope(x_BxLxHxK: jax.Array, base: float = BASE) -> jax.Array:
    cos_LxK, sin_LxK = rope_tables(x_BxLxHxK.shape[1], x_BxLxHxK.shape[-1], base)
    return apply_rope(x_BxLxHxK, cos_LxK, sin_LxK)


def test_rope_scores_depend_only_on_the_position_difference():
    rng = np.random.default_rng(0)
    q_LxK = np.asarray(rope(at_every_position(rng.normal(size=K))))[0, :, 0]
    k_LxK = np.asarray(rope(at_every_position(rng.normal(size=K))))[0, :, 0]
    s_LxL = q_LxK @ k_LxK.T  # s[m, n] = q at position m . k at position n
    for diff in range(-(L - 1), L):
        band = np.diagonal(s_LxL, offset=diff)  # every (m, m + diff)
        np.testing.assert_allclose(band, band[0], rtol=1e-4, atol=1e-4, err_msg=f"n-m={diff}")
    # and the score does change with the difference: position is encoded at all
    assert np.ptp([s_LxL[0, n] for n in range(L)]) > 0.5


def test_rope_keeps_norms_and_is_the_identity_at_position_0():
    x_BxLxHxK = jax.random.normal(jax.random.key(0), (2, L, 3, K))
    y_BxLxHxK = rope(x_BxLxHxK)
    np.testing.assert_allclose(jnp.linalg.norm(y_BxLxHxK, axis=-1),
                               jnp.linalg.norm(x_BxLxHxK, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(y_BxLxHxK[:, 0], x_BxLxHxK[:, 0], rtol=0, atol=0)
    assert float(jnp.max(jnp.abs(y_BxLxHxK[:, 1:] - x_BxLxHxK[:, 1:]))) > 0.1


def test_rope_rotates_each_half_pair_by_position_times_its_frequency():
    # rotate-half convention: coordinate i pairs with i + K/2; at position p the pair turns by
    # p * base^(-2i/K), i.e. (x_i + j x_{i+K/2}) * exp(j p theta_i) in complex numbers
    rng = np.random.default_rng(1)
    x_LxK = rng.normal(size=(L, K))
    theta_K2 = BASE ** (-np.arange(0, K, 2) / K)
    z_LxK2 = (x_LxK[:, :K // 2] + 1j * x_LxK[:, K // 2:]) * np.exp(
        1j * np.arange(L)[:, None] * theta_K2[None, :])
    want_LxK = np.concatenate([z_LxK2.real, z_LxK2.imag], axis=-1)
    got_LxK = np.asarray(rope(jnp.asarray(x_LxK, jnp.float32)[None, :, None, :]))[0, :, 0]
    np.testing.assert_allclose(got_LxK, want_LxK, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("magnitude", [1.0, 1e-4])  # 1e-4: mean(x^2) = 1e-8 < eps, eps dominates
def test_rmsnorm_matches_numpy(magnitude):
    rng = np.random.default_rng(2)
    x_NxD = magnitude * rng.normal(size=(7, 24)) * rng.uniform(0.1, 10, size=(7, 1))
    scale_D = rng.normal(size=24)
    norm = RMSNorm(24, eps=1e-6, param_dtype=jnp.float32)
    norm.scale[...] = jnp.asarray(scale_D, jnp.float32)
    want = x_NxD / np.sqrt(np.mean(x_NxD ** 2, axis=-1, keepdims=True) + 1e-6) * scale_D
    got = norm(jnp.asarray(x_NxD, jnp.float32))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # bf16 in, bf16 out, statistics in f32: within bf16's rounding (8 significant bits) of numpy
    got_bf16 = norm(jnp.asarray(x_NxD, jnp.bfloat16))
    assert got_bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got_bf16, np.float32), want, rtol=2 ** -7, atol=1e-6)


def init(cfg: ModelConfig, seed: int):
    """graphdef and parameters, initialised in one jit (eagerly, each op would compile alone)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(params=0))))
    params = jax.jit(lambda key: nnx.split(Transformer(cfg, rngs=nnx.Rngs(params=key)))[1])(
        jax.random.key(seed))
    return graphdef, params


def logits_and_nll(graphdef, params, tokens_BxL: jax.Array) -> tuple[np.ndarray, float]:
    def run(params, tokens_BxL):
        model = nnx.merge(graphdef, params)
        return model(tokens_BxL), model.token_nll(tokens_BxL, jnp.roll(tokens_BxL, -1, 1)).mean()

    logits, nll = jax.jit(run)(params, tokens_BxL)
    return np.asarray(logits), float(nll)


def test_bf16_compute_agrees_with_f32():
    # the same f32 parameters, the activations and matmul inputs in bf16: bf16 keeps 8
    # significant bits (rounding 2^-9 ~ 0.2% per op); through 2 layers of ~10 roundings each the
    # logits stay within 5% of their spread of the f32 ones (~1.7% measured) and the mean NLL
    # within 1e-3 nats (~1e-4 measured)
    graphdef, params = init(MODEL, 0)
    bf16 = dataclasses.replace(MODEL, dtype="bfloat16")
    graphdef_bf16, _ = nnx.split(nnx.eval_shape(lambda: Transformer(bf16, rngs=nnx.Rngs(0))))
    tokens_BxL = jax.random.randint(jax.random.key(1), (4, 16), 0, MODEL.vocab_size)
    a_BxLxV, nll_f32 = logits_and_nll(graphdef, params, tokens_BxL)
    b_BxLxV, nll_bf16 = logits_and_nll(graphdef_bf16, params, tokens_BxL)
    diff = float(np.max(np.abs(a_BxLxV - b_BxLxV)))
    assert 0 < diff <= 0.05 * float(a_BxLxV.std()), (diff, float(a_BxLxV.std()))
    assert nll_bf16 == pytest.approx(nll_f32, abs=1e-3)
