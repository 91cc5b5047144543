"""`gx scaling run`: a ladder of model sizes x token budgets trained on Ray Tune, then fitted.

Every (size, steps) pair is a real `gemini_core.train.trainer.run_experiment` of the base
experiment with that model and that many steps; its own run dir and fingerprint, so rerunning
the ladder reuses done runs and resumes interrupted ones from their checkpoints. The data and
the tokenizer are prepared once on the driver; the runs not yet done go to Ray Tune
(sweeps.fanout), the most expensive first (the longest jobs started first finish the grid
soonest). The fit: sweeps.scaling_law, written by sweeps.scaling_table.

Sweep dir: <runs root>/sweeps/<name>-<fingerprint[:8]>/ with ladder.json (the runs),
ladder.csv (run_id, size, steps, params (non-embedding), params_total, tokens, loss = final
eval/mean/loss, bpb, flops, failed), fit.json, fit.svg and fit.png.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import ml_collections

from gemini_core import config as gc_config
from gemini_core.config import ExperimentConfig, to_dataclass
from gemini_core.errors import UserError
from gemini_core.nested import merge, plain
from gemini_core.runs.rundir import fingerprint, write_json_atomic
from sweeps.config import ResourcesConfig, check_resources
from sweeps.fanout import fit_results, new_tuner, progress_log, tune_trainable
from sweeps.scaling_law import N_CONSTANTS, ScalingFitConfig
from sweeps.scaling_table import fit_and_write
from sweeps.sweep_dir import LOSS

Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# the ladder's typed config


@dataclasses.dataclass(frozen=True)
class LadderConfig:
    name: str
    base: Any  # the experiment every run is (an experiment ConfigDict), name replaced by `name`
    sizes: Mapping[str, Any]  # size name -> fields replacing the base's, e.g. {"model": {...}}
    steps: tuple[int, ...]  # token budgets: steps x batch x seq tokens per run
    fit: ScalingFitConfig = ScalingFitConfig()
    resources: ResourcesConfig = ResourcesConfig()


@dataclasses.dataclass(frozen=True)
class Rung:
    """One run of the ladder."""

    size: str
    steps: int
    config: ExperimentConfig

    @property
    def name(self) -> str:
        return f"{self.size}-s{self.steps}"


def _keys(d: Mapping, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, Mapping):
            out |= _keys(v, f"{prefix}{k}.")
    return out


def rung_config(ladder: LadderConfig, size: str, steps: int) -> ExperimentConfig:
    """The base with the size's fields and `steps`, validated like any user config; an error
    names the ladder's key (config.sizes.<size>.* or config.base.*) and the run."""
    override = plain(ladder.sizes[size])
    cfg = merge(plain(ladder.base), override)
    cfg = merge(cfg, {"name": ladder.name, "train": {"steps": steps}, "tracking": {
        "job_type": "scaling", "tags": [ladder.name, size, f"steps={steps}"]}})
    try:
        exp = gc_config.from_config_dict(cfg)
        gc_config.check_paths(exp.data)  # a mistyped path fails at load, not after the others
        return exp
    except UserError as e:
        msg = str(e)
        key = msg.split("=")[0].split(":")[0].removeprefix("config.")
        where = f"config.sizes.{size}." if key in _keys(override) else "config.base."
        msg = msg.replace("config.", where, 1)
        # the runs' train.steps are the ladder's steps: named as the user sets them
        msg = msg.replace(f"config.train.steps={steps}",
                          f"config.steps[{ladder.steps.index(steps)}]={steps}")
        raise UserError(f"{msg} (ladder run {size} x {steps} steps)") from None


