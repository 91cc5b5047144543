"""The one in-process entry that trains an experiment: `run_experiment(config, runs_root)`.

The CLI, each sweep trial in a Ray worker, and the recipe pipeline all call it. It prepares the
data (cached), resolves the mixture schedule, derives the run id, then trains — or reuses a
`done` run, or resumes an interrupted one from its last checkpoint — and returns the summary.
A method with a loss of its own (DoReMi's Group-DRO proxy) passes an `objective.Objective` and
trains in this same loop. Over 500 lines on purpose: the one training loop, with the run's
identity and records beside it; what varies around it lives in its own modules (step_fns,
distill, objective, context_stages, progress, faults).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import nnx

from gemini_core import config as config_lib
from gemini_core.config import ExperimentConfig
from gemini_core.data.mixture import MixtureSchedule, Stage
from gemini_core.data.sampler import Sampler
from gemini_core.data.tokens import PreparedData, prepare_data
from gemini_core.errors import Preempted, UserError
from gemini_core.eval import downstream
from gemini_core.eval.domain_loss import EvalSet, evaluate, format_table
from gemini_core.model import attention, media
from gemini_core.runs.checkpoint import Checkpointer
from gemini_core.runs.rundir import RunDir, fingerprint, run_id
from gemini_core.runs.tracking import Tracker
from gemini_core.scale import distributed, faults, flops, sharding
from gemini_core.train import context_stages, distill, step_fns
from gemini_core.train.objective import Objective
from gemini_core.train.progress import Progress

Log = Callable[[str], None]


def cache_root(cfg: ExperimentConfig, runs_root: Path) -> Path:
    return Path(cfg.data.cache_dir).absolute() if cfg.data.cache_dir else runs_root / ".cache"


def enable_compilation_cache(root: Path) -> None:
    """JAX's persistent cache: a second process (a resumed run, a sweep trial) skips compiling.

    JAX_COMPILATION_CACHE_DIR, when set, wins over `root`: one cache shared by several runs
    roots (a CI job, a test session, a team's scratch disk)."""
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(root / "jax")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


# ---------------------------------------------------------------------------------------------
# the mixture schedule


def declared_schedule(cfg: ExperimentConfig) -> MixtureSchedule:
    """The schedule as declared: from data.schedule (a JSON file) or config.mixture.stages.

    Stage weights may still be the named rule "natural", resolved once token counts exist.
    """
    domains = cfg.data.domains
    if cfg.data.schedule:
        return MixtureSchedule.load(cfg.data.schedule).validate(domains, cfg.data.schedule)
    stages = []
    for stage in sorted(cfg.mixture.stages.values(), key=lambda s: s.start):
        weights = stage.weights
        if weights == "uniform":
            weights = {d: 1.0 / len(domains) for d in domains}
        stages.append(Stage(stage.start, weights, stage.seq_len or None))
    return MixtureSchedule(tuple(stages))


def tokenizer_sample_weights(cfg: ExperimentConfig, declared: MixtureSchedule):
    rule = cfg.data.tokenizer.sample_weights
    if rule != "mixture":
        return rule
    if any(isinstance(s.weights, str) for s in declared.stages):
        return "natural"  # token shares are unknown before the tokenizer exists: byte shares
    return declared.time_average(cfg.data.domains)


def resolve_schedule(declared: MixtureSchedule, data: PreparedData,
                     domains: tuple[str, ...]) -> MixtureSchedule:
    """Replaces "natural" stages by each domain's share of training tokens."""
    counts = {d: len(data.train[d]) for d in domains}
    total = sum(counts.values())
    natural = {d: counts[d] / total for d in domains}
    stages = tuple(Stage(s.start, natural if s.weights == "natural" else
                         {d: float(s.weights.get(d, 0.0)) for d in domains}, s.seq_len)
                   for s in declared.stages)
    return MixtureSchedule(stages).validate(domains)


# ---------------------------------------------------------------------------------------------
# identity


def identity(cfg: ExperimentConfig, schedule: MixtureSchedule, manifest_hash: str) -> dict:
    """What the fingerprint hashes: every field, with data by content and paths left out."""
    resolved = config_lib.to_json_dict(cfg)
    for path_field in ("root", "cache_dir", "schedule"):  # where things are, not what they are
        resolved["data"].pop(path_field)
    resolved["mixture"] = schedule.to_dict()
    resolved["data"]["manifest"] = manifest_hash
    # how the run is protected, not what it computes (rollbacks and SDC checks are bit-exact):
    # changing an interval between restarts must continue the same run
    resolved.pop("faults", None)
    # what is measured, not what is trained: asking a done run for more tasks evaluates them
    resolved.pop("eval", None)
    # where and how it runs, not what it computes: the same run on another mesh or slice (its
    # losses agree to float rounding, tests/test_sharding.py) resumes the same checkpoints
    for placement_field in ("mesh", "distributed"):
        resolved.pop(placement_field, None)
    # how the model computes, not what: every attention kernel and remat policy agree to float
    # rounding (tests/test_attention.py, test_layer_stack.py) from the same checkpoints
    for execution_field in ("attention", "remat"):
        resolved["model"].pop(execution_field)
    # fields added after runs existed, left out at the default that reproduces those runs: a run
    # that was cached keeps its id, one that sets them gets a new one (scan_layers among them:
    # a scanned stack computes the same, but its checkpoints hold stacked weights)
    _pop_at_default(resolved["model"], "rope", config_lib.to_json_dict(config_lib.RopeScaling()))
    _pop_at_default(resolved["model"], "scan_layers", False)
    for section in ("model", "data"):
        _pop_at_default(resolved[section], "document_mask", False)
    _pop_at_default(resolved["data"], "synthetic", {})
    _pop_at_default(resolved["data"], "modalities", {})
    _pop_at_default(resolved["model"], "encoders", {})
    _pop_at_default(resolved["model"], "media", [])
    return resolved


def _pop_at_default(section: dict, key: str, default: Any) -> None:
    if section.get(key) == default:
        section.pop(key)


@dataclasses.dataclass
class Prepared:
    cfg: ExperimentConfig
    data: PreparedData
    schedule: MixtureSchedule
    identity: dict
    fingerprint: str
    run: RunDir
    teacher: distill.Teacher | None = None  # a distilled student's teacher run
    layout: sharding.Layout | None = None  # the device mesh and rules; set by run_experiment
    objective: Objective | None = None  # a loss other than next-token (objective.py)
    tasks: list = dataclasses.field(default_factory=list)  # config.eval.downstream's TaskSpecs


def prepare(cfg: ExperimentConfig, runs_root: Path, log: Log = print,
            objective: Objective | None = None) -> Prepared:
    """Data, tokenizer and schedule, then the run's identity; no training."""
    config_lib.require_data_root(cfg.data)
    tasks = downstream.configured_specs(cfg.eval.downstream)  # its mistakes before any data
    # a kernel this machine cannot run (cuDNN off a GPU): said before any data is read
    attention.resolve(cfg.model.attention, jax.default_backend(), cfg.data.seq_len,
                      dtype=cfg.model.dtype)
    if cfg.distill.teacher and cfg.data.modalities:
        raise UserError(f"config.distill.teacher={cfg.distill.teacher!r}: distilling a student "
                        "with modality domains (config.data.modalities) is not supported")
    if objective is not None and cfg.distill.teacher:
        raise UserError(f"config.distill.teacher={cfg.distill.teacher!r}: a {objective.suffix} "
                        f"run trains its own objective and cannot also be distilled")
    declared = declared_schedule(cfg)
    data = prepare_data(cfg.data, tokenizer_sample_weights(cfg, declared),
                        cache_root(cfg, runs_root), log=log, encoders=cfg.model.encoders)
    if data.media is not None:  # the model's media tables follow from the prepared data
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                                 media=data.media.tables))
    schedule = resolve_schedule(declared, data, cfg.data.domains)
    if context_stages.is_staged(schedule, cfg.data.seq_len) and (objective or cfg.distill.teacher):
        what = (f"config.distill.teacher={cfg.distill.teacher!r}" if cfg.distill.teacher
                else f"a {objective.suffix} run")
        raise UserError(f"{what}: stages of their own seq_len are not supported here (its "
                        "per-step teacher or objective state assumes one batch shape); drop the "
                        "stages' seq_len")
    ident = identity(cfg, schedule, data.manifest_hash)
    teacher = None
    if cfg.distill.teacher:
        teacher = distill.resolve_teacher(cfg.distill, runs_root, data.tokenizer)
        ident["distill"]["teacher"] = teacher.fingerprint  # what the teacher is, not its name
    else:
        ident.pop("distill")  # its knobs mean nothing without a teacher
    name = cfg.name
    if objective is not None:
        ident.update(objective.identity())
        name = f"{cfg.name}_{objective.suffix}"
    fp = fingerprint(ident)
    return Prepared(cfg, data, schedule, ident, fp, RunDir(runs_root, name, run_id(name, fp)),
                    teacher, objective=objective, tasks=tasks)


