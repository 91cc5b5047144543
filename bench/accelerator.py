"""Training throughput and MFU of a ~1B-parameter decoder on one accelerator (issue 25's goal:
>= 50% MFU on one H100), through the real train step.

The model: d_model 2048, 16 layers, 16 query heads / 1 kv head (head dim 128), mlp 8192, vocab
32,768, tied: about 1.0B parameters; bf16 activations over f32 parameters, AdamW;
`model.attention=auto` (cuDNN flash attention on a GPU), `model.scan_layers` and a remat policy
(default dots_with_no_batch_dims_saveable); 4 sequences of 4,096 tokens, random tokens with an
EOS every ~1,000 (document masking on by `--document-mask`). FLOPs per token from
gemini_core.scale.flops (6·N + attention), MFU against the device's dense bf16 peak
(flops.device_peak_flops: the table for accelerators, measured on CPU).

Prints the parameter count, compile seconds, the compiled step's temporary memory, step times
(median of --steps after --warmup), tokens/s and MFU.

usage: python bench/accelerator.py [--steps 10] [--warmup 3] [--batch 4] [--seq 4096]
                                   [--remat POLICY] [--no-scan] [--document-mask] [--tiny]
`--tiny` shrinks the model to d_model 128 / 2 layers / seq 512 so the script can be checked
on a CPU; its figures mean nothing.
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
from gemini_core.scale import flops
from gemini_core.train import step_fns

ONE_B = ModelConfig(d_model=2048, num_layers=16, num_heads=16, num_kv_heads=1, head_dim=128,
                    mlp_dim=8192, vocab_size=32768, dtype="bfloat16", param_dtype="float32",
                    attention="auto", scan_layers=True)
TINY = dataclasses.replace(ONE_B, d_model=128, num_layers=2, num_heads=4, head_dim=32,
                           mlp_dim=512, vocab_size=4096)
TARGET_MFU = 0.50


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--remat", default="dots_with_no_batch_dims_saveable")
    p.add_argument("--no-scan", action="store_true")
    p.add_argument("--document-mask", action="store_true")
    p.add_argument("--tiny", action="store_true", help="a small model, to check the script on CPU")
    return p.parse_args(argv)


def batch(rows: int, seq_len: int, vocab: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    tokens_BxT1 = rng.integers(EOS_ID + 1, vocab, (rows, seq_len + 1)).astype(np.int32)
    tokens_BxT1[:, ::1000] = EOS_ID  # packed documents of ~1,000 tokens
    return tokens_BxT1


def main(argv: list[str]) -> None:
    args = parse(argv)
    seq = 512 if args.tiny and args.seq == 4096 else args.seq
    cfg = dataclasses.replace(TINY if args.tiny else ONE_B, remat=args.remat,
                              scan_layers=not args.no_scan, document_mask=args.document_mask)
    print(machine.describe(), flush=True)
    n_params = flops.param_counts(cfg)["total"]
    print(f"model: {n_params / 1e9:.3f}B parameters, {cfg.num_layers} layers, d_model "
          f"{cfg.d_model}, {cfg.dtype} compute, attention {cfg.attention}, remat {cfg.remat}, "
          f"scan {cfg.scan_layers}, document mask {cfg.document_mask}; batch {args.batch} x "
          f"{seq} tokens", flush=True)
    graphdef, state = step_fns.init_state(cfg, OptimizerConfig(lr=3e-4, warmup_steps=10),
                                          1000, seed=0)
    step = step_fns.make_train_step(graphdef)
    tokens = batch(args.batch, seq, cfg.vocab_size)
    start = time.perf_counter()
    compiled = step.lower(state, tokens).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes / 2**30
    print(f"compiled in {time.perf_counter() - start:.1f} s; temporaries {temp:.2f} GiB",
          flush=True)
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, tokens)
        loss = float(metrics["loss"])  # waits for the step
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    tokens_per_s = args.batch * seq / step_s
    achieved = tokens_per_s * flops.flops_per_token(cfg, seq)
    peak = flops.device_peak_flops()
    mfu = achieved / peak
    print(f"step {step_s * 1e3:.1f} ms (median of {args.steps}), loss {loss:.3f}; "
          f"{tokens_per_s:,.0f} tokens/s; {achieved / 1e12:.1f} TFLOP/s of "
          f"{peak / 1e12:.1f} peak ({jax.devices()[0].device_kind}): MFU {mfu:.1%} "
          f"(target >= {TARGET_MFU:.0%} on one H100)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