def _check(ladder: LadderConfig) -> None:
    if not ladder.name:
        raise UserError("config.name='': every ladder needs a name")
    if not isinstance(ladder.base, Mapping) or not ladder.base:
        raise UserError("config.base: the experiment every run trains (a section of keys, e.g. "
                        "an experiment's get_config())")
    if len(ladder.sizes) < 2:
        raise UserError(f"config.sizes: {len(ladder.sizes)} size(s); the fit needs at least 2 "
                        "model sizes")
    for size, fields in ladder.sizes.items():
        if not isinstance(fields, Mapping):
            raise UserError(f"config.sizes.{size}={fields!r}: expected a section of experiment "
                            "fields, e.g. {'model': {'d_model': 64, ...}}")
    if len(set(ladder.steps)) < 2:
        raise UserError(f"config.steps={ladder.steps}: the fit needs at least 2 token budgets")
    for i, s in enumerate(ladder.steps):
        if s < 1:
            raise UserError(f"config.steps[{i}]={s}: must be >= 1")
    if len(set(ladder.steps)) != len(ladder.steps):
        raise UserError(f"config.steps={ladder.steps}: a budget is named twice")
    f = ladder.fit
    if f.bootstrap < 0:
        raise UserError(f"config.fit.bootstrap={f.bootstrap}: must be >= 0")
    if f.starts < 1:
        raise UserError(f"config.fit.starts={f.starts}: must be >= 1")
    if not f.delta > 0:
        raise UserError(f"config.fit.delta={f.delta}: must be > 0")
    runs = len(ladder.sizes) * len(ladder.steps)
    if not 0 <= f.holdout_largest <= runs - N_CONSTANTS:
        raise UserError(f"config.fit.holdout_largest={f.holdout_largest}: must be in "
                        f"[0, {runs - N_CONSTANTS}] ({runs} runs, the fit has "
                        f"{N_CONSTANTS} constants)")
    for i, c in enumerate(f.budgets):
        if not c > 0:
            raise UserError(f"config.fit.budgets[{i}]={c}: FLOPs must be > 0")
    check_resources(ladder.resources)


def _check_budgets(budgets: tuple[float, ...], runs: list[Rung]) -> None:
    """The compute-optimal table's budgets start where the ladder does: below its smallest run
    the fit has no model small enough to say anything (and `--config.fit.budgets=5`, which
    ml_collections reads as (5.0,), is caught here rather than tabulated)."""
    from gemini_core.scale import flops
    least = min(6.0 * flops.param_counts(r.config.model)["non_embedding"] * r.steps
                * r.config.train.batch_size * r.config.data.seq_len for r in runs)
    for i, c in enumerate(budgets):
        if c < least:
            raise UserError(f"config.fit.budgets[{i}]={c:g}: below the ladder's smallest run "
                            f"({least:.3g} FLOPs, 6·N·D); budgets are FLOPs at or beyond the "
                            "ladder's, a tuple such as --config.fit.budgets='(1e15, 1e16)'")


def from_config_dict(cfg: ml_collections.ConfigDict | Mapping) -> LadderConfig:
    ladder = to_dataclass(cfg, LadderConfig, "config")
    _check(ladder)
    runs = rungs(ladder)  # every run's config is valid now, before any data is read
    _check_budgets(ladder.fit.budgets, runs)
    return ladder


def rungs(ladder: LadderConfig) -> list[Rung]:
    return [Rung(size, steps, rung_config(ladder, size, steps))
            for size in ladder.sizes for steps in ladder.steps]


# ---------------------------------------------------------------------------------------------
# the runs, on Ray Tune


@dataclasses.dataclass(frozen=True)
class LadderRun:
    """A rung with its identity: run id, run dir, N and D."""

    rung: Rung
    run_id: str
    run_dir: Path
    params: int  # non-embedding
    params_total: int
    tokens: int


@dataclasses.dataclass(frozen=True)
class LadderSetup:
    """What a ladder runs: every rung's run, and the ladder's sweep dir."""

    ladder: LadderConfig
    runs: list[LadderRun]
    dir: Path
    runs_root: Path


