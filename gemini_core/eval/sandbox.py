"""Sandboxed execution of model-written Python programs (pass@k for HumanEval, MBPP and the like).

Each program runs in a session of its own: ``[unshare ...] python -I -S -B -c SANDBOX`` starts a
tiny supervisor that forks; the child sets the limits, drops its privileges and runs the program
in the interpreter it already is (one interpreter start per program, not two). The layers, and
what protects what, honestly:

* **Process tree** — ``unshare --pid --fork --kill-child`` (when it works here) puts the program
  in a pid namespace whose init is the supervisor: when the program's main process ends, or gx
  kills the session at the wall-clock timeout, the kernel kills everything left in it (a wall,
  also against double-forked daemons). Without it: ``killpg`` of the session's group, which a
  child that calls ``setsid`` escapes (then only the uid sweep below catches it), and, without
  an own uid either, a program may signal any process of gx's user (gx included).
* **Fork bombs** — run as root (as in our containers), RLIMIT_NPROC is not enforced for root, so
  the supervisor drops the program to a fresh unprivileged uid/gid (one per run, in
  ``SANDBOX_UID_BASE + [0, SANDBOX_UID_SPAN)``) where RLIMIT_NPROC = ``max_processes`` counts
  exactly that run's processes and threads (a wall); after the run every process of that uid is
  SIGKILLed until none is left. As a normal user, RLIMIT_NPROC counts all of the user's tasks,
  so it is set to their current count plus ``max_processes`` (a wall, but a racy budget).
* **Time** — RLIMIT_CPU (kernel, a wall per process) and a wall-clock timeout after which the
  whole session is SIGKILLed (``status="timeout"``).
* **Memory** — RLIMIT_AS = ``memory_mb`` per process (a wall per process; up to
  ``max_processes`` processes may each use that much). A refused allocation is a MemoryError
  (``status="memory"``).
* **Files** — RLIMIT_FSIZE (stderr included), RLIMIT_CORE 0, RLIMIT_NOFILE 256, a throwaway
  working directory (deleted after), HOME and TMPDIR pointing into it. Writes elsewhere: the
  dropped uid can write nothing that is not world-writable (a wall, when gx runs as root), and a
  Python-level guard refuses ``open`` / ``os.*`` writes outside the working directory. The guard
  is not a wall: a subprocess or ctypes can still write to world-writable places (/tmp,
  /dev/shm) as the dropped uid; as a normal user, to anything that user may write.
* **Network** — ``unshare --net`` (a new network namespace with only a down loopback: a wall)
  where it works; always also a guard that makes ``socket.socket`` refuse AF_INET/AF_INET6 (not
  a wall: ``_socket`` internals or ctypes get around it).

The environment is minimal (PATH, locale, HOME, TMPDIR), Python runs isolated (``-I``: no user
site, no PYTHON* variables, no cwd on sys.path) and, unless ``site_packages``, without site (the
standard library only). As root, the interpreter is one the dropped uid can run (a venv under
root's 0700 home is not: then the system's python of the same version; see `sandbox_mode`). ``passed`` means: the program ran to its last statement, exited 0, within
the limits. A program that calls ``sys.exit(0)`` (or ``os._exit(0)``) before its end — a way a
completion could skip the tests — is ``status="exited early"``, not passed.

Whatever a program does, :func:`run_program` returns an :class:`ExecResult`; it never raises for
a program's behaviour and never waits past the timeout plus the cleanup.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

SANDBOX_UID_BASE = 1_500_000_000
SANDBOX_UID_SPAN = 1_000_000
STDERR_TAIL_CHARS = 2000

# The sandbox's first process (the pid namespace's init when unshare works; root there when gx is
# root). It forks; the child sets the limits, drops to the sandbox uid and becomes the program's
# interpreter (no second interpreter start): it takes the status pipe away from the program,
# installs the guards, runs program.py as __main__ and marks on the pipe that it reached the
# program's end. The parent waits for it and reports how it ended. Only the standard library.
_SANDBOX = r"""
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
status_fd = cfg["status_fd"]
pid = os.fork()
if pid == 0:
    try:
        os.chdir(cfg["work"])
        for name, soft, hard in cfg["limits"]:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setresgid(cfg["uid"], cfg["uid"], cfg["uid"])
            os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
        os.set_inheritable(status_fd, False)
        sys.argv = ["program.py"]
        if cfg["site"]:
            import site
            site.main()
        with open("program.py", encoding="utf-8") as f:
            code = compile(f.read(), "program.py", "exec")
    except BaseException as e:
        os.write(status_fd, ("start-failed %s: %s\n" % (type(e).__name__, e)).encode())
        os._exit(127)
    if cfg["guards"]:
        exec(cfg["guards_source"], {"__name__": "sandbox_guards"})
    import builtins
    main_pid = os.getpid()
    exec(code, {"__name__": "__main__", "__file__": "program.py", "__builtins__": builtins})
    if os.getpid() == main_pid:  # not a child the program forked that ran on to the end
        os.write(status_fd, b"done\n")
    raise SystemExit(0)
