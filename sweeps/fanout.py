"""The Ray Tune fan-out of a sweep's runs: one Tune trial per run, on CPUs of its own.

Every run is a real `gemini_core.train.trainer.run_experiment` (its own run dir and
fingerprint), so a run whose fingerprint already has a done run costs nothing and an
interrupted one resumes from its checkpoints; `Tuner.restore` brings back a stage after the
driver is killed. A run reports once at its end (and its progress lines on the way); the driver
prints a live table of finished runs, retries and failures. The scaling ladder fans out through
the same pieces (`tune_trainable`, `live_table`, `fit_results`, `progress_log`).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from gemini_core import config as gc_config
from gemini_core.data.mixture import MixtureSchedule
from gemini_core.runs.rundir import write_json_atomic
from gemini_core.scale import ray_local
from sweeps.cpus import trial_cpus
from sweeps.sweep_dir import DOWNSTREAM, LOSS

if TYPE_CHECKING:  # and not at run time: a Ray worker imports this module to run a trial, and
    # the setup's imports (the sweep config's, JAX among them) would slow every worker's start
    from sweeps.sweep_setup import SweepSetup

Log = Callable[[str], None]
PROGRESS = "progress"  # the key of a running trial's intermediate Tune report


# ---------------------------------------------------------------------------------------------
# one run (in a Ray worker process)


def schedule_tags(schedule: MixtureSchedule) -> list[str]:
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
    exp["tracking"]["tags"] = [job["name"], job["scale"],
                               *schedule_tags(MixtureSchedule.load(path))]
    exp["tracking"]["job_type"] = job.get("job_type") or (
        "proxy" if job["name"].startswith("trial-") else "validate")
    exp["model"] = gc_config.declared_model(exp["model"])
    # the trials score their tasks' search half, the validation the held-out half the search
    # never saw (gemini_core.eval.task_examples: split)
    split = exp["eval"]["downstream"]["split"] = job_split(job)
    if split == "heldout":  # the validation reports accuracies too, or not
        exp["eval"]["downstream"]["generate"] = meta["sweep"]["validate"].get("generate", True)
    return gc_config.from_config_dict(exp)


def job_split(job: dict) -> str:
    """Which half of each task's examples a job scores: a validation run (a candidate's, or a
    trial's at target scale for decision accuracy) the held-out one, a trial the search one."""
    return "heldout" if job["name"].startswith(("proxy/", "target/")) else "search"


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
    cfg = job_config(sweep_dir, job)
    # a worker that cannot see the corpus (a node without the data mount) fails here, at once,
    # not after loading JAX and the trainer
    gc_config.check_paths(cfg.data)
    from ray import tune

    from gemini_core.train import step_fns, trainer
    step_fns.tune_host_malloc()
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
                 f"{LOSS}mean": float(summary["eval/mean/loss"]),
                 **downstream_values(summary, job_split(job))})


def downstream_values(summary: dict, split: str) -> dict[str, float]:
    """The run's downstream task metrics on one split of the examples (summary keys
    `downstream/<task>@<split>/<metric>`) as `downstream/<task>/<metric>`, stderr left out: a
    column of the trials table each; `downstream/mean/bpb` is their tasks' mean."""
    suffix = f"@{split}/"
    out = {}
    for k, v in summary.items():
        task, _, metric = k[len(DOWNSTREAM):].partition(suffix)
        if k.startswith(DOWNSTREAM) and metric and not metric.endswith("_stderr") \
                and isinstance(v, (int, float)):
            out[f"{DOWNSTREAM}{task}/{metric}"] = float(v)
    bpbs = [v for k, v in out.items() if k.endswith("/bpb")]
    if bpbs:
        out[f"{DOWNSTREAM}mean/bpb"] = sum(bpbs) / len(bpbs)
    return out


# ---------------------------------------------------------------------------------------------
# the driver


