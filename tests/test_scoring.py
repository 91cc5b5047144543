"""Log-likelihood scoring against the model's own token NLL on token sequences built by hand,
with a real tokenizer trained on the real corpus and real ARC-Easy questions: the continuation's
tokens (found here from token byte lengths, not from the offsets the code uses), left
truncation, windows for long continuations, lm-eval's rolling windows (re-implemented here from
its definition), greedy flags, and batching/padding/bucketing/sharding changing nothing."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemini_core.config import DEFAULT_DOMAINS, DataConfig, MeshConfig, ModelConfig, TokenizerConfig
from gemini_core.data.tokenizer import Tokenizer, document_ids, train_or_load_tokenizer
from gemini_core.errors import UserError
from gemini_core.eval import scoring
from gemini_core.model.transformer import Transformer
from gemini_core.scale.sharding import Layout

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SEQ_LEN = 32  # short, so real questions overflow it and several buckets fill
RTOL = 1e-5


def real_tokenizer(corpus_root: Path, cache: Path) -> Tokenizer:
    cfg = DataConfig(root=str(corpus_root), seq_len=64,
                     tokenizer=TokenizerConfig(vocab_size=512, sample_chars=300_000))
    weights = {d: 1 / len(DEFAULT_DOMAINS) for d in DEFAULT_DOMAINS}
    return train_or_load_tokenizer(cfg, weights, cache, log=lambda _: None)


def tiny_model(vocab: int) -> Transformer:
    cfg = ModelConfig(d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, mlp_dim=64,
                      vocab_size=vocab)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    # weights from numpy: JAX's initializers compile a program per parameter shape (~8 s on
    # 2 cores, in each process); norm scales near 1, the rest with std 0.1
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda x: jnp.asarray(
        (x.ndim == 1) + 0.1 * rng.standard_normal(x.shape), jnp.float32), abstract)
    return nnx.merge(graphdef, state)


def arc_requests(limit: int) -> list[tuple[str, str]]:
    out = []
    with gzip.open(SHARED / "benchmarks" / "arc_easy" / "data.jsonl.gz", "rt") as f:
        for line, _ in zip(f, range(limit)):
            q = json.loads(line)["question"]
            out += [(f"Question: {q['stem']}\nAnswer:", f" {c['text']}") for c in q["choices"]]
    return out


EDGE_CASES = [
    ("", "Plants take in carbon dioxide."),  # no context: predicted from EOS alone
    ("Answer: ", "Paris"),  # the context's last space goes to the continuation's first piece
    ("The character is", " \u754c and more"),  # byte-fallback pieces right after the boundary
    ("\u4e16\u754c", "\u754c"),  # ... and on both sides of it
    ("Question: Which gas do plants take in?\nAnswer:",
     " one two three four five six seven eight nine ten eleven twelve"),  # several rows
]


@pytest.fixture(scope="module")
def tok(corpus_root, data_cache) -> Tokenizer:
    return real_tokenizer(corpus_root, data_cache)


@pytest.fixture(scope="module")
def model(tok) -> Transformer:
    return tiny_model(tok.vocab_size)


@pytest.fixture(scope="module")
def requests() -> list[tuple[str, str]]:
    return arc_requests(12) + EDGE_CASES


@pytest.fixture(scope="module")
def batched(model, tok, requests) -> list[scoring.LogLik]:
    return scoring.loglikelihood(model, tok, requests, seq_len=SEQ_LEN, batch_size=4)


# ---------------------------------------------------------------------------------------------
# references, computed without the code under test


def hand_split(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """[EOS] + the joint tokens, and the continuation's count, from token byte lengths: a token
    is the continuation's when it ends after the context's last byte or starts at or after it."""
    joint = tok.encode(context + continuation)
    bytes_V = tok.token_bytes()
    boundary, before = len(context.encode("utf-8")), 0
    for k, token in enumerate(joint):
        if before + bytes_V[token] > boundary or before >= boundary:
            return [tok.eos_id] + joint, len(joint) - k
        before += int(bytes_V[token])
    return [tok.eos_id] + joint, 0


@nnx.jit
def _padded_nll_and_logits(model: Transformer, window_1xT1: jax.Array):
    return (model.token_nll(window_1xT1[:, :-1], window_1xT1[:, 1:])[0],
            model(window_1xT1[:, :-1])[0])


def padded_window(ids: list[int]) -> tuple[jax.Array, int]:
    """The last seq_len+1 tokens of ids, right-padded to seq_len+1 (causal attention keeps the
    padding from them: one compiled shape), and how many are real."""
    window = ids[-(SEQ_LEN + 1):]
    return jnp.asarray([window + [0] * (SEQ_LEN + 1 - len(window))], jnp.int32), len(window)


def hand_nll(model: Transformer, ids: list[int], n: int) -> float:
    """The model's token_nll over the last seq_len+1 tokens of ids, summed over the last n."""
    window_1xT1, real = padded_window(ids)
    nll_T = np.asarray(_padded_nll_and_logits(model, window_1xT1)[0], np.float64)
    return float(nll_T[real - 1 - n: real - 1].sum())


