"""A trial's CPUs (sweeps/cpus.py): claimed per CPU across processes, all threads pinned,
released at the trial's end or when its process dies."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sweeps import cpus

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def own_lock_dir(tmp_path, monkeypatch):
    """These tests' claims must not meet a sweep running beside them on this node."""
    monkeypatch.setattr(cpus.tempfile, "gettempdir", lambda: str(tmp_path))


def test_setting_the_thread_flag_again_leaves_xla_flags_as_they_were(monkeypatch):
    """A reused Ray worker sets it once per trial; JAX's persistent cache key hashes XLA_FLAGS
    as written, so a growing XLA_FLAGS would make every later trial recompile."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    cpus.set_xla_threads(1)
    once = os.environ["XLA_FLAGS"]
    cpus.set_xla_threads(1)
    assert os.environ["XLA_FLAGS"] == once == (
        "--xla_force_host_platform_device_count=2 --xla_cpu_multi_thread_eigen=false")
    cpus.set_xla_threads(2)
    assert os.environ["XLA_FLAGS"].split()[-1] == "--xla_cpu_multi_thread_eigen=true"
    assert os.environ["XLA_FLAGS"].count("multi_thread_eigen") == 1


def test_claims_exclude_each_other_and_free_on_release():
    first, fds = cpus.claim(1, [0, 1])
    assert first == [0]
    second, fds2 = cpus.claim(1, [0, 1])  # another open file: flock sees another holder
    assert second == [1]
    assert cpus.claim(1, [0, 1]) == ([], [])  # both held: nothing half-claimed
    assert cpus.claim(2, [0, 1]) == ([], [])
    cpus.release(fds)
    assert cpus.claim(1, [0, 1])[0] == [0]


def test_a_killed_process_frees_its_cpus(tmp_path):
    """A trial killed mid-run (SIGKILL, OOM) leaves no stale claim behind."""
    code = ("import sys, time; from sweeps import cpus; "
            "cpus.tempfile.gettempdir = lambda: sys.argv[1]; "
            "print(cpus.claim(2, [0, 1])[0], flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], text=True,
                              stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "[0, 1]"
        assert cpus.claim(1, [0, 1]) == ([], [])  # held by the live process
    finally:
        holder.kill()
        holder.wait()
    assert cpus.claim(2, [0, 1])[0] == [0, 1]


@pytest.mark.skipif(len(cpus.NODE_CPUS) < 2, reason="needs 2 CPUs to tell pinned from not")
def test_trial_pins_every_thread_and_unpins_after():
    started = threading.Event()
    stop = threading.Event()

    def idle():
        started.set()
        stop.wait()

    thread = threading.Thread(target=idle)
    thread.start()  # running before the trial starts, like Ray's own threads
    started.wait()
    try:
        with cpus.trial_cpus(1, log=print) as got:
            assert len(got) == 1
            assert os.sched_getaffinity(0) == set(got)
            assert os.sched_getaffinity(thread.native_id) == set(got)
            late = []
            t2 = threading.Thread(target=lambda: late.append(os.sched_getaffinity(0)))
            t2.start()
            t2.join()
            assert late == [set(got)]  # started inside: inherits the pin
        assert os.sched_getaffinity(0) == set(cpus.NODE_CPUS)
        assert os.sched_getaffinity(thread.native_id) == set(cpus.NODE_CPUS)
        assert cpus.claim(1, got)[0] == got  # released
    finally:
        stop.set()
        thread.join()


def test_no_free_cpu_runs_unpinned_and_says_so():
    held, fds = cpus.claim(len(cpus.NODE_CPUS))
    lines = []
    try:
        with cpus.trial_cpus(1, log=lines.append) as got:
            assert got == []
            assert os.sched_getaffinity(0) == set(cpus.NODE_CPUS)
    finally:
        cpus.release(fds)
    assert held and len(lines) == 1 and "runs unpinned" in lines[0]
