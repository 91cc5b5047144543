"""Step time and MFU of one model at 1 vs 8 CPU devices, under each mesh preset.

The real path: step_fns.init_state / make_train_step with a sharding.Layout (state born sharded,
host batch placed with its sharding every step, AdamW and clipping in the same jit). The global
batch is the same at 1 and 8 devices (strong scaling). JAX fixes its device count at start, so
each configuration runs in its own child process (XLA_FLAGS=--xla_force_host_platform_device_
count); configurations alternate for --rounds rounds (the machine is shared and noisy) and the
table reports medians.

What the numbers mean here: the 8 "devices" are XLA:CPU's fake host devices, and they share the
same cores as the 1-device run. There is no extra compute to scale onto, so the ideal is a
ratio of 1.0 (same step time), and the figure measures what partitioning costs on top of it:
the collectives (all-gathers, reduce-scatters, all-reduces as in-memory copies), per-device
dispatch, and smaller matmuls that run further from the host's peak. MFU is against the host's
f32 matmul peak measured in the same process (fake devices do not add peak). On real TPU/GPU
devices each device brings its own FLOPs and memory, and the same code divides the work.

usage: python bench/sharding.py [--rounds 3] [--steps 10] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

MODEL = dict(vocab_size=4096, d_model=128, num_layers=4, num_heads=4, num_kv_heads=1,
             mlp_dim=512, tie_embeddings=True)  # the quickstart model
SEQ, BATCH = 128, 32
CONFIGS = (("1 device", 1, "dp"), ("8 devices dp", 8, "dp"), ("8 devices fsdp", 8, "fsdp"),
           ("8 devices fsdp_tp", 8, "fsdp_tp"))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps per window")
    p.add_argument("--windows", type=int, default=3, help="timed windows per round (median)")
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument("--child", nargs=2, metavar=("DEVICES", "PRESET"), help=argparse.SUPPRESS)
    return p.parse_args()


def child(devices: int, preset: str, args: argparse.Namespace) -> dict:
    import jax
    import numpy as np

    from gemini_core.config import MeshConfig, ModelConfig, OptimizerConfig
    from gemini_core.scale import flops, sharding
    from gemini_core.train import step_fns

    step_fns.tune_host_malloc()
    assert jax.device_count() == devices, jax.devices()
    model = ModelConfig(**MODEL)
    layout = sharding.Layout.from_config(MeshConfig(preset=preset))
    graphdef, state = step_fns.init_state(model, OptimizerConfig(lr=3e-4), 10_000, 0, layout)
    step = step_fns.make_train_step(graphdef, layout)
    rng = np.random.default_rng(0)
    tokens = [rng.integers(0, model.vocab_size, (BATCH, SEQ + 1), dtype=np.int32)
              for _ in range(4)]
    for i in range(3):  # compile (or a cache hit) and warm up
        state, metrics = step(state, tokens[i % 4])
    jax.block_until_ready(state)
    times = []
    for _ in range(args.windows):
        start = time.perf_counter()
        for i in range(args.steps):
            state, metrics = step(state, tokens[i % 4])
        jax.block_until_ready((state, metrics))
        times.append((time.perf_counter() - start) / args.steps)
    step_s = statistics.median(times)
    flops_per_step = flops.flops_per_token(model, SEQ) * BATCH * SEQ
    peak = flops.mesh_peak_flops(layout.mesh)
    return {"devices": devices, "preset": preset, "mesh": layout.sizes, "step_s": step_s,
            "tokens_per_s": BATCH * SEQ / step_s, "mfu": flops_per_step / step_s / peak,
            "peak_gflops": peak / 1e9, "loss": float(metrics["loss"])}


def run_child(devices: int, preset: str, args: argparse.Namespace, cache: str) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_COMPILATION_CACHE_DIR"] = cache  # later rounds skip compiling
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    cmd = [sys.executable, __file__, "--child", str(devices), preset,
           "--steps", str(args.steps), "--windows", str(args.windows)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args)))
        return
    results: dict[str, list[dict]] = {name: [] for name, _, _ in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="gx-bench-sharding-") as cache:
        for r in range(args.rounds):
            for name, devices, preset in CONFIGS:
                results[name].append(run_child(devices, preset, args, cache))
                print(f"round {r + 1}: {name}: {results[name][-1]['step_s'] * 1e3:.1f} ms/step",
                      file=sys.stderr)
    base = statistics.median(x["step_s"] for x in results["1 device"])
    print(f"model: quickstart (V{MODEL['vocab_size']} D{MODEL['d_model']} "
          f"L{MODEL['num_layers']} H{MODEL['num_heads']} MQA, tied), seq {SEQ}, global batch "
          f"{BATCH}; medians of {args.rounds} alternating rounds x {args.windows} windows x "
          f"{args.steps} steps; {os.cpu_count()} CPU cores\n")
    print("| configuration | mesh (data x fsdp x model) | ms/step | tokens/s | MFU (host peak) "
          "| 1-device time / this time |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for name, _, _ in CONFIGS:
        rows = results[name]
        step_s = statistics.median(x["step_s"] for x in rows)
        mfu = statistics.median(x["mfu"] for x in rows)
        mesh = rows[0]["mesh"]
        summary[name] = {"step_s": step_s, "mfu": mfu, "scaling": base / step_s,
                         "mesh": mesh, "rounds": rows}
        print(f"| {name} | {mesh['data']} x {mesh['fsdp']} x {mesh['model']} | "
              f"{step_s * 1e3:.1f} | {BATCH * SEQ / step_s:,.0f} | {mfu:.1%} | "
              f"{base / step_s:.2f} |")
    peaks = [x["peak_gflops"] for rows in results.values() for x in rows]
    print(f"\nhost f32 matmul peak (per process, median): {statistics.median(peaks):.0f} GFLOP/s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