def setup_ladder(ladder: LadderConfig, runs_root: Path, log: Log = print) -> LadderSetup:
    """Data and tokenizer once (every run shares them), every run's identity, the sweep dir."""
    from gemini_core.scale import flops
    from gemini_core.train import trainer

    runs_root = Path(runs_root).absolute()
    runs = []
    for i, rung in enumerate(rungs(ladder)):
        root = rung.config.data.root
        if not root or not Path(root).is_dir():
            raise UserError(f"config.base.data.root={root!r}: set it to the corpus folder, e.g. "
                            "--config.base.data.root=../shared/corpus")
        # the first prepares data and tokenizer (or finds them cached); the rest hit the cache
        p = trainer.prepare(rung.config, runs_root, log=log if i == 0 else lambda _: None)
        counts = flops.param_counts(rung.config.model)
        tokens = rung.config.train.steps * rung.config.train.batch_size * rung.config.data.seq_len
        runs.append(LadderRun(rung, p.run.run_id, p.run.path, counts["non_embedding"],
                              counts["total"], tokens))
    fp = fingerprint({"runs": [r.run_id for r in runs]})  # run ids carry every field + data
    return LadderSetup(ladder, runs, runs_root / "sweeps" / f"{ladder.name}-{fp[:8]}",
                       runs_root)


def _job_config(cfg: ExperimentConfig) -> dict:
    plain = gc_config.to_json_dict(cfg)
    plain["model"] = gc_config.declared_model(plain["model"])
    for key in ("root", "cache_dir", "schedule"):  # Tune runs each trial in a dir of its own
        if plain["data"][key]:
            plain["data"][key] = str(Path(plain["data"][key]).absolute())
    return plain


def run_rung(config: dict, runs_root: str, cpus: int, progress_every_s: float = 0.0) -> None:
    """The Ray Tune function trainable: one ladder run on CPUs of its own, reported once at its
    end (and its progress on the way)."""
    from sweeps.cpus import trial_cpus
    with trial_cpus(cpus):  # before JAX starts: XLA's thread flag
        from ray import tune

        from gemini_core.train import step_fns, trainer
        step_fns.tune_host_malloc()
        job = config["job"]
        cfg = gc_config.from_config_dict(job["config"])
        summary = trainer.run_experiment(cfg, Path(runs_root),
                                       log=progress_log(job["name"], progress_every_s))
        loss = float(summary["eval/mean/loss"])
        tune.report({"name": job["name"], "run_id": summary["run_id"],
                     "failed": "" if math.isfinite(loss) else "non-finite loss",
                     f"{LOSS}mean": loss})


def _run_on_tune(setup: LadderSetup, pending: list[LadderRun], log: Log) -> dict[str, str]:
    """Runs `pending` on Ray Tune; returns run name -> error ('' when it finished)."""
    res = setup.ladder.resources
    trainable, concurrent = tune_trainable(run_rung, res, log, runs_root=str(setup.runs_root))
    # most compute first: the longest runs start first, so the grid ends soonest
    pending = sorted(pending, key=lambda p: -p.params * p.tokens)
    jobs = [{"name": p.rung.name, "config": _job_config(p.rung.config)} for p in pending]
    # a fresh Tuner each time: the runs themselves resume (run dirs, checkpoints), and only
    # the runs not yet done are in it
    path = setup.dir / "tune"
    shutil.rmtree(path, ignore_errors=True)
    tuner = new_tuner(trainable, jobs, path / "runs", "ladder", concurrent, res, log)
    log(f"ladder: {len(jobs)} runs to train, {concurrent} at a time, {res.cpus_per_trial} CPU each")
    return {name: failed for name, (_, failed) in fit_results(tuner).items()}


def _summary(p: LadderRun) -> dict:
    path = p.run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def run_state(p: LadderRun) -> str:
    path = p.run_dir / "status.json"
    return json.loads(path.read_text()).get("state", "") if path.is_file() else ""


