"""Context parallelism: the sequence split over a mesh axis (`config.mesh.context`).

Kernels with their queries as a later chunk of the keys (one device); then, on 8 CPU devices in a
worker process (`python tests/test_context_parallel.py OUT.json`), the loss and every gradient
of a split sequence against the unsplit model, and the per-device memory XLA plans for a step
as the sequence is split more ways. The whole training run under a split sequence is checked
against the one-device run in test_sharding.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# (kernel, query heads, kv heads, document mask, mesh preset, fsdp, context)
CASES = [("dense", 4, 1, False, "fsdp", 2, 4),
         ("blockwise", 4, 2, True, "fsdp", 1, 8),
         ("dense", 4, 2, True, "fsdp_tp", 2, 2)]
CONTEXTS = (1, 2, 4)


def _qkv(L, S, H, G, K=8, B=2, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, L, H, K), np.float32),
            rng.standard_normal((B, S, G, K), np.float32),
            rng.standard_normal((B, S, G, K), np.float32))


@pytest.mark.parametrize("kernel", ["dense", "blockwise"])
@pytest.mark.parametrize("segments", [False, True])
def test_a_later_chunk_of_queries_gives_those_rows_of_the_whole_attention(kernel, segments):
    from gemini_core.model import attention

    S, H, G = 96, 4, 2
    q, k, v = _qkv(S, S, H, G)
    seg = np.repeat(np.array([[0] * 30 + [1] * 50 + [2] * 16]), 2, axis=0).astype(np.int32)
    seg_args = (seg, seg) if segments else (None, None)
    whole = np.asarray(attention.dense_attention(q, k, v, *seg_args))
    run = attention.dense_attention if kernel == "dense" else attention.blockwise_attention
    extra = {} if kernel == "dense" else {"block_q": 16, "block_k": 16}
    for start, stop in ((0, 32), (32, 64), (64, 96), (40, 72)):
        seg_q = (seg[:, start:stop], seg) if segments else (None, None)
        part = run(q[:, start:stop], k, v, *seg_q, q_offset=start, **extra)
        np.testing.assert_allclose(np.asarray(part), whole[:, start:stop], atol=2e-6,
                                   err_msg=f"{kernel} rows {start}:{stop}")


def test_queries_past_the_keys_are_refused():
    from gemini_core.model import attention

    q, k, v = _qkv(32, 48, 2, 1)
    with pytest.raises(ValueError, match="q_offset=20 \\+ L=32 must be at most S=48"):
        attention.blockwise_attention(q, k, v, q_offset=20)
    with pytest.raises(ValueError, match="q_offset=20 \\+ L=32 must be at most S=48"):
        attention.dense_attention(q, k, v, q_offset=20)


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("context") / "out.json"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, __file__, str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


def test_a_split_sequence_gives_the_unsplit_loss_and_gradients(worker):
    for case in worker["cases"]:
        assert case["mesh"]["context"] == case["context"], case
        assert abs(case["loss"] - case["loss_one"]) <= 1e-5 * abs(case["loss_one"]), case
        # every parameter's gradient, largest absolute difference over its largest entry
        assert case["grad_rel"] <= 1e-5, case
        assert case["grad_max"] > 1e-4, case  # the gradients are not vanishing


def test_per_device_memory_falls_as_the_sequence_is_split(worker):
    temp = {int(n): b for n, b in worker["memory"].items()}
    assert sorted(temp) == list(CONTEXTS)
    for fewer, more in zip(CONTEXTS, CONTEXTS[1:]):
        assert temp[more] < temp[fewer], temp
    assert temp[4] < temp[1] / 3, temp  # the rest: the gathered keys and values, the state


def test_dry_run_counts_the_split_sequence():
    from gemini_core.experiment import load_experiment
    from gemini_core.scale import dry_run

    def activations(*overrides):
        cfg = load_experiment("experiments/quickstart.py", list(overrides)).config
        sizes = {a: getattr(cfg.mesh, a) for a in ("data", "fsdp", "context", "model")}
        rules = {k: tuple(a for a in v.split(",") if a) for k, v in cfg.mesh.rules.items()}
        return cfg, dry_run.activation_bytes(cfg, sizes, rules)

    # the same 8 ways split along the batch or along the sequence: the same activations but
    # the gathered keys and values (2·G·K per token of the device's whole rows)
    _, by_batch = activations("--config.mesh.data=8")
    cfg, by_length = activations("--config.mesh.data=1", "--config.mesh.context=8")
    m = cfg.model
    kv = cfg.train.batch_size * cfg.data.seq_len * 2 * m.num_kv_heads * m.qk_dim * 4
    assert by_length - by_batch == pytest.approx(m.num_layers * kv, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# the 8-device worker


def _loss_and_grads(model, tokens_BxT1):
    from flax import nnx

    def loss(m):
        return m.token_nll(tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]).mean()
    return nnx.value_and_grad(loss)(model)


def _split_step(model, layout, tokens_BxT1):
    """The jitted loss-and-gradients step under `layout`, and its arguments placed there."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)

    def step(state, tokens):
        return _loss_and_grads(nnx.merge(graphdef, state), tokens)

    placed = jax.device_put(state, layout.state_shardings(state))
    return jax.jit(step), (placed, jax.device_put(tokens_BxT1, layout.batch_sharding()))


