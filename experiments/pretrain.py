"""Pretraining with Gemini-family shapes: nano, pro, ultra — full size, or scaled down to a CPU.

    gx run experiments/pretrain.py:size=nano --dry-run                  # the full Nano-size plan
    gx run experiments/pretrain.py:size=nano,d=256 --config.data.root=../shared/corpus
    gx run experiments/pretrain.py:size=nano,d=256 --config.data.schedule=PATH/winner.json
    gx run experiments/pretrain.py:size=nano,d=256,long=4 --config.data.root=../shared/corpus

Argument keys: size (nano|pro|ultra), d (0 = the family's full width; else a smaller width with
the family's depth/width ratio, head size cap, MLP ratio and K/V sharing kept), steps (0 = the
Chinchilla-optimal ~20 tokens per parameter), seq, batch, vocab (0 = family default), long
(0 = none; N: the last 10% is a long-context stage at N x seq, books and a synthetic passkey
domain upweighted, RoPE scaled by YaRN, documents masked: docs/long-context.md).
Nano follows the published Nano-1 scale (1.8B, multi-query attention); Pro and Ultra shapes are
not published, so they are our dense stand-ins of the same family at larger scale.
"""

import math

import ml_collections

from gemini_core.experiment import parse_arg

# full-size shapes: width, depth, head size, K/V heads (1 = multi-query), MLP ratio, vocab
FAMILIES = {
    "nano": dict(d_model=2048, num_layers=18, head_dim=256, num_kv_heads=1, mlp_ratio=8,
                 vocab=256_000, seq=8192, batch=512),
    "pro": dict(d_model=6144, num_layers=48, head_dim=128, num_kv_heads=8, mlp_ratio=8,
                vocab=256_000, seq=8192, batch=1024),
    "ultra": dict(d_model=12288, num_layers=96, head_dim=128, num_kv_heads=8, mlp_ratio=8,
                  vocab=256_000, seq=8192, batch=2048),
}
CPU_DEFAULTS = dict(vocab=8192, seq=256, batch=16)  # what a scaled-down (d>0) run uses


def _shape(family: dict, d: int) -> dict:
    if not d:
        d = family["d_model"]
        layers, head_dim = family["num_layers"], family["head_dim"]
    else:  # keep the family's depth/width ratio and shrink heads no smaller than 1/4 of d
        layers = max(2, round(family["num_layers"] * d / family["d_model"]))
        head_dim = min(family["head_dim"], d // 4)
    heads = d // head_dim
    group = max(1, (family["d_model"] // family["head_dim"]) // family["num_kv_heads"])
    kv_heads = 1 if family["num_kv_heads"] == 1 else max(1, heads // group)
    return dict(d_model=d, num_layers=layers, num_heads=heads, head_dim=head_dim,
                num_kv_heads=kv_heads, mlp_dim=family["mlp_ratio"] * d, tie_embeddings=True)


def _param_estimate(m: dict, vocab: int) -> int:
    d, k, h, kv = m["d_model"], m["head_dim"], m["num_heads"], m["num_kv_heads"]
    per_layer = d * (h * k) * 2 + d * (kv * k) * 2 + 3 * d * m["mlp_dim"] + 2 * d
    return m["num_layers"] * per_layer + vocab * d + d


def get_config(arg=None):
    a = parse_arg(arg, size="nano", d=0, steps=0, seq=0, batch=0, vocab=0, lr=0.0, long=0)
    if a.size not in FAMILIES:
        raise ValueError(f"size={a.size!r}: expected one of {', '.join(FAMILIES)}")
    family = FAMILIES[a.size]
    small = a.d > 0
    vocab = a.vocab or (CPU_DEFAULTS["vocab"] if small else family["vocab"])
    seq = a.seq or (CPU_DEFAULTS["seq"] if small else family["seq"])
    batch = a.batch or (CPU_DEFAULTS["batch"] if small else family["batch"])
    model = _shape(family, a.d)
    chinchilla_steps = math.ceil(20 * _param_estimate(model, vocab) / (batch * seq))

    c = ml_collections.ConfigDict()
    c.name = f"pretrain-{a.size}" + (f"-d{a.d}" if small else "")
    c.seed = 0
    c.model = model
    c.data = dict(root="", seq_len=seq, tokenizer=dict(vocab_size=vocab, sample_chars=5_000_000))
    # end-of-training upweighting of math and code over the last 10% (a winner.json from
    # `gx sweep` replaces this through --config.data.schedule)
    c.mixture = dict(stages=dict(
        base=dict(start=0.0, weights=dict(books=0.2, wiki=0.15, math=0.15, code=0.15, web=0.2,
                                          multilingual=0.15)),
        anneal=dict(start=0.9, weights=dict(books=0.15, wiki=0.15, math=0.25, code=0.25,
                                            web=0.1, multilingual=0.1)),
    ))
    steps = a.steps or chinchilla_steps
    c.optimizer = dict(lr=a.lr or (3e-3 if small else 3e-4), warmup_steps=min(2000, steps // 20),
                       schedule="wsd", decay_fraction=0.2, weight_decay=0.1, clip_norm=1.0)
    c.train = dict(steps=steps, batch_size=batch, log_every=10, eval_every=max(steps // 10, 1),
                   eval_batches=8, checkpoint_every=max(steps // 10, 1))
    c.tracking = dict(project="gemini-core", job_type="pretrain")
    if a.long > 1:
        _long_context_stage(c, a.long, seq)
    return c


def _long_context_stage(c: ml_collections.ConfigDict, factor: int, seq: int) -> None:
    """The anneal stage at `factor` x the context: long books and passkey retrieval documents
    upweighted (a twentieth of the base stage too), YaRN, packed documents masked."""
    stages = c.mixture.stages
    stages.base.weights = {**{d: 0.95 * w for d, w in stages.base.weights.items()},
                           "passkey": 0.05}
    stages.anneal.weights = dict(books=0.3, wiki=0.1, math=0.15, code=0.15, web=0.05,
                                 multilingual=0.05, passkey=0.2)
    stages.anneal.seq_len = factor * seq
    c.data.domains = ("books", "wiki", "math", "code", "web", "multilingual", "passkey")
    c.data.synthetic = dict(passkey=dict(kind="passkey", min_fillers=4,
                                         max_fillers=int(factor * seq / 5)))
    c.data.document_mask = True
    c.model.rope = dict(method="yarn", factor=float(factor), original_length=seq)
