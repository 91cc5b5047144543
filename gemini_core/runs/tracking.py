"""Metrics of one run: `metrics.jsonl` in the run directory, and a real W&B run beside it.

`metrics.jsonl` is the primary record (the trainer, `gx show` and sweeps read it); W&B is the
view for comparing runs. W&B is offline by default: no account, no network, every file under
`<run dir>/wandb/`, nothing in the home directory. It goes online only when the user sets
`WANDB_MODE=online` (their key stays in their environment; we never write it anywhere).

One W&B run per run id: a resumed run opens a new offline session with the same id, and
`wandb sync <run dir>/wandb/offline-run-*` uploads the sessions in order into one W&B run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from gemini_core.config import TrackingConfig
from gemini_core.errors import UserError

METRICS_FILE = "metrics.jsonl"
WANDB_SUBDIR = "wandb"
STEP_KEY = "step"  # also logged to W&B as the x-axis of every chart

# Where wandb would otherwise write under ~ (the wandb-core log, artifact cache and staging,
# the settings it may create). Kept per run, under <run dir>/wandb/.sdk/, so a run directory
# is self-contained and deleting it leaves nothing behind. A value the user set wins.
_SDK_DIRS = {
    "WANDB_CACHE_DIR": "cache",
    "WANDB_DATA_DIR": "data",
    "WANDB_ARTIFACT_DIR": "artifacts",
    "WANDB_CONFIG_DIR": "config",
}


# ---------------------------------------------------------------------------------------------
# metrics.jsonl


def metrics_path(run_dir: Path) -> Path:
    return Path(run_dir) / METRICS_FILE


def _parse_lines(data: bytes) -> tuple[list[dict], int]:
    """Rows of whole, valid lines, and how many lines were dropped (a torn tail, junk)."""
    lines = data.split(b"\n")
    whole, tail = lines[:-1], lines[-1]  # no trailing newline = a write cut short by a kill
    rows, dropped = [], int(bool(tail.strip()))
    for line in whole:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(row, dict) and isinstance(row.get(STEP_KEY), int):
            rows.append(row)
        else:
            dropped += 1
    return rows, dropped


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of `metrics.jsonl` ({"step": s, ...}), ignoring a torn last line."""
    try:
        data = metrics_path(run_dir).read_bytes()
    except FileNotFoundError:
        return []
    return _parse_lines(data)[0]


def _write_rows_atomic(path: Path, rows: list[dict]) -> None:
    # write-then-rename: a kill during the rewrite leaves the old file, never a half one
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.writelines(_dump(row) for row in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def truncate_metrics(run_dir: Path, keep_through: int) -> int:
    """Keeps rows with step <= keep_through (and drops a torn last line); returns rows dropped.

    A run resumed from the checkpoint at `keep_through` logs the later steps again, so rows past
    it would become duplicates, and rows a killed process logged after its last checkpoint
    describe training that the resumed run does not continue from.
    """
    path = metrics_path(run_dir)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    rows, dropped = _parse_lines(data)
    kept = [row for row in rows if row[STEP_KEY] <= keep_through]
    dropped += len(rows) - len(kept)
    if dropped:
        _write_rows_atomic(path, kept)
    return dropped


def _dump(row: Mapping[str, Any]) -> str:
    return json.dumps(row, separators=(",", ":")) + "\n"


def _as_floats(step: int, metrics: Mapping[str, float]) -> dict[str, float]:
    """Checks names; numpy / JAX scalars become plain floats; errors name the metric."""
    out = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name or name == STEP_KEY or name.startswith("_"):
            raise ValueError(f"metric name {name!r} at step {step}: must be a non-empty string, "
                             f"not {STEP_KEY!r}, not starting with '_' (reserved by W&B)")
        try:
            out[name] = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"metric {name} at step {step}: expected a number, got "
                            f"{type(value).__name__} {value!r}") from None
    return out


# ---------------------------------------------------------------------------------------------
# W&B


def wandb_mode() -> str:
    """online only on the user's explicit WANDB_MODE=online; disabled respected; else offline."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    return mode if mode in ("online", "disabled") else "offline"


def sdk_env(run_dir: Path, mode: str) -> dict[str, str]:
    """Env values that keep wandb's own files out of ~ (never overriding what the user set)."""
    base = Path(run_dir).absolute() / WANDB_SUBDIR / ".sdk"
    env = {}
    for var, sub in _SDK_DIRS.items():
        # online, wandb must see the user's own settings (their server, entity): read, not written
        if var == "WANDB_CONFIG_DIR" and mode == "online":
            continue
        if var not in os.environ:
            env[var] = str(base / sub)
    return env