def _case(kernel, H, G, doc_mask, preset, fsdp, context) -> dict:
    import jax
    from flax import nnx

    from gemini_core.config import MeshConfig, ModelConfig
    from gemini_core.data.tokenizer import EOS_ID
    from gemini_core.model.transformer import Transformer
    from gemini_core.scale import sharding

    cfg = ModelConfig(vocab_size=256, d_model=32, num_layers=2, num_heads=H, num_kv_heads=G,
                      mlp_dim=64, attention=kernel, document_mask=doc_mask)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    tokens_BxT1 = rng.integers(4, 256, (4, 129)).astype(np.int32)
    tokens_BxT1[:, [19, 70, 71, 100]] = EOS_ID  # documents across the chunks' edges
    loss_one, grads_one = jax.jit(_loss_and_grads)(model, tokens_BxT1)
    layout = sharding.Layout.from_config(MeshConfig(preset=preset, fsdp=fsdp, context=context))
    step, args = _split_step(model, layout, tokens_BxT1)
    with layout.activate():
        loss, grads = step(*args)
    pairs = list(zip(jax.tree.leaves(grads), jax.tree.leaves(grads_one)))
    grad_rel = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                   / float(np.max(np.abs(np.asarray(b)))) for a, b in pairs)
    return {"kernel": kernel, "context": context, "mesh": layout.sizes, "loss": float(loss),
            "loss_one": float(loss_one), "grad_rel": grad_rel,
            "grad_max": max(float(np.max(np.abs(np.asarray(b)))) for _, b in pairs)}


def _memory(context: int) -> int:
    """XLA's temporary bytes per device for a blockwise step at 4k tokens, the sequence split
    `context` ways over as many devices."""
    import jax
    from flax import nnx

    from gemini_core.config import MeshConfig, ModelConfig
    from gemini_core.model.transformer import Transformer
    from gemini_core.scale import sharding

    cfg = ModelConfig(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=1,
                      mlp_dim=128, attention="blockwise")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    layout = sharding.Layout.from_config(MeshConfig(preset="fsdp", fsdp=1, context=context),
                                         devices=jax.devices()[:context])
    step, args = _split_step(model, layout, np.ones((1, 4097), np.int32))
    with layout.activate():
        compiled = step.lower(*args).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def _worker(out: str) -> None:
    import jax
    assert jax.device_count() == 8, jax.devices()
    result = {"cases": [_case(*case) for case in CASES],
              "memory": {n: _memory(n) for n in CONTEXTS}}
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    _worker(sys.argv[1])
