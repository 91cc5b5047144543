"""Learning-rate schedules and the AdamW optimizer.

Schedules (step counted from 0; warmup reaches the peak lr at step `warmup_steps`):
  cosine:   linear warmup, then cosine from lr to min_lr_ratio·lr at the last step
  wsd:      linear warmup, constant lr, then linear decay to min_lr_ratio·lr over the last
            `decay_fraction` of the steps (warmup-stable-decay: a run can branch off the
            plateau and decay anywhere, which is what mixture sweeps over run lengths need)
  constant: linear warmup, then lr

Weight decay applies to matrices only (ndim >= 2), never to RMSNorm scales (stacked or not). The
embedding is decayed like every other matrix (nanoGPT/Chinchilla practice): with tied embeddings
it is also the output head, and an undecayed head drifts to large logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gemini_core.config import OptimizerConfig


def _warmup(opt: OptimizerConfig) -> optax.Schedule:
    if opt.warmup_steps == 0:
        return optax.constant_schedule(opt.lr)
    return optax.linear_schedule(0.0, opt.lr, opt.warmup_steps)


def _after_warmup(opt: OptimizerConfig, total_steps: int) -> optax.Schedule:
    min_lr = opt.lr * opt.min_lr_ratio
    steps = max(total_steps - opt.warmup_steps - 1, 1)  # the last step (total-1) hits min_lr
    if opt.schedule == "cosine":
        return optax.cosine_decay_schedule(opt.lr, steps, alpha=opt.min_lr_ratio)
    if opt.schedule == "wsd":
        decay = max(round(opt.decay_fraction * total_steps), 1)
        decay = min(decay, steps)
        stable = steps - decay
        return optax.join_schedules(
            [optax.constant_schedule(opt.lr), optax.linear_schedule(opt.lr, min_lr, decay)],
            [stable])
    if opt.schedule == "constant":
        return optax.constant_schedule(opt.lr)
    raise ValueError(f"OptimizerConfig.schedule={opt.schedule!r}: cosine | wsd | constant")


def lr_schedule(opt: OptimizerConfig, total_steps: int) -> optax.Schedule:
    if opt.warmup_steps == 0:
        return _after_warmup(opt, total_steps)
    return optax.join_schedules([_warmup(opt), _after_warmup(opt, total_steps)],
                                [opt.warmup_steps])


def decay_mask(params):
    """True for matrices (decayed), False for RMSNorm scales, by name as well as by shape: with
    `model.scan_layers` a block's scales are stacked into (layers, D), a matrix by shape alone."""
    def decayed(path, p) -> bool:
        return jnp.ndim(p) >= 2 and not any(getattr(k, "key", None) == "scale" for k in path)
    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(opt: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    adamw = optax.adamw(lr_schedule(opt, total_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                        weight_decay=opt.weight_decay, mask=decay_mask)
    if opt.clip_norm <= 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(opt.clip_norm), adamw)
