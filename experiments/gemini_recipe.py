"""The Gemini recipe as one pipeline: curated data -> a tokenizer trained on that mix -> a mixture
sweep of small proxies -> pretraining on the winning schedule -> a smaller student distilled
from the pretrained model.

    gx run experiments/gemini_recipe.py:size=tiny --config.params.corpus=../shared/corpus
    gx run experiments/gemini_recipe.py:size=tiny --config.params.corpus=../shared/corpus \\
        --config.steps.prepare.config.classifier.drop_fraction=0.2 --dry-run
    gx run experiments/gemini_recipe.py:size=tiny --config.params.corpus=../shared/corpus \\
        --force pretrain
    gx ls

Each step names an experiment file (relative to this folder) and the fields it sets over that
file's own; `inputs` fill fields from other steps' outputs ("ref:<step>.<output>") or from
`params`. size=small (default): the whole corpus, the 24-trial sweep with validation, a d=256
Nano-shaped model and the small distilled student; size=tiny: a slice of the corpus and test-
scale everything (a few minutes on 2 cores). gx/recipe/ runs it.
"""

import ml_collections

from gemini_core.experiment import parse_arg

SIZES = {
    "small": dict(max_docs=0, vocab=4096, sample_chars=2_000_000,
                  sweep="mixture_sweep.py:size=small", sweep_fields={},
                  pretrain="pretrain.py:size=nano,d=256,steps=2000,seq=256,batch=16",
                  pretrain_fields={}, student="distill_nano.py:size=small"),
    "tiny": dict(max_docs=40, vocab=384, sample_chars=200_000,
                 sweep="mixture_sweep.py:size=tiny",
                 sweep_fields=dict(space=dict(trials=6), fit=dict(folds=2, samples=2000),
                                   validate=dict(enabled=False)),
                 pretrain="pretrain.py:size=nano,d=48,steps=40,seq=32,batch=4",
                 pretrain_fields=dict(train=dict(log_every=10, eval_every=0, eval_batches=1,
                                                 checkpoint_every=20)),
                 student="distill_nano.py:size=tiny"),
}


def get_config(arg=None):
    a = parse_arg(arg, size="small")
    if a.size not in SIZES:
        raise ValueError(f"size={a.size!r}: one of {', '.join(SIZES)}")
    s = SIZES[a.size]
    suffix = "" if a.size == "small" else f"_{a.size}"
    c = ml_collections.ConfigDict()
    c.name = f"gemini_recipe{suffix}"
    c.params = dict(corpus="", wandb=True)  # the raw corpus folder; W&B (offline) for the runs
    c.steps = ml_collections.ConfigDict()

    cleaned = "ref:prepare.data_root"
    tokenizer = "ref:tokenizer.settings"
    c.steps.prepare = dict(
        kind="data_prepare", experiment="data_prep.py",
        config=dict(name=f"recipe_data{suffix}", data=dict(max_docs=s["max_docs"]),
                    classifier=dict(drop_fraction=0.1), safety=dict(max_matches=2),
                    dedup=dict(threshold=0.8)),
        inputs=dict(data=dict(root="ref:params.corpus")))
    # natural shares: one tokenizer for every mixture the sweep tries and the winner
    c.steps.tokenizer = dict(
        kind="tokenizer",
        config=dict(tokenizer=dict(vocab_size=s["vocab"], model_type="bpe",
                                   sample_chars=s["sample_chars"], sample_weights="natural")),
        inputs=dict(root=cleaned))
    c.steps.sweep = dict(
        kind="sweep", experiment=s["sweep"],
        config=dict(name=f"recipe_sweep{suffix}", **s["sweep_fields"]),
        inputs=dict(proxy=dict(data=dict(root=cleaned, tokenizer=tokenizer),
                               tracking=dict(wandb="ref:params.wandb"))))
    c.steps.pretrain = dict(
        kind="train", experiment=s["pretrain"],
        config=dict(name=f"recipe_pretrain{suffix}", **s["pretrain_fields"]),
        inputs=dict(data=dict(root=cleaned, tokenizer=tokenizer, schedule="ref:sweep.winner"),
                    tracking=dict(wandb="ref:params.wandb")))
    c.steps.distill = dict(
        kind="distill", experiment=s["student"],
        config=dict(name=f"recipe_nano{suffix}", distill=dict(alpha=0.5, temperature=1.0)),
        inputs=dict(data=dict(root=cleaned, tokenizer=tokenizer, schedule="ref:sweep.winner"),
                    distill=dict(teacher="ref:pretrain.run_id"),
                    tracking=dict(wandb="ref:params.wandb")))
    return c
