"""Training throughput of our jitted train step vs the compiled PyTorch peer, in one run.

Ours: the real step_fns.make_train_step (donated state, AdamW + clipping in the same jit) on
random tokens; median step time over --steps after warmup, synchronised with
block_until_ready. Peer: /work/shared/peers/torch_lm.py --compile (its venv is built by
setup_peers.sh when missing), run as a subprocess between our rounds. The machine is shared and
noisy, so ours and the peer alternate for --rounds rounds and the table reports medians and the
ratio ours/peer. MFU for both uses flops.py's formula (the peers' convention).

usage: python bench/train_throughput.py [--rounds 3] [--steps 10] [--out results.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from gemini_core.train import step_fns

PEERS_SRC = Path("/work/shared/peers")
TARGET_RATIO = 1.15
TARGET_MFU_A = 0.45


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    vocab: int
    d: int
    layers: int
    heads: int
    seq: int
    batch: int
    mlp: int = 0
    tied: bool = False
    peer: bool = True  # the peer has an untied head and mlp = 4·d only


CASES = (
    Case("quickstart", vocab=4096, d=128, layers=4, heads=4, seq=128, batch=32, mlp=512,
         tied=True, peer=False),
    Case("a", vocab=8192, d=256, layers=4, heads=4, seq=256, batch=16),
    Case("b", vocab=8192, d=128, layers=2, heads=4, seq=256, batch=32),
)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="alternations of ours and the peer")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cases", default="quickstart,a,b")
    p.add_argument("--threads", type=int, default=2, help="peer's torch threads")
    p.add_argument("--peer-compile-mode", default="max-autotune",
                   help="torch.compile mode for the peer: default | max-autotune")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--peer-tuned-malloc", action="store_true",
                   help="also run the peer under the same glibc malloc settings as ours")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="leave glibc malloc as is in our process (shows what tuning gives)")
    p.add_argument("--out", default="", help="write results here (.json; a .md beside it)")
    return p.parse_args()


# ---------------------------------------------------------------------------------------------
# ours


def model_config(case: Case):
    from gemini_core.config import ModelConfig
    return ModelConfig(d_model=case.d, num_layers=case.layers, num_heads=case.heads,
                       num_kv_heads=1, mlp_dim=case.mlp, tie_embeddings=case.tied,
                       vocab_size=case.vocab)


class OurRunner:
    """Compiled once; each measure() call times `steps` more steps on the same state."""

    def __init__(self, case: Case, warmup: int):
        import jax
        import jax.numpy as jnp

        from gemini_core.config import OptimizerConfig
        self.case, self.cfg = case, model_config(case)
        graphdef, self.state = step_fns.init_state(self.cfg, OptimizerConfig(lr=3e-4), 10_000, 0)
        self.step = step_fns.make_train_step(graphdef)
        keys = jax.random.split(jax.random.key(1), 4)
        self.batches = [jax.random.randint(k, (case.batch, case.seq + 1), 0, case.vocab,
                                           dtype=jnp.int32) for k in keys]
        start = time.perf_counter()
        self._run(1)
        self.compile_s = time.perf_counter() - start
        self._run(warmup)
        self.params = step_fns.count_params(self.state)

    def _run(self, n: int) -> list[float]:
        import jax
        times = []
        for i in range(n):
            start = time.perf_counter()
            self.state, metrics = self.step(self.state, self.batches[i % len(self.batches)])
            jax.block_until_ready((self.state, metrics))
            times.append(time.perf_counter() - start)
        self.loss = float(metrics["loss"])
        return times

    def measure(self, n: int) -> float:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        median = statistics.median(self._run(n))
        self.faults_per_step = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / n
        return median


# ---------------------------------------------------------------------------------------------
# the peer


def peer_python() -> tuple[Path | None, str]:
    peers = Path(os.environ.get("PEERS") or Path(os.environ.get("TMPDIR") or "/tmp") / "peers")
    python = peers / "venv-torch" / "bin" / "python"
    if python.exists():
        return python, ""
    setup = PEERS_SRC / "setup_peers.sh"
    print(f"peer venv missing: building it with {setup} (PEERS={peers}) ...", flush=True)
    try:
        subprocess.run(["bash", str(setup)], env={**os.environ, "PEERS": str(peers)},
                       check=True, capture_output=True, text=True, timeout=1800)
    except (subprocess.SubprocessError, OSError) as e:
        tail = getattr(e, "stderr", "") or ""
        return None, f"setup_peers.sh failed: {e}; {tail[-500:]}"
    return (python, "") if python.exists() else (None, f"no {python} after setup_peers.sh")


def run_peer(python: Path, case: Case, args: argparse.Namespace,
             tuned_malloc: bool = False) -> tuple[dict | None, str]:
    cmd = [str(python), str(PEERS_SRC / "torch_lm.py"), "--vocab", str(case.vocab),
           "--d", str(case.d), "--layers", str(case.layers), "--heads", str(case.heads),
           "--seq", str(case.seq), "--batch", str(case.batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--compile",
           "--compile-mode", args.peer_compile_mode]
    env = dict(os.environ)
    if tuned_malloc:
        env["GLIBC_TUNABLES"] = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                                 "glibc.malloc.trim_threshold=2147483647")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
    except (subprocess.SubprocessError, OSError) as e:
        return None, f"peer did not run: {e}"
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):]), ""
    return None, f"peer exited {proc.returncode} without RESULT: {(proc.stderr or proc.stdout)[-800:]}"


# ---------------------------------------------------------------------------------------------
# the run


def median_or_none(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def bench(args: argparse.Namespace) -> dict:
    import jax

    from gemini_core.scale import flops
    cases = [c for c in CASES if c.name in args.cases.split(",")]
    peak = flops.measure_matmul_peak(2048, 20)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; f32 matmul peak "
          f"(2048^3, median of 20): {peak / 1e9:.1f} GFLOP/s", flush=True)
    python, why_no_peer = (None, "--no-peer") if args.no_peer else peer_python()
    if python is None:
        print(f"peer unavailable: {why_no_peer}", flush=True)

    runners = {}
    for case in cases:
        runners[case.name] = OurRunner(case, args.warmup)
        print(f"[{case.name}] compiled in {runners[case.name].compile_s:.1f}s, "
              f"{runners[case.name].params:,} params", flush=True)

    ours: dict[str, list[float]] = {c.name: [] for c in cases}
    peer: dict[str, list[dict]] = {c.name: [] for c in cases}
    peer_tuned: dict[str, list[dict]] = {c.name: [] for c in cases}
    peer_errors: dict[str, str] = {}
    for r in range(args.rounds):
        for case in cases:
            t = runners[case.name].measure(args.steps)
            ours[case.name].append(case.batch * case.seq / t)
            line = (f"round {r + 1} [{case.name}] ours {ours[case.name][-1]:,.0f} tok/s "
                    f"({runners[case.name].faults_per_step:,.0f} page faults/step)")
            if python is not None and case.peer:
                res, err = run_peer(python, case, args)
                if res:
                    peer[case.name].append(res)
                    line += f" | peer {res['tokens_per_s']:,.0f} tok/s"
                else:
                    peer_errors[case.name] = err
                    line += f" | peer failed: {err[:200]}"
                if args.peer_tuned_malloc:
                    res, err = run_peer(python, case, args, tuned_malloc=True)
                    if res:
                        peer_tuned[case.name].append(res)
                        line += f" | peer (tuned malloc) {res['tokens_per_s']:,.0f} tok/s"
            print(line, flush=True)

    rows = []
    for case in cases:
        cfg = model_config(case)
        fpt = flops.flops_per_token(cfg, case.seq)
        ours_tps = statistics.median(ours[case.name])
        peer_tps = median_or_none([p["tokens_per_s"] for p in peer[case.name]])
        peer_peak = median_or_none([p["peak_gflops"] * 1e9 for p in peer[case.name]])
        tuned_tps = median_or_none([p["tokens_per_s"] for p in peer_tuned[case.name]])
        row = {
            "case": case.name, "config": dataclasses.asdict(case),
            "params_total": flops.param_counts(cfg)["total"],
            "params_non_embedding": flops.param_counts(cfg)["non_embedding"],
            "gflop_per_step": fpt * case.batch * case.seq / 1e9,
            "ours_tokens_per_s": ours_tps, "ours_rounds": ours[case.name],
            "ours_gflops": ours_tps * fpt / 1e9, "ours_mfu": ours_tps * fpt / peak,
            "ours_loss": runners[case.name].loss,
            "peer_tokens_per_s": peer_tps,
            "peer_rounds": [p["tokens_per_s"] for p in peer[case.name]],
            "peer_gflops": peer_tps * fpt / 1e9 if peer_tps else None,
            "peer_mfu_vs_jax_peak": peer_tps * fpt / peak if peer_tps else None,
            "peer_torch_mm_peak_gflops": peer_peak / 1e9 if peer_peak else None,
            "peer_mfu_vs_own_peak": peer_tps * fpt / peer_peak if peer_tps else None,
            "ours_mfu_vs_torch_peak": ours_tps * fpt / peer_peak if peer_peak else None,
            "ratio": ours_tps / peer_tps if peer_tps else None,
            "peer_tuned_malloc_tokens_per_s": tuned_tps,
            "ratio_vs_tuned_peer": ours_tps / tuned_tps if tuned_tps else None,
            "peer_error": peer_errors.get(case.name),
        }
        rows.append(row)
    return {"jax_matmul_peak_gflops": peak / 1e9, "rounds": args.rounds, "steps": args.steps,
            "peer_compile_mode": args.peer_compile_mode, "malloc_tuned": not args.no_malloc_tuning,
            "loadavg": os.getloadavg(), "rows": rows}


def fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def markdown(result: dict) -> str:
    lines = [f"f32 matmul peak: JAX {result['jax_matmul_peak_gflops']:.0f} GFLOP/s; "
             f"torch.mm (peer's own measurement) per row. Medians of {result['rounds']} "
             f"alternating rounds x {result['steps']} steps; peer = torch.compile "
             f"({result['peer_compile_mode']}).", "",
             "| config | params (non-emb) | GFLOP/step | ours tok/s | peer tok/s | ours/peer "
             "| ours MFU (JAX peak) | peer MFU (JAX peak) | peer MFU (torch peak) "
             "| torch.mm peak |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        c = r["config"]
        name = (f"{r['case']}: V{c['vocab']} D{c['d']} L{c['layers']} H{c['heads']} "
                f"seq{c['seq']} b{c['batch']}{' tied' if c['tied'] else ''}")
        lines.append(
            f"| {name} | {r['params_non_embedding']:,} | {r['gflop_per_step']:.1f} "
            f"| {r['ours_tokens_per_s']:,.0f} | {fmt(r['peer_tokens_per_s'], ',.0f')} "
            f"| {fmt(r['ratio'], '.2f')} | {r['ours_mfu']:.1%} "
            f"| {fmt(r['peer_mfu_vs_jax_peak'], '.1%')} | {fmt(r['peer_mfu_vs_own_peak'], '.1%')} "
            f"| {fmt(r['peer_torch_mm_peak_gflops'], '.0f')} |")
    tuned = [r for r in result["rows"] if r["peer_tuned_malloc_tokens_per_s"]]
    if tuned:
        lines += ["", "peer under the same malloc settings as ours: " + "; ".join(
            f"{r['case']} {r['peer_tuned_malloc_tokens_per_s']:,.0f} tok/s "
            f"(ours/peer {r['ratio_vs_tuned_peer']:.2f})" for r in tuned)]
    lines += ["", "targets: " + "; ".join(targets(result))]
    return "\n".join(lines)


def targets(result: dict) -> list[str]:
    out = []
    for r in result["rows"]:
        if r["case"] in ("a", "b"):
            ok = r["ratio"] is not None and r["ratio"] >= TARGET_RATIO
            out.append(f"{r['case']}: ours/peer {fmt(r['ratio'], '.2f')} "
                       f"(>= {TARGET_RATIO}: {'met' if ok else 'NOT met'})")
        if r["case"] == "a":
            ok = r["ours_mfu"] >= TARGET_MFU_A
            out.append(f"a: MFU {r['ours_mfu']:.1%} (>= {TARGET_MFU_A:.0%}: "
                       f"{'met' if ok else 'NOT met'})")
    return out


def main() -> int:
    args = parse()
    # before JAX's first computation: its worker threads must bind to the main malloc arena
    if not args.no_malloc_tuning and not step_fns.tune_host_malloc():
        print("note: glibc malloc tuning unavailable; expect ~1 GB of page faults per step")
    import jax
    cache = Path(os.environ.get("TMPDIR") or "/tmp") / "gemini_core_jax_cache"
    jax.config.update("jax_compilation_cache_dir", str(cache))
    result = bench(args)
    table = markdown(result)
    print()
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        out.with_suffix(".md").write_text(table + "\n")
        print(f"\nwrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
