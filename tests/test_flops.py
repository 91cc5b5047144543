import dataclasses
import math

import jax
from flax import nnx

from gemini_core.config import ModelConfig
from gemini_core.model.transformer import Transformer
from gemini_core.scale import flops

# the PyTorch peer's config (a): V8192 D256 L4 H4, one kv head, mlp 4·D, untied head
PEER_A = ModelConfig(d_model=256, num_layers=4, num_heads=4, num_kv_heads=1,
                     tie_embeddings=False, vocab_size=8192)


def nnx_param_count(cfg: ModelConfig) -> int:
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(params=0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def test_peer_config_a_by_hand():
    D, L, H, K, F, V, T = 256, 4, 4, 64, 1024, 8192, 256
    q = D * H * K                      # 65,536
    kv = 2 * D * 1 * K                 # 32,768: one shared k and v head
    o = H * K * D                      # 65,536
    mlp = 3 * D * F                    # 786,432: gate, up, down
    norms = 2 * D                      # 512
    block = q + kv + o + mlp + norms   # 950,784
    head = D * V                       # 2,097,152 (untied: a matmul, so non-embedding)
    non_embedding = L * block + D + head  # + final norm = 5,900,544
    embedding = V * D                  # 2,097,152
    assert block == 950_784
    assert non_embedding == 5_900_544  # what torch_lm.py prints for this config
    counts = flops.param_counts(PEER_A)
    assert counts == {"total": 7_997_696, "embedding": embedding, "non_embedding": non_embedding,
                      "media": 0}  # a text model: no encoders
    assert nnx_param_count(PEER_A) == counts["total"]

    attention = 12 * L * H * K * T    # 3,145,728 per token: QK^T and AV, fwd + bwd
    per_token = 6 * non_embedding + attention  # 35,403,264 + 3,145,728
    assert flops.flops_per_token(PEER_A, T) == per_token == 38_548_992
    tokens = 16 * T                   # one step of batch 16
    # torch_lm.py prints "model FLOPs/step 157.90 GFLOP" for this config
    assert flops.training_flops(PEER_A, T, tokens) == per_token * tokens == 157_896_671_232


def test_tied_head_counted_once_but_still_costs_flops():
    tied = dataclasses.replace(PEER_A, tie_embeddings=True)
    D, V, T = 256, 8192, 256
    counts = flops.param_counts(tied)
    assert counts["non_embedding"] == 5_900_544 - D * V
    assert counts["total"] == 7_997_696 - D * V
    assert nnx_param_count(tied) == counts["total"]
    # the head matmul runs either way: same FLOPs as untied
    assert flops.flops_per_token(tied, T) == flops.flops_per_token(PEER_A, T)


def test_gqa_and_explicit_head_dim_counts_match_the_model():
    cfg = ModelConfig(d_model=48, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=16,
                      mlp_dim=100, vocab_size=300)
    D, L, H, G, K, F, V = 48, 3, 6, 2, 16, 100, 300
    block = D * H * K + 2 * D * G * K + H * K * D + 3 * D * F + 2 * D
    assert flops.param_counts(cfg)["total"] == V * D + L * block + D
    assert nnx_param_count(cfg) == flops.param_counts(cfg)["total"]
    assert flops.flops_per_token(cfg, 64) == 6 * (L * block + D + D * V) + 12 * L * H * K * 64


def test_memory_and_chinchilla():
    n = 7_997_696
    assert flops.memory_bytes(PEER_A) == {"params": 4 * n, "optimizer": 8 * n}
    bf16 = dataclasses.replace(PEER_A, param_dtype="bfloat16")
    assert flops.memory_bytes(bf16)["params"] == 2 * n
    assert flops.chinchilla_tokens(n) == 20 * n


def test_measured_peak_is_a_positive_rate():
    peak = flops.measure_matmul_peak(n=128, reps=3)
    assert math.isfinite(peak) and peak > 0


def test_cpu_peak_is_measured_once_and_kept_beside_the_compilation_cache(tmp_path, monkeypatch):
    import jax
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax"))
    try:
        _check_peak_file(tmp_path, monkeypatch)
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def _check_peak_file(tmp_path, monkeypatch):
    import json

    import jax
    monkeypatch.setattr(flops, "_PEAK_CACHE", {})
    measured = flops.device_peak_flops()
    stored = json.loads((tmp_path / "jax" / "cpu_matmul_peak.json").read_text())
    key = flops.peak_key(jax.devices()[0].device_kind)
    assert stored == {key: measured} and measured > 0
    # another process (an empty in-memory cache) reads the file instead of measuring
    (tmp_path / "jax" / "cpu_matmul_peak.json").write_text(json.dumps({key: 123.0}))
    monkeypatch.setattr(flops, "_PEAK_CACHE", {})
    assert flops.device_peak_flops() == 123.0
    (tmp_path / "jax" / "cpu_matmul_peak.json").write_text("{not json")  # torn: measured again
    monkeypatch.setattr(flops, "_PEAK_CACHE", {})
    assert flops.device_peak_flops() > 0
    assert key in json.loads((tmp_path / "jax" / "cpu_matmul_peak.json").read_text())


def test_an_environment_compilation_cache_wins_over_the_runs_roots(tmp_path, monkeypatch):
    """One cache for several runs roots (this test session's, a CI job's); without the
    variable, each runs root keeps its own."""
    from gemini_core.train.trainer import enable_compilation_cache
    before = jax.config.jax_compilation_cache_dir
    try:
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "shared"))
        enable_compilation_cache(tmp_path / "root")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "shared")
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
        enable_compilation_cache(tmp_path / "root")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "root" / "jax")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