def next_token(model: Transformer, ids: list[int]) -> int:
    """The model's argmax after ids (a full forward)."""
    window_1xT1, real = padded_window(ids + [0])
    return int(jnp.argmax(_padded_nll_and_logits(model, window_1xT1)[1][real - 2]))


def lm_eval_rolling_windows(tokens: list[int], prefix: int, max_seq_len: int):
    """lm-evaluation-harness's get_rolling_token_windows(context_len=1) + make_disjoint_window:
    (context tokens, predicted tokens) pairs."""
    pred_len, predicted = max_seq_len, 0
    first = min(max_seq_len, len(tokens))
    windows = [([prefix] + tokens[: first - 1], tokens[:first])]
    predicted += first
    while predicted < len(tokens):
        window_pred_len = min(len(tokens) - predicted, pred_len)
        end = predicted + window_pred_len
        windows.append((tokens[end - max_seq_len - 1: end - 1], tokens[end - window_pred_len: end]))
        predicted += window_pred_len
    return [(a[: len(a) - (len(b) - 1)], b) for a, b in windows]


def assert_same(got: list[scoring.LogLik], want: list[scoring.LogLik]) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g.tokens, g.bytes, g.greedy, g.truncated) == (w.tokens, w.bytes, w.greedy,
                                                              w.truncated), i
        assert g.nll == pytest.approx(w.nll, rel=RTOL), i


# ---------------------------------------------------------------------------------------------
# tokens


def test_offsets_cover_the_text_and_match_encode(tok, requests):
    for context, continuation in requests:
        text = context + continuation
        ids, starts, ends = tok.encode_with_offsets(text)
        assert ids == tok.encode(text)
        assert starts[0] == 0 and ends[-1] == len(text)
        assert all(s <= e for s, e in zip(starts, ends))
        assert "".join(text[s:e] for s, e in zip(starts, ends)) == text  # no gaps, no overlaps


def test_continuation_tokens_are_the_joint_encodings_last_ones(tok, requests):
    for context, continuation in requests:
        ids, n = scoring.continuation_split(tok, context, continuation)
        assert (ids, n) == hand_split(tok, context, continuation), (context, continuation)
        assert ids == document_ids(tok, context + continuation)


