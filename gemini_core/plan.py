"""`gx run --dry-run`: the plan of a run, from the validated config alone (no data read).

Parameter count, FLOPs per token, steps and tokens, tokens per domain from the schedule, the
Chinchilla-optimal token count (~20 tokens per parameter), and memory for params + AdamW state.
"""

from __future__ import annotations

from gemini_core import flops
from gemini_core.config import ExperimentConfig
from gemini_core.data.mixture import MixtureSchedule, domain_counts


def steps_per_stage(schedule: MixtureSchedule, total_steps: int) -> list[int]:
    firsts = schedule.first_steps(total_steps) + [total_steps]
    return [b - a for a, b in zip(firsts, firsts[1:])]


def tokens_per_domain(schedule: MixtureSchedule, domains, total_steps: int, batch_size: int,
                      seq_len: int) -> dict[str, int] | None:
    """Exactly what the sampler will draw: its own per-step counts, summed."""
    if any(isinstance(s.weights, str) for s in schedule.stages):
        return None  # "natural" weights are only known once the data is tokenized
    sequences = domain_counts(schedule, domains, total_steps, batch_size).sum(axis=0)
    return {d: int(n) * seq_len for d, n in zip(domains, sequences)}


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.3g} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.3g} MiB"


def render(cfg: ExperimentConfig, schedule: MixtureSchedule) -> str:
    m, t, seq = cfg.model, cfg.train, cfg.data.seq_len
    counts = flops.param_counts(m)
    tokens_per_step = t.batch_size * seq
    total_tokens = t.steps * tokens_per_step
    fpt = flops.flops_per_token(m, seq)
    chinchilla = flops.chinchilla_tokens(counts["total"])
    mem = flops.memory_bytes(m)
    lines = [
        f"experiment   {cfg.name}",
        f"model        d_model={m.d_model} layers={m.num_layers} heads={m.num_heads} "
        f"kv_heads={m.num_kv_heads} head_dim={m.qk_dim} mlp={m.ffw_dim} vocab={m.vocab_size} "
        f"tied={m.tie_embeddings}",
        f"params       {counts['total']:,} total ({_si(counts['total'])}); "
        f"{counts['non_embedding']:,} non-embedding; {counts['embedding']:,} embedding",
        f"FLOPs/token  {_si(fpt)} (6·N_nonembed + 12·L·H·K·T)  ->  "
        f"{fpt * total_tokens:.3g} FLOPs for the run",
        f"steps        {t.steps:,} x batch {t.batch_size} x seq {seq} = "
        f"{total_tokens:,} tokens ({_si(total_tokens)})",
        f"chinchilla   {_si(chinchilla)} tokens optimal for {_si(counts['total'])} params "
        f"(20/param); this run is {total_tokens / chinchilla:.3g}x that",
        f"memory       params {_gib(mem['params'])} + AdamW state {_gib(mem['optimizer'])} = "
        f"{_gib(mem['params'] + mem['optimizer'])} (f32, before activations)",
        "schedule",
    ]
    stage_steps = steps_per_stage(schedule, t.steps)
    for stage, n in zip(schedule.stages, stage_steps):
        weights = stage.weights if isinstance(stage.weights, str) else ", ".join(
            f"{d}={w:.3g}" for d, w in stage.weights.items() if w)
        lines.append(f"  from {stage.start:.3g} ({n:,} steps): {weights}")
    per_domain = tokens_per_domain(schedule, cfg.data.domains, t.steps, t.batch_size, seq)
    lines.append("tokens per domain")
    if per_domain is None:
        lines.append("  natural weights: token shares, known once the data is tokenized")
    else:
        for d, n in per_domain.items():
            lines.append(f"  {d:<14}{n:>16,.0f}  ({n / total_tokens:6.1%})")
    return "\n".join(lines)