_, status = os.waitpid(pid, 0)
if os.WIFSIGNALED(status):
    os.write(status_fd, b"signal %d\n" % os.WTERMSIG(status))
else:
    os.write(status_fd, b"exit %d\n" % os.waitstatus_to_exitcode(status))
"""

# Python-level guards (not walls; see the module docstring), run in the program's process.
_GUARDS = r"""
import builtins, io, os, _socket
_WORK = os.path.realpath(os.getcwd())
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

def _inside(path):
    if isinstance(path, int):
        return True
    real = os.path.realpath(os.fsdecode(os.fspath(path)))
    return real == _WORK or real.startswith(_WORK + os.sep) or real == "/dev/null"

def _refuse(path):
    raise PermissionError(13, "sandbox: writing outside the working directory", str(path))

_real_open = io.open
def _open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and not _inside(file):
        _refuse(file)
    return _real_open(file, mode, *args, **kwargs)
builtins.open = io.open = _open

_real_os_open = os.open
def _os_open(path, flags, *args, **kwargs):
    if flags & _WRITE_FLAGS and not _inside(path):
        _refuse(path)
    return _real_os_open(path, flags, *args, **kwargs)
os.open = _os_open

def _guard_paths(name, n_paths):
    real = getattr(os, name)
    def guarded(*args, **kwargs):
        for path in args[:n_paths]:
            if not _inside(path):
                _refuse(path)
        return real(*args, **kwargs)
    setattr(os, name, guarded)
for _name in ("remove", "unlink", "rmdir", "mkdir", "chmod", "chown", "lchown", "truncate",
              "utime", "mkfifo", "mknod"):
    if hasattr(os, _name):
        _guard_paths(_name, 1)
for _name in ("rename", "replace", "link", "symlink"):
    _guard_paths(_name, 2)

# guarding the C type (before socket.py subclasses it) costs no `import socket` (~30 ms)
_RealSocket = _socket.socket
_NET = {_socket.AF_INET, _socket.AF_INET6}
class _GuardedSocket(_RealSocket):
    __slots__ = ()  # socket.py's subclass declares __weakref__ itself
    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        if fileno is None and (_socket.AF_INET if family == -1 else family) in _NET:
            raise PermissionError(13, "sandbox: network access is disabled")
        _RealSocket.__init__(self, family, type, proto, fileno)
