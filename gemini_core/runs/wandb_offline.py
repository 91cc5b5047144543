"""Reading a run's offline W&B data back from disk (tests and checks compare it with
`metrics.jsonl`): every session of the run, merged in order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

from gemini_core.runs.metrics import STEP_KEY
from gemini_core.runs.wandb_run import SDK_DIRS, WANDB_SUBDIR


def session_logs(run_dir: Path) -> list[Path]:
    wandb_dir = Path(run_dir) / WANDB_SUBDIR
    return sorted(wandb_dir.glob("*run-*/run-*.wandb"))


def inspect_records(log_file: Path) -> list[dict]:
    # Why `wandb leet inspect --json`: wandb 0.31 ships no Python reader for its .wandb
    # transaction log any more (the old datastore module is gone); `leet inspect` is wandb's
    # own public command for it, reads the format whatever its version, and prints one JSON
    # record per line with values already decoded. It runs in a child process with an env that
    # keeps it offline, quiet, keyless and out of ~.
    with tempfile.TemporaryDirectory(prefix="gx-wandb-read-") as scratch:
        env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
        env.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_ERROR_REPORTING="false",
                   **{var: str(Path(scratch) / sub) for var, sub in SDK_DIRS.items()})
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


class Session:
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
    logs = session_logs(run_dir)
    if not logs:
        raise FileNotFoundError(f"no W&B run under {Path(run_dir) / WANDB_SUBDIR}")
    sessions = [Session(inspect_records(p)) for p in logs]
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
