"""`gx sweep`: proxy runs over sampled mixture schedules, fanned out by Ray Tune, then fit + choose.

Every trial is a real `gemini_core.train.trainer.run_experiment` of the proxy experiment with its own
schedule: its own run dir and fingerprint, W&B group = the sweep, job_type = proxy. So a trial
whose fingerprint already has a done run costs nothing, and an interrupted one resumes from its
checkpoints; `Tuner.restore` brings back the sweep itself after the driver is killed. The data
and the tokenizer are prepared once on the driver (trials share one tokenizer: it must not
depend on the trial's mixture), and the JAX compilation cache is shared by all trials.

Sweep dir: <runs root>/sweeps/<name>-<fingerprint[:8]>/ with sweep.json, schedules/, tune/,
trials.csv (one row per trial, the `gx fit` table format), fit.json, winner.json, report.txt,
report.html (self-contained, with plots) and wandb/ (the sweep's W&B summary run).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from gemini_core import config as gc_config
from gemini_core.data.mixture import MixtureSchedule, Stage
from gemini_core.errors import UserError
from gemini_core.scale import ray_local
from gemini_core.runs.rundir import fingerprint, write_json_atomic
from sweeps import fit as fit_lib
from sweeps import optimize, space as space_lib
from sweeps.cpus import trial_cpus
from sweeps.config import SweepConfig, proxy_config, target_config

Log = Callable[[str], None]
WEIGHT, LOSS = "weight/", "loss/"
PROGRESS = "progress"  # the key of a running trial's intermediate Tune report


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    sweep: SweepConfig
    proxy: gc_config.ExperimentConfig
    target: gc_config.ExperimentConfig  # the validation's target scale
    domains: tuple[str, ...]
    tokens: dict[str, int]
    target_tokens: int
    schedules: list[MixtureSchedule]
    dir: Path
    runs_root: Path
    fixed: dict[str, int]  # "centre" and the space's anchors -> trial index; always fitted


# ---------------------------------------------------------------------------------------------
# plan: data once, the space, the sweep's identity


def _trial_base(exp: gc_config.ExperimentConfig) -> gc_config.ExperimentConfig:
    """What every run of the sweep shares. Paths absolute: Ray runs trials in other working
    directories. One tokenizer: trials differ in mixture only, and a tokenizer drawn by the
    mixture would differ per trial."""
    data = exp.data
    data = dataclasses.replace(
        data, root=str(Path(data.root).absolute()) if data.root else "",
        cache_dir=str(Path(data.cache_dir).absolute()) if data.cache_dir else "")
    if data.tokenizer.sample_weights == "mixture":
        data = dataclasses.replace(data, tokenizer=dataclasses.replace(
            data.tokenizer, sample_weights="natural"))
    return dataclasses.replace(exp, data=data)


def plan_sweep(sweep: SweepConfig, runs_root: Path, log: Log = print) -> SweepPlan:
    from gemini_core.train import trainer
    from gemini_core.data.tokens import prepare_data

    runs_root = Path(runs_root).absolute()
    proxy = _trial_base(proxy_config(sweep))
    gc_config.require_data_root(proxy.data)
    cache = trainer.cache_root(proxy, runs_root)
    data = prepare_data(proxy.data, proxy.data.tokenizer.sample_weights, cache, log=log)
    domains = proxy.data.domains
    tokens = {d: int(len(data.train[d])) for d in domains}
    proxy_tokens = proxy.train.steps * proxy.train.batch_size * proxy.data.seq_len
    target = sweep.target_tokens or 4 * proxy_tokens
    space_lib.check_space(sweep.space, domains, tokens, target,
                          min_trials=_min_trials(sweep) if sweep.method == "regression" else 1)
    schedules, fixed = space_lib.sample_space(sweep.space, domains, tokens, target)
    ident = gc_config.to_json_dict(sweep)
    ident.pop("resources")  # how the trials run, not what they are: a resumed sweep may change it
    for path_field in ("root", "cache_dir", "schedule"):  # where things are, not what
        ident["proxy"]["data"].pop(path_field, None)
    fp = fingerprint({"sweep": ident, "manifest": data.manifest_hash,
                      "schedules": [s.to_dict() for s in schedules]})
    out = runs_root / "sweeps" / f"{sweep.name}-{fp[:8]}"
    return SweepPlan(sweep, proxy, _trial_base(target_config(sweep)), domains, tokens,
                     target, schedules, out, runs_root, fixed)


def _min_trials(sweep: SweepConfig) -> int:
    """The fewest trials that leave the fit fit_lib.MIN_TRIALS rows after `fit_and_choose`
    holds out its share of the drawn ones (counting every trial but the centre as drawn: an
    anchor may be dropped as a duplicate)."""
    trials = fit_lib.MIN_TRIALS
    while trials - round(sweep.fit.holdout_fraction * (trials - 1)) < fit_lib.MIN_TRIALS:
        trials += 1
    return trials


def write_plan(plan: SweepPlan) -> None:
    (plan.dir / "schedules").mkdir(parents=True, exist_ok=True)
    for i, schedule in enumerate(plan.schedules):
        path = plan.dir / "schedules" / f"trial-{i:03d}.json"
        if not path.exists():
            schedule.dump(path)
    write_json_atomic(plan.dir / "sweep.json", {
        "sweep": gc_config.to_json_dict(plan.sweep), "proxy": gc_config.to_json_dict(plan.proxy),
        "target": gc_config.to_json_dict(plan.target),
        "domains": list(plan.domains), "tokens": plan.tokens, "target_tokens": plan.target_tokens,
        "runs_root": str(plan.runs_root)})


# ---------------------------------------------------------------------------------------------
# one trial (runs in a Ray worker process)


def _tags(schedule: MixtureSchedule) -> list[str]:
    tags = []
    for k, stage in enumerate(schedule.stages):
        tags += [f"s{k}:{d}={w:.3f}" for d, w in stage.weights.items()]
    return tags


def job_config(sweep_dir: Path, job: dict) -> gc_config.ExperimentConfig:
    """A run of the sweep: the proxy (or target-scale) experiment with a schedule and a seed,
    validated like any user config."""
    meta = json.loads((sweep_dir / "sweep.json").read_text())
    path = sweep_dir / "schedules" / job["schedule"]
    exp = meta[job["scale"]]
    exp["seed"] = job["seed"]
    exp["data"]["schedule"] = str(path)
    exp["tracking"]["tags"] = [job["name"], job["scale"], *_tags(MixtureSchedule.load(path))]
    exp["tracking"]["job_type"] = job.get("job_type") or (
        "proxy" if job["name"].startswith("trial-") else "validate")
    exp["model"] = {k: v for k, v in exp["model"].items() if k != "vocab_size"}
    return gc_config.from_config_dict(exp)


def run_job(config: dict, sweep_dir: str, cpus: int, progress_every_s: float = 0.0) -> None:
    """The Ray Tune function trainable: one run on CPUs of its own, reported once at its end
    (and its progress on the way)."""
    with trial_cpus(cpus):
        _run_job(config["job"], Path(sweep_dir), progress_log(config["job"]["name"],
                                                              progress_every_s))


def progress_log(name: str, every_s: float) -> Log:
    """A trial's run log: its progress lines (`step N/total  loss …  tok/s  eta …`) go to the
    driver as intermediate Tune results, one per `every_s` at most; the other lines are
    dropped (the run dir keeps the metrics)."""
    from ray import tune
    last = time.monotonic()

    def log(line: str) -> None:
        nonlocal last
        if every_s and line.startswith("step ") and time.monotonic() - last >= every_s:
            last = time.monotonic()
            tune.report({"name": name, PROGRESS: line})
    return log


def _run_job(job: dict, sweep_dir: Path, log: Log) -> None:
    from ray import tune

    from gemini_core.train import step_fns, trainer
    step_fns.tune_host_malloc()
    cfg = job_config(sweep_dir, job)
    meta = json.loads((sweep_dir / "sweep.json").read_text())
    root = Path(meta["runs_root"])
    if job.get("doremi"):  # the Group-DRO proxy against a finished reference run
        from gemini_core.runs.rundir import find_run
        from sweeps import doremi
        dc = doremi.DoReMiConfig(**job["doremi"])
        summary = doremi.train_doremi(cfg, find_run(root, job["reference_run"]), dc, root,
                                      log=log)
    else:
        summary = trainer.run_experiment(cfg, root, log=log)
    losses = {d: float(summary[f"eval/{d}/loss"]) for d in cfg.data.domains}
    bad = [d for d, v in losses.items() if not math.isfinite(v)]
    tune.report({"name": job["name"], "run_id": summary["run_id"],
                 "failed": f"non-finite loss on {', '.join(bad)}" if bad else "",
                 **{f"{LOSS}{d}": v for d, v in losses.items()},
                 f"{LOSS}mean": float(summary["eval/mean/loss"])})


# ---------------------------------------------------------------------------------------------
# fan-out


def _live_table(stage: str, total: int, log: Log, progress_every_s: float = 0.0):
    """A Tune callback printing a line per finished run on the driver: the live table; and
    the running trials' progress lines while none has finished for `progress_every_s`."""
    from ray import tune

    class LiveTable(tune.Callback):
        def __init__(self):
            self.setup()

        def setup(self, **info):
            # also when a killed sweep is resumed: Tune restores this callback from the old
            # process, whose clock and count mean nothing here
            self.done, self.t0 = 0, time.perf_counter()
            self.last_finished = self.t0

        def on_trial_result(self, iteration, trials, trial, result, **info):
            now = time.perf_counter()
            if PROGRESS in result:  # a running trial's intermediate report
                if now - self.last_finished >= progress_every_s:
                    log(f"{stage} {result['name']}: {result[PROGRESS]}")
                return
            self.done, self.last_finished = self.done + 1, now
            # finished in earlier processes too: the position in the whole stage
            position = sum(t.status == "TERMINATED" and t is not trial for t in trials) + 1
            eta = (now - self.t0) / self.done * max(total - position, 0)
            failed = f"  FAILED: {result['failed']}" if result.get("failed") else ""
            log(f"{stage} {result['name']} ({position}/{total}, eta {eta:.0f}s): "
                f"mean loss {result[LOSS + 'mean']:.4f}  {result['run_id']}{failed}")

        def on_trial_error(self, iteration, trials, trial, **info):
            log(f"{stage} {trial.config['job']['name']}: error (retried up to max_failures)")

    return LiveTable()


