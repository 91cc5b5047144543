"""Decoding with the KV cache vs recomputing the full forward for each new token.

The quickstart model's architecture (d_model 128, 4 layers, 4 query heads, 1 kv head, mlp 512,
vocab 4096, tied head; random weights: speed does not depend on them), batch 8, prompts of 256
tokens, 256 new tokens, greedy.

- cached: `Decoder.generate_ids`, the path `generate` takes: one prefill, then a jitted decode
  step per token over the preallocated cache, a jitted sampler, and the host reading each
  step's tokens (as it must, for stop strings and EOS). Timed end to end (prefill included),
  and once more with temperature 0.7 / top-p 0.95 sampling.
- recompute: no cache. Each new token runs the whole model over the sequence so far (prompt
  and the tokens generated), right-padded to a multiple of 64 so that 4 compiled shapes serve
  the 256 steps, logits only at the last position, argmax, and the token written on device (no
  host round trip: the baseline gets every advantage).

Every program is compiled before timing. Tokens/s counts new tokens (8 x 256 per generation).

usage: python bench/generate.py [--rounds 3] [--recompute-rounds 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import machine
import numpy as np
from flax import nnx

from gemini_core.config import ModelConfig
from gemini_core.model.generate import Decoder, SamplingConfig
from gemini_core.model.transformer import Transformer
from gemini_core.train import step_fns

QUICKSTART = ModelConfig(d_model=128, num_layers=4, num_heads=4, num_kv_heads=1, mlp_dim=512,
                         tie_embeddings=True, vocab_size=4096)
BATCH, PROMPT, NEW = 8, 256, 256
RECOMPUTE_PAD = 64  # the recompute baseline's length buckets
TARGET_SPEEDUP = 10.0


def build(cfg: ModelConfig) -> Transformer:
    def init():
        return nnx.split(Transformer(cfg, rngs=nnx.Rngs(params=0)))
    graphdef, _ = nnx.eval_shape(init)
    return nnx.merge(graphdef, jax.jit(lambda: init()[1])())


def prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [[1] + list(rng.integers(4, vocab, PROMPT - 1)) for _ in range(BATCH)]


def time_cached(decoder: Decoder, ids: list[list[int]], sampling: SamplingConfig,
                rounds: int) -> tuple[float, list[list[int]]]:
    rows = decoder.generate_ids(ids, sampling, batch_size=BATCH)  # compiles
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        rows = decoder.generate_ids(ids, sampling, batch_size=BATCH)
        times.append(time.perf_counter() - start)
    assert all(len(r.tokens) == NEW for r in rows)
    return statistics.median(times), [r.tokens for r in rows]


def recompute_step(model: Transformer):
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, tokens_BxL, pos):
        """The next token after position pos - 1 of every row, written at pos."""
        m = nnx.merge(graphdef, state)
        B, L = tokens_BxL.shape
        h_BxLxD = m.hidden(tokens_BxL).reshape(B, L, -1)
        next_B = jnp.argmax(m.logits(h_BxLxD[:, pos - 1]), axis=-1).astype(jnp.int32)
        return next_B

    return state, step


def time_recompute(model: Transformer, ids: list[list[int]],
                   rounds: int) -> tuple[float, list[list[int]]]:
    state, step = recompute_step(model)
    total = PROMPT + NEW
    buffer_BxT = np.zeros((BATCH, total), np.int32)
    buffer_BxT[:, :PROMPT] = np.asarray(ids)

    def run() -> jax.Array:
        tokens_BxT = jnp.asarray(buffer_BxT)
        for t in range(NEW):
            pos = PROMPT + t
            L = -(-pos // RECOMPUTE_PAD) * RECOMPUTE_PAD
            next_B = step(state, tokens_BxT[:, :L], jnp.int32(pos))
            tokens_BxT = tokens_BxT.at[:, pos].set(next_B)
        return jax.block_until_ready(tokens_BxT)

    for L in range(PROMPT, total + 1, RECOMPUTE_PAD):  # compile each shape before timing
        step(state, jnp.zeros((BATCH, L), jnp.int32), jnp.int32(L - 1)).block_until_ready()
    times, out = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), np.asarray(out)[:, PROMPT:].tolist()


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="timed generations with the cache")
    p.add_argument("--recompute-rounds", type=int, default=1,
                   help="timed generations without (each takes about a minute on 2 cores)")
    return p.parse_args()


def main() -> int:
    args = parse()
    step_fns.tune_host_malloc()  # as the trainer does, before JAX's first computation
    print(f"machine: {machine.describe()}")
    print(f"model: quickstart dims ({QUICKSTART.d_model} wide, {QUICKSTART.num_layers} layers, "
          f"{QUICKSTART.num_heads} heads / {QUICKSTART.num_kv_heads} kv head, mlp "
          f"{QUICKSTART.mlp_dim}, vocab {QUICKSTART.vocab_size}), random weights; batch "
          f"{BATCH}, prompt {PROMPT} + {NEW} new tokens")
    model = build(QUICKSTART)
    ids = prompts(QUICKSTART.vocab_size)
    decoder = Decoder(model)
    new_tokens = BATCH * NEW
    greedy = SamplingConfig(max_new_tokens=NEW)
    cached_s, cached_out = time_cached(decoder, ids, greedy, args.rounds)
    sampled_s, _ = time_cached(decoder, ids, SamplingConfig(max_new_tokens=NEW, temperature=0.7,
                                                            top_p=0.95), args.rounds)
    start = time.perf_counter()
    logits_BxV, _ = decoder.prefill(np.asarray(ids, np.int32), np.full(BATCH, PROMPT),
                                    cache_len=PROMPT + NEW)
    jax.block_until_ready(logits_BxV)
    prefill_s = time.perf_counter() - start
    recompute_s, recompute_out = time_recompute(model, ids, args.recompute_rounds)
    same = sum(a == b for a, b in zip(cached_out, recompute_out))
    rows = [("KV cache, greedy", cached_s), ("KV cache, temperature 0.7 top-p 0.95", sampled_s),
            ("recompute the full forward, greedy", recompute_s)]
    print(f"\n| decoding | seconds for {new_tokens} new tokens | new tokens/s |")
    print("|---|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} | {new_tokens / seconds:,.0f} |")
    speedup = recompute_s / cached_s
    print(f"\nprefill of {BATCH} x {PROMPT} tokens: {prefill_s * 1e3:.1f} ms (inside the cached "
          f"figures); decode steps alone: {(cached_s - prefill_s) / NEW * 1e3:.2f} ms per token")
    print(f"greedy completions identical to the recompute baseline's: {same} of {BATCH} rows")
    print(f"speed-up of the cache: {speedup:.1f}x (target >= {TARGET_SPEEDUP:.0f}x: "
          f"{'met' if speedup >= TARGET_SPEEDUP else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