def ladder_table(setup: LadderSetup, errors: Mapping[str, str]):
    import pandas as pd

    records = []
    for p in setup.runs:
        s = _summary(p) if run_state(p) == "done" else {}
        loss = float(s.get("eval/mean/loss", math.nan))
        failed = errors.get(p.rung.name) or ("" if math.isfinite(loss) else
                                             f"not done ({run_state(p) or 'never started'})")
        records.append({"run_id": p.run_id, "size": p.rung.size, "steps": p.rung.steps,
                        "params": p.params, "params_total": p.params_total, "tokens": p.tokens,
                        "loss": loss, "bpb": float(s.get("eval/mean/bpb", math.nan)),
                        "flops": 6.0 * p.params * p.tokens, "failed": failed})
    return pd.DataFrame.from_records(records)


def run_ladder(ladder: LadderConfig, runs_root: Path, *, log: Log = print) -> Path:
    t0 = time.perf_counter()
    setup = setup_ladder(ladder, runs_root, log)
    setup.dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(setup.dir / "ladder.json", {
        "ladder": gc_config.to_json_dict(ladder), "runs_root": str(setup.runs_root),
        "runs": [{"name": p.rung.name, "size": p.rung.size, "steps": p.rung.steps,
                  "run_id": p.run_id, "params": p.params, "params_total": p.params_total,
                  "tokens": p.tokens} for p in setup.runs]})
    pending = [p for p in setup.runs if run_state(p) != "done"]
    log(f"ladder {setup.dir.name}: {len(ladder.sizes)} sizes x {len(ladder.steps)} budgets = "
        f"{len(setup.runs)} runs ({len(setup.runs) - len(pending)} already done) -> {setup.dir}")
    errors = _run_on_tune(setup, pending, log) if pending else {}
    table = ladder_table(setup, errors)
    table.to_csv(setup.dir / "ladder.csv", index=False)
    for _, row in table[table["failed"] != ""].iterrows():
        log(f"ladder: {row['run_id']} ({row['size']} x {row['steps']} steps) left out of the "
            f"fit: {row['failed']}")
    log(format_ladder(table))
    log(f"ladder: runs took {time.perf_counter() - t0:.0f}s")
    ok = table[table["failed"] == ""]
    f = ladder.fit
    if len(ok) - f.holdout_largest < N_CONSTANTS:
        raise UserError(f"ladder: only {len(ok)} of {len(table)} runs finished; the fit needs "
                        f"at least {N_CONSTANTS + f.holdout_largest} ({setup.dir / 'ladder.csv'})")
    fit_and_write(ok.reset_index(drop=True), setup.dir, "fit", holdout_largest=f.holdout_largest,
                  bootstrap_resamples=f.bootstrap, delta=f.delta, starts=f.starts, seed=f.seed,
                  budgets=f.budgets, source=setup.dir.name, log=log)
    return setup.dir


def format_ladder(table) -> str:
    """Loss of every run: sizes down, budgets across."""
    steps = sorted(table["steps"].unique())
    tokens = {s: int(table[table["steps"] == s]["tokens"].iloc[0]) for s in steps}
    lines = [f"{'size':<8} {'N (non-emb)':>12} " + " ".join(f"{tokens[s]:>10,}" for s in steps)
             + "   <- D (tokens); final eval/mean/loss"]
    for size in table.sort_values(["params", "steps"])["size"].unique():
        rows = table[table["size"] == size]
        cells = []
        for s in steps:
            row = rows[rows["steps"] == s]
            note = str(row["failed"].iloc[0]) if "failed" in row and not row.empty else ""
            failed = row.empty or note not in ("", "nan")
            cells.append(f"{'failed':>10}" if failed else f"{float(row['loss'].iloc[0]):>10.4f}")
        lines.append(f"{size:<8} {int(rows['params'].iloc[0]):>12,} " + " ".join(cells))
    return "\n".join(lines)
