"""Generation with a KV cache against the full forward: cached logits at every position (one
device, and 8 CPU devices under a (data, model) mesh in a child process: JAX fixes its device
count at start-up), greedy decoding against step-by-step argmax, seeded sampling inside the
top-k / nucleus of the full forward's distribution, and the text API (stop strings, EOS,
max_new_tokens, streaming, prompt truncation) with a real tokenizer trained on the corpus."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemini_core.config import DataConfig, ModelConfig, TokenizerConfig
from gemini_core.data.tokenizer import document_ids
from gemini_core.errors import UserError
from gemini_core.model.generate import Decoder, SamplingConfig, TextStream, bucket, generate
from gemini_core.model.transformer import Transformer

REPO = Path(__file__).resolve().parents[1]
# init_std 0.2: logits of order 1-5, so a relative tolerance means something and the sampling
# distributions are neither uniform nor one-hot
MQA = ModelConfig(d_model=32, num_layers=2, num_heads=4, num_kv_heads=1, mlp_dim=48,
                  vocab_size=61, init_std=0.2)
GQA = dataclasses.replace(MQA, num_kv_heads=2)
RTOL = 1e-5
REF_LEN = 64  # the reference forward runs right-padded to this length (one compile)


def build(cfg: ModelConfig = MQA, seed: int = 0) -> Transformer:
    """The architecture with numpy-drawn weights (norm scales 1): JAX's own initialiser costs
    seconds of XLA compilation per model on CPU, which these tests do not need."""
    graphdef, abstract = nnx.split(nnx.eval_shape(
        lambda: Transformer(cfg, rngs=nnx.Rngs(params=0))))
    rng = np.random.default_rng(seed)

    def draw(path, x):
        if "['scale']" in jax.tree_util.keystr(path):
            return jnp.ones(x.shape, x.dtype)
        return jnp.asarray(rng.normal(0.0, cfg.init_std, x.shape).astype(x.dtype))

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, abstract))


@functools.cache
def forward_of(graphdef: nnx.GraphDef):
    """model(tokens) jitted, one per architecture: compiled once for all the tests."""
    return jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))


class Reference:
    """The full forward of one unpadded sequence, by the training path (model(tokens))."""

    def __init__(self, model: Transformer):
        graphdef, self.state = nnx.split(model)
        self.forward = forward_of(graphdef)

    def logits(self, seq: list[int]) -> np.ndarray:
        """(len(seq), V): right padding changes nothing before it (causal)."""
        assert len(seq) <= REF_LEN
        padded = np.zeros((1, REF_LEN), np.int32)
        padded[0, :len(seq)] = seq
        return np.asarray(self.forward(self.state, jnp.asarray(padded)))[0, :len(seq)]


def sequences(n: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (n, length)).astype(np.int32)


def teacher_forced(decoder: Decoder, seqs_BxT: np.ndarray, prompt_B: np.ndarray
                   ) -> tuple[list[list[np.ndarray]], tuple]:
    """Each row's logits after its prompt (prefill), then after each further token of its
    sequence fed one at a time (decode steps), and the cache: row b's list starts at
    position prompt_B[b] - 1 and has T - max(prompt_B) + 1 entries."""
    B, T = seqs_BxT.shape
    P = bucket(int(prompt_B.max()), 16)
    tokens_BxP = np.zeros((B, P), np.int32)
    for b in range(B):
        tokens_BxP[b, :prompt_B[b]] = seqs_BxT[b, :prompt_B[b]]
    logits_BxV, cache = decoder.prefill(tokens_BxP, prompt_B, cache_len=bucket(max(T, P)))
    out = [[row] for row in np.asarray(logits_BxV)]
    for t in range(T - int(prompt_B.max())):
        pos_B = prompt_B + t
        logits_BxV, cache = decoder.decode_step(seqs_BxT[np.arange(B), pos_B], pos_B, cache)
        for b, row in enumerate(np.asarray(logits_BxV)):
            out[b].append(row)
    return out, cache


def assert_cached_equals_full(model: Transformer, decoder: Decoder, B: int = 4, T: int = 24):
    seqs_BxT = sequences(B, T, model.cfg.vocab_size)
    prompt_B = np.array([1, 4, 9, 7, 2, 12, 5, 3][:B], np.int32)  # position 0 onward, mixed
    got, cache = teacher_forced(decoder, seqs_BxT, prompt_B)
    ref = Reference(model)
    for b in range(B):
        want_TxV = ref.logits(list(seqs_BxT[b]))
        first = prompt_B[b] - 1
        for i, logits_V in enumerate(got[b]):
            want_V = want_TxV[first + i]
            np.testing.assert_allclose(logits_V, want_V, rtol=RTOL,
                                       atol=RTOL * np.abs(want_V).max(),
                                       err_msg=f"row {b} position {first + i}")
    return cache


@pytest.mark.parametrize("cfg", [MQA, GQA], ids=["mqa", "gqa"])
def test_cached_decode_equals_the_full_forward_at_every_position(cfg):
    model = build(cfg)
    cache = assert_cached_equals_full(model, Decoder(model))
    k_BxSxGxK, v_BxSxGxK = cache[0]
    # one slot per kv head: multi-query keeps a single head, H times smaller than the queries
    assert k_BxSxGxK.shape == v_BxSxGxK.shape == (4, 32, cfg.num_kv_heads, cfg.qk_dim)
    assert len(cache) == cfg.num_layers


def test_cached_decode_on_8_devices_under_a_data_model_mesh(tmp_path):
    out = tmp_path / "worker.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GX_", "JAX_COORDINATOR"))}
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=8"])
    proc = subprocess.run([sys.executable, __file__, str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    for name, case in result.items():
        assert case["devices"] == 8 and case["mesh"] == {"data": 4, "fsdp": 1, "context": 1, "model": 2}, case
        assert case["equal"] == "ok", (name, case["equal"])
        # the cache is split along the batch (data); kv heads over model only where they divide
        assert case["cache_spec"] == case["want_cache_spec"], (name, case)
        assert case["params_kept"], (name, case["param_specs"])
        assert case["query_heads_split"], case["param_specs"]  # the model really is split
    mqa = result["mqa"]
    assert mqa["greedy_sharded"] == mqa["greedy_argmax"] and len(mqa["greedy_sharded"]) == 8


def test_greedy_generation_equals_stepwise_argmax_of_the_full_forward():
    model = build()
    ref = Reference(model)
    prompts = [list(s[:n]) for s, n in zip(sequences(5, 20, MQA.vocab_size, seed=1),
                                           (3, 16, 1, 8, 11))]
    max_new = 12
    # batch_size 4: two batches, the second with three padding rows
    got = Decoder(model).generate_ids(prompts, SamplingConfig(max_new_tokens=max_new),
                                      batch_size=4)
    for i, prompt in enumerate(prompts):
        assert got[i].tokens == stepwise_argmax(ref, prompt, max_new), i
        assert got[i].finish_reason == "length"


def stepwise_argmax(ref: Reference, prompt: list[int], n: int) -> list[int]:
    """n tokens, each the argmax of the full forward over the prompt and the tokens so far."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.argmax(ref.logits(seq)[-1])))
    return seq[len(prompt):]


