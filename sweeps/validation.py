"""A sweep's validation: the winner against the baselines, with seeds, at proxy and at target
scale (validate.json), and how its results are put in words (the text and HTML reports).

Candidates: the winner, the natural and uniform mixtures, the best measured trial, DoReMi's
mixture (validate.doremi), the winner without its end-of-training stage (what upweighting buys)
and the declared boost (validate.boost). The winner beats a baseline when the gap of their seed
means exceeds 2 sigma of seed noise; on the mean loss, on the objective, and per task. Only
`validate` runs anything (lazily imported fan-out): the reports import this module for its
words alone.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from gemini_core.data.mixture import MixtureSchedule, Stage
from sweeps import space as space_lib
from sweeps.fit import Objective, higher_is_better, metric_key, objective_values, worsening
from sweeps.sweep_dir import DOWNSTREAM, LOSS, objective_columns

if TYPE_CHECKING:
    from sweeps.sweep_setup import SweepSetup

Log = Callable[[str], None]
CANONICAL = ("natural", "uniform", "doremi", "winner", "best_trial")  # who names a shared run
UPWEIGHTING = (("upweighting", "the winner's end-of-training stage"),
               ("boost", "declared boost (validate.boost)"))


def candidates(setup: SweepSetup, result: dict) -> dict[str, MixtureSchedule]:
    from sweeps.sweep_setup import baselines

    winner = MixtureSchedule.from_dict(result["winner"])
    out = {"winner": winner, **baselines(setup)}
    if "best_trial" in result:  # a regression sweep's best proxy trial
        out["best_trial"] = setup.schedules[result["best_trial"]["trial"]]
    if "doremi" in result:  # DoReMi's mixture, run beside the regression (validate.doremi)
        out["doremi"] = MixtureSchedule.from_dict(result["doremi"]["winner"])
    if any(st.weights != winner.stages[0].weights for st in winner.stages[1:]):
        # the same base mixture without its end-of-training stage: what upweighting buys
        out["winner_no_anneal"] = MixtureSchedule((Stage(0.0, dict(winner.stages[0].weights)),))
    if setup.sweep.validate.boost:
        out["winner_boost"] = boosted(setup, winner, setup.sweep.validate.boost,
                                      setup.sweep.validate.boost_factor)
    return out


def boosted(setup: SweepSetup, winner: MixtureSchedule, domains: Sequence[str], factor: float
            ) -> MixtureSchedule:
    """The winner's base stage, then `domains` multiplied by `factor` (under the caps and
    minimum weight) from the winner's end-stage start, or mid anneal_start: validate.boost."""
    space = setup.sweep.space
    base = winner.stages[0].weights
    cap = space_lib.caps(space, setup.domains, setup.tokens, setup.target_tokens)
    base_D = np.array([base.get(d, 0.0) for d in setup.domains])
    boosted_D = space_lib.project_to_capped_simplex(
        base_D * space_lib.boost_factors(setup.domains, domains, factor),
        np.full(len(setup.domains), space.min_weight),
        np.array([cap[d] for d in setup.domains]))
    start = winner.stages[-1].start if len(winner.stages) > 1 else sum(space.anneal_start) / 2
    return MixtureSchedule((Stage(0.0, dict(base)),
                            Stage(start, dict(zip(setup.domains, boosted_D.tolist())))))


def seed_stats(rows: list[dict], domains: Sequence[str],
               objective: tuple[Objective, Sequence[str]] | None = None) -> dict:
    """A candidate's runs (one per seed) -> n, failed, mean and std of each loss and task
    metric (and of the `objective` over its metrics, per seed), run ids."""
    ok = [dict(r) for r in rows if not r["failed"]]
    if objective is not None and ok:
        obj, metrics = objective
        for r in ok:
            r["objective"] = float(objective_values(
                np.array([[r.get(metric_key(m), np.nan) for m in metrics]]), metrics, obj)[0])
    keys = [f"{LOSS}{d}" for d in domains] + [f"{LOSS}mean"] + sorted(
        {k for r in ok for k in r if k.startswith(DOWNSTREAM)}) + ["objective"] * (
        objective is not None)
    return {"n": len(ok), "failed": len(rows) - len(ok),
            "mean": {k: float(np.mean([r.get(k, np.nan) for r in ok])) if ok else None
                     for k in keys},
            "std": {k: float(np.std([r.get(k, np.nan) for r in ok], ddof=1)) if len(ok) > 1
                    else 0.0 for k in keys},
            "run_ids": [r["run_id"] for r in rows]}


