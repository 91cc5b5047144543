"""Multiple-choice scoring throughput vs training throughput of the same model, in one run.

The quickstart model's dims (d_model 128, 4 layers, 4 heads, 1 kv head, mlp 512, seq_len 128,
tied embeddings; random init: speed does not depend on the weights), its vocabulary from a
SentencePiece tokenizer trained on the real corpus (quickstart's vocab 4,096 BPE, 2M sampled
characters, uniform over domains). Scored: every choice of ARC-Easy's test set and both
solutions of PIQA's validation set, built by their shipped task declarations (what `gx eval
--tasks` scores: "Question: ...\\nAnswer:" + " choice", zero-shot), through
gemini_core.eval.scoring.loglikelihood.

A first pass over each task pays the compiles of its batch shapes (kept for the process) and
is printed on its own. Then --rounds rounds alternate training steps and a pass over each task
(the machine is shared: load that comes and goes hits both alike) and the figures are medians.
Forward tokens = the real (unpadded) input tokens of every row; padded tokens are printed
beside them. Training tokens/s: step_fns.make_train_step at batch 32 x seq 128, the median of
--steps steps per round after --warmup. Target: scoring forward tokens/s >= 2x training
tokens/s (a forward pass is about a third of a training step's work).

usage: python bench/scoring.py [--rounds 3] [--batch-size 32] [--steps 10] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import machine

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TARGET_RATIO = 2.0
SEQ_LEN = 128
TRAIN_BATCH = 32


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=32,
                   help="rows of a full-length scoring batch (shorter rows: as many tokens)")
    p.add_argument("--steps", type=int, default=30, help="timed training steps per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="alternations of training and scoring")
    p.add_argument("--corpus", default=str(SHARED / "corpus"))
    p.add_argument("--benchmarks", default=str(SHARED / "benchmarks"))
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "gx_bench_cache"),
                   help="where the tokenizer is trained once and reused")
    return p.parse_args()


def task_requests(name: str, root: Path) -> list[tuple[str, str]]:
    """Every (context, choice) of a shipped multiple-choice task, as `gx eval` scores it."""
    from gemini_core.eval.task_examples import load_examples
    from gemini_core.eval.tasks import load_tasks
    [spec] = load_tasks(name, root=root)
    return [(ex.context, c) for ex in load_examples(spec, 0) for c in ex.choices]


def tokenizer(args: argparse.Namespace):
    from gemini_core.config import DEFAULT_DOMAINS, DataConfig, TokenizerConfig
    from gemini_core.data.tokenizer import train_or_load_tokenizer
    cfg = DataConfig(root=args.corpus, seq_len=SEQ_LEN,
                     tokenizer=TokenizerConfig(vocab_size=4096, model_type="bpe",
                                               sample_chars=2_000_000))
    weights = {d: 1 / len(DEFAULT_DOMAINS) for d in DEFAULT_DOMAINS}
    return train_or_load_tokenizer(cfg, weights, Path(args.cache), log=print)


def model_config(vocab: int):
    from gemini_core.config import ModelConfig
    return ModelConfig(d_model=128, num_layers=4, num_heads=4, num_kv_heads=1, mlp_dim=512,
                       tie_embeddings=True, vocab_size=vocab)


def forward_tokens(tok, requests, batch_size: int) -> tuple[int, int]:
    """(real input tokens, padded input tokens) that scoring these requests feeds the model."""
    from gemini_core.eval import scoring
    rows = []
    for context, continuation in requests:
        rows += scoring.window_rows(*scoring.continuation_split(tok, context, continuation),
                                    SEQ_LEN)
    real = sum(len(r.ids) - 1 for r in rows)
    padded = sum(b.rows * b.length for b in scoring.batches(rows, SEQ_LEN, batch_size))
    return real, padded


def score_once(model, tok, requests, batch_size: int, log=None) -> tuple[float, list]:
    from gemini_core.eval import scoring
    start = time.perf_counter()
    results = scoring.loglikelihood(model, tok, requests, seq_len=SEQ_LEN,
                                    batch_size=batch_size, log=log)
    return time.perf_counter() - start, results


class Trainer:
    """The quickstart model's real train step, compiled once; measure() times more steps."""

    def __init__(self, cfg, warmup: int):
        import jax
        import jax.numpy as jnp

        from gemini_core.config import OptimizerConfig
        from gemini_core.train import step_fns
        graphdef, self.state = step_fns.init_state(cfg, OptimizerConfig(lr=3e-4), 10_000, 0)
        self.step = step_fns.make_train_step(graphdef)
        keys = jax.random.split(jax.random.key(1), 4)
        self.batches = [jax.random.randint(k, (TRAIN_BATCH, SEQ_LEN + 1), 0, cfg.vocab_size,
                                           dtype=jnp.int32) for k in keys]
        self.measure(warmup)

    def measure(self, steps: int) -> float:
        """Training tokens/s: the median step of `steps`."""
        import jax
        times = []
        for i in range(steps):
            start = time.perf_counter()
            self.state, metrics = self.step(self.state, self.batches[i % len(self.batches)])
            jax.block_until_ready((self.state, metrics))
            times.append(time.perf_counter() - start)
        return TRAIN_BATCH * SEQ_LEN / statistics.median(times)


