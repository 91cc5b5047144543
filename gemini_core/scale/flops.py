"""Parameter counts, training FLOPs, matmul peak and memory, by formula from the config.

Conventions match the peers (/work/shared/peers), so MFU figures are comparable:
  N_nonembed   = every parameter except the input embedding table. An untied output head is
                 counted in it (it is a matmul); a tied head is the embedding itself.
  FLOPs/token  = 6·N_nonembed + 12·L·(H·K)·T  (attention scores and values, no causal halving)
                 + 6·D·V when the head is tied: the head matmul costs the same either way.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from gemini_core.config import ModelConfig
from gemini_core.data.modality import MARKERS

# dense bf16 peaks (FLOP/s) per chip, by device_kind prefix: accelerator MFU is quoted against
# these whatever the matmul dtype. CPU peaks are measured instead.
KNOWN_PEAKS_BF16 = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5p": 459e12,
                    "TPU v6 lite": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
                    "NVIDIA A100": 312e12}


def block_params(cfg: ModelConfig) -> int:
    D, H, G, K, F = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.qk_dim, cfg.ffw_dim
    attention = D * H * K + 2 * D * G * K + H * K * D  # q, k, v, o
    mlp = 3 * D * F  # gate, up, down
    norms = 2 * D
    return attention + mlp + norms


def media_params(cfg: ModelConfig) -> int:
    """The encoders' parameters (gemini_core.model.media): the four marker embeddings, and per
    encoder its features-to-D map and its positions (image: rows and columns; audio: slots).
    Input embeddings like the token table: counted in the total, not in the FLOPs' N."""
    if not cfg.media:
        return 0
    D = cfg.d_model
    first = {t.encoder: t for t in reversed(cfg.media)}  # an encoder is built from its first
    return MARKERS * D + sum(t.features * D + (2 * t.grid if t.modality == "image" else t.slots) * D
                       for t in first.values())


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    D, V = cfg.d_model, cfg.vocab_size
    embedding = V * D
    head = 0 if cfg.tie_embeddings else D * V
    non_embedding = cfg.num_layers * block_params(cfg) + D + head  # + final norm
    media = media_params(cfg)
    return {"total": embedding + non_embedding + media, "embedding": embedding,
            "non_embedding": non_embedding, "media": media}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    n = param_counts(cfg)["non_embedding"]
    tied_head = cfg.d_model * cfg.vocab_size if cfg.tie_embeddings else 0
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.qk_dim * seq_len
    return float(6 * (n + tied_head) + attention)


def training_flops(cfg: ModelConfig, seq_len: int, tokens: int) -> float:
    return flops_per_token(cfg, seq_len) * tokens


def chinchilla_tokens(n_params: int) -> int:
    return 20 * n_params


def memory_bytes(cfg: ModelConfig) -> dict[str, int]:
    """Params in param_dtype plus AdamW's two f32 moments; activations not included."""
    n = param_counts(cfg)["total"]
    return {"params": n * jnp.dtype(cfg.param_dtype).itemsize, "optimizer": 2 * n * 4}


def measure_matmul_peak(n: int = 2048, reps: int = 20) -> float:
    """Median f32 FLOP/s of an n×n×n jitted matmul on the default device."""
    a_NxN = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b_NxN = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    for _ in range(3):
        matmul(a_NxN, b_NxN).block_until_ready()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        matmul(a_NxN, b_NxN).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


_PEAK_CACHE: dict[str, float] = {}


def _peak_file() -> Path | None:
    """Next to JAX's persistent compilation cache when one is set (train.enable_compilation_cache)."""
    cache = jax.config.jax_compilation_cache_dir
    return Path(cache) / "cpu_matmul_peak.json" if cache else None


def peak_key(kind: str) -> str:
    return (f"{kind}|{os.uname().nodename}|{len(os.sched_getaffinity(0))} cpus|"
            + os.environ.get("XLA_FLAGS", ""))


def device_peak_flops() -> float:
    """Peak FLOP/s of one local device for MFU: a table for TPU/GPU, measured on CPU once per
    machine, thread count and XLA flags (~2 s, which every short sweep trial would otherwise pay),
    and kept in the compilation cache's folder."""
    kind = jax.devices()[0].device_kind
    for name, peak in KNOWN_PEAKS_BF16.items():
        if kind.startswith(name):
            return peak
    key = peak_key(kind)
    if key not in _PEAK_CACHE:
        path = _peak_file()
        try:
            stored = json.loads(path.read_text()) if path and path.is_file() else {}
        except ValueError:  # unreadable: measure again and rewrite it
            stored = {}
        if key not in stored:
            stored[key] = measure_matmul_peak(reps=10)
            if path:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")  # trials may race: whole file or none
                tmp.write_text(json.dumps(stored, indent=1) + "\n")
                tmp.replace(path)
        _PEAK_CACHE[key] = stored[key]
    return _PEAK_CACHE[key]


def mesh_peak_flops(mesh: jax.sharding.Mesh) -> float:
    """The mesh's peak FLOP/s for MFU: the sum over its devices on an accelerator. Fake CPU
    devices (xla_force_host_platform_device_count) share one host's cores, so there it is the
    measured peak of the host, once per process."""
    if mesh.devices.flat[0].platform == "cpu":
        return device_peak_flops() * jax.process_count()
    return device_peak_flops() * mesh.size
