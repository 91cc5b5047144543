"""Quickstart: a small Gemini-style decoder on the six-domain corpus, end to end on a CPU.

    gx run experiments/quickstart.py --config.data.root=../shared/corpus

Prepares the data, trains a SentencePiece tokenizer on the mix, trains for a few minutes, and
ends with held-out loss and bits-per-byte per domain. An end-of-training stage upweights math
and code, as the Gemini reports describe.
"""

import ml_collections


def get_config(arg=None):
    del arg  # one fixed size: small enough for 2 CPU cores in a few minutes
    c = ml_collections.ConfigDict()
    c.name = "quickstart"
    c.seed = 0

    c.model = dict(d_model=128, num_layers=4, num_heads=4, num_kv_heads=1, mlp_dim=512,
                   tie_embeddings=True)

    c.data = dict(root="", seq_len=128, max_epochs=4.0, schedule="",
                  tokenizer=dict(vocab_size=4096, model_type="bpe", sample_chars=2_000_000))

    c.mixture = dict(stages=dict(
        base=dict(start=0.0, weights=dict(books=0.2, wiki=0.15, math=0.15, code=0.15, web=0.2,
                                          multilingual=0.15)),
        anneal=dict(start=0.8, weights=dict(books=0.15, wiki=0.15, math=0.25, code=0.25,
                                            web=0.1, multilingual=0.1)),
    ))

    c.optimizer = dict(lr=3e-3, warmup_steps=30, schedule="wsd", decay_fraction=0.2,
                       weight_decay=0.1, clip_norm=1.0)
    c.train = dict(steps=600, batch_size=32, log_every=10, eval_every=200, eval_batches=4,
                   checkpoint_every=200)
    c.tracking = dict(wandb=True, project="gemini-core", job_type="quickstart")
    return c
