"""Rotary position embedding (RoPE) with the scalings used to stretch a model's context.

RoPE (Su et al. 2021, "RoFormer", arXiv:2104.09864) rotates pair i of a head by angle
p * inv_freq_i, inv_freq_i = base^(-2i/K). A model trained at length L_orig has only seen angles
up to L_orig * inv_freq_i; a long-context stage at s * L_orig changes the frequencies so the
longer positions stay (mostly) inside that range:

  linear  position interpolation (Chen et al. 2023, arXiv:2306.15595): inv_freq / s, i.e.
          position p looks like p / s.
  ntk     "NTK-aware" scaling (bloc97 2023; YaRN section 3.1): base' = base * s^(K/(K-2)),
          which stretches the lowest frequency by exactly s and barely moves the highest.
          Static: the factor is fixed, not chosen from the current length.
  yarn    YaRN (Peng et al. 2023, arXiv:2309.00071, eqs. 17-21): "NTK-by-parts" per pair,
          by how many rotations r = L_orig / wavelength the pair makes over the original
          context; gamma(r) = clip((r - beta_slow) / (beta_fast - beta_slow), 0, 1) and
          inv_freq' = (1 - gamma) * inv_freq / s + gamma * inv_freq: pairs that turn many
          times (high frequency, local order) keep their frequency, pairs that turn less
          than once are interpolated, a linear ramp in r between. Plus the attention
          temperature sqrt(1/t) = 0.1 ln(s) + 1 multiplied into cos and sin, so q.k scales
          by its square.

The ramp is linear in r as the paper defines it. The reference code (jquesnelle/yarn, and HF
transformers' `_compute_yarn_parameters`, DeepSeek) ramps linearly in the pair index between
floor/ceil of the indices where r = beta_fast and r = beta_slow: the same pure regions (up to
that rounding), a different blend inside the ramp, so its checkpoints are not bit-compatible.

The declaration, `RopeScaling` (`model.rope`), and its checks are in gemini_core.model.options
(no jax there, for the config boundary). Tables are in the rotate-half convention (both halves of a
head share the frequencies); with method none the arithmetic is the unscaled RoPE's, op for op.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from gemini_core.model.options import RopeScaling


def _default_inv_freq(head_dim: int, base: float) -> jax.Array:
    # op for op the unscaled RoPE the model always had, so method none stays bit-identical
    return 1.0 / base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def inv_freq(head_dim: int, base: float, scaling: RopeScaling = RopeScaling()) -> jax.Array:
    """The (K/2,) f32 angular frequencies of the pairs, scaled."""
    s = scaling.factor
    if scaling.method == "none" or s == 1:
        # every method is the identity at s = 1; skipping the arithmetic keeps it exact
        return _default_inv_freq(head_dim, base)
    if scaling.method == "linear":
        return _default_inv_freq(head_dim, base) / s
    if scaling.method == "ntk":
        return _default_inv_freq(head_dim, base * s ** (head_dim / (head_dim - 2)))
    if scaling.method == "yarn":
        inv_K2 = _default_inv_freq(head_dim, base)
        rotations_K2 = scaling.original_length * inv_K2 / (2 * math.pi)
        gamma_K2 = jnp.clip((rotations_K2 - scaling.beta_slow)
                            / (scaling.beta_fast - scaling.beta_slow), 0.0, 1.0)
        return (1.0 - gamma_K2) * (inv_K2 / s) + gamma_K2 * inv_K2
    raise ValueError(f"unknown RoPE scaling method {scaling.method!r}")  # check() catches it first


def attention_scale(scaling: RopeScaling) -> float:
    """The factor on cos and sin (q.k scales by its square): YaRN's sqrt(1/t), else 1."""
    if scaling.method != "yarn":
        return 1.0
    if scaling.attention_factor > 0:
        return float(scaling.attention_factor)
    return 0.1 * math.log(scaling.factor) + 1.0


def rope_at(positions: jax.Array, head_dim: int, base: float,
            scaling: RopeScaling = RopeScaling()) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape positions.shape + (K,), e.g. (L,) for a shared table or (B, L) for rows
    at their own positions (decoding, document masking)."""
    inv_K2 = inv_freq(head_dim, base, scaling)
    angle_K2 = positions.astype(jnp.float32)[..., None] * inv_K2
    angle_K = jnp.concatenate([angle_K2, angle_K2], axis=-1)
    cos, sin = jnp.cos(angle_K), jnp.sin(angle_K)
    mscale = attention_scale(scaling)
    if mscale != 1.0:
        cos, sin = cos * mscale, sin * mscale
    return cos, sin


def rope_tables(seq_len: int, head_dim: int, base: float,
                scaling: RopeScaling = RopeScaling()) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape (L, K) for positions 0..L-1."""
    return rope_at(jnp.arange(seq_len, dtype=jnp.float32), head_dim, base, scaling)


def apply_rope(x_BxLxHxK: jax.Array, cos_LxK: jax.Array, sin_LxK: jax.Array) -> jax.Array:
    """Rotates by tables of shape (L, K), shared by the batch, or (B, L, K), a row's own."""
    half = x_BxLxHxK.shape[-1] // 2
    x1, x2 = x_BxLxHxK[..., :half], x_BxLxHxK[..., half:]
    rotated_BxLxHxK = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_LxK[..., None, :], sin_LxK[..., None, :]
    return (x_BxLxHxK * cos + rotated_BxLxHxK * sin).astype(x_BxLxHxK.dtype)