def allowed(logits_V: np.ndarray, temperature: float, top_k: int, top_p: float,
            tol: float = 1e-5) -> np.ndarray:
    """Which tokens top-k then top-p (over the top-k renormalised at this temperature) may
    draw, with a tolerance for the cached and full forwards' rounding at the boundary."""
    z_V = logits_V / temperature
    k = top_k or len(z_V)
    rank_V = np.array([(z_V > z + tol).sum() for z in z_V])  # strictly better tokens
    in_k_V = rank_V < k
    p_V = np.where(in_k_V, np.exp(z_V - z_V.max()), 0.0)
    p_V /= p_V.sum()
    before_V = np.array([p_V[z_V > z + tol].sum() for z in z_V])
    return in_k_V & (before_V < top_p + tol)


@pytest.mark.parametrize("top_k, top_p", [(4, 1.0), (0, 0.6), (8, 0.5)])
def test_seeded_sampling_reproduces_and_stays_in_the_top_k_and_nucleus(top_k, top_p):
    model = build()
    ref = Reference(model)
    decoder = Decoder(model)
    prompts = [list(s[:n]) for s, n in zip(sequences(4, 16, MQA.vocab_size, seed=2),
                                           (2, 9, 5, 14))]
    sampling = SamplingConfig(max_new_tokens=16, temperature=1.5, top_k=top_k, top_p=top_p,
                              seed=7)
    first = [r.tokens for r in decoder.generate_ids(prompts, sampling)]
    assert [r.tokens for r in decoder.generate_ids(prompts, sampling)] == first
    other = dataclasses.replace(sampling, seed=8)
    assert [r.tokens for r in decoder.generate_ids(prompts, other)] != first
    unfiltered = dataclasses.replace(sampling, top_k=0, top_p=1.0)
    outside = inside_not_argmax = 0
    for sample_of in (first, [r.tokens for r in decoder.generate_ids(prompts, unfiltered)]):
        filtered = sample_of is first
        for prompt, tokens in zip(prompts, sample_of):
            logits_TxV = ref.logits(prompt + tokens)
            for t, token in enumerate(tokens):
                logits_V = logits_TxV[len(prompt) - 1 + t]
                ok = allowed(logits_V, sampling.temperature, top_k, top_p)[token]
                if filtered:
                    assert ok, (prompt, t, token)
                    inside_not_argmax += token != int(np.argmax(logits_V))
                else:
                    outside += not ok
    # the check can fail: unfiltered draws do leave the set; and the filtered ones are not
    # simply greedy
    assert outside > 0 and inside_not_argmax > 0, (outside, inside_not_argmax)


