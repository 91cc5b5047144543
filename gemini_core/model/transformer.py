"""Gemini/Gemma-style decoder-only transformer in Flax NNX.

Pre-norm blocks (RMSNorm -> rotary multi-query/grouped-query causal attention -> residual;
RMSNorm -> gated GeLU MLP -> residual), final RMSNorm, output head tied to the embedding or its
own. No biases; logits and the loss in f32.

Shape letters: B batch, L sequence, N = B·L tokens, D d_model, H query heads, G kv heads,
R = H // G query heads per kv head, K head dim, F mlp width, V vocab.

The residual stream stays flattened as (N, D) through every dense layer: XLA:CPU runs the same
matmuls 1.6-1.8x faster on a 2-D (N, D) operand than on (B, L, D). Only attention reshapes.

Parameters carry logical axis names (`out_sharding` metadata) from LOGICAL_AXES; the mapping
of logical axes to a device mesh lives in config/sharding code, never here. Activations are
pinned by logical name too (`constrain`, a no-op without a mesh): the residual stream split by
batch, the MLP hidden and attention heads by their parameter axes, logits by vocab. Left to the
compiler's propagation alone, FSDP would split the residual stream along D like the weights and
keep the whole batch on every device.

Generation's KV-cache path (`prefill`, then `extend` a token at a time; driven by
gemini_core.model.generate) reuses the same projections and attention: `prefill` is the
training forward that also returns each layer's keys and values, and `extend` writes new keys
and values into a preallocated (B, S, G, K) cache per layer and attends to it, with every row at
its own positions (RoPE tables per row).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from gemini_core.config import ModelConfig
from gemini_core.scale.sharding import constrain

LOGICAL_AXES = ("vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp")
_NEG_INF = -1e30  # finite: a fully masked row would give NaN with -inf; causal rows never are


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], std: float,
           dtype: jnp.dtype) -> nnx.Param:
    # eager_sharding off: the model is built without a mesh; sharding code maps the names later
    value = std * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _ones(shape: tuple[int, ...], axes: tuple[str, ...], dtype: jnp.dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype), out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype: jnp.dtype):
        self.scale = _ones((dim,), ("embed",), param_dtype)
        self.eps = eps

    def __call__(self, x_NxD: jax.Array) -> jax.Array:
        # statistics in f32 whatever the activation dtype: bf16 mean-of-squares loses digits
        x32_NxD = x_NxD.astype(jnp.float32)
        inv_N = jax.lax.rsqrt(jnp.mean(x32_NxD * x32_NxD, axis=-1, keepdims=True) + self.eps)
        return (x32_NxD * inv_N * self.scale[...].astype(jnp.float32)).astype(x_NxD.dtype)


def rope_tables(seq_len: int, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape (L, K) for the rotate-half convention (the halves share frequencies)."""
    return rope_at(jnp.arange(seq_len, dtype=jnp.float32), head_dim, base)