def tune_trainable(fn: Callable, res: Any, log: Log, **params) -> tuple[Any, int]:
    """Ray started (or joined), and `fn(config, cpus=..., progress_every_s=..., **params)` as a
    Tune trainable with `res.cpus_per_trial` CPUs; returns it and how many trials run at once."""
    import ray
    from ray import tune

    ray_local.init_ray(log)
    cpus = res.cpus_per_trial
    concurrent = res.max_concurrent or max(1, int(ray.cluster_resources().get("CPU", 1)) // cpus)
    trainable = tune.with_resources(tune.with_parameters(
        fn, cpus=cpus, progress_every_s=res.progress_every_s, **params), {"cpu": cpus})
    return trainable, concurrent


def run_jobs(plan: SweepPlan, jobs: list[dict], stage: str, log: Log) -> dict[str, dict]:
    """Runs `jobs` on Ray Tune (resuming the stage's Tuner if it was interrupted); returns
    job name -> {run_id, failed, loss/<domain>..., loss/mean}."""
    from ray import tune

    res = plan.sweep.resources
    trainable, concurrent = tune_trainable(run_job, res, log, sweep_dir=str(plan.dir))
    cpus = res.cpus_per_trial
    path = plan.dir / "tune" / stage
    # what the stage runs: its jobs and the configs they build on (sweep.json's)
    meta = json.loads((plan.dir / "sweep.json").read_text())
    spec = {"jobs": jobs, "proxy": meta["proxy"], "target": meta["target"]}
    listed = plan.dir / "tune" / f"{stage}.jobs.json"
    if tune.Tuner.can_restore(str(path)) and listed.is_file() \
            and json.loads(listed.read_text()) == spec:
        log(f"{stage}: resuming {path} (finished runs are not rerun)")
        tuner = tune.Tuner.restore(str(path), trainable, resume_errored=True)
    else:
        # a stage interrupted with other jobs or configs (another winner, another target
        # scale) would restore those: start afresh instead; finished runs are reused by
        # fingerprint
        shutil.rmtree(path, ignore_errors=True)
        write_json_atomic(listed, spec)
        tuner = tune.Tuner(
            trainable, param_space={"job": tune.grid_search(jobs)},
            # reused worker processes: a trial after the first skips process start and imports
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, reuse_actors=True),
            run_config=tune.RunConfig(
                name=stage, storage_path=str(path.parent), verbose=0,
                callbacks=[_live_table(stage, len(jobs), log, res.progress_every_s)],
                failure_config=tune.FailureConfig(max_failures=res.max_failures)))
    log(f"{stage}: {len(jobs)} runs, {concurrent} at a time, {cpus} CPU each")
    return {name: {"run_id": metrics.get("run_id", ""), "failed": failed,
                   **{k: v for k, v in metrics.items() if k.startswith(LOSS)}}
            for name, (metrics, failed) in fit_results(tuner).items()}


