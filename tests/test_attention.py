"""Attention implementations (gemini_core.model.attention): blockwise flash attention against
the dense attention (forward and gradients, multi-query / grouped-query / multi-head, with
and without packed documents, lengths the block does and does not divide), causal blocks
really skipped, memory linear in the length, document masking exact, bf16, and the choice of
`model.attention`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemini_core.errors import UserError
from gemini_core.model import attention as attn

TOL = 1e-5
BLOCK = 16
# (H, G): multi-query, grouped-query, multi-head
HEADS = {"mqa": (4, 1), "gqa": (4, 2), "mha": (2, 2)}


def qkvw(B: int, L: int, H: int, G: int, K: int = 16, seed: int = 0,
         dtype=jnp.float32) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=shape).astype(np.float32), dtype)
                 for shape in ((B, L, H, K), (B, L, G, K), (B, L, G, K), (B, L, H, K)))


def packed_segments(B: int, L: int, seed: int = 0) -> jax.Array:
    """Documents of random lengths packed back to back; row 0's second one starts mid-block."""
    rng = np.random.default_rng(seed)
    rows = []
    for b in range(B):
        cuts = [0, BLOCK + 5] if b == 0 else [0]
        while cuts[-1] < L:
            cuts.append(cuts[-1] + int(rng.integers(3, 2 * BLOCK)))
        rows.append(np.searchsorted(np.asarray(cuts[1:]), np.arange(L), side="right"))
    return jnp.asarray(np.stack(rows), jnp.int32)


def out_and_grads(fn, q, k, v, w, seg):
    """Output and d(sum(out * w))/d(q, k, v), in one compiled program."""
    @jax.jit
    def run(q, k, v, w, seg):
        out, pull = jax.vjp(lambda q, k, v: fn(q, k, v, seg, seg), q, k, v)
        return out, pull(w.astype(out.dtype))
    return run(q, k, v, w, seg)


def blockwise(q, k, v, seg_q, seg_kv):
    return attn.blockwise_attention(q, k, v, seg_q, seg_kv, block_q=BLOCK, block_k=BLOCK)


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("segments", [False, True], ids=["no-segments", "segments"])
@pytest.mark.parametrize("L", [64, 53], ids=["L=4blocks", "L=53"])
def test_blockwise_equals_dense_forward_and_gradients(heads, segments, L):
    H, G = HEADS[heads]
    q, k, v, w = qkvw(2, L, H, G)
    seg = packed_segments(2, L) if segments else None
    out, grads = out_and_grads(blockwise, q, k, v, w, seg)
    ref_out, ref_grads = out_and_grads(attn.dense_attention, q, k, v, w, seg)
    np.testing.assert_allclose(out, ref_out, atol=TOL, rtol=0)
    for name, g, ref in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(g, ref, atol=TOL, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non-causal"])
def test_unequal_blocks_and_non_causal_equal_dense(causal):
    """Query blocks of 16 against kv blocks of 8 over 45 positions (both padded)."""
    q, k, v, w = qkvw(1, 45, 4, 2)
    bw = functools.partial(attn.blockwise_attention, block_q=16, block_k=8, causal=causal)
    dense = functools.partial(attn.dense_attention, causal=causal)
    for seg in (None, packed_segments(1, 45)):
        (out, grads), (ref, ref_grads) = (out_and_grads(f, q, k, v, w, seg) for f in (bw, dense))
        np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(g, r, atol=TOL, rtol=0)


def scan_lengths(jaxpr) -> list[int]:
    """The trip counts of every scan in a jaxpr, nested ones included."""
    lengths = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            lengths.append(eqn.params["length"])
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", None)
            if inner is not None:
                lengths += scan_lengths(getattr(inner, "jaxpr", inner))
    return lengths


def test_causal_blocks_above_the_diagonal_are_not_computed():
    """The traced forward and backward loops run once per computed block pair: causal with 8
    blocks a side computes 36 pairs (8 * 9 / 2) each way, not 64. A loop body holds one
    block's scores, so a dropped pair is work not done; were every pair computed and masked,
    the trip counts would add up to 64 each way."""
    q, k, v, _ = qkvw(1, 8 * BLOCK, 4, 1)
    counts = {}
    for causal in (True, False):
        bw = functools.partial(attn.blockwise_attention, block_q=BLOCK, block_k=BLOCK,
                               causal=causal)
        loss = functools.partial(lambda q, k, v, fn: fn(q, k, v).sum(), fn=bw)
        counts[causal] = scan_lengths(jax.make_jaxpr(jax.grad(loss, (0, 1, 2)))(q, k, v).jaxpr)
    assert sum(counts[False]) == 2 * 64  # forward and backward: every pair
    # the 8 diagonal pairs (masked) and the 28 below it (unmasked), forward then backward
    assert counts[True] == [8, 28, 8, 28]
    qi_P, kj_P = attn.block_schedule(8, 8, BLOCK, BLOCK, causal=True)
    assert len(qi_P) == 36 and np.all(kj_P <= qi_P)


def grad_temp_bytes(fn, L: int) -> int:
    q, k, v, _ = qkvw(1, L, 4, 1)
    loss = jax.grad(lambda q, k, v: fn(q, k, v).sum(), (0, 1, 2))
    return jax.jit(loss).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_memory_grows_linearly_with_length_dense_quadratically():
    """Forward + backward temporaries from L=512 to 2048 (4x): blockwise within 2x of linear,
    dense (the (L, L) scores: 16x) beyond it, so the bound separates the two."""
    def bw(q, k, v):
        return attn.blockwise_attention(q, k, v, block_q=64, block_k=64)
    bound = 2 * 4
    ratios = {name: grad_temp_bytes(fn, 2048) / grad_temp_bytes(fn, 512)
              for name, fn in (("blockwise", bw), ("dense", attn.dense_attention))}
    assert ratios["blockwise"] < bound, ratios
    assert ratios["dense"] > bound, ratios


@pytest.mark.parametrize("impl", ["blockwise", "dense"])
def test_changing_one_document_leaves_the_others_exactly_unchanged(impl):
    L = 64
    q, k, v, _ = qkvw(2, L, 4, 1)
    seg = packed_segments(2, L)
    inside = np.asarray(seg == 1)[:, :, None, None]  # both rows: it starts mid-block
    q2, k2, v2, _ = qkvw(2, L, 4, 1, seed=1)
    changed = [jnp.where(inside, new, old) for new, old in ((q2, q), (k2, k), (v2, v))]
    fn = jax.jit(blockwise if impl == "blockwise" else attn.dense_attention)
    before, after = np.asarray(fn(q, k, v, seg, seg)), np.asarray(fn(*changed, seg, seg))
    outside = ~inside[..., 0, 0]
    np.testing.assert_array_equal(after[outside], before[outside])
    assert not np.allclose(after[~outside], before[~outside])  # the document itself did change


def test_bf16_is_finite_and_close_to_f32():
    L = 64
    q, k, v, w = qkvw(2, L, 4, 1)
    seg = packed_segments(2, L)
    out32, grads32 = out_and_grads(blockwise, q, k, v, w, seg)
    out16, grads16 = out_and_grads(blockwise, *(x.astype(jnp.bfloat16) for x in (q, k, v)),
                                   w, seg)
    assert out16.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads16)
    # bf16 keeps 8 significant bits (relative step 2^-8 ~ 0.004); errors of a few steps
    np.testing.assert_allclose(out16.astype(jnp.float32), out32, atol=3e-2, rtol=3e-2)
    for g16, g32 in zip(grads16, grads32):
        g16 = np.asarray(g16.astype(jnp.float32))
        assert np.isfinite(g16).all()
        scale = np.abs(np.asarray(g32)).max()
        assert np.abs(g16 - g32).max() < 3e-2 * scale


