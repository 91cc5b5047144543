"""Long context on the training step: memory by sequence length, compile time by depth, remat.

All on the real train step (`step_fns.make_train_step`: forward, backward, AdamW update) of the
quickstart's model shape (d_model 128, 4 layers, 4 query heads, 1 kv head, mlp 512, vocab
4096), one sequence per batch, random tokens with an EOS every ~1,000 tokens (packed
documents), f32:

1. memory: the compiled step's temporary memory (`compiled.memory_analysis()`, what XLA
   allocates beyond arguments and outputs) at 4k and 32k tokens per sequence, dense vs blockwise
   attention, with and without document masking; then one 32k step actually run (blockwise),
   timed. Target: 32k / 4k <= 10x (dense attention: ~64x).
2. compile: seconds to compile the step of a 32-layer vs a 4-layer model (d_model 64, 1k
   tokens), scanned vs unrolled. Target: scanned 32/4 <= 1.5x (unrolled: ~8x). The persistent
   compilation cache is off here, or the second compile would be a cache hit.
3. remat: step time (median of 3 after a compile) and temporary memory per `model.remat`
   policy at 4k tokens, blockwise attention.

usage: python bench/long_context.py [--skip-run] [--only memory,compile,remat]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import jax
import machine
import numpy as np

from gemini_core.config import ModelConfig, OptimizerConfig
from gemini_core.data.tokenizer import EOS_ID
from gemini_core.train import step_fns

QUICKSTART = ModelConfig(d_model=128, num_layers=4, num_heads=4, num_kv_heads=1, mlp_dim=512,
                         vocab_size=4096, attention="blockwise")
OPT = OptimizerConfig(lr=3e-3, warmup_steps=10)
GIB = 2**30


def batch(seq_len: int, vocab: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    tokens_1xT1 = rng.integers(EOS_ID + 1, vocab, (1, seq_len + 1)).astype(np.int32)
    tokens_1xT1[0, ::1000] = EOS_ID  # documents of ~1,000 tokens, as packing makes them
    return tokens_1xT1


def compiled_step(cfg: ModelConfig, seq_len: int):
    graphdef, state = step_fns.init_state(cfg, OPT, 100, seed=0)
    step = step_fns.make_train_step(graphdef)
    tokens = batch(seq_len, cfg.vocab_size)
    start = time.perf_counter()
    compiled = step.lower(state, tokens).compile()
    return compiled, state, tokens, time.perf_counter() - start


def temp_gib(cfg: ModelConfig, seq_len: int) -> float:
    compiled, *_ = compiled_step(cfg, seq_len)
    return compiled.memory_analysis().temp_size_in_bytes / GIB


def memory(run_32k: bool) -> None:
    print("\n## Temporary memory of one train step (compiled.memory_analysis)")
    print("| attention | document mask | 4k GiB | 32k GiB | 32k / 4k |")
    print("|---|---|---|---|---|")
    for kernel in ("dense", "blockwise"):
        for mask in (False, True):
            cfg = dataclasses.replace(QUICKSTART, attention=kernel, document_mask=mask)
            short, long = temp_gib(cfg, 4096), temp_gib(cfg, 32768)
            print(f"| {kernel} | {mask} | {short:.3f} | {long:.3f} | {long / short:.1f}x |",
                  flush=True)
    if run_32k:
        cfg = dataclasses.replace(QUICKSTART, document_mask=True)
        compiled, state, tokens, _ = compiled_step(cfg, 32768)
        start = time.perf_counter()
        state, metrics = compiled(state, tokens)
        loss = float(metrics["loss"])
        took = time.perf_counter() - start
        print(f"\none 32k-token step (blockwise, document mask) ran: loss {loss:.3f}, "
              f"{took:.1f} s, {32768 / took:,.0f} tokens/s")


def compile_seconds(layers: int, scan: bool) -> float:
    cfg = ModelConfig(d_model=64, num_layers=layers, num_heads=4, num_kv_heads=1, mlp_dim=256,
                      vocab_size=4096, attention="blockwise", scan_layers=scan)
    return compiled_step(cfg, 1024)[3]


def compile_time() -> None:
    print("\n## Compile time of the train step by depth (d_model 64, 1k tokens)")
    print("| stack | 4 layers s | 32 layers s | 32 / 4 |")
    print("|---|---|---|---|")
    for scan in (True, False):
        short, deep = compile_seconds(4, scan), compile_seconds(32, scan)
        print(f"| {'scanned' if scan else 'unrolled'} | {short:.1f} | {deep:.1f} | "
              f"{deep / short:.2f}x |", flush=True)


def remat() -> None:
    print("\n## Remat policies (4k tokens, blockwise, 4 layers)")
    print("| model.remat | step s (median of 3) | temp GiB |")
    print("|---|---|---|")
    for policy in ("none", "dots_saveable", "dots_with_no_batch_dims_saveable", "full"):
        cfg = dataclasses.replace(QUICKSTART, remat=policy)
        compiled, state, tokens, _ = compiled_step(cfg, 4096)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            state, metrics = compiled(state, tokens)
            jax.block_until_ready(metrics["loss"])
            times.append(time.perf_counter() - start)
        gib = compiled.memory_analysis().temp_size_in_bytes / GIB
        print(f"| {policy} | {statistics.median(times):.2f} | {gib:.3f} |", flush=True)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-run", action="store_true", help="only compile the 32k step")
    parser.add_argument("--only", default="memory,compile,remat")
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)
    print(machine.describe())
    parts = args.only.split(",")
    if "memory" in parts:
        memory(not args.skip_run)
    if "compile" in parts:
        compile_time()
    if "remat" in parts:
        remat()


if __name__ == "__main__":
    main(sys.argv[1:])
