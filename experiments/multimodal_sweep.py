"""A mixture sweep over text, image and audio: the modality domains' weights are searched like
any domain's (RegMix-style proxies, a regression per metric, the predicted best mixture), for
an objective over the modality tasks and the text.

    gx sweep experiments/multimodal_sweep.py --config.proxy.data.root=../shared/corpus
    gx sweep experiments/multimodal_sweep.py:size=tiny --config.proxy.data.root=../shared/corpus

The objective is the caption bits per byte of the two modality tasks (smooth where a small
proxy's accuracy still sits near chance), with the text held within 2% of the natural
mixture's mean domain loss. Every proxy scores both tasks on a fixed part of their search half
of the held-out items; the validation (2 seeds, against the natural and the uniform mixture)
scores the other half. docs/multimodal.md has the results.
"""

from pathlib import Path

import ml_collections

from gemini_core.experiment import parse_arg

MULTIMODAL = str(Path(__file__).resolve().parents[1].parent / "shared" / "multimodal")
TEXT = ("books", "wiki", "math", "code", "web", "multilingual")

PROXIES = {  # d_model, layers, heads, steps, batch, seq, vocab, trials
    "small": (64, 2, 2, 400, 16, 128, 2048, 12),
    "tiny": (32, 1, 2, 24, 4, 64, 384, 6),
}
TASKS = ("fashion_mnist", "spoken_digits")


def get_config(arg=None):
    a = parse_arg(arg, size="small")
    if a.size not in PROXIES:
        raise ValueError(f"size={a.size!r}: one of {', '.join(PROXIES)}")
    d, layers, heads, steps, batch, seq, vocab, trials = PROXIES[a.size]
    proxy = ml_collections.ConfigDict()
    proxy.name = "proxy"
    proxy.model = dict(d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=1,
                       mlp_dim=4 * d, tie_embeddings=True,
                       encoders=dict(image=dict(modality="image", patch=7),
                                     audio=dict(modality="audio", n_mels=40,
                                                frames_per_token=4, max_tokens=32)))
    proxy.data = dict(
        root="", seq_len=seq, schedule="", cache_dir="", document_mask=True,
        domains=TEXT + ("image_caption", "audio_transcript"),
        modalities=dict(
            image_caption=dict(kind="image_caption", source=f"{MULTIMODAL}/fashion_mnist",
                               encoder="image"),
            audio_transcript=dict(kind="audio_transcript",
                                  source=f"{MULTIMODAL}/spoken_digits", encoder="audio")),
        tokenizer=dict(vocab_size=vocab, sample_chars=500_000, sample_weights="natural"))
    proxy.mixture = dict(stages=dict(base=dict(start=0.0, weights="natural")))
    proxy.optimizer = dict(lr=3e-3, warmup_steps=max(steps // 10, 1), schedule="wsd",
                           decay_fraction=0.2)
    proxy.train = dict(steps=steps, batch_size=batch, log_every=10, eval_every=0,
                       eval_batches=2, checkpoint_every=max(steps // 3, 1))
    proxy.tracking = dict(wandb=True, project="gemini-core", job_type="proxy", tags=())
    proxy.eval = dict(downstream=dict(tasks=TASKS, limit=300 if a.size != "tiny" else 8,
                                      final_limit=-1))

    c = ml_collections.ConfigDict()
    c.name = f"multimodal_sweep_{a.size}"
    c.proxy = proxy
    c.target_tokens = 0  # 0 = 4x the proxy's tokens
    c.space = dict(trials=trials, prior="natural", prior_power=0.5, concentration=(0.3, 5.0),
                   min_weight=0.02, max_epochs=30.0, anneal=False,
                   anchors=("natural", "uniform"), seed=0)
    c.objective = dict(targets={"downstream/fashion_mnist/bpb": 0.5,
                                "downstream/spoken_digits/bpb": 0.5},
                       max_worse_than_baseline=0.0, constraints={"loss/mean": 0.02})
    c.fit = dict(folds=4, regressors=("linear", "logweight", "loglinear", "lightgbm"),
                 holdout_fraction=0.25, method="search", samples=50_000, prefer_measured=True,
                 prefer_baseline=False)
    c.method = "regression"
    c.resources = dict(cpus_per_trial=1, max_concurrent=0, max_failures=1)
    c.validate = dict(enabled=True, seeds=2 if a.size != "tiny" else 1,
                      scales=("proxy",) if a.size == "tiny" else ("proxy", "target"),
                      target={}, boost=(), rank_trials=0, rank_seeds=1, generate=False,
                      doremi=False)
    return c