def test_draws_follow_the_distribution_the_filters_leave():
    """Frequencies of 4,000 draws (one per step key) against the probabilities: the full
    distribution (with a token of probability 0), its top 2, its 0.7-nucleus."""
    from gemini_core.model.generate import MODES, prompt_keys, sample
    p_V = np.array([0.5, 0.0, 0.2, 0.25, 0.05])
    logits_1xV = jnp.log(jnp.asarray(p_V, jnp.float32))[None]
    keys_1x2 = jnp.asarray(prompt_keys(5, [3]))
    n = 4000
    draw = jax.jit(lambda mode, top_k, top_p: jax.vmap(lambda step: sample(
        logits_1xV, keys_1x2, step, mode, jnp.float32(1.0), top_k, top_p)[0])(jnp.arange(n)))
    for mode, top_k, top_p, want_V in [
            ("sample", 0, 1.0, p_V),
            ("filtered", 2, 1.0, np.array([2, 0, 0, 1, 0]) / 3),  # 0.5 and 0.25, renormalised
            ("filtered", 0, 0.7, np.array([2, 0, 0, 1, 0]) / 3),  # 0.5 + 0.25 reach 0.7
            ("filtered", 0, 0.4, np.array([1, 0, 0, 0, 0]))]:
        tokens = np.asarray(draw(jnp.int32(MODES.index(mode)), jnp.int32(top_k),
                                 jnp.float32(top_p)))
        freq_V = np.bincount(tokens, minlength=5) / n
        sigma_V = np.sqrt(want_V * (1 - want_V) / n)
        assert (np.abs(freq_V - want_V) <= 5 * sigma_V + 1e-12).all(), (mode, top_k, top_p, freq_V)


def test_eos_ends_a_row_without_being_kept():
    model = build()
    decoder = Decoder(model)
    prompts = [[5, 6, 7], [9], [3, 3], [8]]
    greedy = SamplingConfig(max_new_tokens=16)
    free = decoder.generate_ids(prompts, greedy)
    eos = free[0].tokens[3]
    ended = decoder.generate_ids(prompts, greedy, eos_id=eos)
    cut = free[0].tokens.index(eos)
    assert ended[0].tokens == free[0].tokens[:cut] and ended[0].finish_reason == "eos"
    other = free[1].tokens
    if eos in other:  # the other row ends at its own first eos, or runs to the limit
        assert ended[1].tokens == other[:other.index(eos)] and ended[1].finish_reason == "eos"
    else:
        assert ended[1].tokens == other and ended[1].finish_reason == "length"