# ---------------------------------------------------------------------------------------------
# the run


def run_experiment(cfg: ExperimentConfig, runs_root: Path, *, force: bool = False,
                   overrides: Mapping | None = None, log: Log = print,
                   objective: Objective | None = None) -> dict:
    """Trains `cfg` (or reuses a done run, or resumes an interrupted one); returns the summary.

    `objective` replaces the next-token step (objective.py); it adds to the run's identity."""
    runs_root = Path(runs_root).absolute()
    enable_compilation_cache(cache_root(cfg, runs_root))
    # the mesh first: a layout that does not fit the devices is a user error before any data
    layout = sharding.Layout.from_config(cfg.mesh)
    _check_batch(cfg, layout)
    # multi-host: process 0 alone writes the run's records (and W&B) and decides from them
    primary = distributed.is_primary()
    if not primary:
        log = _quiet
    p = prepare(cfg, runs_root, log, objective)
    p.layout = layout
    if not primary:
        p.run = _Follower(p.run.path.parents[1], p.run.experiment, p.run.run_id)
    run = p.run
    status = run.status() or {}
    if distributed.agree(status.get("state") == "done" and not force):
        log(f"{run.run_id} is already done: {run.path} (--force reruns it)")
        if not primary:
            return run.summary() or {}
        # evaluation is not part of a run's identity: tasks asked of a done run are added to it
        return downstream.add_missing_tasks(run, cfg.eval.downstream, p.tasks, cfg.seed, log)
    if distributed.agree(run.is_busy()):
        raise UserError(f"{run.run_id} is being run by pid {status.get('pid')} on "
                        f"{status.get('host')}: {run.path}")
    if force and run.path.exists() and primary:
        shutil.rmtree(run.path)
    run.write_config({**p.identity, "fingerprint": p.fingerprint, "run_id": run.run_id,
                      "overrides": dict(overrides or {}),
                      # with synthetic domains: the cache's root that holds them beside links
                      # to the real domains (`gx eval --data` takes it)
                      "paths": {"data_root": str(p.data.root.absolute()),
                                "schedule": cfg.data.schedule, "data_cache": str(p.data.dir),
                                "tokenizer": str(p.data.tokenizer.path),
                                **({"media_cache": str(p.data.media.dir)} if p.data.media
                                   else {})},
                      "placement": placement(cfg, layout)})
    run.set_status("running")
    distributed.barrier("gx-run-start")  # no process writes checkpoints into a folder being removed
    return record_outcome(run, lambda: _train(p, log))


