"""A recipe's state on disk, <runs root>/recipes/<recipe>/: one JSON file per step (written
atomically), the lock that lets one run of the recipe at a time, and `gx ls`'s table of them."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Callable, Iterator

from gemini_core.errors import UserError
from gemini_core.runs.rundir import pid_alive, read_json, write_json_atomic

Log = Callable[[str], None]
LOCK_FILE = ".lock"  # not *.json: not a step's state


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def state_path(state_dir: Path, step: str) -> Path:
    return Path(state_dir) / f"{step}.json"


def read_state(state_dir: Path, step: str) -> dict | None:
    try:
        return read_json(state_path(state_dir, step))
    except ValueError:  # written atomically, so only a hand edit breaks it: rerun the step
        return None


def write_state(state_dir: Path, step: str, rec: dict) -> None:
    write_json_atomic(state_path(state_dir, step), rec)


def running_elsewhere(rec: dict | None) -> bool:
    """Marked running by another process that is still alive on this host."""
    return bool(rec and rec.get("state") == "running" and rec.get("pid") != os.getpid()
                and pid_alive(rec.get("pid"), rec.get("host")))


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}


@contextlib.contextmanager
def hold_lock(state_dir: Path, recipe: str, log: Log = print) -> Iterator[None]:
    """The recipe's lock for as long as this block runs, or a UserError naming the process
    that holds it. An flock: the kernel drops it when its holder dies however it dies, so a
    lock file left by a dead process (its pid still written in it) is simply taken over."""
    path = Path(state_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            who = (f"pid {holder['pid']} on {holder.get('host')} (since {holder.get('start')})"
                   if "pid" in holder else "another process")
            raise UserError(f"recipe {recipe}: already being run by {who}; wait for it, or "
                            f"stop it first ({path})") from None
        stale = _read_holder(fd)
        if stale:  # a released lock is emptied: this holder died while holding it
            log(f"recipe {recipe}: taking over the lock of pid {stale.get('pid')} on "
                f"{stale.get('host')} (since {stale.get('start')}), which is gone")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "start": now()}).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing drops the flock


def shown_state(rec: dict) -> str:
    """`running` whose process is gone from this host is shown as interrupted."""
    state = rec.get("state", "?")
    if state == "running" and rec.get("host") == socket.gethostname() \
            and not pid_alive(rec.get("pid"), rec.get("host")):
        return "interrupted"
    return state


def format_states(runs_root: Path, name: str | None = None) -> str:
    """Each recipe's steps: state, what they produced, when; "" when there is none."""
    base = Path(runs_root) / "recipes"
    if not base.is_dir():
        return ""
    blocks = []
    for rdir in sorted(p for p in base.iterdir() if p.is_dir()):
        if name and rdir.name != name:
            continue
        recs = []
        for path in rdir.glob("*.json"):
            try:
                recs.append(json.loads(path.read_text()))
            except ValueError:
                recs.append({"step": path.stem, "state": "unreadable"})
        recs.sort(key=lambda r: (r.get("index", 1 << 30), r.get("step", "")))
        head = ("step", "kind", "state", "output", "time")
        rows = [(r.get("step", "?"), r.get("kind", "?"), shown_state(r), r.get("summary") or "-",
                 r.get("end") or r.get("start") or r.get("queued") or "") for r in recs]
        widths = [max(len(str(row[i])) for row in rows + [head]) for i in range(len(head))]
        lines = [f"recipe {rdir.name} ({rdir})"]
        lines += ["  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
                  for row in [head] + rows]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