def fit_results(tuner) -> dict[str, tuple[dict, str]]:
    """Runs the Tuner; job name -> (reported metrics, failure reason or "")."""
    out = {}
    for result in tuner.fit():
        metrics = result.metrics or {}
        failed = metrics.get("failed") or (f"{type(result.error).__name__}: {result.error}"
                                           if result.error else "")
        out[result.config["job"]["name"]] = (metrics, failed)
    return out


def run_trials(plan: SweepPlan, log: Log) -> list[dict]:
    jobs = [{"name": f"trial-{i:03d}", "scale": "proxy", "schedule": f"trial-{i:03d}.json",
             "seed": plan.proxy.seed} for i in range(len(plan.schedules))]
    results = run_jobs(plan, jobs, "trials", log)
    return [{"trial": i, **results[f"trial-{i:03d}"]} for i in range(len(plan.schedules))]


# ---------------------------------------------------------------------------------------------
# table, fit, choose


def trials_table(plan: SweepPlan, rows: list[dict]):
    """One row per trial in the `gx fit` table format: weight/<stage>/<domain>, loss/<domain>."""
    import pandas as pd
    records = []
    for row in rows:
        schedule = plan.schedules[row["trial"]]
        record = {"trial": row["trial"], "run_id": row["run_id"], "failed": row["failed"]}
        for k, stage in enumerate(schedule.stages):
            record[f"start/s{k}"] = stage.start
            for d in plan.domains:
                record[f"{WEIGHT}s{k}/{d}"] = stage.weights.get(d, 0.0)
        for d in plan.domains:
            record[f"{LOSS}{d}"] = row.get(f"{LOSS}{d}", float("nan"))
        record[f"{LOSS}mean"] = row.get(f"{LOSS}mean", float("nan"))
        records.append(record)
    return pd.DataFrame.from_records(records)