def test_a_leading_space_is_scored_as_training_sees_it(tok, model):
    context, continuation = "Question: What is the capital of France?\nAnswer:", " the"
    ids, n = scoring.continuation_split(tok, context, continuation)
    assert ids[1:] == tok.encode(context + continuation)
    assert [tok.piece(t) for t in ids[-n:]] == ["\u2581the"]  # one piece, space included
    # a context ending in the space: that piece straddles the boundary and is scored whole, so
    # both spellings score the same tokens; only the continuation's bytes differ
    spaced = scoring.loglikelihood(model, tok, [(context, " the"), (context + " ", "the")],
                                   seq_len=SEQ_LEN)
    assert spaced[0].tokens == spaced[1].tokens == 1
    assert spaced[0].nll == pytest.approx(spaced[1].nll, rel=RTOL)
    assert (spaced[0].bytes, spaced[1].bytes) == (4, 3)


def test_byte_fallback_characters_fall_wholly_on_one_side(tok):
    ids, n = scoring.continuation_split(tok, "\u4e16\u754c", "\u754c")
    assert n == 3 and tok.decode(ids[-n:]) == "\u754c"  # its three byte pieces
    assert tok.decode(ids[1:-n]) == "\u4e16\u754c"


# ---------------------------------------------------------------------------------------------
# scores


def test_loglikelihood_is_the_models_own_token_nll(model, tok, requests, batched):
    for (context, continuation), got in zip(requests, batched):
        ids, n = hand_split(tok, context, continuation)
        assert (got.tokens, got.bytes) == (n, len(continuation.encode("utf-8")))
        if n <= SEQ_LEN:  # one window: the last seq_len + 1 tokens
            assert got.nll == pytest.approx(hand_nll(model, ids, n), rel=RTOL), continuation
            assert got.truncated == max(0, len(ids) - SEQ_LEN - 1)
    assert sum(1 for r in batched if r.truncated) >= 5  # real questions overflow 32 tokens


def test_left_truncation_keeps_the_whole_continuation(model, tok, requests):
    context, continuation = requests[0][0] * 3, requests[0][1]  # far longer than the window
    lines = []
    got = scoring.loglikelihood(model, tok, [(context, continuation)], seq_len=SEQ_LEN,
                                log=lines.append)[0]
    ids, n = hand_split(tok, context, continuation)
    assert got.truncated == len(ids) - (SEQ_LEN + 1) > SEQ_LEN
    assert got.nll == pytest.approx(hand_nll(model, ids, n), rel=RTOL)
    assert len(lines) == 1 and "1 of 1 requests are longer" in lines[0], lines


def test_a_continuation_longer_than_the_window_takes_several_rows(model, tok):
    context, continuation = EDGE_CASES[-1]
    ids, n = hand_split(tok, context, continuation)
    assert n > SEQ_LEN
    lines = []
    got = scoring.loglikelihood(model, tok, [(context, continuation)], seq_len=SEQ_LEN,
                                log=lines.append)[0]
    assert len(lines) == 1 and "scored in several windows" in lines[0], lines
    # the module doc's windows: chunks of SEQ_LEN targets from the first, each predicted by the
    # SEQ_LEN + 1 tokens ending at its last target
    want, first = 0.0, len(ids) - n
    for start in range(first, len(ids), SEQ_LEN):
        end = min(start + SEQ_LEN, len(ids))
        want += hand_nll(model, ids[:end], end - start)
    assert got.tokens == n and got.nll == pytest.approx(want, rel=RTOL)
    assert got.truncated == first - 1  # the first chunk sees only the context's last token


def test_batching_padding_and_order_change_nothing(model, tok, requests, batched):
    one_by_one = [scoring.loglikelihood(model, tok, [r], seq_len=SEQ_LEN, batch_size=1)[0]
                  for r in requests]
    assert_same(batched, one_by_one)
    order = list(range(len(requests)))
    random.Random(0).shuffle(order)
    shuffled = scoring.loglikelihood(model, tok, [requests[i] for i in order], seq_len=SEQ_LEN,
                                     batch_size=4)
    assert_same(shuffled, [batched[i] for i in order])
    lengths = {len(r.ids) - 1 for r in (scoring.window_rows(
        *scoring.continuation_split(tok, *req), SEQ_LEN)[0] for req in requests)}
    assert min(lengths) <= 16 < max(lengths)  # both buckets of SEQ_LEN = 32 were used


