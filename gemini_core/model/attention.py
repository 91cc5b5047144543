"""Attention implementations behind one signature, and the choice among them (`model.attention`).

Every implementation takes queries (B, L, H, K), keys and values (B, S, G, K), optional segment
ids (B, L) and (B, S) (document masking: a query sees only keys of its own segment, so packed
documents never attend to each other), `causal` (query i sees keys j <= q_offset + i) and
`q_offset` (the queries' first position among the keys: 0, or a later chunk of the sequence
under context parallelism):

- dense: `masked_attention`, which holds the (L, S) scores (also the KV cache's attention);
- blockwise: flash attention in pure JAX (an online softmax over blocks of keys, a custom VJP
  that recomputes the scores block by block), memory linear in L, causal blocks skipped;
- cudnn: cuDNN's fused flash attention through `jax.nn.dot_product_attention`; GPU only.

`resolve` maps a configured name to the one to run and `attention` runs it. Under a mesh whose
`context` axis splits the sequence (context parallelism), `attention` runs the kernel per device
on its chunk of queries against the keys and values of the whole sequence, gathered from every
chunk (`context_parallel`): the (B, L, D) activations of every other layer stay split, and
K/V are small beside them (G kv heads, often 1).

Shape letters as in gemini_core.model.transformer, plus S kv length, Q a query block's length,
C a kv block's length, P the (query block, kv block) pairs computed.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from gemini_core.errors import UserError
from gemini_core.model.options import ATTENTION
from gemini_core.scale import sharding

IMPLEMENTATIONS = ATTENTION
# `auto` off GPU: dense below this length, blockwise from it (bench/attention.py on the 2-core
# CPU: blockwise is already faster at 1k, and its memory is linear, so the switch is early)
BLOCKWISE_FROM = 1024
# 256 x 256 ran fastest on the 2-core CPU (bench/attention.py, forward + backward at 1k and
# 4k: 128 x 128 up to 1.7x slower, 512 x 512 1.8x): a block's scores (4 heads: 1 MB in f32)
# stay in cache, and the matmuls are still fat enough
BLOCK_Q = BLOCK_K = 256
# finite, so a row whose keys so far were all masked sums exp(0) = 1 per key instead of NaN;
# its first visible key rescales those sums by exp(_NEG_INF - max) = 0, exactly
_NEG_INF = -1e30
_GPU_PLATFORMS = ("gpu", "cuda")


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The static part of a blockwise call (hashable: a custom_vjp non-differentiable arg)."""
    block_q: int
    block_k: int
    causal: bool
    kv_len: int  # keys at or past it are padding (masked when not causal)
    segments: bool
    q_offset: int = 0  # query i sits at key position q_offset + i


