"""Mixture sweep (RegMix-style): proxy runs over sampled two-stage schedules, a regression per
domain, and the mixture it predicts best, written as winner.json.

    gx sweep experiments/mixture_sweep.py --config.proxy.data.root=../shared/corpus
    gx sweep experiments/mixture_sweep.py:size=tiny --config.proxy.data.root=../shared/corpus
    gx run experiments/pretrain.py:size=nano,d=256 --config.data.root=../shared/corpus \\
        --config.data.schedule=runs/sweeps/<sweep>/winner.json

`size=small` (default): 24 trials of a 2-layer d=64 proxy trained 600 steps (1.2M tokens; ~20
minutes on 2 cores: 150-step proxies were too noisy to rank mixtures, README "Mixture
quality"); `size=mini`: 16 trials of a 2-layer d=48 proxy of 300 steps; `size=tiny`: 8 trials
of a 1-layer d=32 proxy for a test-scale run in a few minutes. `--config.method=doremi`
replaces the swarm and the fit by DoReMi's two proxy runs.

`objective=gsm8k|code|suite` chooses the mixture for a capability (docs/capabilities.md): every
proxy scores the public tasks' gold-answer bpb on a fixed part of their search half, the fit
predicts the objective's task (GSM8K, HumanEval, or the mean over all tasks), with the mean domain
loss held within 2% of the natural mixture's for a single capability; the validation (3 seeds)
scores every task on the held-out half.
"""

import ml_collections

from gemini_core.experiment import parse_arg

PROXIES = {  # d_model, layers, heads, steps, batch, seq, vocab, trials
    "small": (64, 2, 2, 600, 16, 128, 2048, 24),
    "mini": (48, 2, 2, 300, 16, 128, 2048, 16),
    "tiny": (32, 1, 2, 24, 4, 32, 384, 8),
}
# objective=: what the mixture is chosen for, the tasks every proxy scores for it (gold bpb on
# a fixed subset of each task's search half; the validation scores the held-out half), and the
# constraint: no more than 2% on the mean domain loss against the natural mixture
SUITE = ("arc_easy", "arc_challenge", "piqa", "lambada", "xcopa", "gsm8k", "humaneval", "mbpp")
OBJECTIVES = {
    "loss": ((), {}, {}),
    "gsm8k": (SUITE, {"downstream/gsm8k/bpb": 1.0}, {"loss/mean": 0.02}),
    # HumanEval rather than MBPP: MBPP's gold bpb on 100 held-out problems moved 0.3 bits
    # between seeds of one mixture at the mini target scale, HumanEval's 0.03-0.04
    "code": (SUITE, {"downstream/humaneval/bpb": 1.0}, {"loss/mean": 0.02}),
    "suite": (SUITE, {"downstream/*/bpb": 1.0}, {}),
}


def get_config(arg=None):
    a = parse_arg(arg, size="small", objective="loss")
    if a.size not in PROXIES:
        raise ValueError(f"size={a.size!r}: one of {', '.join(PROXIES)}")
    if a.objective not in OBJECTIVES:
        raise ValueError(f"objective={a.objective!r}: one of {', '.join(OBJECTIVES)}")
    tasks, targets, constraints = OBJECTIVES[a.objective]
    d, layers, heads, steps, batch, seq, vocab, trials = PROXIES[a.size]
    proxy = ml_collections.ConfigDict()
    proxy.name = "proxy"
    proxy.model = dict(d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=1,
                       mlp_dim=4 * d, tie_embeddings=True)
    proxy.data = dict(root="", seq_len=seq, schedule="", cache_dir="",
                      tokenizer=dict(vocab_size=vocab, sample_chars=500_000,
                                     sample_weights="natural"))
    proxy.mixture = dict(stages=dict(base=dict(start=0.0, weights="natural")))
    proxy.optimizer = dict(lr=3e-3, warmup_steps=max(steps // 10, 1), schedule="wsd",
                           decay_fraction=0.2)
    proxy.train = dict(steps=steps, batch_size=batch, log_every=10, eval_every=0,
                       eval_batches=2, checkpoint_every=max(steps // 3, 1))
    proxy.tracking = dict(wandb=True, project="gemini-core", job_type="proxy", tags=())
    # scored once, at the end, 0-shot (the proxies' window is short), without sampling: the
    # gold answer's bpb is what ranks data at this scale
    proxy.eval = dict(downstream=dict(tasks=tasks, limit=100 if a.size != "tiny" else 8,
                                      final_limit=-1, shots=0, generate=False))

    c = ml_collections.ConfigDict()
    # the capability objectives share one swarm (the same proxies score every task): one name,
    # so their trials and baselines are the same runs, trained once; each objective's sweep
    # dir differs by its fingerprint
    c.name = f"mixture_sweep_{a.size}" + ("_tasks" if a.objective != "loss" else "")
    c.proxy = proxy
    c.target_tokens = 0  # 0 = 4x the proxy's tokens
    # trial 0 is the prior's centre, then the anchors: the baselines validation compares with
    c.space = dict(trials=trials, prior="natural", prior_power=0.5, concentration=(0.3, 5.0),
                   min_weight=0.02, max_epochs=4.0, anneal=True, anneal_start=(0.8, 0.9),
                   anchors=("natural", "uniform"), seed=0)
    c.objective = dict(targets=targets, max_worse_than_baseline=0.0, constraints=constraints)
    # prefer_measured: the best measured trial wins unless the fit predicts its own mixture
    # better by more than the fit's cross-validated error
    # prefer_baseline (capability objectives): natural stays unless the choice leads it by more
    # than the fit's error; one proxy's task bpb is noisy
    c.fit = dict(folds=4, regressors=("linear", "logweight", "loglinear", "lightgbm"),
                 holdout_fraction=0.25, method="search", samples=50_000, prefer_measured=True,
                 prefer_baseline=a.objective != "loss")
    # regression (the swarm above) or doremi: a reference proxy on the prior, then a Group-DRO
    # proxy whose domain weights, averaged over steps, are the choice (sweeps/doremi.py)
    c.method = "regression"
    c.doremi = dict(eta=1.0, smoothing=1e-3, reference="prior")
    c.resources = dict(cpus_per_trial=1, max_concurrent=0, max_failures=1)
    # target scale: empty = d_model x2 (about 4x non-embedding params), steps x4 (4x tokens)
    # boost=("code",): also measure that domain upweighted x boost_factor over the end stage
    # rank_trials: that many trials trained at target scale too: does the proxies' order hold?
    c.validate = dict(enabled=True, seeds=2 if a.objective == "loss" else 3,
                      scales=("proxy", "target"), target={}, boost=(), boost_factor=4.0,
                      rank_trials=0, rank_seeds=1, generate=False, doremi=False)
    return c
