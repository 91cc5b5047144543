"""A sweep's validation: the winner against the baselines, with seeds, at proxy and at target
scale (validate.json), and how its results are put in words (the text and HTML reports).

Candidates: the winner, the natural and uniform mixtures, the best measured trial, the winner
without its end-of-training stage (what upweighting buys) and the declared boost
(validate.boost). The winner beats a baseline when the gap of their seed means exceeds 2 sigma
of seed noise. Only `validate` runs anything (lazily imported fan-out): the reports import this
module for its words alone.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from gemini_core.data.mixture import MixtureSchedule, Stage
from sweeps import space as space_lib
from sweeps.sweep_dir import LOSS

if TYPE_CHECKING:
    from sweeps.sweep_setup import SweepSetup

Log = Callable[[str], None]
UPWEIGHTING = (("upweighting", "the winner's end-of-training stage"),
               ("boost", "declared boost (validate.boost)"))


def candidates(setup: SweepSetup, result: dict) -> dict[str, MixtureSchedule]:
    from sweeps.sweep_setup import baselines

    winner = MixtureSchedule.from_dict(result["winner"])
    out = {"winner": winner, **baselines(setup)}
    if "best_trial" in result:  # a regression sweep's best proxy trial
        out["best_trial"] = setup.schedules[result["best_trial"]["trial"]]
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


def seed_stats(rows: list[dict], domains: Sequence[str]) -> dict:
    """A candidate's runs (one per seed) -> n, failed, mean and std of each loss, run ids."""
    keys = [f"{LOSS}{d}" for d in domains] + [f"{LOSS}mean"]
    ok = [r for r in rows if not r["failed"]]
    return {"n": len(ok), "failed": len(rows) - len(ok),
            "mean": {k: float(np.mean([r[k] for r in ok])) if ok else None for k in keys},
            "std": {k: float(np.std([r[k] for r in ok], ddof=1)) if len(ok) > 1 else 0.0
                    for k in keys},
            "run_ids": [r["run_id"] for r in rows]}


def validate(setup: SweepSetup, result: dict, log: Log) -> dict:
    """Trains every candidate with validate.seeds seeds at each of validate.scales; the
    contents of validate.json."""
    from sweeps.fanout import run_jobs

    t0 = time.perf_counter()
    cands = candidates(setup, result)
    for name, schedule in cands.items():
        schedule.validate(setup.domains).dump(setup.dir / "schedules" / f"validate-{name}.json")
    # a candidate equal to an earlier one (the winner kept a measured trial: best_trial, or an
    # anchor such as uniform) is the same run: trained once, reported under both names
    same = {name: next(n for n in cands if cands[n].to_dict() == cands[name].to_dict())
            for name in cands}
    scales, seeds = setup.sweep.validate.scales, range(setup.sweep.validate.seeds)
    jobs = [{"name": f"{scale}/{name}/seed{k}", "scale": scale,
             "schedule": f"validate-{name}.json", "seed": setup.proxy.seed + k}
            for scale in scales for name in cands if same[name] == name for k in seeds]
    runs = run_jobs(setup, jobs, "validate", log)
    out: dict = {"scales": {}, "seconds": None}
    for scale in scales:
        per = {name: seed_stats([runs[f"{scale}/{same[name]}/seed{k}"] for k in seeds],
                                setup.domains)
               for name in cands}
        out["scales"][scale] = {"candidates": per, "winner_vs": comparisons(per),
                                "upweighting": upweighting(per, "winner", cands, setup.domains)}
        if "winner_boost" in cands:
            out["scales"][scale]["boost"] = upweighting(per, "winner_boost", cands,
                                                        setup.domains)
    out["seconds"] = time.perf_counter() - t0
    return out


def comparisons(per: dict) -> dict:
    """Winner vs each baseline on the mean loss: the gap, and whether it exceeds 2 sigma of
    seed noise (sigma of a difference of two seed means)."""
    w = per["winner"]
    key = f"{LOSS}mean"
    out = {}
    for name in ("natural", "uniform", "best_trial"):
        if name not in per:
            continue
        b = per[name]
        if w["mean"][key] is None or b["mean"][key] is None:
            continue
        gap = b["mean"][key] - w["mean"][key]
        sigma = math.sqrt(w["std"][key] ** 2 / max(w["n"], 1) + b["std"][key] ** 2 / max(b["n"], 1))
        out[name] = {"gap": gap, "relative": gap / b["mean"][key], "sigma": sigma,
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
    for scale, s in v["scales"].items():
        lines.append(f"  {scale}:")
        for name, c in s["candidates"].items():
            m, sd = c["mean"], c["std"]
            if m[f"{LOSS}mean"] is None:
                lines.append(f"    {name:<17} all runs failed")
                continue
            lines.append(f"    {name:<17} mean {m[LOSS + 'mean']:.4f} ± {sd[LOSS + 'mean']:.4f}  "
                         + "  ".join(f"{d[:6]} {m[LOSS + d]:.3f}" for d in domains))
        for name, c in s["winner_vs"].items():
            direction = "lower" if c["gap"] > 0 else "higher"
            lines.append(f"    winner vs {name}: mean loss {abs(c['relative']):.2%} {direction}, "
                         f"2 sigma of seed noise = {2 * c['sigma']:.4f} -> "
                         f"{verdict(c)}")
        lines += [f"    {describe_upweighting(s[key], label)}" for key, label in UPWEIGHTING
                  if s.get(key)]
    return "\n".join(lines)
