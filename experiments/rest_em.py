"""Self-training beyond human data (ReST^EM, Singh et al. 2023) on procedural math word problems.

    gx run experiments/rest_em.py:role=base --config.data.root=../shared/corpus     # the base
    gx run experiments/rest_em.py --config.base=<the base's run id>                  # ReST^EM

role=base pretrains the quickstart's model on the six text domains plus a synthetic domain of
arithmetic word problems with worked solutions (gemini_core/data/word_problems.py), 40% of the
tokens: enough to learn the format and some arithmetic, so its pass@k on new problems is above
zero and self-training has something to amplify. role=rest_em (default) runs `iterations`
rounds of sample (E-step) / verify / fine-tune the base (M-step) on new problems of the same
generator (other seeds), with the SFT-on-human-solutions baseline, samples checked by
word_problems.check_work (the answer and every equation of the work); docs/self-training.md.
level=hard: operands up to 20 and x 2 / x 3 steps (both roles: pretrain the base at the level
you self-train at). size=tiny: a model and loop small enough for tests. steps=N: the base's steps.
"""

import ml_collections

from gemini_core.experiment import parse_arg

TEXT = ("books", "wiki", "math", "code", "web", "multilingual")
# the problems' difficulty, shared by pretraining and the self-training task: easy (one-digit
# operands, + and -) or hard (operands up to 20, and x 2 / x 3)
LEVELS = dict(easy=dict(min_steps=1, max_steps=3, max_operand=9, ops="+-"),
              hard=dict(min_steps=1, max_steps=3, max_operand=20, ops="+-x"))


def base_config(size: str, steps: int, level: str) -> ml_collections.ConfigDict:
    tiny = size == "tiny"
    c = ml_collections.ConfigDict()
    c.name = "rest_em_base" + ("_tiny" if tiny else "") + ("_hard" if level == "hard" else "")
    c.seed = 0
    d, layers = (32, 1) if tiny else (128, 4)
    c.model = dict(d_model=d, num_layers=layers, num_heads=2 if tiny else 4, num_kv_heads=1,
                   mlp_dim=4 * d, tie_embeddings=True)
    words = dict(kind="word_problems", train_documents=2_000 if tiny else 60_000,
                 valid_documents=100 if tiny else 500, seed=100, **LEVELS[level])
    c.data = dict(root="", seq_len=128, max_epochs=8.0, schedule="", document_mask=True,
                  domains=(*TEXT, "word_problems"), synthetic=dict(word_problems=words),
                  tokenizer=dict(vocab_size=384 if tiny else 4096, model_type="bpe",
                                 sample_chars=200_000 if tiny else 2_000_000))
    weights = dict(books=0.15, wiki=0.1, math=0.1, code=0.1, web=0.1, multilingual=0.05,
                   word_problems=0.4)
    c.mixture = dict(stages=dict(base=dict(start=0.0, weights=weights)))
    c.optimizer = dict(lr=1e-3, warmup_steps=5 if tiny else 30, schedule="wsd", decay_fraction=0.2,
                       weight_decay=0.0, clip_norm=1.0)
    c.train = dict(steps=steps or (20 if tiny else 1200), batch_size=8 if tiny else 32,
                   log_every=10, eval_every=0, eval_batches=1 if tiny else 4,
                   checkpoint_every=steps or (20 if tiny else 300))
    c.tracking = dict(wandb=not tiny, project="gemini-core", job_type="rest_em_base")
    return c


def get_config(arg=None):
    a = parse_arg(arg, role="rest_em", size="small", steps=0, level="easy")
    if a.role not in ("base", "rest_em") or a.size not in ("small", "tiny") or (
            a.level not in LEVELS):
        raise ValueError(f"role={a.role!r}, size={a.size!r}, level={a.level!r}: role "
                         f"base|rest_em, size small|tiny, level {'|'.join(LEVELS)}")
    if a.role == "base":
        return base_config(a.size, a.steps, a.level)
    return rest_em_config(a.size, a.level)


def rest_em_config(size: str, level: str) -> ml_collections.ConfigDict:
    tiny = size == "tiny"
    c = ml_collections.ConfigDict()
    c.method = "rest_em"
    c.name = "rest_em" + ("_tiny" if tiny else "") + ("_hard" if level == "hard" else "")
    c.base = ""
    c.task = "word_problems"
    # the work checked, not only the final answer: with the answer alone, 285 of the 363
    # samples a weak base got "right" had a false equation (bench/results/rest_em_*)
    c.verifier = "gemini_core.data.word_problems:check_work"
    c.iterations = 1 if tiny else 3
    c.seed = 0
    c.problems = dict(train=24 if tiny else 1000, valid=8 if tiny else 100,
                      test=12 if tiny else 300, seed=1, **LEVELS[level])
    c.sample = dict(samples=4 if tiny else 16, keep=2 if tiny else 4, temperature=1.0,
                    max_new_tokens=24 if tiny else 64, shard_problems=8 if tiny else 100,
                    workers=0 if tiny else 2, batch_size=32 if tiny else 100)
    c.finetune = dict(lr=1e-3 if tiny else 3e-4, batch_size=8 if tiny else 32,
                      steps=6 if tiny else 400, eval_every=3 if tiny else 50, patience=3)
    c.held_out = dict(samples=4 if tiny else 8, pass_k=(1, 4) if tiny else (1, 4, 8),
                      temperature=1.0)
    c.tracking = dict(wandb=not tiny, project="gemini-core", job_type="rest_em")
    return c