def _objective(sweep: SweepConfig) -> fit_lib.Objective:
    o = sweep.objective
    return fit_lib.Objective(targets=dict(o.targets),
                             max_worse_than_baseline=o.max_worse_than_baseline)


def fit_and_choose(plan: SweepPlan, table, log: Log) -> dict:
    ok = table[table["failed"] == ""].sort_values("trial")
    failed = table[table["failed"] != ""]
    if len(ok) < 4:
        first = failed["failed"].iloc[0] if len(failed) else ""
        raise UserError(f"sweep: only {len(ok)} of {len(table)} trials finished; the fit needs "
                        f"at least 4" + (f" (first failure: {first[:500]})" if first else ""))
    for _, row in failed.iterrows():
        log(f"sweep: trial {row['trial']} left out of the fit: {row['failed']}")
    f = plan.sweep.fit
    # every k-th drawn trial is held out: never seen by the fit (the centre and the anchors,
    # the baselines, are always fitted)
    drawn = ok["trial"][~ok["trial"].isin(plan.fixed.values())]
    n_hold = int(round(f.holdout_fraction * len(drawn)))
    hold_idx = set(drawn.iloc[::max(1, len(drawn) // max(n_hold, 1))].iloc[:n_hold]) \
        if n_hold else set()
    train_rows = ok[~ok["trial"].isin(hold_idx)]
    hold_rows = ok[ok["trial"].isin(hold_idx)]
    X = np.stack([fit_lib.features(plan.schedules[t], plan.domains) for t in train_rows["trial"]])
    Y = train_rows[[f"{LOSS}{d}" for d in plan.domains]].to_numpy(np.float64)
    objective = _objective(plan.sweep)
    result = fit_lib.fit(X, Y, plan.domains, folds=min(f.folds, len(train_rows)),
                         seed=plan.sweep.space.seed, regressors=f.regressors, objective=objective)
    if warning := result.underdetermined("trials"):
        log(f"sweep: {warning}; more trials (space.trials) make it a search")
    holdout = None
    if len(hold_rows):
        Xh = np.stack([fit_lib.features(plan.schedules[t], plan.domains)
                       for t in hold_rows["trial"]])
        Yh = hold_rows[[f"{LOSS}{d}" for d in plan.domains]].to_numpy(np.float64)
        holdout = fit_lib.evaluate_holdout(result, Xh, Yh, objective)
    template = plan.schedules[0]
    baseline_preds = {name: optimize.predict_schedule(result, schedule)
                      for name, schedule in baselines(plan).items()}
    baseline_pred = baseline_preds["natural"]
    caps = space_lib.caps(plan.sweep.space, plan.domains, plan.tokens, plan.target_tokens)
    winner, predicted = optimize.choose(
        result, plan.domains, template, caps, plan.sweep.space.min_weight, objective,
        baseline_pred if objective.max_worse_than_baseline > 0 else None,
        samples=f.samples, seed=plan.sweep.space.seed, method=f.method)
    measured_N = fit_lib.objective_values(
        ok[[f"{LOSS}{d}" for d in plan.domains]].to_numpy(np.float64), plan.domains, objective)
    best = ok.iloc[int(np.argmin(measured_N))]
    best_trial = int(best["trial"])
    label = next((f"trial {best_trial} ({name})" for name, i in plan.fixed.items()
                  if i == best_trial), f"trial {best_trial}")
    winner, predicted, choice = optimize.prefer_measured(
        result, objective, (winner, predicted),
        (plan.schedules[best_trial], float(measured_N.min())), label, enabled=f.prefer_measured)
    if choice["from"] != "fit":
        log(f"sweep: {optimize.describe_choice(choice)}: the winner is {label}")
    # the report's predicted-vs-actual plot: every finished trial, fitted and held out
    pred_ok = result.predict(np.stack([fit_lib.features(plan.schedules[t], plan.domains)
                                       for t in ok["trial"]]))
    per_trial = [{"trial": int(t), "held_out": int(t) in hold_idx,
                  "predicted": {d: float(v) for d, v in zip(plan.domains, p)}}
                 for t, p in zip(ok["trial"], pred_ok)]
    return {"chosen": result.chosen, "cv_mse": result.cv_mse, "holdout": holdout,
            "per_trial_predicted": per_trial,
            "n_fit": len(train_rows), "n_holdout": len(hold_rows), "n_failed": len(failed),
            "winner": winner.to_dict(), "predicted": {d: float(v) for d, v in predicted.items()},
            "natural_predicted": {d: float(v) for d, v in baseline_pred.items()},
            "objective_predicted": {name: optimize.objective_of(p, objective, plan.domains)
                                    for name, p in (
                ("winner", predicted), *baseline_preds.items(),
                ("best_trial", optimize.predict_schedule(result, plan.schedules[best_trial])))},
            "choice": choice,
            "best_trial": {"trial": best_trial, "run_id": best["run_id"],
                           "loss/mean": float(best[f"{LOSS}mean"]),
                           "objective": float(measured_N.min())}}


def baselines(plan: SweepPlan) -> dict[str, MixtureSchedule]:
    """The natural (token shares) and uniform mixtures in every stage of the sweep's schedules,
    as the validation runs them: the space's anchor trial where it has one (the same mixture on
    the caps and the weight grid, so the same runs), else the exact shares."""
    natural = space_lib.prior_weights(dataclasses.replace(plan.sweep.space, prior_power=1.0),
                                      plan.domains, plan.tokens)
    uniform = {d: 1.0 / len(plan.domains) for d in plan.domains}
    return {name: plan.schedules[plan.fixed[name]] if name in plan.fixed else MixtureSchedule(
                tuple(Stage(s.start, dict(w)) for s in plan.schedules[0].stages))
            for name, w in (("natural", natural), ("uniform", uniform))}


# ---------------------------------------------------------------------------------------------
# DoReMi: a reference proxy, then a Group-DRO proxy whose averaged domain weights are the choice


def run_doremi(plan: SweepPlan, log: Log) -> dict:
    from gemini_core.runs.rundir import find_run
    dc = plan.sweep.doremi
    if dc.reference == "uniform":
        ref_weights = {d: 1.0 / len(plan.domains) for d in plan.domains}
    else:
        ref_weights = space_lib.prior_weights(plan.sweep.space, plan.domains, plan.tokens)
    MixtureSchedule.constant(ref_weights).dump(plan.dir / "schedules" / "doremi-reference.json")
    base = {"scale": "proxy", "schedule": "doremi-reference.json", "seed": plan.proxy.seed,
            "job_type": "doremi"}
    ref = run_jobs(plan, [{**base, "name": "doremi/reference"}], "doremi-reference",
                   log)["doremi/reference"]
    if ref["failed"]:
        raise UserError(f"DoReMi: the reference run failed: {ref['failed'][:1000]}")
    dro = run_jobs(plan, [{**base, "name": "doremi/proxy", "reference_run": ref["run_id"],
                           "doremi": dataclasses.asdict(dc)}], "doremi-proxy", log)["doremi/proxy"]
    if dro["failed"]:
        raise UserError(f"DoReMi: the Group-DRO proxy failed: {dro['failed'][:1000]}")
    summary = find_run(plan.runs_root, dro["run_id"]).summary() or {}
    averaged = np.array([summary[f"doremi/weights/{d}"] for d in plan.domains])
    lower = np.full(len(plan.domains), plan.sweep.space.min_weight)
    cap = space_lib.caps(plan.sweep.space, plan.domains, plan.tokens, plan.target_tokens)
    chosen = space_lib.project_to_capped_simplex(
        averaged, lower, np.array([cap[d] for d in plan.domains]))
    winner = MixtureSchedule.constant(dict(zip(plan.domains, chosen.tolist())))
    log("DoReMi: averaged weights " + ", ".join(
        f"{d}={w:.3f}" for d, w in zip(plan.domains, averaged))
        + "; under the caps and minimum weight: " + ", ".join(
        f"{d}={w:.3f}" for d, w in zip(plan.domains, chosen)))
    return {"method": "doremi", "winner": winner.to_dict(),
            "doremi_weights": dict(zip(plan.domains, averaged.tolist())),
            "reference": {"run_id": ref["run_id"], "weights": ref_weights,
                          f"{LOSS}mean": ref.get(f"{LOSS}mean")},
            "proxy": {"run_id": dro["run_id"], f"{LOSS}mean": dro.get(f"{LOSS}mean")},
            "predicted": {}, "n_fit": 0, "n_holdout": 0, "n_failed": 0}


# ---------------------------------------------------------------------------------------------
# validation: the winner against baselines, with seeds, at proxy and at target scale


def candidates(plan: SweepPlan, result: dict) -> dict[str, MixtureSchedule]:
    winner = MixtureSchedule.from_dict(result["winner"])
    out = {"winner": winner, **baselines(plan)}
    if "best_trial" in result:  # a regression sweep's best proxy trial
        out["best_trial"] = plan.schedules[result["best_trial"]["trial"]]
    if any(st.weights != winner.stages[0].weights for st in winner.stages[1:]):
        # the same base mixture without its end-of-training stage: what upweighting buys
        out["winner_no_anneal"] = MixtureSchedule((Stage(0.0, dict(winner.stages[0].weights)),))
    if plan.sweep.validate.boost:
        out["winner_boost"] = boosted(plan, winner, plan.sweep.validate.boost,
                                      plan.sweep.validate.boost_factor)
    return out


def boosted(plan: SweepPlan, winner: MixtureSchedule, domains: Sequence[str], factor: float
            ) -> MixtureSchedule:
    """The winner's base stage, then `domains` multiplied by `factor` (under the caps and
    minimum weight) from the winner's end-stage start, or mid anneal_start: validate.boost."""
    space = plan.sweep.space
    base = winner.stages[0].weights
    cap = space_lib.caps(space, plan.domains, plan.tokens, plan.target_tokens)
    base_D = np.array([base.get(d, 0.0) for d in plan.domains])
    boosted_D = space_lib.project_to_capped_simplex(
        base_D * space_lib.boost_factors(plan.domains, domains, factor),
        np.full(len(plan.domains), space.min_weight), np.array([cap[d] for d in plan.domains]))
    start = winner.stages[-1].start if len(winner.stages) > 1 else sum(space.anneal_start) / 2
    return MixtureSchedule((Stage(0.0, dict(base)),
                            Stage(start, dict(zip(plan.domains, boosted_D.tolist())))))


def _stats(rows: list[dict], domains) -> dict:
    keys = [f"{LOSS}{d}" for d in domains] + [f"{LOSS}mean"]
    ok = [r for r in rows if not r["failed"]]
    return {"n": len(ok), "failed": len(rows) - len(ok),
            "mean": {k: float(np.mean([r[k] for r in ok])) if ok else None for k in keys},
            "std": {k: float(np.std([r[k] for r in ok], ddof=1)) if len(ok) > 1 else 0.0
                    for k in keys},
            "run_ids": [r["run_id"] for r in rows]}


def validate(plan: SweepPlan, result: dict, log: Log) -> dict:
    t0 = time.perf_counter()
    cands = candidates(plan, result)
    for name, schedule in cands.items():
        schedule.validate(plan.domains).dump(plan.dir / "schedules" / f"validate-{name}.json")
    # a candidate equal to an earlier one (the winner kept a measured trial: best_trial, or an
    # anchor such as uniform) is the same run: trained once, reported under both names
    same = {name: next(n for n in cands if cands[n].to_dict() == cands[name].to_dict())
            for name in cands}
    scales, seeds = plan.sweep.validate.scales, range(plan.sweep.validate.seeds)
    jobs = [{"name": f"{scale}/{name}/seed{k}", "scale": scale,
             "schedule": f"validate-{name}.json", "seed": plan.proxy.seed + k}
            for scale in scales for name in cands if same[name] == name for k in seeds]
    runs = run_jobs(plan, jobs, "validate", log)
    out: dict = {"scales": {}, "seconds": None}
    for scale in scales:
        per = {name: _stats([runs[f"{scale}/{same[name]}/seed{k}"] for k in seeds], plan.domains)
               for name in cands}
        out["scales"][scale] = {"candidates": per, "winner_vs": _comparisons(per),
                                "upweighting": _upweighting(per, "winner", cands, plan.domains)}
        if "winner_boost" in cands:
            out["scales"][scale]["boost"] = _upweighting(per, "winner_boost", cands, plan.domains)
    out["seconds"] = time.perf_counter() - t0
    return out


def _comparisons(per: dict) -> dict:
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


def _upweighting(per: dict, name: str, cands: dict[str, MixtureSchedule], domains
                 ) -> dict | None:
    """Loss change from candidate `name`'s end-of-training stage, against its base stage alone
    (winner_no_anneal; the winner itself when it has one stage), on the domains the stage
    upweights and on the mean."""
    schedule = cands[name]
    reference = "winner_no_anneal" if "winner_no_anneal" in per else "winner"
    if len(schedule.stages) < 2 or reference == name:
        return None
    base, end = schedule.stages[0].weights, schedule.stages[-1].weights
    boosted = [d for d in domains if end.get(d, 0) > base.get(d, 0) + 1e-6]  # not float dust
    w, n = per[name]["mean"], per[reference]["mean"]
    if w[f"{LOSS}mean"] is None or n[f"{LOSS}mean"] is None:
        return None
    return {"boosted": boosted, "start": schedule.stages[-1].start,
            "weights": {d: end.get(d, 0.0) for d in boosted},
            "domains": {d: (w[f"{LOSS}{d}"] - n[f"{LOSS}{d}"]) / n[f"{LOSS}{d}"] for d in boosted},
            "mean": (w[f"{LOSS}mean"] - n[f"{LOSS}mean"]) / n[f"{LOSS}mean"]}


UPWEIGHTING = (("upweighting", "the winner's end-of-training stage"),
               ("boost", "declared boost (validate.boost)"))


def describe_upweighting(up: dict, label: str) -> str:
    """One line: an end-of-training stage's effect on the domains it boosts and on the mean."""
    weights = up.get("weights", {})
    boosted = ", ".join(f"{d}" + (f" to {weights[d]:.2f}" if d in weights else "")
                        for d in up["boosted"]) or "none"
    start = f" from {up['start']:.0%} of training" if "start" in up else ""
    return (f"{label} (boosts {boosted}{start}): "
            + ", ".join(f"{d} {x:+.2%}" for d, x in up["domains"].items())
            + f"; mean {up['mean']:+.2%}")


def format_validation(v: dict, domains) -> str:
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


# ---------------------------------------------------------------------------------------------
# the sweep


def run_sweep(sweep: SweepConfig, runs_root: Path, *, validate_winner: bool = True,
              log: Log = print) -> Path:
    t0 = time.perf_counter()
    plan = plan_sweep(sweep, runs_root, log)
    write_plan(plan)
    log(f"sweep {plan.dir.name}: {len(plan.schedules)} mixtures over {', '.join(plan.domains)}; "
        f"caps at {plan.target_tokens:,} target tokens -> {plan.dir}")
    if sweep.method == "doremi":
        result = run_doremi(plan, log)
        t_trials = time.perf_counter() - t0
    else:
        rows = run_trials(plan, log)
        t_trials = time.perf_counter() - t0
        table = trials_table(plan, rows)
        table.to_csv(plan.dir / "trials.csv", index=False)
        result = fit_and_choose(plan, table, log)
    result["seconds"] = {"trials": t_trials, "total": time.perf_counter() - t0}
    write_json_atomic(plan.dir / "fit.json", result)
    optimize.write_winner(plan.dir / "winner.json", MixtureSchedule.from_dict(result["winner"]),
                          result["predicted"], {"sweep": plan.dir.name})
    log(f"sweep: trials and fit took {result['seconds']['total']:.0f}s")
    if validate_winner and sweep.validate.enabled:
        write_json_atomic(plan.dir / "validate.json", validate(plan, result, log))
    text = format_sweep(plan.dir)
    (plan.dir / "report.txt").write_text(text + "\n")
    from sweeps import report, wandb_summary  # matplotlib, wandb: paid at the end only
    html = report.write_html(plan.dir)
    wandb_summary.log_sweep(plan.dir, log=log)
    log(text)
    log(f"report: {html}")
    log(f"winner: {plan.dir / 'winner.json'}  (gx run experiments/pretrain.py "
        f"--config.data.schedule={plan.dir / 'winner.json'} ...)")
    return plan.dir


def find_sweep(root: Path, name: str) -> Path:
    """A sweep dir by path, by full name, or by its unique prefix (the newest if several)."""
    if (Path(name) / "sweep.json").is_file():
        return Path(name)
    found = sorted((root / "sweeps").glob(f"{name}*/fit.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UserError(f"no finished sweep named {name!r} under {root / 'sweeps'}")
    return found[-1].parent


def format_sweep(sweep_dir: Path) -> str:
    """`gx compare SWEEP`: the trials, the fit's choices, the winner against natural."""
    result = json.loads((sweep_dir / "fit.json").read_text())
    meta = json.loads((sweep_dir / "sweep.json").read_text())
    domains = meta["domains"]
    if result.get("method") == "doremi":
        lines = _format_doremi(result, domains)
    else:
        lines = _format_trials(sweep_dir, result, domains)
    if (sweep_dir / "validate.json").is_file():
        lines.append(format_validation(json.loads((sweep_dir / "validate.json").read_text()),
                                       domains))
    return "\n".join(lines)


def _format_doremi(result: dict, domains) -> list[str]:
    ref, dro = result["reference"], result["proxy"]
    return [f"DoReMi: reference run {ref['run_id']} (mean loss {ref[LOSS + 'mean']:.4f}), "
            f"Group-DRO proxy {dro['run_id']}",
            "  reference mixture: " + ", ".join(f"{d}={ref['weights'][d]:.3f}" for d in domains),
            "  DoReMi weights (averaged over steps): " + ", ".join(
                f"{d}={result['doremi_weights'][d]:.3f}" for d in domains),
            "  winner (under the caps and minimum weight): " + ", ".join(
                f"{d}={w:.3f}" for d, w in result["winner"]["stages"][0]["weights"].items())]


def describe_choice(result: dict) -> str:
    """fit.json's choice in one line: the fit's mixture or a measured trial, and why."""
    return optimize.describe_choice(result["choice"], result["best_trial"]["objective"])


def _format_trials(sweep_dir: Path, result: dict, domains) -> list[str]:
    import pandas as pd
    table = pd.read_csv(sweep_dir / "trials.csv", keep_default_na=False)
    lines = [f"sweep {sweep_dir.name}: {len(table)} trials "
             f"({result['n_fit']} fitted, {result['n_holdout']} held out, "
             f"{result['n_failed']} failed)", ""]
    head = f"{'trial':>5}  {'mean':>7}  " + "  ".join(f"{d[:6]:>6}" for d in domains) + "  weights (base stage)"
    lines.append(head)
    table = table.sort_values(f"{LOSS}mean")
    for _, row in table.iterrows():
        losses = "  ".join(f"{float(row[f'{LOSS}{d}']):>6.3f}" for d in domains)
        weights = " ".join(f"{d[:4]}={float(row[f'{WEIGHT}s0/{d}']):.2f}" for d in domains)
        mark = "  FAILED" if row["failed"] else ""
        lines.append(f"{int(row['trial']):>5}  {float(row[f'{LOSS}mean']):>7.4f}  {losses}  "
                     f"{weights}{mark}")
    lines += ["", "fit: " + ", ".join(f"{d} {m}" for d, m in result["chosen"].items())]
    if result["holdout"]:
        h = result["holdout"]
        lines.append(f"held-out trials: Spearman {h['spearman']:.3f}, regret {h['regret']:.4f} "
                     f"(n={h['n']})")
    lines.append("winner (predicted loss per domain, natural mixture's predicted in brackets):")
    for k, stage in enumerate(result["winner"]["stages"]):
        lines.append(f"  stage {k} from {stage['start']:.2f}: " + ", ".join(
            f"{d}={w:.3f}" for d, w in stage["weights"].items()))
    lines.append("  " + ", ".join(f"{d} {result['predicted'][d]:.4f} "
                                   f"({result['natural_predicted'][d]:.4f})" for d in domains))
    obj, h = result.get("objective_predicted"), result["holdout"]
    if obj:
        names = ("winner", "natural", "uniform", "best_trial")  # JSON sorts them
        lines.append("  objective predicted: " + ", ".join(
            f"{name.replace('_', ' ')} {obj[name]:.4f}" for name in names if name in obj) + (
            f"; the fit's error on held-out trials {h['objective_rmse']:.4f}"
            if h and math.isfinite(h.get("objective_rmse", math.nan)) else ""))
    if result.get("choice"):
        lines.append(f"  {describe_choice(result)}")
    return lines