def first_passes(model, tok, tasks: dict, batch_size: int) -> dict:
    """Per task: sizes, and the first pass's wall time (with its compiles)."""
    rows = {}
    for name, requests in tasks.items():
        real, padded = forward_tokens(tok, requests, batch_size)
        cold, results = score_once(model, tok, requests, batch_size, log=print)
        rows[name] = {"task": name, "requests": len(requests), "forward_tokens": real,
                      "padded_tokens": padded, "wall_cold_s": cold, "walls_s": [],
                      "truncated": sum(1 for r in results if r.truncated)}
        print(f"[{name}] {len(requests):,} requests, {real:,} forward tokens ({padded:,} "
              f"padded: fill {real / padded:.0%}); first pass with compiles {cold:.1f} s",
              flush=True)
    return rows


def alternate(model, tok, tasks: dict, rows: dict, trainer: Trainer, args) -> list[dict]:
    """Rounds of training steps then a pass over each task; per round tokens/s and ratio."""
    rounds = []
    for r in range(args.rounds):
        train = trainer.measure(args.steps)
        line = f"round {r + 1}: training {train:,.0f} tokens/s"
        for name, requests in tasks.items():
            rows[name]["walls_s"].append(score_once(model, tok, requests, args.batch_size)[0])
            line += f" | {name} {rows[name]['walls_s'][-1]:.1f} s"
        scored = sum(row["forward_tokens"] for row in rows.values()) / sum(
            row["walls_s"][-1] for row in rows.values())
        rounds.append({"train_tokens_per_s": train, "scoring_tokens_per_s": scored,
                       "ratio": scored / train})
        print(f"{line} | scoring {scored:,.0f} forward tokens/s = {scored / train:.2f}x "
              f"training | load {os.getloadavg()[0]:.2f}", flush=True)
    return rounds


def report(rows: dict, rounds: list[dict]) -> dict:
    train = statistics.median(r["train_tokens_per_s"] for r in rounds)
    print(f"\ntraining (batch {TRAIN_BATCH} x seq {SEQ_LEN}): {train:,.0f} tokens/s "
          f"(median of {len(rounds)} rounds)")
    for row in rows.values():
        row["wall_s"] = statistics.median(row["walls_s"])
        row["requests_per_s"] = row["requests"] / row["wall_s"]
        row["tokens_per_s"] = row["forward_tokens"] / row["wall_s"]
        print(f"[{row['task']}] {row['requests']:,} requests in {row['wall_s']:.1f} s (first "
              f"pass {row['wall_cold_s']:.1f} s): {row['requests_per_s']:,.0f} requests/s, "
              f"{row['tokens_per_s']:,.0f} forward tokens/s; {row['truncated']} truncated")
    ratio = statistics.median(r["ratio"] for r in rounds)
    print(f"scoring / training forward tokens/s, median over rounds: {ratio:.2f}x "
          f"(target >= {TARGET_RATIO:.0f}x: {'met' if ratio >= TARGET_RATIO else 'NOT met'})")
    return {"tasks": list(rows.values()), "rounds": rounds, "train_tokens_per_s": train,
            "ratio": ratio}


def main() -> int:
    args = parse()
    from gemini_core.train import step_fns
    step_fns.tune_host_malloc()  # before JAX's first computation, as the trainer does
    from flax import nnx

    from gemini_core.model.transformer import Transformer
    from gemini_core.scale import flops
    print(f"machine: {machine.describe()}", flush=True)
    print(f"f32 matmul peak (2048^3): {flops.measure_matmul_peak(2048, 10) / 1e9:.1f} GFLOP/s",
          flush=True)
    tok = tokenizer(args)
    cfg = model_config(tok.vocab_size)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    root = Path(args.benchmarks)
    tasks = {name: task_requests(name, root) for name in ("arc_easy", "piqa")}
    rows = first_passes(model, tok, tasks, args.batch_size)
    rounds = alternate(model, tok, tasks, rows, Trainer(cfg, args.warmup), args)
    print("RESULT " + json.dumps({"machine": machine.cpu(), **report(rows, rounds)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
