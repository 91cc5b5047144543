"""Scaling ladder: a grid of model sizes x token budgets, then L(N, D) = E + A/N^alpha + B/D^beta.

    gx scaling run experiments/scaling_ladder.py --config.base.data.root=../shared/corpus
    gx scaling run experiments/scaling_ladder.py:size=tiny --config.base.data.root=../shared/corpus
    gx scaling fit scaling_ladder --holdout-largest 1          # refit a finished ladder

Every run is the same small decoder of the pretrain family (multi-query attention, MLP ratio 8,
head size d/4, the family's depth rule: 2 layers at these widths) with its own width and its own
number of steps; the learning-rate schedule (WSD) ends at each run's last step, so every final
loss is a fully decayed one, as Chinchilla's approach 3 needs. `size=small` (default): 5 widths
x 4 budgets (0.26M-2.1M tokens; about 1,200 CPU-seconds of training steps, so roughly 10-15
minutes on 2 idle cores; bench/results/scaling_fit_* has what we measured); `size=tiny`: 3 widths x 2
budgets of very small models, a few seconds each, for tests.
"""

import ml_collections

from gemini_core.experiment import parse_arg

LADDERS = {  # widths, steps (token budgets), seq, batch, vocab, tokenizer sample chars
    "small": ((32, 48, 64, 96, 128), (128, 256, 512, 1024), 128, 16, 2048, 2_000_000),
    "tiny": ((16, 24, 32), (12, 24), 32, 4, 384, 200_000),
}
FAMILY = dict(d_model=2048, num_layers=18, mlp_ratio=8)  # experiments/pretrain.py's nano


def _shape(d: int) -> dict:
    # the pretrain family's rule: its depth/width ratio (at least 2 layers), heads of size d/4
    layers = max(2, round(FAMILY["num_layers"] * d / FAMILY["d_model"]))
    return dict(d_model=d, num_layers=layers, num_heads=4, head_dim=d // 4, num_kv_heads=1,
                mlp_dim=FAMILY["mlp_ratio"] * d, tie_embeddings=True)


def get_config(arg=None):
    a = parse_arg(arg, size="small")
    if a.size not in LADDERS:
        raise ValueError(f"size={a.size!r}: one of {', '.join(LADDERS)}")
    widths, steps, seq, batch, vocab, sample_chars = LADDERS[a.size]

    base = ml_collections.ConfigDict()
    base.name = "base"  # replaced by the ladder's name: the runs' experiment and W&B group
    base.model = _shape(widths[0])  # replaced per size below
    base.data = dict(root="", seq_len=seq, cache_dir="",
                     domains=("books", "wiki", "math", "code", "web", "multilingual"),
                     tokenizer=dict(vocab_size=vocab, sample_chars=sample_chars,
                                    sample_weights="natural"))
    base.mixture = dict(stages=dict(base=dict(start=0.0, weights="natural")))
    base.optimizer = dict(lr=3e-3, warmup_steps=min(steps) // 8, schedule="wsd",
                          decay_fraction=0.2, weight_decay=0.1, clip_norm=1.0)
    base.train = dict(steps=min(steps), batch_size=batch, log_every=max(min(steps) // 4, 1),
                      eval_every=0, eval_batches=8 if a.size == "small" else 2,
                      checkpoint_every=256 if a.size == "small" else 0)
    base.tracking = dict(wandb=True, project="gemini-core", job_type="scaling", tags=())

    c = ml_collections.ConfigDict()
    c.name = "scaling_ladder" if a.size == "small" else f"scaling_ladder_{a.size}"
    c.base = base
    # size name -> fields replacing the base's (explicit shapes; an lr per size would go here)
    c.sizes = {f"d{d}": dict(model=_shape(d)) for d in widths}
    c.steps = steps  # token budget of each run: steps x batch x seq tokens
    # budgets: FLOPs of the compute-optimal table; () = the largest run's x1, x10, x100, x1000
    c.fit = dict(bootstrap=200, holdout_largest=0, delta=1e-3, starts=64, seed=0, budgets=())
    c.resources = dict(cpus_per_trial=1, max_concurrent=0, max_failures=1)
    return c