def record_outcome(run: RunDir, train_fn: Callable[[], dict]) -> dict:
    """Runs `train_fn` and records how it ended in the run dir: done with its summary,
    preempted, or failed with the error."""
    try:
        summary = train_fn()
    except Preempted:  # SIGTERM: a checkpoint was written; the same command resumes
        run.set_status("preempted")
        raise
    except BaseException as e:
        run.set_status("failed", error=f"{type(e).__name__}: {e}"[:2000])
        raise
    run.write_summary(summary)
    run.set_status("done")
    return summary


def _check_batch(cfg: ExperimentConfig, layout: sharding.Layout) -> None:
    if cfg.train.batch_size % layout.batch_shards:
        raise UserError(f"config.train.batch_size={cfg.train.batch_size}: must be divisible by "
                        f"the {layout.batch_shards} batch shards of the mesh ("
                        f"{', '.join(f'{a}={n}' for a, n in layout.sizes.items())}; batch -> "
                        f"{','.join(layout.rules['batch'])})")
    context_stages.check_layout(cfg, declared_schedule(cfg), layout)
    if cfg.data.seq_len % layout.context_shards:
        raise UserError(f"config.data.seq_len={cfg.data.seq_len}: must be divisible by the "
                        f"{layout.context_shards} context shards of the mesh (config.mesh.context;"
                        f" length -> {','.join(layout.rules['length'])})")


