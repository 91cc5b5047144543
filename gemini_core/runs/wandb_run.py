"""W&B for one run: started offline by default, with every file of wandb's own under the run
directory, and torn down when idle.

W&B is the view for comparing runs; `metrics.jsonl` stays the primary record. Offline by
default: no account, no network, every file under `<run dir>/wandb/`, nothing in the home
directory. It goes online only when the user sets `WANDB_MODE=online` (their key stays in their
environment; we never write it anywhere). One W&B run per run id: a resumed run opens a new
offline session with the same id, and `wandb sync <run dir>/wandb/offline-run-*` uploads the
sessions in order into one W&B run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from gemini_core.config import TrackingConfig
from gemini_core.errors import UserError
from gemini_core.runs.metrics import STEP_KEY

WANDB_SUBDIR = "wandb"

# Where wandb would otherwise write under ~ (the wandb-core log, artifact cache and staging,
# the settings it may create). Kept per run, under <run dir>/wandb/.sdk/, so a run directory
# is self-contained and deleting it leaves nothing behind. A value the user set wins.
SDK_DIRS = {
    "WANDB_CACHE_DIR": "cache",
    "WANDB_DATA_DIR": "data",
    "WANDB_ARTIFACT_DIR": "artifacts",
    "WANDB_CONFIG_DIR": "config",
}


def wandb_mode() -> str:
    """online only on the user's explicit WANDB_MODE=online; disabled respected; else offline."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    return mode if mode in ("online", "disabled") else "offline"


def sdk_env(run_dir: Path, mode: str) -> dict[str, str]:
    """Env values that keep wandb's own files out of ~ (never overriding what the user set)."""
    base = Path(run_dir).absolute() / WANDB_SUBDIR / ".sdk"
    env = {}
    for var, sub in SDK_DIRS.items():
        # online, wandb must see the user's own settings (their server, entity): read, not written
        if var == "WANDB_CONFIG_DIR" and mode == "online":
            continue
        if var not in os.environ:
            env[var] = str(base / sub)
    return env


class EnvPatch:
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


def add_to_summary(run_dir: Path, *, run_id: str, group: str, config: dict,
                   tracking: TrackingConfig, values: Mapping[str, float],
                   images: Mapping[str, Path]) -> str | None:
    """Puts an evaluation made after training (`gx eval`) into the run's W&B summary: values,
    and images (name -> PNG) that W&B shows on the run's page. A new session of the same W&B run
    (resumed by id, offline unless WANDB_MODE=online); the summary, not the history, so the
    training curves are left as they are. Returns a line saying where, None when the run does
    not track W&B (tracking.wandb false, or WANDB_MODE=disabled)."""
    mode = wandb_mode()
    if not tracking.wandb or mode == "disabled":
        return None
    import wandb

    env = EnvPatch()
    try:
        env.set(sdk_env(run_dir, mode))
        run = start_wandb(run_dir, run_id=run_id, group=group, config=config, tracking=tracking,
                          mode=mode)
        for name, value in values.items():
            run.summary[name] = value
        for name, path in images.items():
            run.summary[name] = wandb.Image(str(path))
        where = run.url if mode == "online" else str(Path(run_dir) / WANDB_SUBDIR)
        run.finish()
    finally:
        teardown_if_idle()
        env.restore()
    return f"W&B: {', '.join([*values, *images])} in the summary of run {run_id} ({where})"

