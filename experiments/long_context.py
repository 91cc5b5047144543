"""The quickstart's model with a long-context stage, as the Gemini recipe ends pretraining:
the last quarter of training at `long` x the context (4 x 128 = 512 tokens by default), long
books and a synthetic passkey domain upweighted, RoPE scaled for it by YaRN, packed documents
masked from each other.

    gx run experiments/long_context.py --config.data.root=../shared/corpus
    gx eval RUN --tasks needle --needle-lengths 128,256,512
    gx run experiments/long_context.py:long=1 --config.data.root=../shared/corpus   # baseline

`long=1` is the same run without the stage (same data, same steps, unscaled RoPE): the model the
needle table compares with. `steps=N` trains N steps (default 600, as the quickstart).
The passkey domain (gemini_core/data/synthetic.py) is generated from its seed into the data
cache: documents that hide a 5-digit key in filler text and ask for it at the end, 70-550
tokens long, a tenth of the base stages' tokens and three tenths of the long stage's.
"""

import ml_collections

from gemini_core.experiment import parse_arg

TEXT = ("books", "wiki", "math", "code", "web", "multilingual")
BASE = dict(books=0.18, wiki=0.135, math=0.135, code=0.135, web=0.18, multilingual=0.135,
            passkey=0.1)
LONG = dict(books=0.3, wiki=0.08, math=0.08, code=0.08, web=0.08, multilingual=0.08,
            passkey=0.3)


def get_config(arg=None):
    a = parse_arg(arg, long=4, steps=600)
    c = ml_collections.ConfigDict()
    c.name = "long_context" if a.long > 1 else "long_context_baseline"
    c.seed = 0
    c.model = dict(d_model=128, num_layers=4, num_heads=4, num_kv_heads=1, mlp_dim=512,
                   tie_embeddings=True)
    seq_len = 128
    c.data = dict(root="", seq_len=seq_len, max_epochs=8.0, schedule="", document_mask=True,
                  domains=(*TEXT, "passkey"),
                  synthetic=dict(passkey=dict(kind="passkey", train_documents=20_000,
                                              valid_documents=500, min_fillers=4,
                                              max_fillers=100, seed=0)),
                  tokenizer=dict(vocab_size=4096, model_type="bpe", sample_chars=2_000_000))
    anneal = dict(start=0.75, weights=LONG)
    if a.long > 1:
        anneal["seq_len"] = a.long * seq_len
        c.model.rope = dict(method="yarn", factor=float(a.long), original_length=seq_len)
    c.mixture = dict(stages=dict(base=dict(start=0.0, weights=BASE), anneal=anneal))
    c.optimizer = dict(lr=3e-3, warmup_steps=30, schedule="wsd", decay_fraction=0.2,
                       weight_decay=0.1, clip_norm=1.0)
    c.train = dict(steps=a.steps, batch_size=32, log_every=10, eval_every=200, eval_batches=4,
                   checkpoint_every=200)
    c.tracking = dict(wandb=True, project="gemini-core", job_type="long_context")
    return c