def validate(setup: SweepSetup, result: dict, log: Log) -> dict:
    """Trains every candidate with validate.seeds seeds at each of validate.scales (tasks scored
    on their held-out half), and validate.rank_trials trials at target scale; the contents of
    validate.json."""
    from sweeps import config as sweep_config
    from sweeps.fanout import run_jobs

    t0 = time.perf_counter()
    v = setup.sweep.validate
    cands = candidates(setup, result)
    for name, schedule in cands.items():
        schedule.validate(setup.domains).dump(setup.dir / "schedules" / f"validate-{name}.json")
    # candidates with one mixture (a winner that is an anchor or the best trial) are the same
    # runs: trained once, reported under both names, and named after the baseline first — a
    # run's name is in its identity, so the anchors' runs are the same in every sweep of the
    # swarm, whichever winner each objective picks
    order = sorted(cands, key=lambda n: CANONICAL.index(n) if n in CANONICAL else len(CANONICAL))
    same = {name: next(n for n in order if cands[n].to_dict() == cands[name].to_dict())
            for name in cands}
    scales, seeds = v.scales, range(v.seeds)
    jobs = [{"name": f"{scale}/{name}/seed{k}", "scale": scale,
             "schedule": f"validate-{name}.json", "seed": setup.proxy.seed + k}
            for scale in scales for name in cands if same[name] == name for k in seeds]
    ranked = rank_jobs(setup, cands, same)
    jobs += [job for names in ranked.values() for job in names if isinstance(job, dict)]
    runs = run_jobs(setup, jobs, "validate", log)
    obj = sweep_config.objective(setup.sweep)
    objective = (obj, obj.metrics(setup.domains, objective_columns(sorted(
        {k for r in runs.values() for k in r}))))
    out: dict = {"objective": objective[0].describe(), "scales": {}, "seconds": None}
    for scale in scales:
        per = {name: seed_stats([runs[f"{scale}/{same[name]}/seed{k}"] for k in seeds],
                                setup.domains, objective)
               for name in cands}
        tasks = [k for k in objective_columns(sorted({k for c in per.values() for k in c["mean"]}))
                 if k.startswith(DOWNSTREAM)]  # each task, not their mean
        out["scales"][scale] = {
            "candidates": per, "winner_vs": comparisons(per),
            "objective_vs": comparisons(per, "objective"),
            "tasks_vs_natural": {k: c["natural"] for k in tasks
                                 if "natural" in (c := comparisons(per, k, ("natural",)))},
            "constraints": constraints_met(per, *objective),
            "upweighting": upweighting(per, "winner", cands, setup.domains)}
        if "winner_boost" in cands:
            out["scales"][scale]["boost"] = upweighting(per, "winner_boost", cands,
                                                        setup.domains)
    if ranked:
        out["decision"] = decision_accuracy(setup, ranked, runs, objective)
    out["seconds"] = time.perf_counter() - t0
    return out


def rank_jobs(setup: SweepSetup, cands: dict[str, MixtureSchedule], same: dict[str, str]
              ) -> dict[int, list[dict | str]]:
    """The first validate.rank_trials trials that finished (the centre and the anchors among
    them), trained at target scale too with rank_seeds seeds and scored on the held-out half as
    the candidates are: trial -> its jobs, or the name of a candidate's run where the trial's
    mixture is a candidate's (an anchor, a winner that is a trial), trained once."""
    import pandas as pd

    v = setup.sweep.validate
    if not v.rank_trials:
        return {}
    table = pd.read_csv(setup.dir / "trials.csv", keep_default_na=False)
    out: dict[int, list[dict | str]] = {}
    for t in table[table["failed"] == ""]["trial"].sort_values()[:v.rank_trials]:
        t = int(t)
        twin = next((same[n] for n, c in cands.items()
                     if c.to_dict() == setup.schedules[t].to_dict()), None)
        out[t] = [f"target/{twin}/seed{k}" if twin and "target" in v.scales and k < v.seeds
                  else {"name": f"target/trial-{t:03d}/seed{k}", "scale": "target",
                        "job_type": "rank", "schedule": f"trial-{t:03d}.json",
                        "seed": setup.proxy.seed + k}
                  for k in range(v.rank_seeds)]
    return out