def test_a_second_batch_within_the_same_buckets_compiles_nothing():
    compiles = []

    def listener(event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    decoder = Decoder(build(dataclasses.replace(MQA, num_layers=1)))
    sampling = SamplingConfig(max_new_tokens=5, temperature=1.0, top_k=3)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        decoder.generate_ids([[1] * n for n in (3, 9, 14, 6)], sampling, batch_size=4)
        first = len(compiles)
        decoder.generate_ids([[2] * n for n in (12, 1, 7, 16)], sampling, batch_size=4)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert first >= 2 and len(compiles) == first, (first, len(compiles))


def test_sampling_config_errors_name_the_field():
    for bad, message in [({"top_p": 0.0}, "sampling.top_p=0.0: must be in (0, 1]"),
                         ({"temperature": -1.0}, "sampling.temperature=-1.0: must be >= 0"),
                         ({"max_new_tokens": 0}, "sampling.max_new_tokens=0: must be >= 1"),
                         ({"top_k": -2}, "sampling.top_k=-2: must be >= 0"),
                         ({"stop": ("",)}, "sampling.stop=('',): must be non-empty strings")]:
        with pytest.raises(UserError) as e:
            SamplingConfig(**bad).validate()
        assert str(e.value).startswith(message), (str(e.value), message)


# ---------------------------------------------------------------------------------------------
# the text API, with a real tokenizer


@pytest.fixture(scope="module")
def tokenizer(corpus_root, data_cache):
    from gemini_core.data.tokenizer import train_or_load_tokenizer
    data = DataConfig(root=str(corpus_root), seq_len=64, domains=("wiki", "web"),
                      tokenizer=TokenizerConfig(vocab_size=384, sample_chars=200_000))
    return train_or_load_tokenizer(data, {"wiki": 0.5, "web": 0.5}, data_cache,
                                   log=lambda _: None)


@pytest.fixture(scope="module")
def text_model(tokenizer):
    return build(dataclasses.replace(MQA, vocab_size=tokenizer.vocab_size, init_std=0.1))


# one prompt over 32 tokens: the text tests share one program shape (batch 4, prompt 64,
# cache 64), compiled once
PROMPTS = ("The history of", "def add(a, b):\n", "Question: what is 2 + 3?\nAnswer:",
           "The river flows past the old mill and the church to the sea.")


def test_prompts_are_document_starts(tokenizer):
    assert document_ids(tokenizer, "The cat") == [tokenizer.eos_id] + tokenizer.encode("The cat")


def test_stop_strings_max_tokens_and_streaming(tokenizer, text_model):
    sampling = SamplingConfig(max_new_tokens=24, temperature=1.0, seed=0)  # no EOS drawn
    full = generate(text_model, tokenizer, PROMPTS, sampling)
    for prompt, c in zip(PROMPTS, full):
        assert c.finish_reason == "length" and len(c.tokens) == 24
        assert c.text == tokenizer.decode(list(c.tokens))
        assert c.prompt_tokens == len(document_ids(tokenizer, prompt)) and c.truncated == 0
    # a stop string taken from the middle of each completion, and one that never occurs
    stops = []
    for c in full:
        clean = [i for i in range(4, len(c.text) - 2) if "\ufffd" not in c.text[i:i + 2]]
        assert clean, c.text
        stops.append(c.text[clean[0]:clean[0] + 2])
    streamed: dict[int, list[str]] = {}
    got = generate(text_model, tokenizer, PROMPTS,
                   dataclasses.replace(sampling, stop=(*stops, "\x00never")),
                   on_text=lambda i, piece: streamed.setdefault(i, []).append(piece))
    for i, (c, f) in enumerate(zip(got, full)):
        cut = min(f.text.find(s) for s in stops if s in f.text)
        assert c.text == f.text[:cut] and c.finish_reason == "stop", (c, f.text)
        assert f.tokens[:len(c.tokens)] == c.tokens  # the same draws up to the stop
        assert any(s in tokenizer.decode(list(c.tokens)) for s in stops)  # the stop's tokens
        assert "".join(streamed.get(i, [])) == c.text
    # without stop strings the streamed pieces are the whole text too, piece by piece
    streamed.clear()
    again = generate(text_model, tokenizer, PROMPTS, sampling,
                     on_text=lambda i, piece: streamed.setdefault(i, []).append(piece))
    assert [c.text for c in again] == [c.text for c in full]
    assert all("".join(streamed[i]) == c.text for i, c in enumerate(full))
    assert max(len(v) for v in streamed.values()) > 3  # streamed, not one piece at the end


def test_text_stream_holds_back_partial_stop_strings_and_characters(tokenizer):
    pieces: list[str] = []
    stream = TextStream(tokenizer, stop=("\n\nQ",), emit=pieces.append)
    ids = tokenizer.encode("A €5 fee\n\nQ: next")
    stopped_at = next(i for i, token in enumerate(ids) if stream.push(token))
    assert stream.finish() == "A €5 fee"
    assert "".join(pieces) == "A €5 fee" and "\ufffd" not in "".join(pieces)
    assert tokenizer.decode(ids[:stopped_at + 1]).endswith("\n\nQ")


def test_eos_at_the_text_level(tokenizer, text_model):
    """A model whose every next token is EOS: the blocks silenced, so the last hidden state is
    the input's embedding normalised; every embedding is (1, 0, ..., 0) but EOS's (2, 0, ...),
    so EOS has the largest logit (tied head) after any token."""
    model = build(text_model.cfg)  # the text model's architecture: its compiled programs
    for block in model.blocks:
        block.attn.wo_HxKxD[...] = jnp.zeros_like(block.attn.wo_HxKxD[...])
        block.mlp.down_FxD[...] = jnp.zeros_like(block.mlp.down_FxD[...])
    embed_VxD = jnp.zeros_like(model.embed_VxD[...]).at[:, 0].set(1.0)
    model.embed_VxD[...] = embed_VxD.at[tokenizer.eos_id, 0].set(2.0)
    got = generate(model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=5))
    assert [(c.text, c.tokens, c.finish_reason) for c in got] == [("", (), "eos")] * 4


