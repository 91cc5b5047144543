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
pinned by logical name too (`constrain`, a no-op without a mesh): the residual stream's B·L rows
split by batch and then by position (`tokens`: context parallelism splits the sequence), the MLP
hidden and attention heads by their parameter axes, logits by vocab. Left to the
compiler's propagation alone, FSDP would split the residual stream along D like the weights and
keep the whole batch on every device.

Generation's KV-cache path (`prefill`, then `extend` a token at a time; driven by
gemini_core.model.generate) reuses the same projections and attention: `prefill` is the
training forward that also returns each layer's keys and values, and `extend` writes new keys
and values into a preallocated (B, S, G, K) cache per layer and attends to it, with every row at
its own positions (RoPE tables per row).

Long context: attention is one of gemini_core.model.attention's kernels (`model.attention`;
the blockwise one never holds an (L, L) array); with `document_mask` every packed document
attends only to itself and its positions restart at its EOS; `model.rope` scales the rotary
frequencies for a longer context. The block stack runs unrolled or as one block scanned over the
layers (`scan_layers`: the block compiles once), each block optionally rematerialised
(`remat`). Scanned, the parameters are stored stacked, one array per weight with a leading
layer axis (replicated), so the optimizer's update is also one op per weight whatever the depth;
they are initialised as the unrolled blocks and stacked, so both start from the same weights,
but their checkpoints differ in layout, and `scan_layers` is part of a run's identity.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from gemini_core.config import ModelConfig
from gemini_core.data.tokenizer import EOS_ID
from gemini_core.model import attention as attention_lib
from gemini_core.model.media import MediaEmbed
from gemini_core.model.rope import apply_rope, rope_at
from gemini_core.scale.sharding import constrain

LOGICAL_AXES = ("vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "media")


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
        self.kernel = cfg.attention

    def __call__(self, x_NxD: jax.Array, batch: int, cos_LxK: jax.Array, sin_LxK: jax.Array,
                 segment_BxL: jax.Array | None) -> jax.Array:
        q_BxLxHxK, k_BxLxGxK, v_BxLxGxK = self.qkv(x_NxD, batch, cos_LxK, sin_LxK)
        out_BxLxHxK = attention_lib.attention(self.kernel, q_BxLxHxK, k_BxLxGxK, v_BxLxGxK,
                                              segment_BxL, segment_BxL)
        return self.project(out_BxLxHxK)

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

    def project(self, out_BxLxHxK: jax.Array) -> jax.Array:
        """The heads' outputs through the output projection: (B·L, D)."""
        H, K, dt = self.num_heads, self.head_dim, self.dtype
        B, L = out_BxLxHxK.shape[:2]
        out_BxLxHxK = constrain(out_BxLxHxK, ("batch", "length", "q_heads", None))
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
        # (B, 1, 1, L, S): masked_attention's mask broadcasts over kv heads and their queries
        mask_Bx1x1xLxS = (jnp.arange(S)[None, None, None, None, :]
                          <= pos_BxL[:, None, None, :, None])
        out_BxLxHxK = attention_lib.masked_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK,
                                                     mask_Bx1x1xLxS)
        return self.project(out_BxLxHxK), (k_BxSxGxK, v_BxSxGxK)


KV_CACHE_AXES = ("batch", None, "kv_heads", None)  # a layer's k or v cache (B, S, G, K)
KVCache = tuple[tuple[jax.Array, jax.Array], ...]  # per layer: (k, v), each (B, S, G, K)


