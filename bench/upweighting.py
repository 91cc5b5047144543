"""End-of-training upweighting, domain by domain: which domain's loss falls by >= 5% when its
weight is raised over the last stage of training, at what cost to the mean?

The sweep's validation measures one declared boost (`validate.boost`) on its winner. This bench
measures every domain of the corpus, at each of `--factors`, on one base mixture (`--base`:
uniform, natural, or a winner.json whose first stage is the base), at the same target scale as
bench/mixture_quality.py (the small proxy at 2x width, `--target-steps`). Each boosted schedule
is the base until `--start`, then the base with one domain multiplied by the factor, projected
under the sweep's caps and minimum weight: the same `sweeps.validation.boosted` the validation uses.

The base and each boosted run share a seed, so they train identically until the end stage
starts (same initialisation, same batches): the change is paired per seed, and its spread over
seeds is far below the seed noise of either run. Every run goes through the sweep runner (Ray
Tune, real runs, reused by fingerprint: a second invocation with the same --work trains nothing).
usage:
    python bench/upweighting.py [--factors 4 8] [--seeds 2] [--work DIR] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OWN_TARGET, MEAN_TARGET = -0.05, 0.01  # the issue's: upweighted domain >= 5% lower, mean <= 1% worse


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", default=str(REPO.parent / "shared" / "corpus"))
    p.add_argument("--size", default="small", help="experiments/mixture_sweep.py size")
    p.add_argument("--base", default="uniform",
                   help="uniform, natural, or a winner.json (its first stage is the base)")
    p.add_argument("--factors", type=float, nargs="+", default=[4.0, 8.0])
    p.add_argument("--start", type=float, default=0.85,
                   help="fraction of training at which the end stage starts (a winner.json "
                        "with an end stage of its own keeps its start)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--target-steps", type=int, default=600)
    p.add_argument("--work", default="/tmp/gx-bench-upweighting",
                   help="runs root (kept: a rerun reuses finished runs)")
    p.add_argument("--out", default="", help="results JSON (default: <work>/upweighting.json)")
    return p.parse_args()


def sweep_config(args):
    """mixture_quality's sweep config and target scale: the figures are comparable."""
    sys.path.insert(0, str(REPO / "bench"))
    from mixture_quality import sweep_config as quality_config
    return quality_config(argparse.Namespace(
        corpus=args.corpus, trials=16, size=args.size, seeds=args.seeds, boost=[],
        boost_factor=4.0, scales=["target"], target_steps=args.target_steps), "regression")


def base_schedule(args, setup):
    from gemini_core.data.mixture import MixtureSchedule, Stage
    from sweeps.sweep_setup import baselines
    if args.base in ("uniform", "natural"):
        weights = baselines(setup)[args.base].stages[0].weights
        start = args.start
    else:
        winner = MixtureSchedule.load(args.base).validate(setup.domains)
        weights = winner.stages[0].weights
        start = winner.stages[-1].start if len(winner.stages) > 1 else args.start
    # two equal stages: `boosted` takes the end stage's start from the schedule it boosts
    return MixtureSchedule((Stage(0.0, dict(weights)), Stage(start, dict(weights))))


def schedules(setup, base, factors) -> dict:
    """name -> schedule: "base" (one stage), and "<domain>x<factor>" per domain and factor."""
    from gemini_core.data.mixture import MixtureSchedule, Stage
    from sweeps.validation import boosted
    out = {"base": MixtureSchedule((Stage(0.0, dict(base.stages[0].weights)),))}
    for d in setup.domains:
        for f in factors:
            out[f"{d}x{f:g}"] = boosted(setup, base, (d,), f)
    return out