def _quiet(_: str) -> None:
    """The log of processes other than 0: they would print the same lines again."""


class _Follower(RunDir):
    """The run directory as processes other than 0 see it: read, never written."""

    def set_status(self, state: str, **fields) -> None:
        pass

    def write_config(self, cfg: dict) -> None:
        pass

    def write_summary(self, summary: dict) -> None:
        pass


class _NoTracker:
    """Processes other than 0 log nothing: process 0 writes metrics.jsonl and W&B."""

    def log(self, step: int, metrics) -> None:
        pass

    def summary(self, values) -> None:
        pass

    def __enter__(self) -> "_NoTracker":
        return self

    def __exit__(self, *exc) -> None:
        pass


def placement(cfg: ExperimentConfig, layout: sharding.Layout) -> dict:
    """Where the run ran (config.json, hence W&B's config); not in the fingerprint."""
    return {"mesh": {**config_lib.to_json_dict(cfg.mesh), **layout.sizes},
            "devices": layout.mesh.size, "processes": jax.process_count(),
            "platform": layout.mesh.devices.flat[0].platform,
            "distributed": config_lib.to_json_dict(cfg.distributed)}


@dataclasses.dataclass
class _Meter:
    """Turns the one-step-late metrics into log rows, progress and throughput."""

    tracker: Tracker
    sampler: Sampler
    progress: Progress
    log_every: int
    tokens_per_step: int
    flops_per_step: float
    peak_flops: float
    t_window: float = dataclasses.field(default_factory=time.perf_counter)
    steps_window: int = 0
    # seconds from the meter's creation to the first step's metrics: compile (or a compilation
    # cache hit) plus one step; what a sweep's later trials save through the shared cache
    first_step_s: float | None = None
    # per-domain sums of row losses and row counts over the log window: train/<domain>/loss
    # is the window mean, far less noisy than one step's few rows of a small domain
    loss_sum_D: np.ndarray | None = None
    rows_D: np.ndarray | None = None
    # an objective's non-scalar metrics, named (Objective.log_metrics); logged with the step's row
    extra: Callable[[dict], dict[str, float]] | None = None

    def emit(self, step: int, metrics_dev, domain_B: np.ndarray, force: bool = False) -> None:
        """Step `step` has finished; its metrics were left on device until now."""
        self.steps_window += 1
        if self.first_step_s is None:
            self.first_step_s = time.perf_counter() - self.t_window
        fetched = jax.device_get(metrics_dev)
        n = len(self.sampler.domains)
        if self.loss_sum_D is None:
            self.loss_sum_D, self.rows_D = np.zeros(n), np.zeros(n)
        self.loss_sum_D += np.bincount(domain_B, weights=fetched.pop("row_loss"), minlength=n)
        self.rows_D += np.bincount(domain_B, minlength=n)
        extra = self.extra(fetched) if self.extra is not None else {}
        metrics = {f"train/{k}": float(v) for k, v in fetched.items()}
        self.progress.update(step + 1, metrics["train/loss"])
        if not force and (step + 1) % self.log_every:
            return
        for d, name in enumerate(self.sampler.domains):
            if self.rows_D[d]:
                metrics[f"train/{name}/loss"] = float(self.loss_sum_D[d] / self.rows_D[d])
        self.loss_sum_D, self.rows_D = None, None
        elapsed = max(time.perf_counter() - self.t_window, 1e-9)
        tok_s = self.steps_window * self.tokens_per_step / elapsed
        metrics["perf/tokens_per_sec"] = tok_s
        metrics["perf/mfu"] = self.steps_window * self.flops_per_step / elapsed / self.peak_flops
        for d, w in zip(self.sampler.domains, self.sampler.weights(step)):
            metrics[f"mixture/{d}"] = w
        self.tracker.log(step + 1, {**metrics, **extra})
        self.progress.set_rate(tok_s)
        self.t_window, self.steps_window = time.perf_counter(), 0