class _EnvPatch:
    """Sets env vars for the life of a Tracker: wandb-core reads them when it starts, and the
    Python side reads them when it stages files. Restored on finish."""

    def __init__(self) -> None:
        self._saved: dict[str, str | None] = {}

    def set(self, values: Mapping[str, str]) -> None:
        for v in values.values():
            Path(v).mkdir(parents=True, exist_ok=True)
        for k, v in values.items():
            self._saved.setdefault(k, os.environ.get(k))
            os.environ[k] = v

    def restore(self) -> None:
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._saved = {}


def _wandb_settings(wandb: Any) -> Any:
    # Measured on this machine (2 cores, wandb 0.31): init ~0.5 s with a cold wandb-core
    # (0.2 s warm). Stats sampling, the metadata probe (host, GPU, git, pip freeze) and code
    # saving only slow startup and spawn helpers; the run dir already records config and host.
    return wandb.Settings(
        console="off",  # do not capture our stdout/stderr into the run
        silent=True, quiet=True,  # our own one line says where the files are
        x_disable_stats=True, x_disable_meta=True, x_disable_machine_info=True,
        x_save_requirements=False, save_code=False, disable_code=True, disable_git=True,
        disable_job_creation=True,
    )


def _define_metrics(run: Any) -> None:
    # Every chart's x-axis is our training step, whatever the cadence of the metric (eval/* and
    # mixture/* are logged less often than train/*); "*" covers names callers add later.
    run.define_metric(STEP_KEY, hidden=True)
    run.define_metric("*", step_metric=STEP_KEY)


def start_wandb(run_dir: Path, *, run_id: str, group: str, config: dict,
                 tracking: TrackingConfig, mode: str) -> Any:
    import wandb  # imported here: ~0.5 s, and only runs that track pay it

    try:
        run = wandb.init(
            dir=str(Path(run_dir).absolute()), mode=mode, project=tracking.project, group=group,
            id=run_id, name=run_id, job_type=tracking.job_type, tags=list(tracking.tags),
            config=config,
            resume="allow",  # same id: a resumed run continues the same W&B run
            # an unfinished run of an earlier attempt in this process (a crash in a sweep
            # worker) must be closed, not handed back to us as "the" run
            reinit="finish_previous",
            allow_val_change=True, settings=_wandb_settings(wandb))
    except (wandb.errors.AuthenticationError, wandb.errors.UsageError) as e:
        if mode == "online":
            raise UserError(f"WANDB_MODE=online, but W&B could not start run {run_id}: {e} "
                            "(set WANDB_API_KEY, or unset WANDB_MODE to track offline)") from e
        raise
    _define_metrics(run)
    return run


def recoverable(e: BaseException) -> bool:
    """Failures of W&B's machinery (its service, disk, comms), not misuse: the kind that offline
    mode survives. A UsageError, TypeError, ValueError is a bug of ours and must surface."""
    import wandb

    if isinstance(e, wandb.errors.UsageError):
        return False
    return isinstance(e, (wandb.errors.Error, OSError, TimeoutError, ConnectionError))


def teardown_if_idle() -> None:
    # Stops wandb-core so the next run in this process starts it with that run's directories;
    # left running, its log of later runs would land in this run's directory. Skipped while any
    # other W&B run is active in the process.
    import wandb

    if wandb.run is None:
        wandb.teardown()


# ---------------------------------------------------------------------------------------------
# the tracker


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
        self._env: _EnvPatch | None = None
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
        self._env = _EnvPatch()
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
        values = _as_floats(step, metrics)
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
        self._file.write(_dump(row))
        self._file.flush()
        self._written_step = self._pending_step
        self._pending, self._pending_step = None, -1

    def summary(self, metrics: Mapping[str, float]) -> None:
        """Final metrics (the last eval) as the W&B run summary."""
        values = _as_floats(max(self._written_step, self._pending_step), metrics)
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


# ---------------------------------------------------------------------------------------------
# reading an offline run back


def _session_logs(run_dir: Path) -> list[Path]:
    wandb_dir = Path(run_dir) / WANDB_SUBDIR
    return sorted(wandb_dir.glob("*run-*/run-*.wandb"))


