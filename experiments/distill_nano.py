"""Distillation of a small "Nano" student from a larger teacher, as Gemini trains Nano.

    gx run experiments/distill_nano.py:role=teacher --config.data.root=../shared/corpus
    gx run experiments/distill_nano.py --config.data.root=../shared/corpus \\
        --config.distill.teacher=<the teacher's run id>
    gx run experiments/distill_nano.py:role=scratch --config.data.root=../shared/corpus

role=student (default): the student, trained on alpha * KL(teacher || student) + (1 - alpha) *
cross-entropy (`distill.kl=reverse` for KL(student || teacher), `distill.top_k=K` to cache the
teacher's top K first and train without it in memory). role=teacher: the teacher, a larger model
on more tokens. role=scratch: the same student from scratch (the baseline at equal tokens).
All three share one tokenizer (its sample drawn by natural shares, not by the mixture), which
distillation needs: the teacher's and the student's token ids must mean the same.
size=small (default; bench/distill.py) or size=tiny (tests); steps=N trains for N steps
instead of the size's (the student and the scratch baseline alike: equal tokens), d=N makes
the model N wide instead of the size's (give both the same to compare them).
"""

import ml_collections

from gemini_core.experiment import parse_arg

SIZES = {  # role -> (d_model, layers, heads, steps); then batch, seq, vocab
    "small": {"teacher": (192, 4, 4, 1200), "student": (64, 2, 2, 400), "data": (32, 128, 4096)},
    "tiny": {"teacher": (48, 1, 2, 40), "student": (32, 1, 2, 16), "data": (4, 32, 384)},
}


def get_config(arg=None):
    a = parse_arg(arg, role="student", size="small", steps=0, d=0)
    if a.size not in SIZES or a.role not in ("student", "teacher", "scratch"):
        raise ValueError(f"role={a.role!r}, size={a.size!r}: role student|teacher|scratch, "
                         f"size {'|'.join(SIZES)}")
    d, layers, heads, steps = SIZES[a.size]["teacher" if a.role == "teacher" else "student"]
    steps = a.steps or steps  # the schedule (warmup, checkpoints, log cadence) follows it
    d = a.d or d
    batch, seq, vocab = SIZES[a.size]["data"]
    c = ml_collections.ConfigDict()
    c.name = {"teacher": "distill_teacher", "student": "distill_nano",
              "scratch": "distill_scratch"}[a.role] + ("_tiny" if a.size == "tiny" else "")
    c.seed = 0
    c.model = dict(d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=1,
                   mlp_dim=4 * d, tie_embeddings=True)
    c.data = dict(root="", seq_len=seq, schedule="", cache_dir="",
                  tokenizer=dict(vocab_size=vocab, sample_chars=2_000_000 if a.size == "small"
                                 else 200_000, sample_weights="natural"))
    c.mixture = dict(stages=dict(base=dict(start=0.0, weights="natural")))
    c.optimizer = dict(lr=3e-3, warmup_steps=max(steps // 20, 1), schedule="wsd",
                       decay_fraction=0.2)
    c.train = dict(steps=steps, batch_size=batch, log_every=max(steps // 40, 1), eval_every=0,
                   eval_batches=4 if a.size == "small" else 1,
                   checkpoint_every=max(steps // 4, 1))
    c.tracking = dict(wandb=True, project="gemini-core", job_type=f"distill-{a.role}")
    c.distill = dict(teacher="", alpha=0.5 if a.role == "student" else 0.0, temperature=1.0,
                     kl="forward", top_k=0)
    return c