def _train(p: Prepared, log: Log) -> dict:
    cfg, run, tc = p.cfg, p.run, p.cfg.train
    total, seq_len = tc.steps, cfg.data.seq_len
    sampler = Sampler(p.schedule, cfg.data.domains, p.data.train, total_steps=total,
                      batch_size=tc.batch_size, seq_len=seq_len, seed=cfg.seed)
    for warning in sampler.repetition_warnings(cfg.data.max_epochs):
        log(f"warning: {warning}")
    evalset = EvalSet.build(p.data.valid, p.data.token_bytes, seq_len=seq_len,
                            batch_size=tc.batch_size, batches=tc.eval_batches)
    layout = p.layout or sharding.Layout.from_config(cfg.mesh)
    _check_batch(cfg, layout)
    graphdef, state = step_fns.init_state(cfg.model, cfg.optimizer, total, cfg.seed, layout)
    if p.data.media is not None:  # the tables are data: written in, never initialised
        state = media.with_tables(graphdef, state, p.data.media.features)
    if p.objective is not None:  # the loop's state (objective.LoopState): checkpointed whole
        state = {"state": state, "carry": p.objective.init_carry(layout)}
    ckpt = Checkpointer(run.checkpoints, keep=tc.keep_checkpoints)
    start, state = resume(run, ckpt, state, log)
    guard = faults.Guard(cfg.faults, run.path, run_id=run.run_id, fingerprint=p.fingerprint,
                         log=log)
    start, state = guard.restore_newer(start, state)  # a restarted Ray worker: its replica
    n_params = flops.param_counts(cfg.model)["total"]
    log(f"{run.run_id}: {n_params:,} params, {total} steps x {tc.batch_size * seq_len:,} tokens "
        f"-> {run.path}")
    tracker = (Tracker(run.path, run_id=run.run_id, group=cfg.name, config=run.config(),
                       tracking=cfg.tracking, resume_step=start or None, log=log)
               if distributed.is_primary() else _NoTracker())
    with guard, tracker:
        progress = Progress(total, start, log)
        meter = _Meter(tracker, sampler, progress, tc.log_every, tc.batch_size * seq_len,
                       flops.flops_per_token(cfg.model, seq_len) * tc.batch_size * seq_len,
                       flops.mesh_peak_flops(layout.mesh),
                       extra=p.objective.log_metrics if p.objective is not None else None)
        tasks = downstream.InTraining.from_config(
            cfg.eval.downstream, p.tasks, p.data.tokenizer, seq_len, layout, cfg.seed,
            p.data.media)
        try:
            final_eval, state = _loop(p, state, graphdef, start, sampler, evalset, ckpt, meter,
                                      guard, tasks)
        finally:
            progress.close()
            ckpt.close()
        extra = p.objective.summary(state["carry"], total) if p.objective is not None else {}
        tracker.summary({**final_eval, **extra})
    guard.finish()
    epochs = sampler.epochs()
    log(format_table(final_eval, epochs, cfg.data.domains))
    if progress.first_loss is not None:  # None when resumed from the final checkpoint
        log(f"train/loss {progress.first_loss:.4f} at step {start + 1} -> "
            f"{progress.last_loss:.4f} at step {total}")
    log(f"run dir: {run.path}")
    return {**final_eval, "run_id": run.run_id, "steps": total,
            "tokens": total * tc.batch_size * seq_len, "train/loss": progress.last_loss,
            "params": n_params, "epochs": epochs, "perf/first_step_s": meter.first_step_s,
            **guard.summary(), **extra}