def write_cache(cache_BxSxGxK: jax.Array, new_BxLxGxK: jax.Array, start_B: jax.Array) -> jax.Array:
    """The cache with each row's L new entries written from its own start slot."""
    def row(c_SxGxK, new_LxGxK, start):
        return jax.lax.dynamic_update_slice(c_SxGxK, new_LxGxK.astype(c_SxGxK.dtype),
                                            (start, 0, 0))
    return constrain(jax.vmap(row)(cache_BxSxGxK, new_BxLxGxK, start_B), KV_CACHE_AXES)


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
                          ("tokens", "mlp"))
        return h_NxF @ self.down_FxD[...].astype(dt)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
        self.mlp = Mlp(cfg, rngs=rngs)

    def __call__(self, x_NxD: jax.Array, batch: int, cos_LxK: jax.Array, sin_LxK: jax.Array,
                 segment_BxL: jax.Array | None) -> jax.Array:
        return self.residual(x_NxD, self.attn(self.attn_norm(x_NxD), batch, cos_LxK, sin_LxK,
                                              segment_BxL))

    def residual(self, x_NxD: jax.Array, attn_NxD: jax.Array) -> jax.Array:
        """The attention output added to the stream, then the MLP's."""
        x_NxD = constrain(x_NxD + attn_NxD, ("tokens", None))
        return constrain(x_NxD + self.mlp(self.mlp_norm(x_NxD)), ("tokens", None))

    def prefill(self, x_NxD: jax.Array, batch: int, cos_LxK: jax.Array, sin_LxK: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The block as __call__ on whole prompts, also returning its keys and values
        (B, L, G, K)."""
        q_BxLxHxK, k_BxLxGxK, v_BxLxGxK = self.attn.qkv(self.attn_norm(x_NxD), batch, cos_LxK,
                                                        sin_LxK)
        out_BxLxHxK = attention_lib.attention("dense", q_BxLxHxK, k_BxLxGxK, v_BxLxGxK)
        return self.residual(x_NxD, self.attn.project(out_BxLxHxK)), k_BxLxGxK, v_BxLxGxK

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
        blocks = [Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)]
        self.blocks = stacked_block(blocks) if cfg.scan_layers else nnx.List(blocks)
        self.final_norm = RMSNorm(D, cfg.norm_eps, pdt)
        self.head_DxV = (None if cfg.tie_embeddings else
                         _param(rngs, (D, V), ("embed", "vocab"), cfg.init_std, pdt))
        # last, so a text model's parameters draw the same random numbers as they always did
        self.media = (MediaEmbed(cfg.media, V, D, cfg.init_std, pdt, rngs=rngs) if cfg.media
                      else None)

    def embed(self, tokens_BxL: jax.Array) -> jax.Array:
        """Token embeddings, flattened to (B·L, D)."""
        # Gemma scales the embedding by sqrt(D): with std-0.02 init (which the tied head needs
        # for ~uniform initial logits) the unscaled input would be drowned by the first block's
        # residual updates. A constant, fused into the gather.
        ids_N = tokens_BxL.reshape(-1)
        if self.media is None:
            x_NxD = self.embed_VxD[...][ids_N] * math.sqrt(self.cfg.d_model)
            return constrain(x_NxD.astype(self.cfg.dtype), ("tokens", None))
        # ids at or above V are markers and media references: the encoders embed them
        text_N = ids_N < self.cfg.vocab_size
        x_NxD = self.embed_VxD[...][jnp.where(text_N, ids_N, 0)] * math.sqrt(self.cfg.d_model)
        x_NxD = jnp.where(text_N[:, None], x_NxD, self.media(ids_N).astype(x_NxD.dtype))
        return constrain(x_NxD.astype(self.cfg.dtype), ("tokens", None))

    def target_mask(self, targets: jax.Array) -> jax.Array | None:
        """Which targets the loss counts: text tokens (None: all, a model without media)."""
        return None if self.media is None else targets < self.cfg.vocab_size

    def rope(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """cos, sin of shape positions.shape + (K,), scaled as `model.rope` says."""
        cfg = self.cfg
        return rope_at(positions, cfg.qk_dim, cfg.rope_base, cfg.rope)

    def decode(self, x_NxD: jax.Array, batch: int,
               segment_BxL: jax.Array | None = None, pos_BxL: jax.Array | None = None
               ) -> jax.Array:
        """The blocks and the final norm over an embedded (B·L, D) stream; with segments (and
        their positions, from `documents`), each document attends only to itself."""
        L = x_NxD.shape[0] // batch
        cos, sin = self.rope(jnp.arange(L) if pos_BxL is None else pos_BxL)
        return self.final_norm(self.stack(x_NxD, batch, cos, sin, segment_BxL))

    def stack(self, x_NxD: jax.Array, batch: int, cos: jax.Array, sin: jax.Array,
              segment_BxL: jax.Array | None) -> jax.Array:
        """The blocks, unrolled or scanned, each rematerialised as `model.remat` says."""
        cfg = self.cfg
        if cfg.scan_layers:
            block_def, stacked = nnx.split(self.blocks)
        else:
            block_def = nnx.graphdef(self.blocks[0])

        def apply(x_NxD: jax.Array, block_state: nnx.State) -> jax.Array:
            return nnx.merge(block_def, block_state)(x_NxD, batch, cos, sin, segment_BxL)

        if cfg.remat != "none":
            policy = None if cfg.remat == "full" else getattr(jax.checkpoint_policies, cfg.remat)
            # inside a scan the loop already keeps XLA from merging the recomputation away
            apply = jax.checkpoint(apply, policy=policy, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            x_NxD, _ = jax.lax.scan(lambda x, s: (apply(x, s), None), x_NxD, stacked)
            return x_NxD
        for block in self.blocks:
            x_NxD = apply(x_NxD, nnx.state(block))
        return x_NxD

    def layers(self) -> list[Block]:
        """One Block per layer (slices of the stacked weights when scanned): the KV-cache
        paths run the layers one by one."""
        if not self.cfg.scan_layers:
            return list(self.blocks)
        block_def, stacked = nnx.split(self.blocks)
        return [nnx.merge(block_def, jax.tree.map(lambda w, i=i: w[i], stacked))
                for i in range(self.cfg.num_layers)]

    def prefill(self, tokens_BxL: jax.Array, cache_len: int) -> tuple[jax.Array, KVCache]:
        """The forward over prompts (right-padded: every row's positions are its own from 0):
        the final-normed hidden state (B·L, D) and a KV cache of `cache_len` slots per row
        holding the L positions' keys and values (padding's too: the decode steps overwrite
        them before any query can see them)."""
        B, L = tokens_BxL.shape
        cos_LxK, sin_LxK = self.rope(jnp.arange(L))
        x_NxD = self.embed(tokens_BxL)
        cache = []
        for block in self.layers():
            x_NxD, k_BxLxGxK, v_BxLxGxK = block.prefill(x_NxD, B, cos_LxK, sin_LxK)
            pad = ((0, 0), (0, cache_len - L), (0, 0), (0, 0))
            cache.append(tuple(constrain(jnp.pad(a, pad), KV_CACHE_AXES)
                               for a in (k_BxLxGxK, v_BxLxGxK)))
        return self.final_norm(x_NxD), tuple(cache)

    def extend(self, tokens_BxL: jax.Array, start_B: jax.Array,
               cache: KVCache) -> tuple[jax.Array, KVCache]:
        """L new tokens per row at positions start_B + [0, L), attending to the cache: the
        final-normed hidden state (B·L, D) and the cache with their keys and values added."""
        B, L = tokens_BxL.shape
        pos_BxL = start_B[:, None] + jnp.arange(L, dtype=start_B.dtype)[None, :]
        cos_BxLxK, sin_BxLxK = self.rope(pos_BxL)
        x_NxD = self.embed(tokens_BxL)
        new_cache = []
        for block, kv in zip(self.layers(), cache):
            x_NxD, kv = block.extend(x_NxD, B, cos_BxLxK, sin_BxLxK, pos_BxL, kv)
            new_cache.append(kv)
        return self.final_norm(x_NxD), tuple(new_cache)

    def hidden(self, tokens_BxL: jax.Array) -> jax.Array:
        """The final-normed residual stream, flattened: (B·L, D); packed documents masked from
        each other when the model is configured so."""
        segments = documents(tokens_BxL) if self.cfg.document_mask else (None, None)
        return self.decode(self.embed(tokens_BxL), tokens_BxL.shape[0], *segments)

    def logits(self, h_NxD: jax.Array) -> jax.Array:
        """f32 logits from the (N, D) hidden state; accumulation in f32 whatever the dtype."""
        dt = jnp.dtype(self.cfg.dtype)
        if self.head_DxV is None:
            logits_NxV = jnp.einsum("nd,vd->nv", h_NxD, self.embed_VxD[...].astype(dt),
                                    preferred_element_type=jnp.float32)
        else:
            logits_NxV = jnp.einsum("nd,dv->nv", h_NxD, self.head_DxV[...].astype(dt),
                                    preferred_element_type=jnp.float32)
        return constrain(logits_NxV, ("tokens", "vocab"))

    def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
        B, L = tokens_BxL.shape
        return self.logits(self.hidden(tokens_BxL)).reshape(B, L, -1)

    def token_nll(self, tokens_BxL: jax.Array, targets_BxL: jax.Array) -> jax.Array:
        """Next-token negative log-likelihood in nats, (B, L), without (B, L, V) reshapes; 0 at
        targets the loss does not count (`target_mask`)."""
        B, L = tokens_BxL.shape
        logits_NxV = self.logits(self.hidden(tokens_BxL))
        mask_BxL = self.target_mask(targets_BxL)
        if mask_BxL is None:
            return cross_entropy(logits_NxV, targets_BxL.reshape(-1)).reshape(B, L)
        # markers and media references are inputs only: their targets count zero
        nll_N = cross_entropy(logits_NxV, jnp.where(mask_BxL, targets_BxL, 0).reshape(-1))
        return jnp.where(mask_BxL, nll_N.reshape(B, L), 0.0)


def stacked_block(blocks: list[Block]) -> Block:
    """One Block holding every layer's weights stacked along a leading, replicated layer axis
    (the first block, its parameters replaced by the stacks)."""
    holder = blocks[0]
    nnx.update(holder, jax.tree.map(lambda *layers: jnp.stack(layers),
                                    *(nnx.state(b, nnx.Param) for b in blocks)))
    for _, var in nnx.iter_graph(holder):
        if isinstance(var, nnx.Param):
            var.set_metadata("out_sharding", (None, *var.get_metadata()["out_sharding"]))
    return holder


def documents(tokens_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Segment ids and in-document positions of packed windows, both (B, L) int32: EOS starts a
    document (training packs each document after an EOS, and prompts begin with one), so the
    tokens alone say where documents begin; a window's leading partial document is segment 0,
    its positions counted from the window's start."""
    L = tokens_BxL.shape[1]
    starts_BxL = tokens_BxL == EOS_ID
    segment_BxL = jnp.cumsum(starts_BxL, axis=1, dtype=jnp.int32)
    index_L = jnp.arange(L, dtype=jnp.int32)
    first_BxL = jax.lax.cummax(jnp.where(starts_BxL, index_L, 0), axis=1)
    return segment_BxL, index_L - first_BxL


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
