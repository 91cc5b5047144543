"""Ray start-up, shared by data curation (Ray Data) and sweeps (Ray Tune): a cluster when
RAY_ADDRESS names one, else a local Ray of this process with no dashboard.

A local Ray started here does not outlive the command that started it. When its driver is
killed (kill -9: no atexit, no ray.shutdown), Ray's dashboard and runtime-env agents notice
their raylet is gone but hang on the way out, reporting to a GCS that died too. So each local
start records its driver in `<temp>/gx-drivers/`, and a small watchdog process kills what is left
of the session once the driver is gone; the next start also clears the leftovers of any dead
driver whose watchdog did not finish (killed with it). A leftover is found by the session folder
(`<temp>/session_<date>_<driver pid>`) in its command line, open files or working directory.
Linux only (/proc); elsewhere the start is as before.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

Log = Callable[[str], None]
DRIVERS = "gx-drivers"  # under the temp dir: one <pid>.json per live local Ray started by gx
GRACE_S = 2.0  # after the driver's death: Ray's own processes that can exit, exit


def init_ray(log: Log, num_cpus: int | None = None) -> None:
    """Starts (or connects to) Ray once per process; a no-op when Ray is already up."""
    import ray
    if ray.is_initialized():
        return
    logging.getLogger("ray").setLevel(logging.ERROR)  # Ray Data logs every dataset it runs
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's boxes would break up our live lines
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log(f"ray: connecting to {address}")
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        return
    temp = ray_temp_dir()
    reaped = reap_dead_drivers(temp)
    if reaped:
        log(f"ray: stopped {reaped} leftover Ray process(es) of a killed gx command")
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _temp_dir=str(temp))
    session = own_session(temp)
    if session is not None and Path("/proc").is_dir():
        _start_watchdog(temp, session)


def ray_temp_dir() -> Path:
    # a short path: Ray's unix sockets live under it and have a ~100-character limit;
    # GX_RAY_TEMP_DIR gives a command a local cluster of its own
    return Path(os.environ.get("GX_RAY_TEMP_DIR") or
                Path(tempfile.gettempdir()) / f"gx-ray-{os.getuid()}")


def own_session(temp: Path, pid: int | None = None) -> Path | None:
    """The session folder Ray made for the local Ray that process `pid` (default: this one)
    started: Ray names it session_<date>_<pid of the starting process>."""
    found = sorted(temp.glob(f"session_*_{pid or os.getpid()}"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


# ---------------------------------------------------------------------------------------------
# processes, through /proc


def process_start(pid: int) -> str | None:
    """The process's start time (clock ticks since boot): with the pid, one process for sure
    (pids are reused); None when there is no such live process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state is field 3
    return None if fields[0] in ("Z", "X") else fields[19]


def _mentions(text: str, marker: str) -> bool:
    """`marker` (a folder) in `text` as a whole path component: session_..._12 is not _123."""
    return re.search(re.escape(marker) + r"(?![\w-])", text) is not None


def _references(pid: int, marker: str) -> bool:
    proc = Path(f"/proc/{pid}")
    try:
        if _mentions((proc / "cmdline").read_bytes().decode(errors="replace"), marker):
            return True
        if _mentions(os.readlink(proc / "cwd"), marker):
            return True
        for fd in (proc / "fd").iterdir():
            try:
                if _mentions(os.readlink(fd), marker):
                    return True
            except OSError:
                continue
    except OSError:  # gone meanwhile, or not ours to read
        return False
    return False


def session_processes(session: Path) -> list[int]:
    """Live processes of this user that belong to a Ray session (this one excluded)."""
    marker, me, uid = str(session), os.getpid(), os.getuid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
        except OSError:
            continue
        pid = int(entry.name)
        if process_start(pid) is not None and _references(pid, marker):
            found.append(pid)
    return found


def kill_session(session: Path) -> int:
    """SIGKILLs what is left of a session whose driver is dead; returns how many."""
    pids = session_processes(session)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return len(pids)


# ---------------------------------------------------------------------------------------------
# driver records and the watchdog


def _record_path(temp: Path, pid: int) -> Path:
    return temp / DRIVERS / f"{pid}.json"


def reap_dead_drivers(temp: Path) -> int:
    """Kills the leftovers of every recorded driver that is gone; returns how many processes."""
    if not (temp / DRIVERS).is_dir() or not Path("/proc").is_dir():
        return 0
    killed = 0
    for record in (temp / DRIVERS).glob("*.json"):
        try:
            rec = json.loads(record.read_text())
            pid, start, session = int(rec["pid"]), str(rec["start"]), Path(rec["session"])
        except (OSError, ValueError, KeyError, TypeError):
            record.unlink(missing_ok=True)  # half-written by a killed driver: nothing to go on
            continue
        if process_start(pid) == start:
            continue  # a live gx command's Ray: not ours to touch
        killed += kill_session(session)
        record.unlink(missing_ok=True)
    return killed


def _start_watchdog(temp: Path, session: Path) -> None:
    pid = os.getpid()
    start = process_start(pid)
    if start is None:
        return
    record = _record_path(temp, pid)
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": pid, "start": start, "session": str(session)}))
    os.replace(tmp, record)
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)}
    # its own session: a kill of the driver's process group leaves the watchdog to clean up
    subprocess.Popen([sys.executable, "-m", "gemini_core.scale.ray_local", "watch", str(pid),
                      start, str(session), str(record)],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True, env=env)


def watch(pid: int, start: str, session: Path, record: Path) -> None:
    """The watchdog: waits for the driver to end, then kills what is left of its session."""
    while process_start(pid) == start:
        time.sleep(0.5)
    time.sleep(GRACE_S)
    kill_session(session)
    record.unlink(missing_ok=True)


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "watch":
    watch(int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), Path(sys.argv[5]))