def resume(run: RunDir, ckpt: Checkpointer, state, log: Log) -> tuple[int, object]:
    """(steps done, state): the latest checkpoint read into `state`'s shapes and shardings (the
    loop's whole state: an objective's carry too), or (0, state) for a fresh run."""
    start = ckpt.latest_step() or 0
    if start:
        state = ckpt.restore(start, state)
        log(f"resuming {run.run_id} from step {start} ({run.checkpoints})")
    return start, state


def _model_state(p: Prepared, state):
    """The train state (params, optimizer) inside the loop's state: what eval reads."""
    return state["state"] if p.objective is not None else state


def _train_step(p: Prepared, graphdef, state, sampler: Sampler, log: Log):
    """(state, tokens_Bx(T+1), domain_B, step) -> (state, metrics): the plain step, an
    objective's, or a distilled student's (the step indexes the teacher's cached top-K)."""
    if p.objective is not None:
        custom = p.objective.make_step(graphdef, state, p.layout)
        return lambda state, tokens_BxT1, domain_B, step: custom(state, tokens_BxT1, domain_B)
    if p.teacher is None:
        plain = step_fns.make_train_step(graphdef, p.layout)
        return lambda state, tokens_BxT1, domain_B, step: plain(state, tokens_BxT1)
    dc = p.cfg.distill
    if not dc.top_k:
        full = distill.make_train_step(
            graphdef, distill.load_teacher_state(p.teacher, p.layout), dc, layout=p.layout)
        return lambda state, tokens_BxT1, domain_B, step: full(state, tokens_BxT1, step)
    batches = {k: p.identity[k] for k in ("mixture", "seed")}
    batches.update(manifest=p.identity["data"]["manifest"], steps=sampler.total_steps,
                   batch_size=sampler.batch_size, seq_len=sampler.seq_len)
    cache = distill.topk_cache(p.teacher, dc, sampler, batches,
                               cache_root(p.cfg, p.run.path.parents[1]), log)
    topk = distill.make_train_step(graphdef, p.teacher, dc, cache, layout=p.layout)
    return lambda state, tokens_BxT1, domain_B, step: topk(state, tokens_BxT1, step)