def decision_accuracy(setup: SweepSetup, ranked: dict[int, list[dict | str]], runs: dict,
                      objective: tuple[Objective, Sequence[str]]) -> dict:
    """Proxy (the trial, on the search half) vs target scale (mean over rank_seeds, on the
    held-out half) on the objective, per trial: the share of trial pairs both scales order
    alike, and the Spearman between them."""
    import pandas as pd

    from sweeps.fit import spearman

    obj, metrics = objective
    table = pd.read_csv(setup.dir / "trials.csv").set_index("trial")
    proxy_T = objective_values(table.loc[list(ranked), [metric_key(m) for m in metrics]]
                               .to_numpy(np.float64), metrics, obj)
    target_T = np.array([seed_stats([runs[j if isinstance(j, str) else j["name"]] for j in jobs],
                                    setup.domains, objective)["mean"]["objective"] or np.nan
                         for jobs in ranked.values()])
    pairs = [(i, j) for i in range(len(ranked)) for j in range(i + 1, len(ranked))]
    same = [np.sign(proxy_T[i] - proxy_T[j]) == np.sign(target_T[i] - target_T[j])
            for i, j in pairs]
    return {"trials": list(ranked), "proxy": proxy_T.tolist(), "target": target_T.tolist(),
            "seeds": setup.sweep.validate.rank_seeds, "pairs": len(pairs),
            "pair_agreement": float(np.mean(same)) if pairs else math.nan,
            "spearman": spearman(proxy_T, target_T)}


def constraints_met(per: dict, obj: Objective, metrics: Sequence[str]) -> dict:
    """Each constrained metric: the winner's seed mean against natural's, and whether it stays
    within the declared bound (measured, where the search had predictions)."""
    out = {}
    for m, x, sign in zip(metrics, obj.bounds(metrics), obj.signs(metrics)):
        key = metric_key(m)
        w, b = per["winner"]["mean"].get(key), per.get("natural", {}).get("mean", {}).get(key)
        if math.isnan(x) or w is None or b is None:
            continue
        worse = float(worsening(np.array([[w]]), np.array([b]), np.array([sign]))[0, 0])
        out[key] = {"worse": worse, "bound": float(x), "met": bool(worse <= x)}
    return out


def comparisons(per: dict, key: str = f"{LOSS}mean",
                baselines: Sequence[str] = ("natural", "uniform", "doremi", "best_trial")) -> dict:
    """Winner vs each baseline on `key` (the mean loss; any metric, an accuracy's sign
    flipped): the gap (> 0: the winner is better), and whether it exceeds 2 sigma of seed noise
    (sigma of a difference of two seed means)."""
    w = per["winner"]
    sign = -1.0 if higher_is_better(key) else 1.0
    out = {}
    for name in baselines:
        if name not in per:
            continue
        b = per[name]
        if w["mean"].get(key) is None or b["mean"].get(key) is None \
                or not math.isfinite(w["mean"][key] + b["mean"][key]):
            continue
        gap = sign * (b["mean"][key] - w["mean"][key])
        sigma = math.sqrt(w["std"][key] ** 2 / max(w["n"], 1) + b["std"][key] ** 2 / max(b["n"], 1))
        # a baseline at 0 (an accuracy nobody reaches) has no relative gap
        relative = gap / abs(b["mean"][key]) if b["mean"][key] else math.nan
        out[name] = {"gap": gap, "relative": relative, "sigma": sigma,
                     "beats_by_2_sigma": bool(gap > 2 * sigma and sigma > 0),
                     "loses_by_2_sigma": bool(-gap > 2 * sigma and sigma > 0)}
    return out


def verdict(c: dict) -> str:
    """A winner-vs-baseline comparison in words."""
    if c["beats_by_2_sigma"]:
        return "beats it"
    if c.get("loses_by_2_sigma"):
        return "worse, beyond seed noise"
    return "within seed noise"


def upweighting(per: dict, name: str, cands: dict[str, MixtureSchedule],
                domains: Sequence[str]) -> dict | None:
    """Loss change from candidate `name`'s end-of-training stage, against its base stage alone
    (winner_no_anneal; the winner itself when it has one stage), on the domains the stage
    upweights and on the mean."""
    schedule = cands[name]
    reference = "winner_no_anneal" if "winner_no_anneal" in per else "winner"
    if len(schedule.stages) < 2 or reference == name:
        return None
    base, end = schedule.stages[0].weights, schedule.stages[-1].weights
    raised = [d for d in domains if end.get(d, 0) > base.get(d, 0) + 1e-6]  # not float dust
    w, n = per[name]["mean"], per[reference]["mean"]
    if w[f"{LOSS}mean"] is None or n[f"{LOSS}mean"] is None:
        return None
    return {"boosted": raised, "start": schedule.stages[-1].start,
            "weights": {d: end.get(d, 0.0) for d in raised},
            "domains": {d: (w[f"{LOSS}{d}"] - n[f"{LOSS}{d}"]) / n[f"{LOSS}{d}"] for d in raised},
            "mean": (w[f"{LOSS}mean"] - n[f"{LOSS}mean"]) / n[f"{LOSS}mean"]}


