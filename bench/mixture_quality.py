"""Mixture quality: does the sweep's regression rank mixtures it never saw, and does its winner
beat the natural and uniform mixtures at target scale? And DoReMi at equal proxy compute.

1. A regression sweep on ../shared/corpus (experiments/mixture_sweep.py:size=small) with
   `--trials` proxies (default 48 = 8 x 6 domains), a third of them held out of the fit:
   Spearman of predicted vs actual mean-of-domains loss on the held-out mixtures (target >= 0.9),
   and per domain against the heuristic "a domain's loss falls with its own weight" (rank by
   the domain's time-averaged weight).
2. Its validation stage: the winner vs natural and uniform at target scale (target: >= 2% lower
   mean loss, beyond 2 sigma of seed noise), and end-of-training upweighting measured against
   the winner's base stage alone: the winner's own end stage, and a declared boost (`--boost`,
   default code x4; target: >= 5% lower loss on the upweighted domain, mean <= 1% worse).
3. DoReMi with the same proxy compute: a reference and a Group-DRO proxy of the same shape,
   each trained for trials/2 times the proxy's steps, its choice validated at the same target
   scale (the natural and uniform runs are the same runs, reused by fingerprint).
   `--no-regression` runs DoReMi alone: its own validation trains natural and uniform beside it.

Everything goes through the real `run_sweep` (Ray Tune, real runs); a second invocation with the
same --work reuses every finished run. usage:
    python bench/mixture_quality.py [--trials 48] [--work DIR] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", default=str(REPO.parent / "shared" / "corpus"))
    p.add_argument("--trials", type=int, default=48)
    p.add_argument("--size", default="small", help="experiments/mixture_sweep.py size")
    p.add_argument("--seeds", type=int, default=3, help="seeds per validated mixture")
    p.add_argument("--proxy-steps", type=int, default=0,
                   help="train the proxies this long (0: the size's default)")
    p.add_argument("--target-steps", type=int, default=600,
                   help="the target scale's steps; its width is 2x the proxy's")
    p.add_argument("--work", default="/tmp/gx-bench-mixture-quality",
                   help="runs root (kept: a rerun reuses finished runs)")
    p.add_argument("--boost", nargs="*", default=["code"],
                   help="domains the declared end-of-training boost upweights (validate.boost; "
                        "none: only the winner's own end stage is measured)")
    p.add_argument("--boost-factor", type=float, default=4.0)
    p.add_argument("--scales", nargs="+", default=["proxy", "target"],
                   help="validate.scales: the scales the validation trains at")
    p.add_argument("--no-doremi", action="store_true")
    p.add_argument("--no-regression", action="store_true",
                   help="skip the regression sweep (DoReMi against the baselines alone)")
    p.add_argument("--out", default="")
    return p.parse_args()


def sweep_config(args, method: str, proxy_steps: int | None = None):
    from gemini_core.config import to_json_dict
    from gemini_core.experiment import load_experiment
    from sweeps import config as sweep_config_lib
    overrides = [f"--config.proxy.data.root={args.corpus}", f"--config.space.trials={args.trials}",
                 "--config.proxy.tracking.wandb=false", "--config.fit.holdout_fraction=0.35",
                 f"--config.validate.seeds={args.seeds}", f"--config.method={method}",
                 f"--config.validate.boost={tuple(args.boost)!r}",
                 f"--config.validate.boost_factor={args.boost_factor}",
                 f"--config.validate.scales={tuple(args.scales)!r}"]
    sweep = to_json_dict(load_experiment(
        f"experiments/mixture_sweep.py:size={args.size}", overrides,
        schema=sweep_config_lib.SweepConfig, convert=sweep_config_lib.from_config_dict).config)
    proxy = sweep["proxy"]
    # one target scale for both methods: 2x width (~4x non-embedding params), --target-steps
    # (warmup 1/40 and checkpoints every 1/12 of them: the figures in bench/results/ were made so)
    steps = args.target_steps
    sweep["validate"]["target"] = {
        "model": {"d_model": 2 * proxy["model"]["d_model"], "mlp_dim": 2 * proxy["model"]["mlp_dim"]},
        "train": {"steps": steps, "checkpoint_every": max(steps // 12, 1)},
        "optimizer": {"warmup_steps": max(steps // 40, 1)}}
    # the repetition caps of both methods are those of the regression's target run: 4x the
    # tokens of its proxies (DoReMi's longer proxies would otherwise raise the budget)
    regression_steps = args.proxy_steps or proxy["train"]["steps"]
    sweep["target_tokens"] = (4 * regression_steps * proxy["train"]["batch_size"]
                              * proxy["data"]["seq_len"])
    if proxy_steps:
        proxy["train"].update(steps=proxy_steps, checkpoint_every=max(proxy_steps // 3, 1))
        proxy["optimizer"]["warmup_steps"] = max(proxy_steps // 10, 1)
    return sweep_config_lib.from_config_dict(sweep)


def heuristic_spearman(sweep_dir: Path, domains: list[str]) -> dict:
    """Per domain on the held-out trials: Spearman of the fit's prediction and of the heuristic
    (minus the domain's time-averaged weight) with the actual loss."""
    from gemini_core.data.mixture import MixtureSchedule
    from sweeps.fit import spearman
    table = pd.read_csv(sweep_dir / "trials.csv", keep_default_na=False).set_index("trial")
    fit = json.loads((sweep_dir / "fit.json").read_text())
    held = [r for r in fit.get("per_trial_predicted", []) if r["held_out"]]
    out = {}
    for d in domains:
        actual = [float(table.loc[r["trial"], f"loss/{d}"]) for r in held]
        predicted = [r["predicted"][d] for r in held]
        weight = [MixtureSchedule.load(sweep_dir / "schedules" / f"trial-{r['trial']:03d}.json")
                  .time_average(domains)[d] for r in held]
        out[d] = {"fit": spearman(predicted, actual), "own_weight": spearman(
            -np.array(weight), actual)}
    return out


def noise_ceiling(sweep_dir: Path) -> dict | None:
    """How well any predictor could rank the trials: the seed noise of the proxy-scale validation
    runs (pooled std of each mixture's seeds) against the spread of the trials' mean losses. The
    measured loss is signal + seed noise, so its correlation with the signal is at most
    sqrt(1 - seed_var / trial_var)."""
    v = json.loads((sweep_dir / "validate.json").read_text())["scales"].get("proxy")
    if not v:
        return None
    var = [c["std"]["loss/mean"] ** 2 for c in v["candidates"].values() if c["n"] > 1]
    table = pd.read_csv(sweep_dir / "trials.csv", keep_default_na=False)
    trial_std = float(table.loc[table["failed"] == "", "loss/mean"].astype(float).std(ddof=1))
    seed_std = float(np.sqrt(np.mean(var)))
    return {"seed_std": seed_std, "trial_std": trial_std,
            "ceiling": float(np.sqrt(max(0.0, 1 - seed_std ** 2 / trial_std ** 2)))}


def validation_figures(sweep_dir: Path) -> dict:
    from sweeps.validation import UPWEIGHTING
    v = json.loads((sweep_dir / "validate.json").read_text())
    target = v["scales"]["target"]
    return {"seconds": v["seconds"], "winner_vs": target["winner_vs"],
            **{key: target.get(key) for key, _ in UPWEIGHTING},
            "winner_mean": target["candidates"]["winner"]["mean"]["loss/mean"],
            "winner_std": target["candidates"]["winner"]["std"]["loss/mean"],
            "proxy_winner_vs": v["scales"].get("proxy", {}).get("winner_vs")}


def main() -> None:
    args = parse()
    from gemini_core.train import step_fns
    from sweeps.runner import run_sweep
    step_fns.tune_host_malloc()
    root = Path(args.work)
    results: dict = {"trials": args.trials, "size": args.size, "seeds": args.seeds,
                     "proxy_steps": args.proxy_steps, "target_steps": args.target_steps}

    if not args.no_regression:
        t0 = time.perf_counter()
        reg_dir = run_sweep(sweep_config(args, "regression", args.proxy_steps), root,
                            log=lambda s: print(s, flush=True))
        results["regression_s"] = time.perf_counter() - t0
        fit = json.loads((reg_dir / "fit.json").read_text())
        results["domains"] = json.loads((reg_dir / "sweep.json").read_text())["domains"]
        results["holdout"] = fit["holdout"]
        results["choice"] = {**fit["choice"], "objective_predicted": fit["objective_predicted"]}
        results["heuristic"] = heuristic_spearman(reg_dir, results["domains"])
        results["noise"] = noise_ceiling(reg_dir)
        results["regression"] = validation_figures(reg_dir)

    if not args.no_doremi:
        base = args.proxy_steps or sweep_config(args, "regression").proxy["train"]["steps"]
        t0 = time.perf_counter()
        dro_dir = run_sweep(sweep_config(args, "doremi", proxy_steps=base * args.trials // 2),
                            root, log=lambda s: print(s, flush=True))
        results["doremi_s"] = time.perf_counter() - t0
        results["doremi"] = validation_figures(dro_dir)
        results["doremi"]["weights"] = json.loads((dro_dir / "fit.json").read_text())[
            "winner"]["stages"][0]["weights"]
        results["domains"] = json.loads((dro_dir / "sweep.json").read_text())["domains"]
    report(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


def report(r: dict) -> None:
    print(f"\n== mixture quality ({r['trials']} trials, size={r['size']}, {r['seeds']} seeds) ==")
    if "regression" in r:
        report_fit(r)
    report_validation(r)


def report_fit(r: dict) -> None:
    h = r["holdout"]
    print(f"regression sweep + validation: {r['regression_s']:.0f}s")
    print(f"held-out mixtures: {h['n']}; Spearman (mean-of-domains loss) {h['spearman']:.3f} "
          f"(target >= 0.9); regret {h['regret']:.4f}")
    if r.get("noise"):
        n = r["noise"]
        print(f"seed noise at proxy scale: pooled std {n['seed_std']:.4f} vs {n['trial_std']:.4f} "
              f"across trials -> no predictor ranks the measured loss above ~{n['ceiling']:.2f}")
    c = r["choice"]
    print(f"choice: {c['from']} (the fit's own mixture predicted {c['predicted_gain']:+.4f} better "
          f"than {c['best_measured']}, measured; the fit's error {c['margin']:.4f}); "
          "objective predicted: " + ", ".join(
              f"{k} {v:.4f}" for k, v in c["objective_predicted"].items()))
    print(f"{'domain':<14}{'fit':>8}{'own weight':>12}   Spearman on held-out trials")
    for d in r["domains"]:
        x = r["heuristic"][d]
        print(f"{d:<14}{x['fit']:>8.3f}{x['own_weight']:>12.3f}")


def report_validation(r: dict) -> None:
    from sweeps.validation import UPWEIGHTING, describe_upweighting, verdict
    for method in ("regression", "doremi"):
        if method not in r:
            continue
        v = r[method]
        print(f"{method}: target-scale winner mean loss {v['winner_mean']:.4f} ± {v['winner_std']:.4f}")
        for name, c in v["winner_vs"].items():
            print(f"  vs {name:<11} {c['relative']:+.2%} lower (2 sigma = {2 * c['sigma']:.4f}) -> "
                  f"{verdict(c)}   [target >= 2% lower, beyond 2 sigma]")
        for key, label in UPWEIGHTING:
            if v.get(key):
                print(f"  {describe_upweighting(v[key], label)}"
                      "   [target: upweighted <= -5%, mean <= +1%]")
    if "doremi" in r:
        print("DoReMi weights: " + ", ".join(f"{d}={w:.3f}" for d, w in r["doremi"]["weights"].items()))
    if "doremi" in r and "regression" in r:
        gap = r["doremi"]["winner_mean"] - r["regression"]["winner_mean"]
        print(f"DoReMi vs regression at equal proxy compute: DoReMi's winner {gap:+.4f} nats "
              f"({gap / r['regression']['winner_mean']:+.2%}) at target scale")

if __name__ == "__main__":
    main()