def test_rolling_loglikelihood_is_lm_evals_windows(model, tok, corpus_root):
    with gzip.open(corpus_root / "wiki" / "valid.jsonl.gz", "rt") as f:
        text = json.loads(f.readline())["text"][:600]
    tokens = tok.encode(text)
    assert len(tokens) > 3 * SEQ_LEN
    want = 0.0
    for context, predicted in lm_eval_rolling_windows(tokens, tok.eos_id, SEQ_LEN):
        want += hand_nll(model, context + predicted, len(predicted))
    got, short = scoring.loglikelihood_rolling(model, tok, [text, "ab"], seq_len=SEQ_LEN,
                                               batch_size=2)
    assert (got.tokens, got.bytes) == (len(tokens), len(text.encode("utf-8")))
    assert got.nll == pytest.approx(want, rel=RTOL)
    assert short.tokens == len(tok.encode("ab"))
    assert short.nll == pytest.approx(hand_nll(model, document_ids(tok, "ab"),
                                               short.tokens), rel=RTOL)


def test_greedy_flag(model, tok):
    context = "Question: Which gas do plants take in?\nAnswer:"
    ids = document_ids(tok, context)
    for _ in range(5):  # the model's own argmax continuation, one full forward per token
        ids.append(next_token(model, ids))
    greedy_text = tok.decode(ids[-5:])
    assert scoring.continuation_split(tok, context, greedy_text) == (ids, 5)  # round trip
    other = next(t for t in range(4, tok.vocab_size) if t != ids[-1] and tok.token_bytes()[t])
    changed = greedy_text[:-1] + tok.decode([other])  # its last token no longer the argmax
    got = scoring.loglikelihood(model, tok, [(context, greedy_text), (context, changed)],
                                seq_len=SEQ_LEN)
    assert got[0].greedy and not got[1].greedy
    # greedy over several windows: every row of the request must agree
    rows = scoring.window_rows(ids, 5, 4)
    assert len(rows) == 2
    _, greedy_R = scoring.score_rows(model, rows, seq_len=4)
    assert greedy_R.all()


def test_an_empty_continuation_is_a_user_error(model, tok):
    with pytest.raises(UserError, match=r"scoring request 1: empty continuation"):
        scoring.loglikelihood(model, tok, [("a", " b"), ("Question: x", "")], seq_len=SEQ_LEN)


def test_eight_devices_give_the_same_scores(tok, requests, batched, data_cache, corpus_root):
    """Sharded over 8 CPU devices (fsdp_tp: the batch over fsdp=4, parameters over fsdp and
    model=2; batches padded to the 4 batch shards): the results the same."""
    env = {**os.environ, "XLA_FLAGS": " ".join(
        [f for f in os.environ.get("XLA_FLAGS", "").split()
         if not f.startswith("--xla_force_host_platform_device_count")]
        + ["--xla_force_host_platform_device_count=8"])}
    proc = subprocess.run([sys.executable, __file__, str(corpus_root), str(data_cache)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.splitlines()[-1])["fsdp_tp"]
    assert_same([scoring.LogLik(**r) for r in rows], batched)


def _worker(corpus_root: str, cache: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    tok = real_tokenizer(Path(corpus_root), Path(cache))
    requests = arc_requests(12) + EDGE_CASES
    layout = Layout.from_config(MeshConfig(preset="fsdp_tp"))
    assert layout.batch_shards == 4
    # few, large batches: sharded compiles are what this test pays for
    results = scoring.loglikelihood(tiny_model(tok.vocab_size), tok, requests, seq_len=SEQ_LEN,
                                    batch_size=64, layout=layout)
    print(json.dumps({"fsdp_tp": [dataclasses.asdict(r) for r in results]}))


if __name__ == "__main__":
    _worker(*sys.argv[1:3])
