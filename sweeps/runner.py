"""`gx sweep`: proxy runs over sampled mixture schedules, fanned out by Ray Tune, then fit, choose
and validate; the orchestration of the modules that do each.

The sweep's setup (sweeps.sweep_setup: data once, the sampled schedules, sweep.json), its
trials on Ray Tune (sweeps.fanout: every trial a real run with its own run dir and fingerprint,
so done trials are reused and a killed sweep resumes), the fit and the choice of the winner
(here, on sweeps.fit and sweeps.optimize), or DoReMi's reference and Group-DRO proxy runs
instead; then the validation (sweeps.validation) and the reports (sweeps.report_text,
sweeps.report, sweeps.wandb_summary). The data and the tokenizer are prepared once on the
driver (trials share one tokenizer: it must not depend on the trial's mixture), and the JAX
compilation cache is shared by all trials. The sweep dir's files: sweeps.sweep_dir.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import numpy as np

from gemini_core.data.mixture import MixtureSchedule
from gemini_core.errors import UserError
from gemini_core.runs.rundir import write_json_atomic
from sweeps import config as sweep_config
from sweeps import fit as fit_lib
from sweeps import optimize
from sweeps import space as space_lib
from sweeps.config import SweepConfig
from sweeps.fanout import run_jobs
from sweeps.report_text import format_sweep
from sweeps.sweep_dir import DOWNSTREAM, LOSS, WEIGHT, objective_columns
from sweeps.sweep_setup import SweepSetup, baselines, setup_sweep, write_setup
from sweeps.validation import validate

Log = Callable[[str], None]


def run_trials(setup: SweepSetup, log: Log) -> list[dict]:
    jobs = [{"name": f"trial-{i:03d}", "scale": "proxy", "schedule": f"trial-{i:03d}.json",
             "seed": setup.proxy.seed} for i in range(len(setup.schedules))]
    results = run_jobs(setup, jobs, "trials", log)
    return [{"trial": i, **results[f"trial-{i:03d}"]} for i in range(len(setup.schedules))]


# ---------------------------------------------------------------------------------------------
# table, fit, choose


def trials_table(setup: SweepSetup, rows: list[dict]):
    """One row per trial in the `gx fit` table format: weight/<stage>/<domain>, loss/<domain>,
    and downstream/<task>/<metric> when the proxy evaluates tasks."""
    import pandas as pd
    records = []
    for row in rows:
        schedule = setup.schedules[row["trial"]]
        record = {"trial": row["trial"], "run_id": row["run_id"], "failed": row["failed"]}
        for k, stage in enumerate(schedule.stages):
            record[f"start/s{k}"] = stage.start
            for d in setup.domains:
                record[f"{WEIGHT}s{k}/{d}"] = stage.weights.get(d, 0.0)
        for d in setup.domains:
            record[f"{LOSS}{d}"] = row.get(f"{LOSS}{d}", float("nan"))
        record[f"{LOSS}mean"] = row.get(f"{LOSS}mean", float("nan"))
        record.update({k: v for k, v in sorted(row.items()) if k.startswith(DOWNSTREAM)})
        records.append(record)
    return pd.DataFrame.from_records(records)


def finished_trials(table, log: Log, metrics: list[str]):
    """The trials that finished with every fitted metric; a UserError when fewer than the fit
    needs did."""
    table = table.copy()
    for m in metrics:  # a task the trial did not score cannot be fitted
        lacking = (table["failed"] == "") & table[fit_lib.metric_key(m)].isna()
        table.loc[lacking, "failed"] = f"no value for {fit_lib.metric_key(m)}"
    ok = table[table["failed"] == ""].sort_values("trial")
    failed = table[table["failed"] != ""]
    if len(ok) < fit_lib.MIN_TRIALS:
        first = failed["failed"].iloc[0] if len(failed) else ""
        raise UserError(f"sweep: only {len(ok)} of {len(table)} trials finished; the fit needs "
                        f"at least {fit_lib.MIN_TRIALS}"
                        + (f" (first failure: {first[:500]})" if first else ""))
    for _, row in failed.iterrows():
        log(f"sweep: trial {row['trial']} left out of the fit: {row['failed']}")
    return ok


def held_out_trials(setup: SweepSetup, ok) -> set[int]:
    """Every k-th drawn trial, never seen by the fit (the centre and the anchors, the
    baselines, are always fitted)."""
    drawn = ok["trial"][~ok["trial"].isin(setup.fixed.values())]
    n_hold = int(round(setup.sweep.fit.holdout_fraction * len(drawn)))
    if not n_hold:
        return set()
    return set(drawn.iloc[::max(1, len(drawn) // n_hold)].iloc[:n_hold])


def fit_and_choose(setup: SweepSetup, table, log: Log) -> dict:
    objective = sweep_config.objective(setup.sweep)
    metrics = objective.metrics(setup.domains, objective_columns(table.columns))
    columns = [fit_lib.metric_key(m) for m in metrics]
    ok = finished_trials(table, log, metrics)
    n_failed = len(table) - len(ok)
    f = setup.sweep.fit
    hold_idx = held_out_trials(setup, ok)
    train_rows = ok[~ok["trial"].isin(hold_idx)]
    hold_rows = ok[ok["trial"].isin(hold_idx)]
    X = np.stack([fit_lib.features(setup.schedules[t], setup.domains) for t in train_rows["trial"]])
    Y = train_rows[columns].to_numpy(np.float64)
    result = fit_lib.fit(X, Y, setup.domains, folds=min(f.folds, len(train_rows)),
                         seed=setup.sweep.space.seed, regressors=f.regressors, objective=objective,
                         metrics=metrics)
    if warning := result.underdetermined("trials"):
        log(f"sweep: {warning}; more trials (space.trials) make it a search")
    holdout = None
    if len(hold_rows):
        Xh = np.stack([fit_lib.features(setup.schedules[t], setup.domains)
                       for t in hold_rows["trial"]])
        Yh = hold_rows[columns].to_numpy(np.float64)
        holdout = fit_lib.evaluate_holdout(result, Xh, Yh, objective)
    template = setup.schedules[0]
    baseline_preds = {name: optimize.predict_schedule(result, schedule)
                      for name, schedule in baselines(setup).items()}
    baseline_pred = baseline_preds["natural"]
    caps = space_lib.caps(setup.sweep.space, setup.domains, setup.tokens, setup.target_tokens)
    winner, predicted = optimize.choose(
        result, setup.domains, template, caps, setup.sweep.space.min_weight, objective,
        baseline_pred if objective.constrained else None,
        samples=f.samples, seed=setup.sweep.space.seed, method=f.method)
    measured_N = fit_lib.objective_values(ok[columns].to_numpy(np.float64), metrics, objective)
    best = ok.iloc[int(np.argmin(measured_N))]
    best_trial = int(best["trial"])
    label = next((f"trial {best_trial} ({name})" for name, i in setup.fixed.items()
                  if i == best_trial), f"trial {best_trial}")
    winner, predicted, choice = optimize.prefer_measured(
        result, objective, (winner, predicted),
        (setup.schedules[best_trial], float(measured_N.min())), label, enabled=f.prefer_measured)
    natural = setup.fixed.get("natural", -1)  # the anchor trial, measured like the others
    if f.prefer_baseline and natural in set(ok["trial"]):
        winner, predicted, choice = optimize.prefer_baseline(
            result, objective, (winner, predicted, choice),
            (setup.schedules[natural], float(measured_N[list(ok["trial"]).index(natural)])),
            f"trial {natural} (natural)")
    if choice["from"] != "fit":
        log(f"sweep: {optimize.describe_choice(choice)}: the winner is {choice['from']}")
    # the report's predicted-vs-actual plot: every finished trial, fitted and held out
    pred_ok = result.predict(np.stack([fit_lib.features(setup.schedules[t], setup.domains)
                                       for t in ok["trial"]]))
    per_trial = [{"trial": int(t), "held_out": int(t) in hold_idx,
                  "predicted": {m: float(v) for m, v in zip(metrics, p)}}
                 for t, p in zip(ok["trial"], pred_ok)]
    return {"objective": objective.describe(), "metrics": metrics,
            "chosen": result.chosen, "cv_mse": result.cv_mse, "holdout": holdout,
            "per_trial_predicted": per_trial,
            "n_fit": len(train_rows), "n_holdout": len(hold_rows), "n_failed": n_failed,
            "winner": winner.to_dict(), "predicted": {d: float(v) for d, v in predicted.items()},
            "natural_predicted": {d: float(v) for d, v in baseline_pred.items()},
            "objective_predicted": {name: optimize.objective_of(p, objective, metrics)
                                    for name, p in (
                ("winner", predicted), *baseline_preds.items(),
                ("best_trial", optimize.predict_schedule(result, setup.schedules[best_trial])))},
            "choice": choice,
            "best_trial": {"trial": best_trial, "run_id": best["run_id"],
                           "loss/mean": float(best[f"{LOSS}mean"]),
                           "objective": float(measured_N.min())}}


# ---------------------------------------------------------------------------------------------
# DoReMi: a reference proxy, then a Group-DRO proxy whose averaged domain weights are the choice


def run_doremi(setup: SweepSetup, log: Log) -> dict:
    from gemini_core.runs.rundir import find_run
    dc = setup.sweep.doremi
    if dc.reference == "uniform":
        ref_weights = {d: 1.0 / len(setup.domains) for d in setup.domains}
    else:
        ref_weights = space_lib.prior_weights(setup.sweep.space, setup.domains, setup.tokens)
    MixtureSchedule.constant(ref_weights).dump(setup.dir / "schedules" / "doremi-reference.json")
    base = {"scale": "proxy", "schedule": "doremi-reference.json", "seed": setup.proxy.seed,
            "job_type": "doremi"}
    ref = run_jobs(setup, [{**base, "name": "doremi/reference"}], "doremi-reference",
                   log)["doremi/reference"]
    if ref["failed"]:
        raise UserError(f"DoReMi: the reference run failed: {ref['failed'][:1000]}")
    dro = run_jobs(setup, [{**base, "name": "doremi/proxy", "reference_run": ref["run_id"],
                           "doremi": dataclasses.asdict(dc)}], "doremi-proxy", log)["doremi/proxy"]
    if dro["failed"]:
        raise UserError(f"DoReMi: the Group-DRO proxy failed: {dro['failed'][:1000]}")
    summary = find_run(setup.runs_root, dro["run_id"]).summary() or {}
    averaged = np.array([summary[f"doremi/weights/{d}"] for d in setup.domains])
    lower = np.full(len(setup.domains), setup.sweep.space.min_weight)
    cap = space_lib.caps(setup.sweep.space, setup.domains, setup.tokens, setup.target_tokens)
    chosen = space_lib.project_to_capped_simplex(
        averaged, lower, np.array([cap[d] for d in setup.domains]))
    winner = MixtureSchedule.constant(dict(zip(setup.domains, chosen.tolist())))
    log("DoReMi: averaged weights " + ", ".join(
        f"{d}={w:.3f}" for d, w in zip(setup.domains, averaged))
        + "; under the caps and minimum weight: " + ", ".join(
        f"{d}={w:.3f}" for d, w in zip(setup.domains, chosen)))
    return {"method": "doremi", "winner": winner.to_dict(),
            "doremi_weights": dict(zip(setup.domains, averaged.tolist())),
            "reference": {"run_id": ref["run_id"], "weights": ref_weights,
                          f"{LOSS}mean": ref.get(f"{LOSS}mean")},
            "proxy": {"run_id": dro["run_id"], f"{LOSS}mean": dro.get(f"{LOSS}mean")},
            "predicted": {}, "n_fit": 0, "n_holdout": 0, "n_failed": 0}


# ---------------------------------------------------------------------------------------------
# the sweep


def run_sweep(sweep: SweepConfig, runs_root: Path, *, validate_winner: bool = True,
              log: Log = print) -> Path:
    t0 = time.perf_counter()
    setup = setup_sweep(sweep, runs_root, log)
    write_setup(setup)
    log(f"sweep {setup.dir.name}: {len(setup.schedules)} mixtures over {', '.join(setup.domains)}; "
        f"caps at {setup.target_tokens:,} target tokens -> {setup.dir}")
    if sweep.method == "doremi":
        result = run_doremi(setup, log)
        t_trials = time.perf_counter() - t0
    else:
        rows = run_trials(setup, log)
        t_trials = time.perf_counter() - t0
        table = trials_table(setup, rows)
        table.to_csv(setup.dir / "trials.csv", index=False)
        result = fit_and_choose(setup, table, log)
    result["seconds"] = {"trials": t_trials, "total": time.perf_counter() - t0}
    write_json_atomic(setup.dir / "fit.json", result)
    optimize.write_winner(setup.dir / "winner.json", MixtureSchedule.from_dict(result["winner"]),
                          result["predicted"], {"sweep": setup.dir.name})
    log(f"sweep: trials and fit took {result['seconds']['total']:.0f}s")
    if validate_winner and sweep.validate.enabled:
        if sweep.validate.doremi and sweep.method == "regression":  # a baseline of its own
            doremi = run_doremi(setup, log)
            result["doremi"] = {k: doremi[k] for k in ("winner", "doremi_weights")}
            write_json_atomic(setup.dir / "fit.json", result)
        write_json_atomic(setup.dir / "validate.json", validate(setup, result, log))
    text = format_sweep(setup.dir)
    (setup.dir / "report.txt").write_text(text + "\n")
    from sweeps import report, wandb_summary  # matplotlib, wandb: paid at the end only
    html = report.write_html(setup.dir)
    wandb_summary.log_sweep(setup.dir, log=log)
    log(text)
    log(f"report: {html}")
    log(f"winner: {setup.dir / 'winner.json'}  (gx run experiments/pretrain.py "
        f"--config.data.schedule={setup.dir / 'winner.json'} ...)")
    return setup.dir