def block_schedule(num_q: int, num_k: int, block_q: int, block_k: int, causal: bool,
                   q_offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The (query block, kv block) pairs blockwise attention computes, as two (P,) arrays.

    Causal drops every pair whose first key comes after the block's last query: those blocks
    are not computed at all (about half of them for many blocks)."""
    pairs = [(i, j) for i in range(num_q) for j in range(num_k)
             if not causal or j * block_k <= q_offset + (i + 1) * block_q - 1]
    qi_P, kj_P = np.asarray(pairs, np.int32).reshape(-1, 2).T
    return qi_P, kj_P


def _loops(plan: _Plan, num_q: int, num_k: int) -> list[tuple[tuple[np.ndarray, ...], bool]]:
    """The schedule as up to two loops: the pairs that need a positional mask (straddling the
    causal diagonal, or holding padded keys), then the rest, which skip that pass over the
    scores (most of them: below the diagonal every key is visible)."""
    qi_P, kj_P = block_schedule(num_q, num_k, plan.block_q, plan.block_k, plan.causal,
                                plan.q_offset)
    last_key_P = (kj_P + 1) * plan.block_k - 1
    cut_P = (last_key_P > plan.q_offset + qi_P * plan.block_q if plan.causal
             else last_key_P >= plan.kv_len)
    return [((qi_P[m], kj_P[m]), positional) for m, positional in ((cut_P, True), (~cut_P, False))
            if m.any()]


def _block_mask(plan: _Plan, i: jax.Array, j: jax.Array, seg_q_BxL: jax.Array,
                seg_kv_BxS: jax.Array, positional: bool) -> jax.Array | None:
    """(B or 1, 1, Q, 1, C): which scores of the pair count; None when all of them do."""
    q_pos_Q = plan.q_offset + i * plan.block_q + jnp.arange(plan.block_q)
    k_pos_C = j * plan.block_k + jnp.arange(plan.block_k)
    mask_1xQxC = None
    if positional and plan.causal:  # also keeps real queries off the padded keys past them
        mask_1xQxC = (q_pos_Q[:, None] >= k_pos_C[None, :])[None]
    elif positional:
        mask_1xQxC = jnp.broadcast_to(k_pos_C < plan.kv_len, (1, plan.block_q, plan.block_k))
    if plan.segments:
        sq_BxQ = jax.lax.dynamic_slice_in_dim(seg_q_BxL, i * plan.block_q, plan.block_q, 1)
        sk_BxC = jax.lax.dynamic_slice_in_dim(seg_kv_BxS, j * plan.block_k, plan.block_k, 1)
        same_BxQxC = sq_BxQ[:, :, None] == sk_BxC[:, None, :]
        mask_1xQxC = same_BxQxC if mask_1xQxC is None else mask_1xQxC & same_BxQxC
    return None if mask_1xQxC is None else mask_1xQxC[:, None, :, None, :]


def _blocks(x: jax.Array, index: jax.Array, size: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, index * size, size, axis=2)


def _add_block(acc: jax.Array, index: jax.Array, size: int, block: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(
        acc, _blocks(acc, index, size) + block, index * size, axis=2)


def _flash_fwd_pass(q_BxGxLxRxK, k_BxGxSxK, v_BxGxSxK, seg_q_BxL, seg_kv_BxS, plan: _Plan):
    """Output (in q's dtype) and the per-row logsumexp (B, G, L, R) in f32."""
    B, G, L, R, K = q_BxGxLxRxK.shape
    bq, bk, S = plan.block_q, plan.block_k, k_BxGxSxK.shape[2]

    def step(positional: bool, carry, ij):
        o_BxGxLxRxK, m_BxGxLxR, l_BxGxLxR = carry
        i, j = ij
        q_BxGxQxRxK = _blocks(q_BxGxLxRxK, i, bq)
        s_BxGxQxRxC = jnp.einsum("bgqrk,bgck->bgqrc", q_BxGxQxRxK, _blocks(k_BxGxSxK, j, bk),
                                 preferred_element_type=jnp.float32)
        mask = _block_mask(plan, i, j, seg_q_BxL, seg_kv_BxS, positional)
        if mask is not None:
            s_BxGxQxRxC = jnp.where(mask, s_BxGxQxRxC, _NEG_INF)
        m_old_BxGxQxR = _blocks(m_BxGxLxR, i, bq)
        m_new_BxGxQxR = jnp.maximum(m_old_BxGxQxR, s_BxGxQxRxC.max(axis=-1))
        p_BxGxQxRxC = jnp.exp(s_BxGxQxRxC - m_new_BxGxQxR[..., None])
        alpha_BxGxQxR = jnp.exp(m_old_BxGxQxR - m_new_BxGxQxR)
        pv_BxGxQxRxK = jnp.einsum("bgqrc,bgck->bgqrk", p_BxGxQxRxC.astype(v_BxGxSxK.dtype),
                                  _blocks(v_BxGxSxK, j, bk), preferred_element_type=jnp.float32)
        o_new = alpha_BxGxQxR[..., None] * _blocks(o_BxGxLxRxK, i, bq) + pv_BxGxQxRxK
        l_new = alpha_BxGxQxR * _blocks(l_BxGxLxR, i, bq) + p_BxGxQxRxC.sum(axis=-1)
        put = functools.partial(jax.lax.dynamic_update_slice_in_dim, start_index=i * bq, axis=2)
        return (put(o_BxGxLxRxK, o_new), put(m_BxGxLxR, m_new_BxGxQxR),
                put(l_BxGxLxR, l_new)), None

    carry = (jnp.zeros((B, G, L, R, K), jnp.float32), jnp.full((B, G, L, R), _NEG_INF),
             jnp.zeros((B, G, L, R), jnp.float32))
    for schedule, positional in _loops(plan, L // bq, S // bk):  # any order: softmax is online
        carry, _ = jax.lax.scan(functools.partial(step, positional), carry, schedule)
    o_BxGxLxRxK, m_BxGxLxR, l_BxGxLxR = carry
    # a row that sees no key at all (only padding can) gets zeros, not 0/0
    l_BxGxLxR = jnp.where(l_BxGxLxR == 0.0, 1.0, l_BxGxLxR)
    o_BxGxLxRxK = (o_BxGxLxRxK / l_BxGxLxR[..., None]).astype(q_BxGxLxRxK.dtype)
    return o_BxGxLxRxK, m_BxGxLxR + jnp.log(l_BxGxLxR)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q_BxGxLxRxK, k_BxGxSxK, v_BxGxSxK, seg_q_BxL, seg_kv_BxS, plan: _Plan):
    return _flash_fwd_pass(q_BxGxLxRxK, k_BxGxSxK, v_BxGxSxK, seg_q_BxL, seg_kv_BxS, plan)[0]


def _flash_fwd(q_BxGxLxRxK, k_BxGxSxK, v_BxGxSxK, seg_q_BxL, seg_kv_BxS, plan: _Plan):
    o_BxGxLxRxK, lse_BxGxLxR = _flash_fwd_pass(q_BxGxLxRxK, k_BxGxSxK, v_BxGxSxK, seg_q_BxL,
                                               seg_kv_BxS, plan)
    # only the output and the logsumexp beyond the inputs: the backward recomputes the scores
    return o_BxGxLxRxK, (q_BxGxLxRxK, k_BxGxSxK, v_BxGxSxK, seg_q_BxL, seg_kv_BxS,
                         o_BxGxLxRxK, lse_BxGxLxR)


def _flash_bwd(plan: _Plan, residuals, do_BxGxLxRxK):
    """FlashAttention-2's backward over the forward's schedule, P recomputed from the logsumexp:
    dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO O)), dQ = dS K, dK = dS^T Q."""
    q_BxGxLxRxK, k_BxGxSxK, v_BxGxSxK, seg_q_BxL, seg_kv_BxS, o_BxGxLxRxK, lse_BxGxLxR = residuals
    L, S = q_BxGxLxRxK.shape[2], k_BxGxSxK.shape[2]
    bq, bk = plan.block_q, plan.block_k
    delta_BxGxLxR = jnp.sum(do_BxGxLxRxK.astype(jnp.float32) * o_BxGxLxRxK.astype(jnp.float32),
                            axis=-1)

    def step(positional: bool, carry, ij):
        dq_BxGxLxRxK, dk_BxGxSxK, dv_BxGxSxK = carry
        i, j = ij
        q_BxGxQxRxK, do_BxGxQxRxK = _blocks(q_BxGxLxRxK, i, bq), _blocks(do_BxGxLxRxK, i, bq)
        k_BxGxCxK, v_BxGxCxK = _blocks(k_BxGxSxK, j, bk), _blocks(v_BxGxSxK, j, bk)
        s_BxGxQxRxC = jnp.einsum("bgqrk,bgck->bgqrc", q_BxGxQxRxK, k_BxGxCxK,
                                 preferred_element_type=jnp.float32)
        p_BxGxQxRxC = jnp.exp(s_BxGxQxRxC - _blocks(lse_BxGxLxR, i, bq)[..., None])
        mask = _block_mask(plan, i, j, seg_q_BxL, seg_kv_BxS, positional)
        if mask is not None:
            p_BxGxQxRxC = jnp.where(mask, p_BxGxQxRxC, 0.0)
        dv_BxGxCxK = jnp.einsum("bgqrc,bgqrk->bgck", p_BxGxQxRxC.astype(do_BxGxQxRxK.dtype),
                                do_BxGxQxRxK, preferred_element_type=jnp.float32)
        dp_BxGxQxRxC = jnp.einsum("bgqrk,bgck->bgqrc", do_BxGxQxRxK, v_BxGxCxK,
                                  preferred_element_type=jnp.float32)
        ds_BxGxQxRxC = p_BxGxQxRxC * (dp_BxGxQxRxC - _blocks(delta_BxGxLxR, i, bq)[..., None])
        dq_BxGxQxRxK = jnp.einsum("bgqrc,bgck->bgqrk", ds_BxGxQxRxC.astype(k_BxGxCxK.dtype),
                                  k_BxGxCxK, preferred_element_type=jnp.float32)
        dk_BxGxCxK = jnp.einsum("bgqrc,bgqrk->bgck", ds_BxGxQxRxC.astype(q_BxGxQxRxK.dtype),
                                q_BxGxQxRxK, preferred_element_type=jnp.float32)
        return (_add_block(dq_BxGxLxRxK, i, bq, dq_BxGxQxRxK),
                _add_block(dk_BxGxSxK, j, bk, dk_BxGxCxK),
                _add_block(dv_BxGxSxK, j, bk, dv_BxGxCxK)), None

    carry = tuple(jnp.zeros(x.shape, jnp.float32) for x in (q_BxGxLxRxK, k_BxGxSxK, v_BxGxSxK))
    for schedule, positional in _loops(plan, L // bq, S // bk):
        carry, _ = jax.lax.scan(functools.partial(step, positional), carry, schedule)
    dq, dk, dv = carry
    return (dq.astype(q_BxGxLxRxK.dtype), dk.astype(k_BxGxSxK.dtype),
            dv.astype(v_BxGxSxK.dtype), None, None)  # segment ids: integers, no cotangent


_flash.defvjp(_flash_fwd, _flash_bwd)


def _check_alignment(L: int, S: int, causal: bool, q_offset: int) -> None:
    if causal and not (0 <= q_offset and q_offset + L <= S):
        raise ValueError(f"causal attention places queries among the keys: q_offset={q_offset} "
                         f"+ L={L} must be at most S={S}")


def _pad_axis(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def blockwise_attention(q_BxLxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array,
                        segment_q_BxL: jax.Array | None = None,
                        segment_kv_BxS: jax.Array | None = None, *, block_q: int = BLOCK_Q,
                        block_k: int = BLOCK_K, causal: bool = True,
                        q_offset: int = 0) -> jax.Array:
    """Flash attention: queries in blocks of block_q against keys in blocks of block_k.

    Neither pass holds more than one (Q, C) block of scores per kv head. A length the block
    does not divide is padded up to a multiple inside and the padding masked (causal: real
    queries never reach the padded keys past them; otherwise by position); the padded queries'
    rows are dropped. A block longer than the sequence shrinks to it."""
    B, L, H, K = q_BxLxHxK.shape
    S, G = k_BxSxGxK.shape[1], k_BxSxGxK.shape[2]
    _check_alignment(L, S, causal, q_offset)
    if (segment_q_BxL is None) != (segment_kv_BxS is None):
        raise ValueError("give segment ids for both queries and keys, or for neither")
    bq, bk = min(block_q, L), min(block_k, S)
    plan = _Plan(bq, bk, causal, S, segment_q_BxL is not None, q_offset)
    if segment_q_BxL is None:  # unused (plan.segments is False); the custom_vjp wants arrays
        segment_q_BxL, segment_kv_BxS = jnp.zeros((B, L), jnp.int32), jnp.zeros((B, S), jnp.int32)
    # (B, L, G, R, K) -> (B, G, L, R, K): the R query heads of a kv head meet its keys in one
    # matmul per block; with G = 1 (multi-query) the transposes are free reshapes
    q_BxLxHxK = q_BxLxHxK * jnp.asarray(1.0 / math.sqrt(K), q_BxLxHxK.dtype)
    q_BxGxLxRxK = q_BxLxHxK.reshape(B, L, G, H // G, K).transpose(0, 2, 1, 3, 4)
    k_BxGxSxK, v_BxGxSxK = (x.transpose(0, 2, 1, 3) for x in (k_BxSxGxK, v_BxSxGxK))
    o_BxGxLxRxK = _flash(_pad_axis(q_BxGxLxRxK, 2, bq), _pad_axis(k_BxGxSxK, 2, bk),
                         _pad_axis(v_BxGxSxK, 2, bk), _pad_axis(segment_q_BxL, 1, bq),
                         _pad_axis(segment_kv_BxS, 1, bk), plan)[:, :, :L]
    return o_BxGxLxRxK.transpose(0, 2, 1, 3, 4).reshape(B, L, H, K)


def masked_attention(q_BxLxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array,
                     mask_LxS: jax.Array) -> jax.Array:
    """Softmax attention as two batched matmuls; each kv head serves R = H/G query heads.

    The R query heads of a group are stacked with the positions into one (R·L)-row operand, so
    multi-query attention is one (R·L, K) x (K, S) matmul per sequence rather than H thin ones.
    The softmax is normalised after the second matmul (divide the (L, K) output, not the (L, S)
    probabilities): one pass fewer over the scores, and a backward pass with no (L, S) reduction.
    The mask is (L, S), shared by the batch, or (B, 1, 1, L, S), a row's own (the KV cache's,
    or packed documents'). Dense: it holds the (L, S) scores.
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


def _segment_mask(segment_q_BxL: jax.Array | None, segment_kv_BxS: jax.Array | None,
                  L: int, S: int, causal: bool, q_offset: int = 0) -> jax.Array:
    """(L, S) or, with segments, (B, 1, 1, L, S): True where a query may see a key."""
    _check_alignment(L, S, causal, q_offset)
    mask_LxS = ((q_offset + jnp.arange(L))[:, None] >= jnp.arange(S)[None, :] if causal
                else jnp.ones((L, S), jnp.bool_))
    if segment_q_BxL is None:
        return mask_LxS
    same_BxLxS = segment_q_BxL[:, :, None] == segment_kv_BxS[:, None, :]
    return (mask_LxS & same_BxLxS)[:, None, None]


def dense_attention(q_BxLxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array,
                    segment_q_BxL: jax.Array | None = None,
                    segment_kv_BxS: jax.Array | None = None, *, causal: bool = True,
                    q_offset: int = 0) -> jax.Array:
    """The full (L, S) scores with the causal and same-segment mask."""
    mask = _segment_mask(segment_q_BxL, segment_kv_BxS, q_BxLxHxK.shape[1],
                         k_BxSxGxK.shape[1], causal, q_offset)
    return masked_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask)


def cudnn_attention(q_BxLxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array,
                    segment_q_BxL: jax.Array | None = None,
                    segment_kv_BxS: jax.Array | None = None, *, causal: bool = True,
                    q_offset: int = 0) -> jax.Array:
    """cuDNN flash attention (GPU; bf16 or fp16 inputs, as cuDNN requires).

    `jax.nn.dot_product_attention` (jax 0.10) takes no segment ids: same-segment masking goes
    in as its boolean `mask` (B, 1, L, S), which cuDNN applies as a bias, so that memory is
    quadratic; without segments the causal mask is cuDNN's own and nothing (L, S) is held.
    Queries that are a later chunk of the keys (context parallelism) have their causal mask
    given explicitly too."""
    L, S = q_BxLxHxK.shape[1], k_BxSxGxK.shape[1]
    if segment_q_BxL is None and L == S:
        return jax.nn.dot_product_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, is_causal=causal,
                                            implementation="cudnn")
    mask = _segment_mask(segment_q_BxL, segment_kv_BxS, L, S, causal, q_offset)
    mask_Bx1xLxS = mask[:, :, 0] if mask.ndim == 5 else mask[None, None]
    return jax.nn.dot_product_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, mask=mask_Bx1xLxS,
                                        implementation="cudnn")


_RUN = {"dense": dense_attention, "blockwise": blockwise_attention, "cudnn": cudnn_attention}


def resolve(name: str, platform: str, seq_len: int, *, dtype: str | None = None) -> str:
    """The implementation `name` runs as on `platform` ("cpu", "gpu", "tpu") at `seq_len`.

    `auto`: cuDNN on a GPU (for 16-bit activations: cuDNN has no f32 flash attention);
    elsewhere dense below BLOCKWISE_FROM tokens and blockwise from there."""
    if name not in IMPLEMENTATIONS:
        raise UserError(f"model.attention: unknown value {name!r}; choose one of "
                        f"{', '.join(IMPLEMENTATIONS)}")
    gpu = platform in _GPU_PLATFORMS
    sixteen_bit = dtype is None or jnp.dtype(dtype).itemsize == 2
    if name == "cudnn" and not gpu:
        raise UserError(f"model.attention: 'cudnn' runs only on a GPU, not on {platform}; "
                        f"choose one of auto, dense, blockwise")
    if name == "cudnn" and not sixteen_bit:
        raise UserError(f"model.attention: 'cudnn' needs bf16 or fp16 activations, got "
                        f"{jnp.dtype(dtype).name}; choose one of auto, dense, blockwise")
    if name != "auto":
        return name
    if gpu and sixteen_bit:
        return "cudnn"
    return "blockwise" if seq_len >= BLOCKWISE_FROM else "dense"


def attention(impl: str, q_BxLxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array,
              segment_q_BxL: jax.Array | None = None,
              segment_kv_BxS: jax.Array | None = None) -> jax.Array:
    """Causal attention by the implementation `impl` resolves to on the default backend; split
    over the devices along the sequence where the active mesh says so (module docstring)."""
    name = resolve(impl, jax.default_backend(), q_BxLxHxK.shape[1], dtype=q_BxLxHxK.dtype.name)
    split = sharding.context_axes()
    if split is not None:
        mesh, axes = split
        shards = math.prod(mesh.shape[a] for a in axes)
        if q_BxLxHxK.shape[1] % shards == 0 and q_BxLxHxK.shape[1] == k_BxSxGxK.shape[1]:
            return context_parallel(name, q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, segment_q_BxL,
                                    segment_kv_BxS, mesh, axes)
    return _RUN[name](q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, segment_q_BxL, segment_kv_BxS)


def context_parallel(name: str, q_BxLxHxK: jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array,
                     segment_q_BxL: jax.Array | None, segment_kv_BxL: jax.Array | None,
                     mesh: jax.sharding.Mesh, axes: tuple[str, ...]) -> jax.Array:
    """Causal attention with the sequence split over the mesh `axes` (all-gather context
    parallelism): each device gathers every chunk's keys and values (and segment ids) and
    attends with its own queries, whose positions start at its chunk's offset.

    Manual over `axes` only (`jax.shard_map`'s axis_names); batch, heads and the rest stay
    under the compiler's sharding. The offset picks one of `shards` kernels (`lax.switch` on
    the device's index): each is compiled with its offset static, so the blockwise kernel still
    skips the blocks above the causal diagonal. The backward of the gather is a reduce-scatter
    of the keys' and values' gradients (JAX transposes it). Causal work grows with the chunk's
    index (the last device attends to the whole sequence, the first to its own chunk); a zig-zag
    assignment of chunks would even it out."""
    L = q_BxLxHxK.shape[1]
    shards = math.prod(mesh.shape[a] for a in axes)
    chunk = L // shards
    run = _RUN[name]
    segments = segment_q_BxL is not None

    def local(q_BxCxHxK, k_BxCxGxK, v_BxCxGxK, *segment_BxC):
        k_BxLxGxK, v_BxLxGxK = (jax.lax.all_gather(x, axes, axis=1, tiled=True)
                                for x in (k_BxCxGxK, v_BxCxGxK))
        seg = ((segment_BxC[0], jax.lax.all_gather(segment_BxC[1], axes, axis=1, tiled=True))
               if segments else (None, None))
        branches = [functools.partial(_offset_kernel, run, c * chunk) for c in range(shards)]
        return jax.lax.switch(jax.lax.axis_index(axes), branches, q_BxCxHxK, k_BxLxGxK,
                              v_BxLxGxK, *seg)

    split = P(None, axes)
    operands = (q_BxLxHxK, k_BxLxGxK, v_BxLxGxK) + (
        (segment_q_BxL, segment_kv_BxL) if segments else ())
    return jax.shard_map(local, mesh=mesh, in_specs=(split,) * len(operands), out_specs=split,
                         axis_names=set(axes), check_vma=False)(*operands)


def _offset_kernel(run, q_offset: int, q, k, v, seg_q, seg_kv):
    return run(q, k, v, seg_q, seg_kv, q_offset=q_offset)
