"""Run identity and the run directory (DESIGN.md "Identity" and "Run directory").

fingerprint = sha256 of the canonical JSON of the fully resolved config, with data identified by
content (the manifest's hash) rather than by path; run id = <experiment>-<first 8 hex>.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any, Iterator

from gemini_core.errors import UserError

# preempted: stopped by SIGTERM after a final checkpoint (gemini_core.scale.faults); resumes like an
# interrupted run
STATES = ("queued", "running", "done", "failed", "preempted")


def runs_root(flag: str | None = None) -> Path:
    return Path(flag or os.environ.get("GX_RUNS_ROOT") or "runs").absolute()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprint(identity: dict) -> str:
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()


def run_id(experiment: str, fp: str) -> str:
    return f"{experiment}-{fp[:8]}"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write-then-rename: a killed process leaves the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def pid_alive(pid: int | None, host: str | None) -> bool:
    if not pid or host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunDir:
    """`<runs root>/<experiment>/<run id>/` with config, status, metrics, summary, checkpoints."""

    def __init__(self, root: Path, experiment: str, rid: str):
        self.run_id = rid
        self.experiment = experiment
        self.path = Path(root) / experiment / rid

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def status(self) -> dict | None:
        return read_json(self.path / "status.json")

    def config(self) -> dict | None:
        return read_json(self.path / "config.json")

    def summary(self) -> dict | None:
        return read_json(self.path / "summary.json")

    def is_busy(self) -> bool:
        """Another live process on this host is running this very run."""
        st = self.status() or {}
        return (st.get("state") == "running" and st.get("pid") != os.getpid()
                and pid_alive(st.get("pid"), st.get("host")))

    def shown_state(self) -> str:
        """The state to show: a `running` whose process is gone from this host (kill -9, a
        crash, a lost machine) is `interrupted`; the file keeps what the process last wrote."""
        st = self.status() or {}
        state = st.get("state", "?")
        if (state == "running" and st.get("host") == socket.gethostname()
                and not pid_alive(st.get("pid"), st.get("host"))):
            return "interrupted"
        return state

    def set_status(self, state: str, **fields: Any) -> None:
        assert state in STATES, state
        st = self.status() or {}
        st.update(state=state, pid=os.getpid(), host=socket.gethostname(), **fields)
        if state == "running":
            st["start"] = _now()
            st.pop("end", None)
            st.pop("error", None)
        if state in ("done", "failed", "preempted"):
            st["end"] = _now()
        write_json_atomic(self.path / "status.json", st)

    def write_config(self, cfg: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path / "config.json", cfg)

    def write_summary(self, summary: dict) -> None:
        write_json_atomic(self.path / "summary.json", summary)


def iter_runs(root: Path, experiment: str | None = None) -> Iterator[RunDir]:
    """Every run directory under the root (hidden folders such as .cache skipped)."""
    if not root.is_dir():
        return
    for exp_dir in sorted(root.iterdir()):
        if exp_dir.name.startswith(".") or not exp_dir.is_dir():
            continue
        if experiment and exp_dir.name != experiment:
            continue
        for run in sorted(exp_dir.iterdir()):
            if (run / "config.json").is_file():
                yield RunDir(root, exp_dir.name, run.name)


def find_run(root: Path, rid: str) -> RunDir:
    """A run by id (or a run directory path)."""
    as_path = Path(rid)
    if (as_path / "config.json").is_file():
        return RunDir(as_path.parent.parent, as_path.parent.name, as_path.name)
    matches = [r for r in iter_runs(root) if r.run_id == rid or r.run_id.startswith(rid)]
    if not matches:
        raise UserError(f"{rid}: no such run under {root} (see `gx ls`)")
    if len(matches) > 1:
        names = ", ".join(r.run_id for r in matches)
        raise UserError(f"{rid}: ambiguous, matches {names}")
    return matches[0]
