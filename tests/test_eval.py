"""Held-out loss and bits per byte against numbers worked out independently of the code under
test: an eval set whose windows and byte counts are written out by hand, and models whose
next-token NLL is known in closed form (uniform logits) or computed with numpy from weights
we set (a bigram model) or from the model's own logits."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemini_core.config import ModelConfig, OptimizerConfig
from gemini_core.errors import UserError
from gemini_core.eval.domain_loss import EvalSet, evaluate
from gemini_core.train import step_fns

V = 11
MODEL = ModelConfig(d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=32,
                    vocab_size=V, tie_embeddings=False)
OPT = OptimizerConfig(lr=1e-2, warmup_steps=0, schedule="constant")
# UTF-8 bytes per token id: token 0 is EOS (no text), the others 1-4 bytes (t % 4 + 1)
BYTES_V = np.array([0, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3], np.int32)
SEQ_LEN = 3
# "a" gives 4 full windows of SEQ_LEN + 1 = 4 tokens (5 fit; batches * batch_size = 4 are taken);
# "b" only one (its 6 tokens hold one window, the rest is dropped)
VALID = {"a": np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6]),
         "b": np.array([0, 10, 10, 2, 7, 7])}
WINDOWS = {"a": [[3, 1, 4, 1], [5, 9, 2, 6], [5, 3, 5, 8], [9, 7, 9, 3]],
           "b": [[0, 10, 10, 2]]}
# bytes of the predicted tokens (each window's first token is context only):
# a: [1,4,1] 2+1+2, [9,2,6] 2+3+3, [3,5,8] 4+2+1, [7,9,3] 4+2+4 = 5+8+7+10; b: [10,10,2] 3+3+3
TARGET_BYTES = {"a": 30, "b": 9}
TARGETS = {"a": 12, "b": 3}


@pytest.fixture(scope="module")
def evalset() -> EvalSet:
    return EvalSet.build(VALID, BYTES_V, seq_len=SEQ_LEN, batch_size=2, batches=2)


@pytest.fixture(scope="module")
def model_state():
    graphdef, state = step_fns.init_state(MODEL, OPT, total_steps=10, seed=0)
    return graphdef, state, step_fns.make_eval_step(graphdef)


def with_params(graphdef, state, **set_to):
    """A copy of `state` with the named model parameters (attribute paths) replaced."""
    ts = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    for path, value in set_to.items():
        *parents, leaf = path.split(".")
        obj = ts.model
        for name in parents:
            obj = obj[int(name)] if name.isdigit() else getattr(obj, name)
        getattr(obj, leaf)[...] = jnp.asarray(value, jnp.float32)
    return nnx.state(ts)


def expected_metrics(nll_sum: dict[str, float]) -> dict[str, float]:
    out = {}
    for d, nll in nll_sum.items():
        out[f"eval/{d}/loss"] = nll / TARGETS[d]
        out[f"eval/{d}/bpb"] = nll / math.log(2) / TARGET_BYTES[d]
    out["eval/mean/loss"] = (out["eval/a/loss"] + out["eval/b/loss"]) / 2
    out["eval/mean/bpb"] = (out["eval/a/bpb"] + out["eval/b/bpb"]) / 2
    return out


def assert_metrics(got: dict, want: dict, rtol: float) -> None:
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=rtol), (key, got[key], want[key])


def test_evalset_windows_and_bytes_by_hand(evalset):
    for d, rows in WINDOWS.items():
        np.testing.assert_array_equal(evalset.windows[d], np.array(rows, np.int32), err_msg=d)
        assert evalset.windows[d].dtype == np.int32
    assert dict(evalset.target_bytes) == TARGET_BYTES
    assert evalset.tokens == TARGETS["a"] + TARGETS["b"]


def test_a_domain_shorter_than_one_window_is_a_user_error():
    with pytest.raises(UserError, match=r"domain 'c' has 3 valid tokens, fewer than one "
                                        r"evaluation window of seq_len\+1=4"):
        EvalSet.build({"a": VALID["a"], "c": np.array([1, 2, 3])}, BYTES_V, seq_len=SEQ_LEN,
                      batch_size=2, batches=2)


@pytest.mark.parametrize("batch_size", [1, 3])  # 3: a short last batch
def test_uniform_logits_give_ln_v_per_token_and_log2_v_bits_per_token(model_state, evalset,
                                                                      batch_size):
    # a zero embedding makes every hidden state, hence every logit, exactly 0: the uniform
    # distribution, NLL = ln V per target, bpb = targets * log2(V) / bytes
    graphdef, state, eval_fn = model_state
    uniform = with_params(graphdef, state, embed_VxD=np.zeros((V, MODEL.d_model)))
    got = evaluate(eval_fn, uniform, evalset, batch_size)
    want = expected_metrics({d: TARGETS[d] * math.log(V) for d in TARGETS})
    assert_metrics(got, want, rtol=1e-6)
    assert got["eval/a/bpb"] == pytest.approx(12 * math.log2(11) / 30, rel=1e-6)  # 1.3838


def test_bigram_model_with_known_weights(model_state, evalset):
    # attention and MLP outputs zeroed: each block is the identity, so the logits of token t are
    # RMSNorm(E[t] * sqrt(D)) @ W and the NLL of (t -> u) follows from E and W alone (numpy, f64)
    graphdef, state, eval_fn = model_state
    rng = np.random.default_rng(0)
    D, F, H, K = MODEL.d_model, MODEL.ffw_dim, MODEL.num_heads, MODEL.qk_dim
    E_VxD, W_DxV = rng.normal(size=(V, D)), 2.0 * rng.normal(size=(D, V))
    bigram = with_params(graphdef, state, embed_VxD=E_VxD, head_DxV=W_DxV,
                         **{"blocks.0.attn.wo_HxKxD": np.zeros((H, K, D)),
                            "blocks.0.mlp.down_FxD": np.zeros((F, D))})
    x_VxD = E_VxD * math.sqrt(D)
    h_VxD = x_VxD / np.sqrt(np.mean(x_VxD ** 2, axis=-1, keepdims=True) + MODEL.norm_eps)
    logits_VxV = h_VxD @ W_DxV
    logp_VxV = logits_VxV - np.log(np.exp(logits_VxV).sum(-1, keepdims=True))
    nll = {d: float(-sum(logp_VxV[t, u] for row in rows for t, u in zip(row[:-1], row[1:])))
           for d, rows in WINDOWS.items()}
    assert nll["a"] / TARGETS["a"] > math.log(V) + 0.5  # far from uniform: the weights matter
    assert_metrics(evaluate(eval_fn, bigram, evalset, batch_size=3), expected_metrics(nll),
                   rtol=1e-5)


def test_random_model_nll_from_its_own_logits(model_state, evalset):
    # every parameter scaled up from its std-0.02 init: a context-dependent, far from uniform
    # model; the expected NLL from its full logits with a float64 log-softmax, target = next token
    graphdef, state, eval_fn = model_state
    state = jax.tree.map(jnp.copy, state)
    state["model"] = jax.tree.map(lambda x: 25 * x, state["model"])
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s).model(t))
    nll = {}
    for d, w_NxT1 in evalset.windows.items():
        logits_NxTxV = np.asarray(forward(state, jnp.asarray(w_NxT1[:, :-1])), np.float64)
        logp = logits_NxTxV - np.log(np.exp(logits_NxTxV).sum(-1, keepdims=True))
        nll[d] = float(-np.take_along_axis(logp, w_NxT1[:, 1:, None], -1).sum())
    assert abs(nll["a"] / TARGETS["a"] - math.log(V)) > 0.5  # the logits are far from uniform
    assert_metrics(evaluate(eval_fn, state, evalset, batch_size=3), expected_metrics(nll),
                   rtol=1e-5)