def _loop(p: Prepared, state, graphdef, start: int, sampler: Sampler, evalset: EvalSet,
          ckpt: Checkpointer, meter: _Meter, guard: faults.Guard,
          tasks: downstream.InTraining | None) -> tuple[dict[str, float], object]:
    """Steps from `start` to the end; returns the final eval (downstream tasks' included) and
    the final state."""
    cfg, tc, total = p.cfg, p.cfg.train, p.cfg.train.steps
    programs = context_stages.StagePrograms(
        graphdef, lambda m: step_fns.graphdef_of(m, cfg.optimizer, total),
        context_stages.stage_models(cfg.model, sampler.schedule, cfg.data.seq_len), sampler.stage)

    def train_step(step: int):  # the step's stage's program (one unless stages differ)
        return programs.get(0, step, lambda g: _train_step(p, g, state, sampler,
                                                           meter.progress.note))

    def eval_step(step: int):
        return programs.get(1, step, lambda g: step_fns.make_eval_step(g, p.layout))

    # a stage of its own length says so when it begins (and on resume)
    staged, shape = context_stages.is_staged(sampler.schedule, cfg.data.seq_len), None

    guard.begin(start, state)

    def settle(item, force: bool = False) -> None:  # check (raises faults.Rollback), then log
        fetched = guard.settle(item[0], item[1])
        if fetched is not None:
            meter.emit(item[0], fetched, item[2], force=force)

    pending = None  # (step, metrics on device, domain_B): fetched one step late, no host stall
    step = reached = start  # reached: steps done so far; below it a rollback's replay runs
    while step < total:
        if staged and sampler.shape(step) != shape:
            shape = sampler.shape(step)
            meter.progress.note(f"step {step + 1}: stage {sampler.stage(step) + 1}, "
                                f"{programs.describe(step, shape)}")
        tokens_BxT1, domain_B = sampler.batch(step)
        state, metrics = guard.step(
            lambda s: train_step(step)(s, tokens_BxT1, domain_B, step), state, step)
        done = step + 1
        fresh = done > reached  # a replayed step's checkpoint and eval exist already
        save = tc.checkpoint_every and done % tc.checkpoint_every == 0 and done < total and fresh
        ev = tc.eval_every and done % tc.eval_every == 0 and done < total and fresh
        ev_tasks = tasks is not None and tasks.due(done, total) and fresh
        stop = done == total or guard.stop_requested()  # read once: SIGTERM may come any time
        try:
            if pending is not None:
                settle(pending)
            pending = (step, metrics, domain_B)
            if save or ev or ev_tasks or stop:  # settled now: nothing non-finite reaches disk or eval
                settle(pending, force=stop)
                pending = None
        except faults.Rollback as back:
            state, step, pending = back.state, back.step, None
            continue
        reached = max(reached, done)
        guard.after_step(done, state)
        if save:
            ckpt.save(done, state)
        if ev:
            metrics_eval = evaluate(eval_step(step), _model_state(p, state), evalset,
                                    tc.batch_size)
            meter.tracker.log(done, metrics_eval)
            meter.progress.note(f"step {done}: eval/mean/loss {metrics_eval['eval/mean/loss']:.4f}"
                                f"  eval/mean/bpb {metrics_eval['eval/mean/bpb']:.4f}")
        if ev_tasks:
            _evaluate_tasks(p, tasks, programs.graphdef(step), state, done, meter, final=False)
        if stop and done < total:  # SIGTERM: this step settled and logged, a checkpoint, exit
            if ckpt.latest_step() != done:
                ckpt.save(done, state)
            ckpt.wait()
            raise Preempted(done, str(p.run.checkpoints / str(done)))
        step += 1
    if ckpt.latest_step() != total:
        ckpt.save(total, state)
    final_eval = evaluate(eval_step(total - 1), _model_state(p, state), evalset, tc.batch_size)
    meter.tracker.log(total, final_eval)
    if tasks is not None:
        final_eval.update(_evaluate_tasks(p, tasks, graphdef, state, total, meter, final=True))
    return final_eval, state


def _evaluate_tasks(p: Prepared, tasks: downstream.InTraining, graphdef, state, done: int,
                    meter: _Meter, *, final: bool) -> dict[str, float]:
    """downstream/<task>/<metric> at step `done`, logged; at the end also downstream.json."""
    note = meter.progress.note
    note(f"step {done}: downstream evaluation of {len(tasks.specs)} task(s)"
         + (" (final)" if final else ""))
    model = nnx.merge(graphdef, _model_state(p, state)).model
    results = tasks.evaluate(model, final=final, log=note)
    values = downstream.flat_metrics(results)
    meter.tracker.log(done, values)
    note(f"step {done}: downstream/mean/bpb {values['downstream/mean/bpb']:.4f}")
    if final and distributed.is_primary():
        tasks.record(p.run, done, results)
    return values