def live_table(stage: str, total: int, log: Log, progress_every_s: float = 0.0,
               max_failures: int = 0):
    """A Tune callback printing a line per finished run on the driver: the live table; a line
    per retry and per run that failed every try; and the running trials' progress lines while
    none has finished for `progress_every_s`."""
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

        def on_trial_recover(self, iteration, trials, trial, **info):
            log(f"{stage} {trial.config['job']['name']}: error, retry {trial.num_failures} of "
                f"{max_failures}: {failure_reason(trial.error_file and _read(trial.error_file))}")

        def on_trial_error(self, iteration, trials, trial, **info):
            log(f"{stage} {trial.config['job']['name']}: failed {trial.num_failures} time(s), "
                f"not retried again (resources.max_failures={max_failures})")

    return LiveTable()


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def failure_reason(error: Any) -> str:
    """One line for a failed run: the innermost exception's type and message, not Ray's
    wrapping of it nor its traceback (the run dir's status.json keeps the details)."""
    if error is None or error == "":
        return ""
    while getattr(error, "cause", None) is not None:  # RayTaskError -> the trainable's own
        error = error.cause
    if isinstance(error, BaseException):
        text = f"{type(error).__name__}: {error}"
    else:  # an error file's text: its last line names the exception, with its module
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        name, sep, message = (lines[-1] if lines else "").partition(": ")
        if sep and all(part.isidentifier() for part in name.split(".")):
            name = name.rsplit(".", 1)[-1]
        text = f"{name}{sep}{message}"
    return " ".join(text.split())


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


def run_jobs(setup: SweepSetup, jobs: list[dict], stage: str, log: Log) -> dict[str, dict]:
    """Runs `jobs` on Ray Tune (resuming the stage's Tuner if it was interrupted); returns
    job name -> {run_id, failed, loss/<domain>..., loss/mean}."""
    from ray import tune

    res = setup.sweep.resources
    trainable, concurrent = tune_trainable(run_job, res, log, sweep_dir=str(setup.dir))
    path = setup.dir / "tune" / stage
    # what the stage runs: its jobs and the configs they build on (sweep.json's)
    meta = json.loads((setup.dir / "sweep.json").read_text())
    spec = {"jobs": jobs, "proxy": meta["proxy"], "target": meta["target"]}
    listed = setup.dir / "tune" / f"{stage}.jobs.json"
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
        tuner = new_tuner(trainable, jobs, path, stage, concurrent, res, log)
    log(f"{stage}: {len(jobs)} runs, {concurrent} at a time, {res.cpus_per_trial} CPU each")
    return {name: {"run_id": metrics.get("run_id", ""), "failed": failed,
                   **{k: v for k, v in metrics.items() if k.startswith((LOSS, DOWNSTREAM))}}
            for name, (metrics, failed) in fit_results(tuner).items()}


def new_tuner(trainable: Any, jobs: list[dict], path: Path, stage: str, concurrent: int,
              res: Any, log: Log):
    """A grid of `jobs` kept under `path`, with the live table (lines headed `stage`) and
    `res.max_failures` retries per run."""
    from ray import tune

    return tune.Tuner(
        trainable, param_space={"job": tune.grid_search(jobs)},
        # reused worker processes: a trial after the first skips process start and imports
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, reuse_actors=True),
        run_config=tune.RunConfig(
            name=path.name, storage_path=str(path.parent), verbose=0,
            callbacks=[live_table(stage, len(jobs), log, res.progress_every_s,
                                  res.max_failures)],
            failure_config=tune.FailureConfig(max_failures=res.max_failures)))


def fit_results(tuner) -> dict[str, tuple[dict, str]]:
    """Runs the Tuner; job name -> (reported metrics, failure reason or "")."""
    out = {}
    for result in tuner.fit():
        metrics = result.metrics or {}
        failed = metrics.get("failed") or failure_reason(result.error)
        out[result.config["job"]["name"]] = (metrics, failed)
    return out
