"""The layer stack for long context (gemini_core.model.transformer): document masking (packed
documents never see each other, positions restart at each EOS), and the ways the stack runs —
scanned over stacked weights, rematerialised, any attention kernel — computing the same losses
from the same initial weights."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gemini_core.config import ModelConfig
from gemini_core.data.tokenizer import EOS_ID
from gemini_core.model.transformer import Transformer, documents

MODEL = ModelConfig(d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, mlp_dim=48,
                    vocab_size=61, init_std=0.1, attention="dense")


def build(**changes) -> Transformer:
    return Transformer(dataclasses.replace(MODEL, **changes), rngs=nnx.Rngs(params=0))


@nnx.jit
def logits(model: Transformer, tokens_1xL: jax.Array) -> jax.Array:
    return model(tokens_1xL)[0]


def doc(length: int, seed: int) -> np.ndarray:
    """A document as training packs it: EOS, then `length - 1` tokens that are never EOS."""
    body = np.random.default_rng(seed).integers(EOS_ID + 1, MODEL.vocab_size, length - 1)
    return np.concatenate([[EOS_ID], body]).astype(np.int32)


def test_documents_gives_segments_and_positions_restarting_at_each_eos():
    segment, pos = documents(jnp.asarray([[5, EOS_ID, 7, 8, EOS_ID, 9], [EOS_ID, 4, 4, 4, 4, 4]]))
    np.testing.assert_array_equal(segment, [[0, 1, 1, 1, 2, 2], [1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(pos, [[0, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 5]])


@pytest.mark.parametrize("kernel", ["dense", "blockwise"])
def test_a_packed_document_is_computed_as_if_it_were_alone(kernel):
    first, second, third = doc(11, 1), doc(17, 2), doc(9, 3)
    packed_1xL = jnp.asarray(np.concatenate([first, second, third])[None])
    model = build(document_mask=True, attention=kernel)
    packed_LxV = np.asarray(logits(model, packed_1xL))
    for start, d in ((0, first), (11, second), (28, third)):
        alone_LxV = np.asarray(logits(model, jnp.asarray(d[None])))
        np.testing.assert_allclose(packed_LxV[start:start + len(d)], alone_LxV, atol=2e-5,
                                   err_msg=f"document at {start}")
    # the control: without the mask, the second document sees the first
    unmasked_LxV = np.asarray(logits(build(attention=kernel), packed_1xL))
    assert np.abs(unmasked_LxV[11:28] - np.asarray(logits(model, jnp.asarray(second[None])))
                  ).max() > 1e-3


def test_changing_one_document_leaves_the_others_unchanged():
    docs = [doc(13, 1), doc(20, 2), doc(15, 3)]
    changed = [docs[0], doc(20, 99), docs[2]]
    model = build(document_mask=True)
    a_LxV, b_LxV = (np.asarray(logits(model, jnp.asarray(np.concatenate(d)[None])))
                    for d in (docs, changed))
    np.testing.assert_array_equal(a_LxV[:13], b_LxV[:13])
    np.testing.assert_array_equal(a_LxV[33:], b_LxV[33:])
    assert np.abs(a_LxV[13:33] - b_LxV[13:33]).max() > 1e-3


STACKS = [dict(scan_layers=True), dict(remat="full"), dict(remat="dots_saveable"),
          dict(scan_layers=True, remat="nothing_saveable"), dict(attention="blockwise")]


@functools.cache
def reference_losses() -> tuple[float, ...]:
    return tuple(losses(build(), 20))


def losses(model: Transformer, steps: int) -> list[float]:
    """`steps` Adam steps on one random batch (learnt by heart: the loss falls fast): the
    loss before each."""
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, tokens_BxT1):
        def loss_fn(m):
            return m.token_nll(tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    tokens_BxT1 = jnp.asarray(np.random.default_rng(0).integers(0, MODEL.vocab_size, (4, 33)),
                              jnp.int32)
    return [float(step(model, opt, tokens_BxT1)) for _ in range(steps)]


@pytest.mark.parametrize("changes", STACKS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_every_way_of_running_the_stack_trains_the_same(changes):
    reference = reference_losses()
    got = losses(build(**changes), 20)
    assert reference[-1] < reference[0] - 0.5  # it learns, so equal curves mean something
    np.testing.assert_allclose(got, reference, rtol=2e-5)


def test_a_scanned_stack_holds_the_unrolled_weights_stacked_and_computes_the_same():
    scanned, unrolled = build(scan_layers=True), build()
    for name, w_N in nnx.to_flat_state(nnx.state(scanned.blocks, nnx.Param)):
        layers = [nnx.state(block, nnx.Param) for block in unrolled.blocks]
        want = [dict(nnx.to_flat_state(layer))[name][...] for layer in layers]
        np.testing.assert_array_equal(w_N[...], np.stack(want), err_msg=str(name))
        # the layer axis is replicated; the others keep their logical names
        assert w_N.get_metadata()["out_sharding"][0] is None
    tokens_BxL = jnp.asarray(np.random.default_rng(5).integers(0, 61, (2, 24)), jnp.int32)
    np.testing.assert_allclose(logits(scanned, tokens_BxL[:1]), logits(unrolled, tokens_BxL[:1]),
                               rtol=1e-5, atol=1e-6)
    # the KV-cache path runs the stacked layers one by one
    h_scanned, _ = scanned.prefill(tokens_BxL, 32)
    h_unrolled, _ = unrolled.prefill(tokens_BxL, 32)
    np.testing.assert_allclose(h_scanned, h_unrolled, rtol=1e-5, atol=1e-6)


def compile_ops(num_layers: int, scan: bool) -> int:
    """Instructions in the optimised HLO of a training gradient: a proxy of compile work."""
    model = build(num_layers=num_layers, scan_layers=scan)
    graphdef, state = nnx.split(model)
    tokens_BxT1 = jnp.zeros((2, 17), jnp.int32)

    def loss(state):
        m = nnx.merge(graphdef, state)
        return m.token_nll(tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]).mean()
    text = jax.jit(jax.grad(loss)).lower(state).compile().as_text()
    return sum(1 for line in text.splitlines() if " = " in line)


def test_a_scanned_stack_compiles_one_block_whatever_the_depth():
    scanned = compile_ops(8, True) / compile_ops(2, True)
    unrolled = compile_ops(8, False) / compile_ops(2, False)
    assert scanned < 1.5 < unrolled, (scanned, unrolled)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN runs there")
def test_a_kernel_this_machine_cannot_run_is_refused_before_any_data(tmp_path):
    from pathlib import Path

    from gemini_core.errors import UserError
    from gemini_core.experiment import load_experiment
    from gemini_core.train import trainer

    quickstart = Path(__file__).resolve().parents[1] / "experiments/quickstart.py"
    cfg = load_experiment(str(quickstart), [f"--config.data.root={tmp_path / 'corpus'}",
                                            "--config.model.attention=cudnn"]).config
    with pytest.raises(UserError, match="model.attention: 'cudnn' runs only on a GPU"):
        trainer.prepare(cfg, tmp_path / "runs")
    assert not (tmp_path / "runs").exists()