def rope_at(positions: jax.Array, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape positions.shape + (K,): the tables at any positions, e.g. (B, L) of a
    decode step whose rows are at different positions (the same f32 arithmetic as the tables)."""
    inv_freq_K2 = 1.0 / base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angle_K2 = positions.astype(jnp.float32)[..., None] * inv_freq_K2
    angle_K = jnp.concatenate([angle_K2, angle_K2], axis=-1)
    return jnp.cos(angle_K), jnp.sin(angle_K)


def apply_rope(x_BxLxHxK: jax.Array, cos_LxK: jax.Array, sin_LxK: jax.Array) -> jax.Array:
    """Rotates by tables of shape (L, K), shared by the batch, or (B, L, K), a row's own."""
    half = x_BxLxHxK.shape[-1] // 2
    x1, x2 = x_BxLxHxK[..., :half], x_BxLxHxK[..., half:]
    rotated_BxLxHxK = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_LxK[..., None, :], sin_LxK[..., None, :]
    return (x_BxLxHxK * cos + rotated_BxLxHxK * sin).astype(x_BxLxHxK.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, H, G, K = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.qk_dim
        pdt = jnp.dtype(cfg.param_dtype)
        std = cfg.init_std
        self.wq_DxHxK = _param(rngs, (D, H, K), ("embed", "q_heads", "head_dim"), std, pdt)
        self.wk_DxGxK = _param(rngs, (D, G, K), ("embed", "kv_heads", "head_dim"), std, pdt)
        self.wv_DxGxK = _param(rngs, (D, G, K), ("embed", "kv_heads", "head_dim"), std, pdt)
        self.wo_HxKxD = _param(rngs, (H, K, D), ("q_heads", "head_dim", "embed"), std, pdt)
        self.num_heads, self.num_kv_heads, self.head_dim = H, G, K
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x_NxD: jax.Array, batch: int, cos_LxK: jax.Array, sin_LxK: jax.Array,
                 mask_LxL: jax.Array) -> jax.Array:
        q_BxLxHxK, k_BxLxGxK, v_BxLxGxK = self.qkv(x_NxD, batch, cos_LxK, sin_LxK)
        return self.attend(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask_LxL)

    def qkv(self, x_NxD: jax.Array, batch: int, cos_LxK: jax.Array,
            sin_LxK: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries, keys and values (B, L, ·, K), rotated."""
        H, G, K, dt = self.num_heads, self.num_kv_heads, self.head_dim, self.dtype
        N, D = x_NxD.shape
        L = N // batch
        # one (N, D) x (D, (H+2G)K) matmul instead of three thin ones: weights are tiny, and the
        # concatenation is a copy of D·(H+2G)·K floats per step
        w_DxC = jnp.concatenate([self.wq_DxHxK[...].reshape(D, H * K),
                                 self.wk_DxGxK[...].reshape(D, G * K),
                                 self.wv_DxGxK[...].reshape(D, G * K)], axis=1).astype(dt)
        qkv_NxC = x_NxD @ w_DxC
        q_BxLxHxK = qkv_NxC[:, : H * K].reshape(batch, L, H, K)
        k_BxLxGxK = qkv_NxC[:, H * K: (H + G) * K].reshape(batch, L, G, K)
        v_BxLxGxK = qkv_NxC[:, (H + G) * K:].reshape(batch, L, G, K)
        q_BxLxHxK = apply_rope(q_BxLxHxK, cos_LxK, sin_LxK)
        k_BxLxGxK = apply_rope(k_BxLxGxK, cos_LxK, sin_LxK)
        return q_BxLxHxK, k_BxLxGxK, v_BxLxGxK

    def attend(self, q_BxLxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array,
               mask_LxS: jax.Array) -> jax.Array:
        """Attention of the queries to the keys, through the output projection: (B·L, D)."""
        H, K, dt = self.num_heads, self.head_dim, self.dtype
        B, L = q_BxLxHxK.shape[:2]
        out_BxLxHxK = constrain(causal_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask_LxS),
                                ("batch", "length", "q_heads", None))
        wo_CxD = self.wo_HxKxD[...].reshape(H * K, -1).astype(dt)
        return out_BxLxHxK.reshape(B * L, H * K) @ wo_CxD

    def extend(self, x_NxD: jax.Array, batch: int, cos_BxLxK: jax.Array, sin_BxLxK: jax.Array,
               pos_BxL: jax.Array, kv: tuple[jax.Array, jax.Array]
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """L new positions per row (pos_BxL, consecutive) against the KV cache: their keys and
        values written at their positions, then attention to every cache slot at or before
        each query's position (slots after it hold padding or nothing yet)."""
        q_BxLxHxK, k_BxLxGxK, v_BxLxGxK = self.qkv(x_NxD, batch, cos_BxLxK, sin_BxLxK)
        k_BxSxGxK, v_BxSxGxK = (write_cache(c, new, pos_BxL[:, 0])
                                for c, new in zip(kv, (k_BxLxGxK, v_BxLxGxK)))
        S = k_BxSxGxK.shape[1]
        # (B, 1, 1, L, S): causal_attention's mask broadcasts over kv heads and their queries
        mask_Bx1x1xLxS = (jnp.arange(S)[None, None, None, None, :]
                          <= pos_BxL[:, None, None, :, None])
        return (self.attend(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask_Bx1x1xLxS),
                (k_BxSxGxK, v_BxSxGxK))


KV_CACHE_AXES = ("batch", None, "kv_heads", None)  # a layer's k or v cache (B, S, G, K)
KVCache = tuple[tuple[jax.Array, jax.Array], ...]  # per layer: (k, v), each (B, S, G, K)


def write_cache(cache_BxSxGxK: jax.Array, new_BxLxGxK: jax.Array, start_B: jax.Array) -> jax.Array:
    """The cache with each row's L new entries written from its own start slot."""
    def row(c_SxGxK, new_LxGxK, start):
        return jax.lax.dynamic_update_slice(c_SxGxK, new_LxGxK.astype(c_SxGxK.dtype),
                                            (start, 0, 0))
    return constrain(jax.vmap(row)(cache_BxSxGxK, new_BxLxGxK, start_B), KV_CACHE_AXES)


def causal_attention(q_BxLxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array,
                     mask_LxS: jax.Array) -> jax.Array:
    """Softmax attention as two batched matmuls; each kv head serves R = H/G query heads.

    The R query heads of a group are stacked with the positions into one (R·L)-row operand, so
    multi-query attention is one (R·L, K) x (K, S) matmul per sequence rather than H thin ones.
    The softmax is normalised after the second matmul (divide the (L, K) output, not the (L, S)
    probabilities): one pass fewer over the scores, and a backward pass with no (L, S) reduction.
    The mask is (L, S), shared by the batch, or (B, 1, 1, L, S), a row's own (the KV cache's).
    """
    B, L, H, K = q_BxLxHxK.shape
    G = k_BxSxGxK.shape[2]
    R = H // G
    q_BxLxHxK = q_BxLxHxK * jnp.asarray(1.0 / math.sqrt(K), q_BxLxHxK.dtype)
    q_BxGxRLxK = q_BxLxHxK.reshape(B, L, G, R, K).transpose(0, 2, 3, 1, 4).reshape(B, G, R * L, K)
    k_BxGxSxK = k_BxSxGxK.transpose(0, 2, 1, 3)
    v_BxGxSxK = v_BxSxGxK.transpose(0, 2, 1, 3)
    s_BxGxRLxS = jnp.einsum("bgqk,bgsk->bgqs", q_BxGxRLxK, k_BxGxSxK,
                            preferred_element_type=jnp.float32)
    s_BxGxRxLxS = jnp.where(mask_LxS, s_BxGxRLxS.reshape(B, G, R, L, -1), _NEG_INF)
    # the shift cancels exactly in e@v / sum(e), so it needs no gradient
    m_BxGxRxLx1 = jax.lax.stop_gradient(jnp.max(s_BxGxRxLxS, axis=-1, keepdims=True))
    e_BxGxRxLxS = jnp.exp(s_BxGxRxLxS - m_BxGxRxLx1)
    sum_BxGxRxLx1 = jnp.sum(e_BxGxRxLxS, axis=-1, keepdims=True)
    o_BxGxRLxK = jnp.einsum("bgqs,bgsk->bgqk",
                            e_BxGxRxLxS.reshape(B, G, R * L, -1).astype(v_BxSxGxK.dtype),
                            v_BxGxSxK, preferred_element_type=jnp.float32)
    o_BxGxRxLxK = o_BxGxRLxK.reshape(B, G, R, L, K) / sum_BxGxRxLx1
    return o_BxGxRxLxK.transpose(0, 3, 1, 2, 4).reshape(B, L, H, K).astype(q_BxLxHxK.dtype)


class Mlp(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.ffw_dim
        pdt, std = jnp.dtype(cfg.param_dtype), cfg.init_std
        self.gate_DxF = _param(rngs, (D, F), ("embed", "mlp"), std, pdt)
        self.up_DxF = _param(rngs, (D, F), ("embed", "mlp"), std, pdt)
        self.down_FxD = _param(rngs, (F, D), ("mlp", "embed"), std, pdt)
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x_NxD: jax.Array) -> jax.Array:
        dt = self.dtype
        F = self.gate_DxF.shape[1]
        # gate and up as one (N, D) x (D, 2F) matmul: fewer, fatter GEMMs run closer to peak
        w_Dx2F = jnp.concatenate([self.gate_DxF[...], self.up_DxF[...]], axis=1).astype(dt)
        h_Nx2F = x_NxD @ w_Dx2F
        h_NxF = constrain(jax.nn.gelu(h_Nx2F[:, :F], approximate=True) * h_Nx2F[:, F:],
                          ("batch", "mlp"))
        return h_NxF @ self.down_FxD[...].astype(dt)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
        self.mlp = Mlp(cfg, rngs=rngs)

    def __call__(self, x_NxD: jax.Array, batch: int, cos_LxK: jax.Array, sin_LxK: jax.Array,
                 mask_LxL: jax.Array) -> jax.Array:
        return self.residual(x_NxD, self.attn(self.attn_norm(x_NxD), batch, cos_LxK, sin_LxK,
                                              mask_LxL))

    def residual(self, x_NxD: jax.Array, attn_NxD: jax.Array) -> jax.Array:
        """The attention output added to the stream, then the MLP's."""
        x_NxD = constrain(x_NxD + attn_NxD, ("batch", None))
        return constrain(x_NxD + self.mlp(self.mlp_norm(x_NxD)), ("batch", None))

    def prefill(self, x_NxD: jax.Array, batch: int, cos_LxK: jax.Array, sin_LxK: jax.Array,
                mask_LxL: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The block as __call__, also returning its keys and values (B, L, G, K)."""
        q_BxLxHxK, k_BxLxGxK, v_BxLxGxK = self.attn.qkv(self.attn_norm(x_NxD), batch, cos_LxK,
                                                        sin_LxK)
        attn_NxD = self.attn.attend(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask_LxL)
        return self.residual(x_NxD, attn_NxD), k_BxLxGxK, v_BxLxGxK

    def extend(self, x_NxD: jax.Array, batch: int, cos_BxLxK: jax.Array, sin_BxLxK: jax.Array,
               pos_BxL: jax.Array, kv: tuple[jax.Array, jax.Array]
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        attn_NxD, kv = self.attn.extend(self.attn_norm(x_NxD), batch, cos_BxLxK, sin_BxLxK,
                                        pos_BxL, kv)
        return self.residual(x_NxD, attn_NxD), kv


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.vocab_size <= 0:
            raise ValueError(f"ModelConfig.vocab_size={cfg.vocab_size}: fill it from the tokenizer")
        pdt = jnp.dtype(cfg.param_dtype)
        V, D = cfg.vocab_size, cfg.d_model
        self.cfg = cfg
        self.embed_VxD = _param(rngs, (V, D), ("vocab", "embed"), cfg.init_std, pdt)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(D, cfg.norm_eps, pdt)
        self.head_DxV = (None if cfg.tie_embeddings else
                         _param(rngs, (D, V), ("embed", "vocab"), cfg.init_std, pdt))

    def embed(self, tokens_BxL: jax.Array) -> jax.Array:
        """Token embeddings, flattened to (B·L, D)."""
        # Gemma scales the embedding by sqrt(D): with std-0.02 init (which the tied head needs
        # for ~uniform initial logits) the unscaled input would be drowned by the first block's
        # residual updates. A constant, fused into the gather.
        x_NxD = self.embed_VxD[...][tokens_BxL.reshape(-1)] * math.sqrt(self.cfg.d_model)
        return constrain(x_NxD.astype(self.cfg.dtype), ("batch", None))

    def decode(self, x_NxD: jax.Array, batch: int) -> jax.Array:
        """The blocks and the final norm over an embedded (B·L, D) stream."""
        cfg = self.cfg
        L = x_NxD.shape[0] // batch
        cos_LxK, sin_LxK = rope_tables(L, cfg.qk_dim, cfg.rope_base)
        mask_LxL = jnp.tril(jnp.ones((L, L), jnp.bool_))
        for block in self.blocks:
            x_NxD = block(x_NxD, batch, cos_LxK, sin_LxK, mask_LxL)
        return self.final_norm(x_NxD)

    def prefill(self, tokens_BxL: jax.Array, cache_len: int) -> tuple[jax.Array, KVCache]:
        """The forward over prompts (right-padded: every row's positions are its own from 0):
        the final-normed hidden state (B·L, D) and a KV cache of `cache_len` slots per row
        holding the L positions' keys and values (padding's too: the decode steps overwrite
        them before any query can see them)."""
        cfg = self.cfg
        B, L = tokens_BxL.shape
        cos_LxK, sin_LxK = rope_tables(L, cfg.qk_dim, cfg.rope_base)
        mask_LxL = jnp.tril(jnp.ones((L, L), jnp.bool_))
        x_NxD = self.embed(tokens_BxL)
        cache = []
        for block in self.blocks:
            x_NxD, k_BxLxGxK, v_BxLxGxK = block.prefill(x_NxD, B, cos_LxK, sin_LxK, mask_LxL)
            pad = ((0, 0), (0, cache_len - L), (0, 0), (0, 0))
            cache.append(tuple(constrain(jnp.pad(a, pad), KV_CACHE_AXES)
                               for a in (k_BxLxGxK, v_BxLxGxK)))
        return self.final_norm(x_NxD), tuple(cache)

    def extend(self, tokens_BxL: jax.Array, start_B: jax.Array,
               cache: KVCache) -> tuple[jax.Array, KVCache]:
        """L new tokens per row at positions start_B + [0, L), attending to the cache: the
        final-normed hidden state (B·L, D) and the cache with their keys and values added."""
        cfg = self.cfg
        B, L = tokens_BxL.shape
        pos_BxL = start_B[:, None] + jnp.arange(L, dtype=start_B.dtype)[None, :]
        cos_BxLxK, sin_BxLxK = rope_at(pos_BxL, cfg.qk_dim, cfg.rope_base)
        x_NxD = self.embed(tokens_BxL)
        new_cache = []
        for block, kv in zip(self.blocks, cache):
            x_NxD, kv = block.extend(x_NxD, B, cos_BxLxK, sin_BxLxK, pos_BxL, kv)
            new_cache.append(kv)
        return self.final_norm(x_NxD), tuple(new_cache)

    def hidden(self, tokens_BxL: jax.Array) -> jax.Array:
        """The final-normed residual stream, flattened: (B·L, D)."""
        return self.decode(self.embed(tokens_BxL), tokens_BxL.shape[0])

    def logits(self, h_NxD: jax.Array) -> jax.Array:
        """f32 logits from the (N, D) hidden state; accumulation in f32 whatever the dtype."""
        dt = jnp.dtype(self.cfg.dtype)
        if self.head_DxV is None:
            logits_NxV = jnp.einsum("nd,vd->nv", h_NxD, self.embed_VxD[...].astype(dt),
                                    preferred_element_type=jnp.float32)
        else:
            logits_NxV = jnp.einsum("nd,dv->nv", h_NxD, self.head_DxV[...].astype(dt),
                                    preferred_element_type=jnp.float32)
        return constrain(logits_NxV, ("batch", "vocab"))

    def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
        B, L = tokens_BxL.shape
        return self.logits(self.hidden(tokens_BxL)).reshape(B, L, -1)

    def token_nll(self, tokens_BxL: jax.Array, targets_BxL: jax.Array) -> jax.Array:
        """Next-token negative log-likelihood in nats, (B, L), without (B, L, V) reshapes."""
        B, L = tokens_BxL.shape
        logits_NxV = self.logits(self.hidden(tokens_BxL))
        return cross_entropy(logits_NxV, targets_BxL.reshape(-1)).reshape(B, L)


@jax.custom_vjp
def _nll(logits_NxV: jax.Array, targets_N: jax.Array) -> jax.Array:
    return _nll_fwd(logits_NxV, targets_N)[0]


def _nll_fwd(logits_NxV: jax.Array, targets_N: jax.Array):
    max_N = jnp.max(logits_NxV, axis=-1)
    e_NxV = jnp.exp(logits_NxV - max_N[:, None])
    sum_N = jnp.sum(e_NxV, axis=-1)
    target_logit_N = jnp.take_along_axis(logits_NxV, targets_N[:, None], axis=-1)[:, 0]
    return max_N + jnp.log(sum_N) - target_logit_N, (e_NxV, sum_N, targets_N)


def _nll_bwd(residuals, g_N: jax.Array):
    e_NxV, sum_N, targets_N = residuals
    vocab_V = jnp.arange(e_NxV.shape[-1], dtype=targets_N.dtype)
    is_target_NxV = vocab_V[None, :] == targets_N[:, None]
    dlogits_NxV = e_NxV * (g_N / sum_N)[:, None] - jnp.where(is_target_NxV, g_N[:, None], 0.0)
    return dlogits_NxV, None


_nll.defvjp(_nll_fwd, _nll_bwd)


def cross_entropy(logits_NxV: jax.Array, targets_N: jax.Array) -> jax.Array:
    """Per-token NLL = logsumexp - target logit, in f32, with a hand-written backward.

    The forward keeps exp(logits - max) for the backward, so softmax - onehot is one fused
    multiply-subtract (no second exp over the (N, V) logits, no one-hot array, no scatter), and
    the target logit is a gather. On CPU, V=8192 makes these (N, V) passes a fifth of a step.
    """
    return _nll(logits_NxV.astype(jnp.float32), targets_N)