_socket.socket = _socket.SocketType = _GuardedSocket
"""


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """How one program ended. status: "passed" | "failed" (nonzero exit) | "exited early" (exit 0
    before the program's end) | "timeout" (wall clock or CPU time) | "memory" | "killed: SIGNAME"
    | "error: ..." (the sandbox could not run it)."""
    passed: bool
    status: str
    stderr_tail: str
    seconds: float


@functools.lru_cache(maxsize=1)
def sandbox_mode() -> str:
    """The isolation this machine gives (probed once), e.g. "pid+net namespaces, own uid,
    /usr/bin/python3.11": namespaces "pid+net" (unshare works, as root), "user+pid+net"
    (unprivileged unshare) or none ("process group"); "own uid" when each program gets an
    unprivileged uid of its own; then the interpreter that runs programs."""
    prefix, python, own_uid = _plan()
    name = ("user+pid+net namespaces" if "--user" in prefix
            else "pid+net namespaces" if prefix else "process group")
    return f"{name}{', own uid' if own_uid else ''}, {python}"


@functools.lru_cache(maxsize=1)
def _plan() -> tuple[list[str], str, bool]:
    """(isolation command prefix, default interpreter, whether programs get their own uid)."""
    prefix: list[str] = []
    for candidate in (_unshare_prefix(user_ns=False), _unshare_prefix(user_ns=True)):
        if candidate and _works(candidate + ["true"]):
            prefix = candidate
            break
    if os.geteuid() != 0:
        return prefix, sys.executable, False
    # the dropped uid must be able to run the interpreter: a venv or pyenv under root's 0700 home
    # is out of its reach, the system's python usually is not
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [sys.executable, getattr(sys, "_base_executable", sys.executable),
                  f"/usr/bin/python{version}", f"/usr/local/bin/python{version}",
                  shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")]
    probe_uid = SANDBOX_UID_BASE - 1
    for python in filter(None, candidates):
        if _works([python, "-I", "-S", "-c", "import json, os, resource"], user=probe_uid):
            return prefix, python, True
    return prefix, sys.executable, False  # no interpreter it can run: stay root (weaker, named)


def _unshare_prefix(*, user_ns: bool) -> list[str]:
    exe = shutil.which("unshare")
    if exe is None or (not user_ns and os.geteuid() != 0):
        return []
    return [exe] + (["--user", "--map-root-user"] if user_ns else []) + [
        "--pid", "--fork", "--kill-child", "--net"]


def _works(argv: list[str], user: int | None = None) -> bool:
    ids = {} if user is None else {"user": user, "group": user, "extra_groups": []}
    try:
        return subprocess.run(argv, check=False, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30,
                              cwd="/", **ids).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


_uids_in_use: set[int] = set()
_uids_lock = threading.Lock()


def _take_uid() -> int:
    # random within a wide span: two gx processes on one host practically never meet; within one
    # process the set rules it out. A clash would only make two runs share one process budget.
    rng = random.SystemRandom()
    with _uids_lock:
        while True:
            uid = SANDBOX_UID_BASE + rng.randrange(SANDBOX_UID_SPAN)
            if uid not in _uids_in_use:
                _uids_in_use.add(uid)
                return uid


def _release_uid(uid: int) -> None:
    with _uids_lock:
        _uids_in_use.discard(uid)


def _proc_uids_and_threads() -> list[tuple[int, int, int]]:
    """(pid, real uid, threads) of every process visible in /proc (vanishing ones skipped)."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(os.path.join(entry.path, "status"), "rb") as f:
                status = f.read()
            uid = int(status.split(b"\nUid:", 1)[1].split(None, 1)[0])
            threads = int(status.split(b"\nThreads:", 1)[1].split(None, 1)[0])
        except (OSError, IndexError, ValueError):
            continue
        out.append((int(entry.name), uid, threads))
    return out


def sandbox_processes(uids: range) -> list[int]:
    """Pids of the live processes whose real uid is in `uids` (e.g. range(SANDBOX_UID_BASE,
    SANDBOX_UID_BASE + SANDBOX_UID_SPAN): everything the sandbox runs right now, as root)."""
    return [pid for pid, owner, _ in _proc_uids_and_threads() if owner in uids]


def _kill_uid(uid: int, patience_s: float = 5.0) -> None:
    """SIGKILL every process of the sandbox uid until none is left (a fork bomb's children keep
    forking while we kill, but RLIMIT_NPROC bounds them, so this converges)."""
    deadline = time.monotonic() + patience_s
    while (pids := sandbox_processes(range(uid, uid + 1))) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)


def _limits(timeout_s: float, memory_mb: int, max_processes: int, max_file_mb: int,
            own_uid: bool) -> list[tuple[str, int, int]]:
    cpu_s = max(1, math.ceil(timeout_s))
    nproc = max_processes
    if not own_uid:  # RLIMIT_NPROC counts every task of the real uid: give the program a budget
        me = os.getuid()
        nproc += sum(threads for _, owner, threads in _proc_uids_and_threads() if owner == me)
    return [("RLIMIT_CPU", cpu_s, cpu_s + 1),
            ("RLIMIT_AS", memory_mb << 20, memory_mb << 20),
            ("RLIMIT_NPROC", nproc, nproc),
            ("RLIMIT_FSIZE", max_file_mb << 20, max_file_mb << 20),
            ("RLIMIT_CORE", 0, 0),
            ("RLIMIT_NOFILE", 256, 256)]


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_then_kill(pid: int, timeout_s: float) -> bool:
    """Wait for the session leader `pid` to exit and SIGKILL its process group, at the deadline
    or after the exit, all before it is reaped: until then its pid, and so the group id, cannot
    be anyone else's. True if the deadline struck."""
    struck = threading.Event()

    def strike() -> None:
        struck.set()
        _killpg(pid)

    timer = threading.Timer(max(0.0, timeout_s), strike)
    timer.daemon = True
    timer.start()
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    finally:
        timer.cancel()
        timer.join()  # a strike in flight ends before the caller reaps
        _killpg(pid)
    return struck.is_set()


def _read_all(fd: int) -> str:
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4 * STDERR_TAIL_CHARS))
            return f.read().decode(errors="replace")[-STDERR_TAIL_CHARS:]
    except OSError:
        return ""


def _status(report: str, timed_out: bool, stderr_tail: str) -> tuple[bool, str]:
    lines = report.splitlines()
    if timed_out:
        return False, "timeout"
    start_failed = [line for line in lines if line.startswith("start-failed")]
    if start_failed:
        return False, "error: " + start_failed[0].removeprefix("start-failed ")
    ended = [line.split() for line in lines if line.startswith(("exit ", "signal "))]
    if not ended:
        return False, "error: the sandbox supervisor died without a report"
    kind, number = ended[-1][0], int(ended[-1][1])
    if kind == "signal":
        if number == signal.SIGXCPU:
            return False, "timeout"
        return False, f"killed: {signal.Signals(number).name}"
    if number != 0:
        return False, "memory" if "MemoryError" in stderr_tail else "failed"
    if "done" not in lines:
        return False, "exited early"
    return True, "passed"


