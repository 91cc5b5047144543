"""Context parallelism: per-device memory of a train step as the sequence is split.

    python bench/context_parallel.py [--lengths 4096,16384] [--kernel blockwise]

Runs on 8 host CPU devices (it sets XLA_FLAGS itself): for each length and each number of
context shards (1, 2, 4, 8; the mesh holds just those devices, fsdp=1), the loss-and-gradient
step of a small multi-query decoder on one sequence, compiled under the split, and XLA's own
memory analysis of the compiled program: temporaries per device (activations and the
gathered keys and values), plus the unsplit step's loss against the split one's. Memory is
what this measures; CPU "devices" share two cores, so times would mean nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from gemini_core.config import MeshConfig, ModelConfig  # noqa: E402
from gemini_core.model.transformer import Transformer  # noqa: E402
from gemini_core.scale import sharding  # noqa: E402

SHARDS = (1, 2, 4, 8)


def step_fn(graphdef):
    def step(state, tokens_BxT1):
        def loss(model):
            return model.token_nll(tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]).mean()
        return nnx.value_and_grad(loss)(nnx.merge(graphdef, state))
    return jax.jit(step)


def measure(model: Transformer, length: int, shards: int) -> tuple[float, float]:
    """(temporaries per device in MiB, loss) of one step on a sequence split `shards` ways."""
    graphdef, state = nnx.split(model)
    layout = sharding.Layout.from_config(MeshConfig(preset="fsdp", fsdp=1, context=shards),
                                         devices=jax.devices()[:shards])
    rng = np.random.default_rng(0)
    tokens_BxT1 = rng.integers(4, model.cfg.vocab_size, (1, length + 1)).astype(np.int32)
    args = (jax.device_put(state, layout.state_shardings(state)),
            jax.device_put(tokens_BxT1, layout.batch_sharding()))
    with layout.activate():
        compiled = step_fn(graphdef).lower(*args).compile()
        loss, _ = compiled(*args)
    return compiled.memory_analysis().temp_size_in_bytes / 2**20, float(loss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="4096,16384")
    ap.add_argument("--kernel", default="blockwise", choices=("dense", "blockwise"))
    args = ap.parse_args()
    cfg = ModelConfig(vocab_size=4096, d_model=128, num_layers=4, num_heads=4, num_kv_heads=1,
                      mlp_dim=512, attention=args.kernel)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    print(f"jax {jax.__version__}, {jax.device_count()} CPU devices; model d=128, 4 layers, "
          f"4 heads / 1 kv head, vocab 4096, {args.kernel} attention, batch 1")
    print(f"{'tokens':>8} {'shards':>6} {'temp MiB/device':>16} {'vs 1 shard':>10} "
          f"{'loss':>10}")
    for length in (int(x) for x in args.lengths.split(",")):
        base = None
        for shards in SHARDS:
            mib, loss = measure(model, length, shards)
            base = base or mib
            print(f"{length:>8} {shards:>6} {mib:>16.1f} {mib / base:>9.2f}x {loss:>10.6f}",
                  flush=True)


if __name__ == "__main__":
    main()
