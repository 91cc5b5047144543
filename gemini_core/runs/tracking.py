"""The Tracker: a run's metrics to `metrics.jsonl` (gemini_core.runs.metrics) and, when
`tracking.wandb`, to a W&B run beside it (gemini_core.runs.wandb_run), one row per step in both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from gemini_core.config import TrackingConfig
from gemini_core.runs.metrics import (
    METRICS_FILE,
    STEP_KEY,
    as_floats,
    dump_row,
    metrics_path,
    read_metrics,
    truncate_metrics,
)
from gemini_core.runs.wandb_run import (
    WANDB_SUBDIR,
    EnvPatch,
    recoverable,
    sdk_env,
    start_wandb,
    teardown_if_idle,
    wandb_mode,
)


class Tracker:
    """Logs a run's metrics to `metrics.jsonl` and, when `tracking.wandb`, to W&B.

    Several `log` calls for the same step (train metrics, then eval) are merged into one row,
    written when a later step arrives or at `summary`/`finish`, so the file holds one object per
    step; W&B commits its rows the same way. Steps must not go backwards.
    """

    def __init__(self, run_dir: Path, *, run_id: str, group: str, config: dict,
                 tracking: TrackingConfig, resume_step: int | None = None,
                 log: Callable[[str], None] = print):
        self.run_dir = Path(run_dir)
        self.run_id = run_id
        self._say = log
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # None = training starts at step 0: rows of an earlier attempt are stale as well
        keep = resume_step or 0
        dropped = truncate_metrics(self.run_dir, keep)
        if dropped:
            log(f"{METRICS_FILE}: dropped {dropped} row(s) after step {keep} (resuming there)")
        # the last step in the file: logging it again would write a duplicate row
        self._written_step = max((r[STEP_KEY] for r in read_metrics(self.run_dir)), default=-1)
        self._pending: dict[str, float] | None = None  # the row of the newest step, not yet written
        self._pending_step = -1
        self._wandb_row_open = False
        self._file = open(metrics_path(self.run_dir), "a")
        self._run: Any = None
        self._env: EnvPatch | None = None
        self._wandb_offline = False
        self._finished = False
        if tracking.wandb:
            self._open_wandb(config, group, tracking)
            if resume_step:
                self._restate_in_wandb(resume_step)

    # -- W&B lifecycle

    def _open_wandb(self, config: dict, group: str, tracking: TrackingConfig) -> None:
        mode = wandb_mode()
        if mode == "disabled":
            self._say("W&B: disabled by WANDB_MODE=disabled; metrics go to "
                      f"{metrics_path(self.run_dir)} only")
            return
        self._wandb_offline = mode == "offline"
        self._env = EnvPatch()
        try:
            # the folders first: without them wandb-core would fall back to ~/.cache
            self._env.set(sdk_env(self.run_dir, mode))
            self._run = start_wandb(self.run_dir, run_id=self.run_id, group=group, config=config,
                                     tracking=tracking, mode=mode)
        except Exception as e:
            self._env.restore()
            self._env = None
            if not (self._wandb_offline and recoverable(e)):
                raise
            # offline W&B is a second copy of metrics.jsonl: losing it must not stop training
            self._say(f"warning: W&B offline run could not start ({type(e).__name__}: {e}); "
                      f"metrics go to {metrics_path(self.run_dir)} only")
            return
        wandb_dir = self.run_dir / WANDB_SUBDIR
        if self._wandb_offline:
            self._say(f"W&B offline run {self.run_id}: {wandb_dir} "
                      f"(upload: wandb sync {wandb_dir}/offline-run-*)")
        else:
            self._say(f"W&B run {self.run_id}: {self._run.url}")

    def _restate_in_wandb(self, through: int) -> None:
        """A resumed run logs the rows of `metrics.jsonl` through its resume step again, in this
        W&B session. A session killed with -9 keeps only what wandb-core had flushed (every
        ~15 s), and a later session's rows replace the earlier sessions' from its first step on
        (`read_offline_run`; `wandb sync` drops the steps the run already has), so this session
        restates them all and the W&B history is whole. Online, W&B already holds the steps
        below `run.step`: only the later ones are sent."""
        if self._run is None:
            return
        first = 0 if self._wandb_offline else int(getattr(self._run, "step", 0) or 0)
        rows = [r for r in read_metrics(self.run_dir) if first <= r[STEP_KEY] <= through]
        for row in rows:
            self._wandb_call("log", lambda row=row: self._run.log(row, step=row[STEP_KEY]))
        self._wandb_row_open = bool(rows) and self._run is not None
        if rows:
            self._say(f"W&B: {len(rows)} row(s) of {METRICS_FILE} (steps {rows[0][STEP_KEY]}-"
                      f"{rows[-1][STEP_KEY]}) restated in this session")

    def _wandb_call(self, what: str, fn: Callable[[], None]) -> None:
        if self._run is None:
            return
        try:
            fn()
        except Exception as e:
            if not (self._wandb_offline and recoverable(e)):
                raise
            self._say(f"warning: W&B offline {what} failed ({type(e).__name__}: {e}); "
                      f"W&B logging stops, {METRICS_FILE} continues")
            self._run = None

    # -- logging

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if self._finished:
            raise RuntimeError(f"Tracker for {self.run_id} is finished")
        step = int(step)
        if step != self._pending_step and step <= max(self._written_step, self._pending_step):
            raise ValueError(f"step {step} logged after step "
                             f"{max(self._written_step, self._pending_step)}: steps must increase "
                             f"(a step's metrics may come in several calls, one after another)")
        values = as_floats(step, metrics)
        if step != self._pending_step:
            self._write_pending()
            self._pending, self._pending_step = {}, step
        self._pending.update(values)
        row = {**values, STEP_KEY: step}
        self._wandb_call("log", lambda: self._run.log(row, step=step))
        self._wandb_row_open = self._run is not None

    def _write_pending(self) -> None:
        if self._pending is None:
            return
        row = {STEP_KEY: self._pending_step, **self._pending}
        # one write of the whole line, then flush: a kill leaves whole lines (at worst a torn
        # last one, which readers and resume drop)
        self._file.write(dump_row(row))
        self._file.flush()
        self._written_step = self._pending_step
        self._pending, self._pending_step = None, -1

    def summary(self, metrics: Mapping[str, float]) -> None:
        """Final metrics (the last eval) as the W&B run summary."""
        values = as_floats(max(self._written_step, self._pending_step), metrics)
        self._write_pending()
        if self._wandb_row_open:
            # W&B holds the newest row open until a later step; committed after the summary, its
            # values would overwrite the summary's (last value wins), so commit it first
            step = self._written_step
            self._wandb_call("log", lambda: self._run.log({}, step=step, commit=True))
            self._wandb_row_open = False
        self._wandb_call("summary", lambda: self._run.summary.update(values))

    def finish(self, exit_code: int = 0) -> None:
        if self._finished:
            return
        self._finished = True
        try:
            self._write_pending()
        finally:
            self._file.close()
            try:
                if self._run is not None:
                    self._wandb_call("finish", lambda: self._run.finish(exit_code=exit_code))
                    self._run = None
                    teardown_if_idle()
            finally:
                if self._env is not None:
                    self._env.restore()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)
