"""One trial's CPUs: XLA's thread flag, and the trial's threads pinned to CPUs of its own.

Ray's `{"cpu": n}` is bookkeeping only: it keeps the count of concurrent trials right, but the
kernel still moves every trial's threads across all the node's CPUs, so two trials (and their
data, checkpoint and XLA threads) meet on the same core while another idles. Here each trial
claims n CPUs of the node with a lock file per CPU, held by its worker process (the kernel
drops the lock if the process dies, so a killed trial frees its CPUs), and pins all of its
threads to them for the trial's length.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

# this worker's CPUs before any trial pinned it (a reused Ray worker runs many trials)
NODE_CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
_EIGEN = "--xla_cpu_multi_thread_eigen="


def set_xla_threads(cpus: int) -> None:
    """Before JAX starts in this worker: XLA's matmuls on one thread for a one-CPU trial."""
    # (XLA_FLAGS takes xla_* flags only: an unknown --flag aborts the process.) Set once, not
    # appended: a reused worker runs many trials, and JAX's persistent cache key hashes
    # XLA_FLAGS as written, so a flag repeated per trial made every trial miss the cache.
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_EIGEN)]
    os.environ["XLA_FLAGS"] = " ".join([*kept, f"{_EIGEN}{'true' if cpus > 1 else 'false'}"])


def lock_dir() -> Path:
    """Node-local and per user: the trials of every sweep on this node share it."""
    return Path(tempfile.gettempdir()) / f"gx-cpus-{os.getuid()}"


def claim(n: int, cpus: list[int] | None = None) -> tuple[list[int], list[int]]:
    """`n` of `cpus` (default: the node's) that no other live trial holds, and the open lock
    files holding them; ([], []) when fewer than n are free."""
    folder = lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    got, fds = [], []
    for cpu in NODE_CPUS if cpus is None else cpus:
        fd = os.open(folder / f"{cpu}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        got.append(cpu)
        fds.append(fd)
        if len(got) == n:
            return got, fds
    release(fds)
    return [], []


def release(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)  # closing drops the flock


def pin_threads(cpus: list[int]) -> None:
    """Every thread of this process (Ray's, the data loader's, XLA's pool) on `cpus`; threads
    started later inherit it from the thread that starts them."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(tid), cpus)


@contextlib.contextmanager
def trial_cpus(n: int, log: Callable[[str], None] = print) -> Iterator[list[int]]:
    """For one trial: XLA's thread flag set, and this process pinned to `n` CPUs of its own
    while the block runs (unpinned, with a line saying so, when none are free or the OS cannot
    pin: macOS)."""
    set_xla_threads(n)
    if not NODE_CPUS or not os.path.isdir("/proc/self/task"):
        yield []
        return
    got, fds = claim(n)
    if not got:
        log(f"no {n} free CPU(s) among {NODE_CPUS} in {lock_dir()}: this trial runs unpinned")
        yield []
        return
    pin_threads(got)
    try:
        yield got
    finally:
        pin_threads(NODE_CPUS)
        release(fds)