def describe_upweighting(up: dict, label: str) -> str:
    """One line: an end-of-training stage's effect on the domains it boosts and on the mean."""
    weights = up.get("weights", {})
    raised = ", ".join(f"{d}" + (f" to {weights[d]:.2f}" if d in weights else "")
                       for d in up["boosted"]) or "none"
    start = f" from {up['start']:.0%} of training" if "start" in up else ""
    return (f"{label} (boosts {raised}{start}): "
            + ", ".join(f"{d} {x:+.2%}" for d, x in up["domains"].items())
            + f"; mean {up['mean']:+.2%}")


def format_validation(v: dict, domains: Sequence[str]) -> str:
    lines = [f"validation ({v['seconds']:.0f}s): mean of seeds ± std, loss per domain"]
    if v.get("objective") and v["objective"] != MEAN_LOSS:
        lines.append(f"  objective: {v['objective']}")
    for scale, s in v["scales"].items():
        lines.append(f"  {scale}:")
        for name, c in s["candidates"].items():
            m, sd = c["mean"], c["std"]
            if m[f"{LOSS}mean"] is None:
                lines.append(f"    {name:<17} all runs failed")
                continue
            lines.append(f"    {name:<17} mean {m[LOSS + 'mean']:.4f} ± {sd[LOSS + 'mean']:.4f}  "
                         + "  ".join(f"{d[:6]} {m[LOSS + d]:.3f}" for d in domains))
        lines += _task_lines(s["candidates"])
        lines += [f"    {note}" for note in notes(v, s)]
    if v.get("decision"):
        lines.append(f"  {describe_decision(v['decision'])}")
    return "\n".join(lines)


def notes(v: dict, scale: dict) -> list[str]:
    """One scale's comparisons in words: the winner against each baseline on the objective and
    the mean loss, per task against natural, the constraints, the end-of-training stages."""
    out = []
    if scale.get("objective_vs") and v.get("objective") != MEAN_LOSS:
        out += [f"winner vs {name}: objective {_versus(c)}"
                for name, c in scale["objective_vs"].items()]
    out += [f"winner vs {name}: mean loss {_versus(c)}" for name, c in scale["winner_vs"].items()]
    if scale.get("tasks_vs_natural"):
        out.append("winner vs natural per task (held-out examples; + = better): " + ", ".join(
            f"{k[len(DOWNSTREAM):]} " + (f"{c['relative']:+.1%}" if math.isfinite(c["relative"])
                                         else f"{c['gap']:+.3f}") + f" ({verdict(c)})"
            for k, c in scale["tasks_vs_natural"].items() if headline(k)))
    if scale.get("constraints"):
        out.append("constraints, measured (winner vs natural): " + ", ".join(
            f"{k} {c['worse']:+.2%} worse (bound {c['bound']:.1%}: "
            f"{'met' if c['met'] else 'BROKEN'})" for k, c in scale["constraints"].items()))
    return out + [describe_upweighting(scale[key], label) for key, label in UPWEIGHTING
                  if scale.get(key)]


def describe_decision(d: dict) -> str:
    return (f"decision accuracy across scales ({len(d['trials'])} trials at proxy and target "
            f"scale, {d['seeds']} target seed(s) each): {d['pair_agreement']:.0%} of "
            f"{d['pairs']} pairs ordered alike on the objective, Spearman {d['spearman']:.2f}")


MEAN_LOSS = "mean loss over all domains"  # fit.Objective().describe()


def _versus(c: dict) -> str:
    direction = "better" if c["gap"] > 0 else "worse"
    return (f"{abs(c['relative']):.2%} {direction}, 2 sigma of seed noise = {2 * c['sigma']:.4f}"
            f" -> {verdict(c)}")


def headline(key: str) -> bool:
    """A task's gold bpb and its accuracy (acc, exact match, pass@1): the figures the text
    report shows; validate.json and the HTML page hold every metric."""
    return key.rsplit("/", 1)[-1] in ("bpb", "acc", "exact_match", "pass@1") \
        and not key.startswith(f"{DOWNSTREAM}mean/")


def _task_lines(per: dict) -> list[str]:
    """Each candidate's task bpb and accuracy, mean ± std over seeds."""
    keys = sorted({k for c in per.values() for k in c["mean"]
                   if k.startswith(DOWNSTREAM) and headline(k)})
    if not keys:
        return []
    lines = ["    tasks (held-out examples; mean ± std over seeds):"]
    for name, c in per.items():
        if c["mean"].get(f"{LOSS}mean") is None:
            continue
        lines.append(f"    {name:<17} " + "  ".join(
            f"{k[len(DOWNSTREAM):]} {c['mean'][k]:.3f}±{c['std'][k]:.3f}" for k in keys
            if k in c["mean"]))
    return lines