def test_long_prompts_are_left_truncated_with_a_warning(tokenizer, text_model):
    long = "word " * 80
    said: list[str] = []
    got = generate(text_model, tokenizer, [long, *PROMPTS[:3]], SamplingConfig(max_new_tokens=8),
                   max_len=48, log=said.append)
    n = len(document_ids(tokenizer, long))
    assert got[0].truncated == n - 40 and got[0].prompt_tokens == 40, got[0]
    assert [c.truncated for c in got[1:]] == [0, 0, 0]
    assert len(said) == 1 and said[0].startswith("warning: prompt 0 has") and \
        f"its first {n - 40} tokens are dropped" in said[0], said
    # the truncated prompt generates as its last 40 ids would
    ids = [document_ids(tokenizer, long)[-40:],
           *(document_ids(tokenizer, p) for p in PROMPTS[:3])]
    alone = Decoder(text_model).generate_ids(ids, SamplingConfig(max_new_tokens=8),
                                             eos_id=tokenizer.eos_id)
    assert tuple(alone[0].tokens) == got[0].tokens
    with pytest.raises(UserError, match=r"sampling.max_new_tokens=48: leaves no room for a "
                                        r"prompt in the model's context of 48 tokens"):
        generate(text_model, tokenizer, ["x"], SamplingConfig(max_new_tokens=48), max_len=48)


# ---------------------------------------------------------------------------------------------
# the 8-device worker: `python tests/test_generate.py out.json`


def _spec(x) -> list:
    spec = [list(e) if isinstance(e, tuple) else e for e in x.sharding.spec]
    return spec + [None] * (x.ndim - len(spec))  # PartitionSpec leaves trailing Nones out


def _worker(out_path: str) -> None:
    from gemini_core.config import MeshConfig
    from gemini_core.scale.sharding import Layout

    assert jax.device_count() == 8, jax.devices()
    layout = Layout.from_config(MeshConfig(preset="fsdp_tp", data=4, fsdp=1, model=2))
    results = {}
    # one layer: the layers are alike, and each costs compile time on 8 CPU devices
    for name, cfg in (("mqa", MQA), ("gqa", GQA)):
        cfg = dataclasses.replace(cfg, num_layers=1)
        model = build(cfg)
        graphdef, state = nnx.split(model)
        placed = jax.device_put(state, layout.state_shardings(state))
        specs = {jax.tree_util.keystr(k): _spec(v)
                 for k, v in jax.tree_util.tree_flatten_with_path(placed)[0]}
        sharded = nnx.merge(graphdef, placed)
        decoder = Decoder(sharded, layout)
        try:
            cache = assert_cached_equals_full(model, decoder, B=8)
            equal = "ok"
        except AssertionError as e:
            cache, equal = None, str(e)[-2000:]
        after = {jax.tree_util.keystr(k): _spec(v)
                 for k, v in jax.tree_util.tree_flatten_with_path(nnx.split(sharded)[1])[0]}
        prompts = [list(s[:n]) for s, n in zip(sequences(8, 12, cfg.vocab_size, seed=4),
                                               (3, 12, 1, 7, 5, 9, 2, 11))]
        greedy = SamplingConfig(max_new_tokens=6)
        if name == "gqa":  # generation's programs are the same for both: once is enough
            greedy_sharded = greedy_argmax = None
        else:
            greedy_sharded = [r.tokens for r in decoder.generate_ids(prompts, greedy)]
            greedy_argmax = [stepwise_argmax(Reference(model), p, 6) for p in prompts]
        results[name] = {
            "devices": layout.mesh.size, "mesh": layout.sizes, "equal": equal,
            "cache_spec": None if cache is None else _spec(cache[0][0]),
            "want_cache_spec": ["data", None, "model" if cfg.num_kv_heads % 2 == 0 else None,
                                None],
            "param_specs": specs, "params_kept": after == specs,
            "query_heads_split": any("wq_DxHxK" in k and v[1] == "model"
                                     for k, v in specs.items()),
            "greedy_sharded": greedy_sharded, "greedy_argmax": greedy_argmax}
    Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    _worker(sys.argv[1])