def run_program(source: str, *, timeout_s: float = 10.0, memory_mb: int = 1024,
                max_processes: int = 32, max_file_mb: int = 16, python: str | None = None,
                site_packages: bool = False, python_guards: bool = True) -> ExecResult:
    """Run `source` as a Python program in the sandbox (see the module docstring for what
    protects what) and say how it ended. timeout_s: wall clock from the start of the
    interpreter (also the CPU-time limit, rounded up); memory_mb: address space per process;
    max_processes: processes and threads at once; max_file_mb: the largest file it may write
    (its stderr included). python: the interpreter (default: the first one the
    sandbox uid can run, see `sandbox_mode`). site_packages: let it import the interpreter's
    site-packages (default: the standard library only). python_guards=False leaves out the
    Python-level file and socket guards, leaving only the OS walls (tests use it to check those)."""
    start = time.monotonic()
    try:
        return _run(source, start=start, timeout_s=timeout_s, memory_mb=memory_mb,
                    max_processes=max_processes, max_file_mb=max_file_mb, python=python,
                    site_packages=site_packages, python_guards=python_guards)
    except Exception as e:  # noqa: BLE001 (a sandbox failure is a failed sample, never a crash)
        return ExecResult(False, f"error: {type(e).__name__}: {e}", "", time.monotonic() - start)


def _run(source: str, *, start: float, timeout_s: float, memory_mb: int, max_processes: int,
         max_file_mb: int, python: str | None, site_packages: bool,
         python_guards: bool) -> ExecResult:
    prefix, default_python, own_uid = _plan()
    python = python or default_python
    host_dir = Path(tempfile.mkdtemp(prefix="gx-sandbox-"))
    uid, status_r, status_w = None, -1, -1
    try:
        status_r, status_w = os.pipe()
        uid = _take_uid() if own_uid else None
        host_dir.chmod(0o711)  # the program may pass through to its work dir, not list or write
        work = host_dir / "work"
        work.mkdir(mode=0o700)
        (work / "program.py").write_text(source, encoding="utf-8")
        if uid is not None:
            os.chown(work, uid, uid)
            os.chown(work / "program.py", uid, uid)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "HOME": str(work), "TMPDIR": str(work), "OMP_NUM_THREADS": "1"}
        cfg = {"status_fd": status_w, "work": str(work), "uid": uid, "site": site_packages,
               "guards": python_guards, "guards_source": _GUARDS,
               "limits": _limits(timeout_s, memory_mb, max_processes, max_file_mb, own_uid)}
        argv = prefix + [python, "-I", "-S", "-B", "-c", _SANDBOX, json.dumps(cfg)]
        with open(host_dir / "stderr", "wb") as stderr:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=stderr, env=env, cwd=host_dir, pass_fds=(status_w,),
                                    start_new_session=True)
        os.close(status_w)
        status_w = -1
        try:
            timed_out = _wait_then_kill(proc.pid, timeout_s - (time.monotonic() - start))
        finally:
            _killpg(proc.pid)  # (again, if waiting itself failed) before the reaping
            proc.wait()
            # an init that exited by itself leaves an empty pid namespace (the kernel kills and
            # reaps the rest before its exit is reported); in every other case, sweep the uid
            if uid is not None and not (prefix and proc.returncode == 0):
                _kill_uid(uid)
        tail = _tail(host_dir / "stderr")
        passed, status = _status(_read_all(status_r), timed_out, tail)
        return ExecResult(passed, status, tail, time.monotonic() - start)
    finally:
        for fd in (status_r, status_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(host_dir, ignore_errors=True)
        if uid is not None:
            _release_uid(uid)


def check_program(prompt_and_completion: str, tests: str, *, timeout_s: float = 10.0,
                  **limits) -> ExecResult:
    """Run a completed program followed by its tests: HumanEval passes
    (prompt + completion, test + f"\\ncheck({entry_point})"), MBPP (code + "\\n" +
    test_setup_code, "\\n".join(test_list): the setup code of MBPP's one record that has any,
    task 367, uses a class its code defines). The caller assembles both parts; the sandbox stays
    task-agnostic."""
    return run_program(prompt_and_completion + "\n" + tests + "\n", timeout_s=timeout_s, **limits)


def run_many(programs: Sequence[str], *, workers: int | None = None,
             **limits) -> list[ExecResult]:
    """Run many programs, `workers` at a time (default: the CPU count), results in input order.
    Threads suffice: each job waits on a subprocess of its own."""
    workers = max(1, workers or os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda source: run_program(source, **limits), programs))