def _inspect_records(log_file: Path) -> list[dict]:
    # Why `wandb leet inspect --json`: wandb 0.31 ships no Python reader for its .wandb
    # transaction log any more (the old datastore module is gone); `leet inspect` is wandb's
    # own public command for it, reads the format whatever its version, and prints one JSON
    # record per line with values already decoded. It runs in a child process with an env that
    # keeps it offline, quiet, keyless and out of ~.
    with tempfile.TemporaryDirectory(prefix="gx-wandb-read-") as scratch:
        env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
        env.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_ERROR_REPORTING="false",
                   **{var: str(Path(scratch) / sub) for var, sub in _SDK_DIRS.items()})
        proc = subprocess.run(
            [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log_file)],
            env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    if proc.returncode:
        raise RuntimeError(f"wandb leet inspect {log_file} failed ({proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _decode(value: Any) -> Any:
    # leet prints non-finite floats as strings
    if isinstance(value, str) and value in ("NaN", "Infinity", "-Infinity", "+Infinity", "Inf",
                                            "-Inf", "+Inf", "nan", "inf", "-inf"):
        return float(value.lower().replace("infinity", "inf"))
    return value


def _public(item: Mapping[str, Any]) -> dict[str, Any]:
    """Our keys only: W&B's own start with '_' (_step, _runtime, _timestamp, _wandb)."""
    return {k: v for k, v in item.items() if not k.startswith("_")}


def _public_metrics(item: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _decode(v) for k, v in _public(item).items()}


class _Session:
    """One wandb.init..finish: the records of one .wandb file."""

    def __init__(self, records: list[dict]):
        self.meta: dict[str, Any] = {}
        self.config: dict[str, Any] = {}
        self.summary: dict[str, Any] = {}
        self.history: list[dict] = []
        self.exit_code: int | None = None
        handlers = {"run": self._on_run, "config": self._on_config, "summary": self._on_summary,
                    "history": self._on_history, "exit": self._on_exit}
        for record in records:  # others (telemetry, metric, header, ...) say nothing we return
            handler = handlers.get(record.get("type"))
            if handler:
                handler(record)

    def _on_run(self, record: dict) -> None:
        run = record["run"]
        self.meta = run
        self._on_config({"config": run.get("config", {})})

    def _on_config(self, record: dict) -> None:
        cfg = record["config"]
        self.config.update(_public(cfg.get("update", {})))
        for key in cfg.get("remove", []):
            self.config.pop(key, None)

    def _on_summary(self, record: dict) -> None:
        s = record["summary"]
        self.summary.update(_public_metrics(s.get("update", {})))
        for key in s.get("remove", []):
            self.summary.pop(key, None)

    def _on_history(self, record: dict) -> None:
        h = record["history"]
        item = h.get("item", {})
        step = h.get("step", {}).get("num", item.get("_step", 0))
        self.history.append({**_public_metrics(item), STEP_KEY: int(step)})

    def _on_exit(self, record: dict) -> None:
        self.exit_code = record["exit"].get("exit_code", 0)


def read_offline_run(run_dir: Path) -> dict:
    """A run's W&B data as stored on disk, every session (resume) of it merged in order.

    Returns {"id", "group", "project", "job_type", "tags", "name", "config", "summary",
    "history": [{"step": s, ...} in step order], "exit_code" (None if the last session never
    finished), "sessions"}. Like `metrics.jsonl` on resume, a later session's rows replace the
    earlier sessions' rows from its first step on.
    """
    logs = _session_logs(run_dir)
    if not logs:
        raise FileNotFoundError(f"no W&B run under {Path(run_dir) / WANDB_SUBDIR}")
    sessions = [_Session(_inspect_records(p)) for p in logs]
    sessions.sort(key=lambda s: s.meta.get("start_time", ""))
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    rows: dict[int, dict] = {}
    for s in sessions:
        if s.history:
            first = min(r[STEP_KEY] for r in s.history)
            rows = {k: v for k, v in rows.items() if k < first}
        for r in s.history:
            rows[r[STEP_KEY]] = {**rows.get(r[STEP_KEY], {}), **r}
        config.update(s.config)
        summary.update(s.summary)
    last = sessions[-1].meta
    return {
        "id": last.get("run_id"), "group": last.get("run_group"), "name": last.get("display_name"),
        "project": last.get("project"), "job_type": last.get("job_type"),
        "tags": list(last.get("tags", [])), "config": config, "summary": summary,
        "history": [{STEP_KEY: k, **{n: v for n, v in rows[k].items() if n != STEP_KEY}}
                    for k in sorted(rows)],
        "exit_code": sessions[-1].exit_code, "sessions": len(sessions),
    }
