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
import sys
import traceback
from pathlib import Path
from typing import Any, Iterator

from gemini_core.errors import DamagedFile, UserError

# preempted: stopped by SIGTERM after a final checkpoint (gemini_core.scale.faults); resumes like an
# interrupted run
STATES = ("queued", "running", "done", "failed", "preempted")


def runs_root(flag: str | None = None) -> Path:
    """The runs root: the flag, else $GX_RUNS_ROOT, else ./runs. It need not exist yet (the first
    run creates it), but something else in its place is an error."""
    source = ("--runs-root" if flag else "GX_RUNS_ROOT" if os.environ.get("GX_RUNS_ROOT")
              else "the default runs root")
    root = Path(flag or os.environ.get("GX_RUNS_ROOT") or "runs").absolute()
    if root.exists() and not root.is_dir():
        raise UserError(f"{source}={str(root)!r}: not a directory")
    return root


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


def read_json(path: Path, remedy: str = "") -> Any:
    """The JSON in `path`; None when there is no such file; DamagedFile when it cannot be read."""
    try:
        text = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise DamagedFile(path, "a directory, not a file", remedy) from None
    except OSError as e:
        raise DamagedFile(path, f"cannot read it: {e.strerror or e}", remedy) from None
    try:
        return json.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise DamagedFile(path, "not UTF-8 text", remedy) from None
    except json.JSONDecodeError as e:
        problem = "empty" if not text.strip() else f"not valid JSON: {e.msg} at line {e.lineno}"
        raise DamagedFile(path, problem, remedy) from None


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


# what to do about each damaged record (DamagedFile's remedy)
_REMEDY = {
    "status.json": "delete it and run the same `gx run` command: the run resumes from its "
                   "newest intact checkpoint",
    "config.json": "run the same `gx run` command to rewrite it",
    "summary.json": "rerun the experiment with `gx run --force` to rebuild it",
}
ERROR_LOG = "error.log"  # full tracebacks of failures; status.json's error names it


class RunDir:
    """`<runs root>/<experiment>/<run id>/` with config, status, metrics, summary, checkpoints."""

    def __init__(self, root: Path, experiment: str, rid: str):
        self.run_id = rid
        self.experiment = experiment
        self.path = Path(root) / experiment / rid
        # defence in depth behind config.check_name: whatever the names, the run directory is
        # exactly two levels below the root. Lexical (abspath, not resolve): a runs root or an
        # experiment folder that is a symlink to another disk stays allowed.
        inside = Path(os.path.abspath(self.path))
        if inside.parent.parent != Path(os.path.abspath(root)) or not experiment or not rid:
            raise UserError(f"experiment {experiment!r}, run {rid!r}: the run directory "
                            f"{inside} would not be inside the runs root {Path(root).absolute()}")

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def status(self) -> dict | None:
        return self._record("status.json")

    def config(self) -> dict | None:
        return self._record("config.json")

    def summary(self) -> dict | None:
        return self._record("summary.json")

    def _record(self, name: str) -> dict | None:
        path = self.path / name
        value = read_json(path, _REMEDY[name])
        if value is not None and not isinstance(value, dict):
            raise DamagedFile(path, f"a JSON {type(value).__name__}, not an object", _REMEDY[name])
        return value

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
        try:
            st = self.status() or {}
        except DamagedFile:  # rewritten whole below; the damaged one told nobody anything
            st = {}
        if "error" in fields:
            fields["error"] = self._log_error(str(fields["error"]))
        st.update(state=state, pid=os.getpid(), host=socket.gethostname(), **fields)
        if state == "running":
            st["start"] = _now()
            st.pop("end", None)
            st.pop("error", None)
        if state in ("done", "failed", "preempted"):
            st["end"] = _now()
        write_json_atomic(self.path / "status.json", st)

    def _log_error(self, error: str) -> str:
        """Appends the full error (with the traceback of the exception being handled, when there
        is one) to error.log; returns one line for status.json that points there."""
        exc = sys.exc_info()[1]
        full = "".join(traceback.format_exception(exc)) if exc is not None else error + "\n"
        log = self.path / ERROR_LOG
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as f:
                f.write(f"--- {_now()} pid {os.getpid()} on {socket.gethostname()}\n{full}")
        except OSError:  # a full disk must not hide the error itself
            return error.splitlines()[0][:500] if error else error
        first = error.strip().splitlines()[0] if error.strip() else "error"
        if len(first) > 1000:  # the whole message is in the log
            first = first[:997] + "..."
        return f"{first} (full error: {log})"

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
            if (run / "config.json").exists():  # a damaged one too: `gx ls` shows it
                yield RunDir(root, exp_dir.name, run.name)


def find_run(root: Path, rid: str) -> RunDir:
    """A run by id (or a run directory path)."""
    as_path = Path(os.path.abspath(rid))  # "." or "../x" name the folder they point to
    if (as_path / "config.json").exists():
        return RunDir(as_path.parent.parent, as_path.parent.name, as_path.name)
    matches = [r for r in iter_runs(root) if r.run_id.startswith(rid)]
    exact = [r for r in matches if r.run_id == rid]
    if exact:  # a whole id wins over the longer ids it is a prefix of
        return exact[0]
    if not matches:
        raise UserError(f"{rid}: no such run under {root} (see `gx ls`)")
    if len(matches) > 1:
        names = ", ".join(r.run_id for r in matches)
        raise UserError(f"{rid}: ambiguous, matches {names}")
    return matches[0]
