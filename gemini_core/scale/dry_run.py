"""`gx run --dry-run`: the plan of a run, from the validated config alone (no data read).

Parameter count, FLOPs per token, steps and tokens, tokens per domain from the schedule, the
Chinchilla-optimal token count (~20 tokens per parameter), memory for params + AdamW state, and
the per-device memory under the configured mesh: params, gradients and AdamW moments from the
sharding rules applied to the real state's shapes (the same rules training uses), activations
by formula (see `activation_bytes`), against `mesh.device_memory_gib`.

A layout that does not fit prints a "WARNING: does not fit" line and the command still exits 0:
the plan is an estimate (XLA's temporaries, fragmentation, rematerialisation are not modelled),
so it informs, and the run itself is the arbiter; scripts can look for the line.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp

from gemini_core.config import ExperimentConfig
from gemini_core.data.mixture import MixtureSchedule, domain_counts
from gemini_core.model.attention import BLOCKWISE_FROM
from gemini_core.scale import flops, sharding
from gemini_core.scale.compute_plan import si


def steps_per_stage(schedule: MixtureSchedule, total_steps: int) -> list[int]:
    firsts = schedule.first_steps(total_steps) + [total_steps]
    return [b - a for a, b in zip(firsts, firsts[1:])]


def tokens_per_domain(schedule: MixtureSchedule, domains, total_steps: int, batch_size: int,
                      seq_len: int) -> dict[str, int] | None:
    """Exactly what the sampler will draw: its own per-step counts, summed."""
    if any(isinstance(s.weights, str) for s in schedule.stages):
        return None  # "natural" weights are only known once the data is tokenized
    counts_TxD = domain_counts(schedule, domains, total_steps, batch_size, seq_len)
    bounds = schedule.first_steps(total_steps) + [total_steps]
    tokens_D = sum(counts_TxD[a:b].sum(axis=0) * length  # a stage of its own length
                   for a, b, length in zip(bounds, bounds[1:], schedule.seq_lens(seq_len)))
    return {d: int(n) for d, n in zip(domains, tokens_D)}


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.3g} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.3g} MiB"


def plan_mesh(cfg: ExperimentConfig) -> tuple[dict[str, int], str]:
    """Axis sizes to plan for, and where they came from. Explicit sizes plan for any slice;
    a -1 axis takes the devices JAX sees on this machine (no distributed init in a dry run)."""
    m = cfg.mesh
    if all(getattr(m, a) > 0 for a in sharding.MESH_AXES):
        return {a: getattr(m, a) for a in sharding.MESH_AXES}, "as configured"
    n = jax.device_count()
    auto = next(a for a in sharding.MESH_AXES if getattr(m, a) == -1)
    return sharding.mesh_shape(m, n), f"{auto}=-1 took the {n} device(s) JAX sees here"


def state_bytes_per_device(cfg: ExperimentConfig, sizes: dict[str, int],
                           rules: dict[str, tuple[str, ...]]) -> tuple[dict[str, float], list[str]]:
    """{"params", "optimizer"} bytes on one device, from the abstract train state (no arrays
    made) and the rules; and the parameters a rule could not split (dimension not divisible)."""
    from flax import nnx

    from gemini_core.train import step_fns

    state = nnx.state(nnx.eval_shape(
        lambda: step_fns.build(cfg.model, cfg.optimizer, cfg.train.steps, cfg.seed)))
    out = {"params": 0.0, "optimizer": 0.0}
    unsplit = []
    leaves = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    for path, var in leaves:
        names = var.get_metadata().get("out_sharding") or ()
        value = var.get_value()
        spec = sharding.spec_for(names, value.shape, rules, sizes) if names else ()
        nbytes = math.prod(value.shape) * jnp.dtype(value.dtype).itemsize
        part = "params" if str(path[0].key) == "model" else "optimizer"
        out[part] += nbytes / sharding.shard_factor(spec, sizes)
        if part == "params":
            wanted = sharding.spec_for(names, None, rules, sizes)
            if tuple(spec) != tuple(wanted):
                name = re.sub(r"^blocks\.\d+\.", "blocks.*.",
                              jax.tree_util.keystr(path[1:], simple=True, separator="."))
                item = f"{name}: {_spec_text(wanted)} -> {_spec_text(spec)}"
                if item not in unsplit:
                    unsplit.append(item)
    return out, unsplit


def _spec_text(spec) -> str:
    return "(" + ", ".join("-" if e is None else e if isinstance(e, str) else "+".join(e)
                           for e in spec) + ")"


def _size(n_bytes: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:,.3g} {unit}" if n_bytes < 1000 * scale else \
                f"{n_bytes / scale:,.0f} {unit}"
    return f"{n_bytes / 2**10:.3g} KiB"


def activation_bytes(cfg: ExperimentConfig, sizes: dict[str, int],
                     rules: dict[str, tuple[str, ...]]) -> float:
    """Activations one device keeps for the backward pass, estimated.

    Per token and per layer, in the activation dtype (a bytes) unless marked f32:
      residual input and its RMSNorm output, for attention and for the MLP   4·D
      fused q|k|v projection and the rotated q, k                            (2H + 3G)·K
      attention output before the out-projection                             H·K
      dense attention: the scores and their exponentials (f32; T keys)       2·H·T
      blockwise / cuDNN attention: one logsumexp per query and head (f32)    H
      MLP gate|up pre-activation, GeLU output and the gated product          4·F
    once per token: embedding D and final norm input/output 2·D; logits and the cross
    entropy's kept exponentials (f32) 2·V. `model.attention=auto` counts as dense below
    attention.BLOCKWISE_FROM tokens, as on CPU and TPU (on a GPU, cuDNN's: less).
    With `model.remat` full (or nothing_saveable) a layer keeps only its input (D) and one layer
    at a time holds its whole set while it is recomputed; other policies keep at most what no
    remat keeps, which is what is counted for them (an upper bound).
    Whole batch B·T tokens; on one device each term is divided by how many ways the mesh
    splits its (batch, length, heads | kv heads | mlp | vocab) dimensions under the rules.
    With the sequence split (context parallelism) a layer also holds the gathered keys and
    values of the whole sequence, 2·G·K per token of its batch rows, split by batch only.
    """
    m = cfg.model
    B, T, L = cfg.train.batch_size, cfg.data.seq_len, m.num_layers
    D, H, G, K, F, V = m.d_model, m.num_heads, m.num_kv_heads, m.qk_dim, m.ffw_dim, m.vocab_size
    a = jnp.dtype(m.dtype).itemsize

    def term(elems_per_token: float, itemsize: int, name: str | None = None, dim: int = 1,
             length: str | None = "length"):
        names = ("batch", length) + ((name,) if name else ())
        dims = (B, T) + ((dim,) if name else ())
        split = sharding.shard_factor(sharding.spec_for(names, dims, rules, sizes), sizes)
        return B * T * elems_per_token * itemsize / split

    dense = m.attention == "dense" or (m.attention == "auto" and T < BLOCKWISE_FROM)
    per_layer = (term(4 * D, a) + term(2 * H * K + H * K, a, "q_heads", H)
                 + term(3 * G * K, a, "kv_heads", G)
                 + term(2 * H * T if dense else H, 4, "q_heads", H) + term(4 * F, a, "mlp", F))
    context = sharding.shard_factor(sharding.spec_for(("length",), (T,), rules, sizes), sizes)
    if context > 1:
        per_layer += term(2 * G * K, a, "kv_heads", G, length=None)
    if m.remat in ("full", "nothing_saveable"):
        layers = L * term(D, a) + per_layer
    else:
        layers = L * per_layer
    return layers + term(3 * D, a) + term(2 * V, 4, "vocab", V)


def stage_configs(cfg: ExperimentConfig, schedule: MixtureSchedule | None
                  ) -> list[ExperimentConfig]:
    """The config as each stage of its own length trains it (rows and seq_len), for the
    activation estimate: the largest one counts."""
    if schedule is None:
        return [cfg]
    seq, rows = cfg.data.seq_len, schedule.batch_sizes(cfg.train.batch_size, cfg.data.seq_len)
    return [dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=n),
                                data=dataclasses.replace(cfg.data, seq_len=length))
            for n, length in zip(rows, schedule.seq_lens(seq))]


def render_mesh(cfg: ExperimentConfig, schedule: MixtureSchedule | None = None) -> list[str]:
    """The mesh lines of the plan: layout, per-device memory, and whether it fits."""
    m = cfg.mesh
    sizes, origin = plan_mesh(cfg)
    rules = {k: sharding.parse_rule(v) for k, v in m.rules.items()}
    n = math.prod(sizes.values())
    shape = " x ".join(f"{a}={s}" for a, s in sizes.items())
    by_axes: dict[str, list[str]] = {}
    for name, axes in rules.items():
        if axes:
            by_axes.setdefault(",".join(axes), []).append(name)
    rule_text = "; ".join(f"{', '.join(names)} -> {axes}" for axes, names in by_axes.items())
    lines = [f"mesh         {m.preset}: {shape} = {n} device{'s' * (n > 1)} ({origin})",
             f"rules        {rule_text or 'everything replicated'}"]
    batch_shards = sharding.shard_factor(sharding.spec_for(("batch",), None, rules, sizes), sizes)
    if cfg.train.batch_size % batch_shards:
        lines.append(f"WARNING: config.train.batch_size={cfg.train.batch_size} is not divisible "
                     f"by the {batch_shards} batch shards: the run would refuse it")
    state, unsplit = state_bytes_per_device(cfg, sizes, rules)
    for item in unsplit:
        lines.append(f"  not split as the rule says (dimension not divisible): {item}")
    params, opt = state["params"], state["optimizer"]
    grads = params  # gradients take their parameter's sharding
    acts = max(activation_bytes(c, sizes, rules) for c in stage_configs(cfg, schedule))
    total = params + grads + opt + acts
    budget = m.device_memory_gib * 2**30
    lines.append(f"per device   params {_size(params)} + grads {_size(grads)} + AdamW "
                 f"{_size(opt)} + activations {_size(acts)} (estimate) = {_size(total)} of "
                 f"{m.device_memory_gib:g} GiB (config.mesh.device_memory_gib): "
                 f"{total / budget:,.0%}")
    if total > budget:
        lines.append(f"WARNING: does not fit: {_size(total)} per device > "
                     f"{m.device_memory_gib:g} GiB; shard more (config.mesh.preset=fsdp or "
                     "fsdp_tp, more devices) or lower config.train.batch_size / "
                     "config.data.seq_len")
    return lines


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
        f"params       {counts['total']:,} total ({si(counts['total'])}); "
        f"{counts['non_embedding']:,} non-embedding; {counts['embedding']:,} embedding",
        f"FLOPs/token  {si(fpt)} (6·N_nonembed + 12·L·H·K·T)  ->  "
        f"{fpt * total_tokens:.3g} FLOPs for the run",
        f"steps        {t.steps:,} x batch {t.batch_size} x seq {seq} = "
        f"{total_tokens:,} tokens ({si(total_tokens)})",
        f"chinchilla   {si(chinchilla)} tokens optimal for {si(counts['total'])} params "
        f"(20/param); this run is {total_tokens / chinchilla:.3g}x that",
        f"memory       params {_gib(mem['params'])} + AdamW state {_gib(mem['optimizer'])} = "
        f"{_gib(mem['params'] + mem['optimizer'])} (f32, before activations)",
        *render_mesh(cfg, schedule),
        "schedule",
    ]
    stage_steps = steps_per_stage(schedule, t.steps)
    for stage, n in zip(schedule.stages, stage_steps):
        weights = stage.weights if isinstance(stage.weights, str) else ", ".join(
            f"{d}={w:.3g}" for d, w in stage.weights.items() if w)
        length = f", seq_len {stage.seq_len}" if stage.seq_len else ""
        lines.append(f"  from {stage.start:.3g} ({n:,} steps{length}): {weights}")
    per_domain = tokens_per_domain(schedule, cfg.data.domains, t.steps, t.batch_size, seq)
    lines.append("tokens per domain")
    if per_domain is None:
        lines.append("  natural weights: token shares, known once the data is tokenized")
    else:
        for d, n in per_domain.items():
            lines.append(f"  {d:<14}{n:>16,.0f}  ({n / total_tokens:6.1%})")
    return "\n".join(lines)