def test_argument_mistakes_are_refused():
    q, k, v, _ = qkvw(1, 16, 4, 1)
    with pytest.raises(ValueError, match=r"q_offset=0 \+ L=16 must be at most S=8"):
        attn.blockwise_attention(q, k[:, :8], v[:, :8])
    with pytest.raises(ValueError, match="segment ids for both"):
        attn.blockwise_attention(q, k, v, jnp.zeros((1, 16), jnp.int32))


def test_resolve_picks_a_valid_implementation_and_refuses_clearly():
    for L in (128, attn.BLOCKWISE_FROM, 32768):
        assert attn.resolve("auto", "cpu", L) in ("dense", "blockwise")
    assert attn.resolve("auto", "cpu", 32768) == "blockwise"
    assert attn.resolve("auto", "gpu", 4096, dtype="bfloat16") == "cudnn"
    assert attn.resolve("auto", "gpu", 4096, dtype="float32") == "blockwise"  # no f32 cuDNN
    assert attn.resolve("dense", "cpu", 32768) == "dense"
    with pytest.raises(UserError, match=r"^model\.attention: unknown value 'flash'; choose one "
                                        r"of auto, dense, blockwise, cudnn$"):
        attn.resolve("flash", "cpu", 1024)
    with pytest.raises(UserError, match=r"^model\.attention: 'cudnn' runs only on a GPU, not on "
                                        r"cpu"):
        attn.resolve("cudnn", "cpu", 1024)
    with pytest.raises(UserError, match=r"'cudnn' needs bf16 or fp16 activations, got float32"):
        attn.resolve("cudnn", "gpu", 1024, dtype="float32")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the refusal off GPU")
def test_attention_entry_point_runs_auto_and_refuses_cudnn_off_gpu():
    q, k, v, _ = qkvw(1, 32, 4, 1)
    seg = packed_segments(1, 32)
    np.testing.assert_allclose(attn.attention("auto", q, k, v, seg, seg),
                               attn.dense_attention(q, k, v, seg, seg), atol=TOL, rtol=0)
    with pytest.raises(UserError, match="model.attention: 'cudnn' runs only on a GPU"):
        attn.attention("cudnn", q, k, v)