def paired(runs: dict, name: str, seeds: int, domain: str, domains) -> dict:
    """Per seed, the boosted run's relative change against the base run of the same seed."""
    own, mean = [], []
    for k in range(seeds):
        b, x = runs[f"base/seed{k}"], runs[f"{name}/seed{k}"]
        if b["failed"] or x["failed"]:
            raise SystemExit(f"{name} seed {k}: a run failed: {b['failed'] or x['failed']}")
        own.append(x[f"loss/{domain}"] / b[f"loss/{domain}"] - 1)
        mean.append(x["loss/mean"] / b["loss/mean"] - 1)
    return {"own": float(np.mean(own)), "own_std": float(np.std(own, ddof=1)) if seeds > 1 else 0.0,
            "mean": float(np.mean(mean)),
            "mean_std": float(np.std(mean, ddof=1)) if seeds > 1 else 0.0,
            "others": {d: float(np.mean([runs[f"{name}/seed{k}"][f"loss/{d}"]
                                         / runs[f"base/seed{k}"][f"loss/{d}"] - 1
                                         for k in range(seeds)])) for d in domains if d != domain}}


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.fill_between([-100, 100 * MEAN_TARGET], -100, 100 * OWN_TARGET, color="tab:green",
                    alpha=0.12, label="target: own <= -5%, mean <= +1%")
    colour = {}  # one colour per domain, one marker per factor
    for name, r in results["boosts"].items():
        domain, factor = name.rsplit("x", 1)
        colour.setdefault(domain, f"C{len(colour)}")
        marker = "os^Dv"[results["factors"].index(float(factor)) % 5]
        ax.errorbar(100 * r["mean"], 100 * r["own"], xerr=100 * r["mean_std"],
                    yerr=100 * r["own_std"], fmt=marker, color=colour[domain], capsize=2)
        ax.annotate(f"{name} ({r['weight']:.2f})", (100 * r["mean"], 100 * r["own"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    xs = [100 * r["mean"] for r in results["boosts"].values()]
    ys = [100 * r["own"] for r in results["boosts"].values()]
    ax.set_xlim(min(xs + [0]) - 0.5, max(xs + [100 * MEAN_TARGET]) + 0.5)
    ax.set_ylim(min(ys + [100 * OWN_TARGET]) - 1, max(ys + [0]) + 1)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("mean-of-domains loss change (%)")
    ax.set_ylabel("upweighted domain's loss change (%)")
    ax.set_title(f"end-of-training upweighting from {results['start']:.2f} of training "
                 f"(base {results['base']}, {results['seeds']} paired seeds)", fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = parse()
    from gemini_core.train import step_fns
    from sweeps.fanout import run_jobs
    from sweeps.sweep_setup import setup_sweep, write_setup
    step_fns.tune_host_malloc()
    log = lambda s: print(s, flush=True)  # noqa: E731
    setup = setup_sweep(sweep_config(args), Path(args.work), log)
    write_setup(setup)
    base = base_schedule(args, setup)
    cands = schedules(setup, base, args.factors)
    for name, schedule in cands.items():
        schedule.validate(setup.domains).dump(setup.dir / "schedules" / f"upweight-{name}.json")
    jobs = [{"name": f"{name}/seed{k}", "scale": "target", "schedule": f"upweight-{name}.json",
             "seed": setup.proxy.seed + k, "job_type": "upweighting"}
            for name in cands for k in range(args.seeds)]
    t0 = time.perf_counter()
    runs = run_jobs(setup, jobs, "upweighting", log)
    results = {"base": args.base, "start": base.stages[1].start, "seeds": args.seeds,
               "factors": args.factors, "target_steps": args.target_steps,
               "seconds": time.perf_counter() - t0, "runs": len(jobs),
               "base_weights": dict(cands["base"].stages[0].weights),
               "base_loss": {d: float(np.mean([runs[f"base/seed{k}"][f"loss/{d}"]
                                               for k in range(args.seeds)]))
                             for d in [*setup.domains, "mean"]},
               "boosts": {}}
    for d in setup.domains:
        for f in args.factors:
            name = f"{d}x{f:g}"
            r = paired(runs, name, args.seeds, d, setup.domains)
            r["weight"] = cands[name].stages[1].weights[d]
            r["meets_target"] = r["own"] <= OWN_TARGET and r["mean"] <= MEAN_TARGET
            results["boosts"][name] = r
    report(results)
    out = Path(args.out or Path(args.work) / "upweighting.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def report(r: dict) -> None:
    print(f"\n== end-of-training upweighting: base {r['base']} ("
          + ", ".join(f"{d} {w:.2f}" for d, w in r["base_weights"].items())
          + f"), end stage from {r['start']:.2f}, {r['seeds']} paired seeds, target scale "
          f"{r['target_steps']} steps; {r['runs']} runs in {r['seconds']:.0f}s ==")
    print(f"base mean loss {r['base_loss']['mean']:.4f}")
    print(f"{'boost':<18}{'end weight':>11}{'own loss':>18}{'mean loss':>18}   target "
          "(own <= -5%, mean <= +1%)")
    for name, x in r["boosts"].items():
        print(f"{name:<18}{x['weight']:>11.2f}{x['own']:>+11.2%} ±{x['own_std']:.2%}"
              f"{x['mean']:>+11.2%} ±{x['mean_std']:.2%}   "
              + ("met" if x["meets_target"] else "not met"))


if __name__ == "__main__":
    main()
