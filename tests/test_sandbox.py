"""The code sandbox: hostile programs end as failed samples with the host unharmed, and the real
HumanEval / MBPP reference solutions pass (the pass@k ground truth)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gemini_core.eval import sandbox
from gemini_core.eval.sandbox import check_program, run_many, run_program, sandbox_mode

BENCHMARKS = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
MODE = sandbox_mode()
OWN_UID = "own uid" in MODE
NET_NAMESPACE = "net namespaces" in MODE


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _descendants(pid: int) -> set[int]:
    children, found, todo = _children_map(), set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


@pytest.fixture
def host_unharmed(monkeypatch):
    """Runs the test's programs under uids of a range of its own (no other sandbox user on this
    machine shares it), then checks that nothing of them is left and the test process is fine."""
    base = sandbox.SANDBOX_UID_BASE + sandbox.SANDBOX_UID_SPAN + (os.getpid() % 1000) * 1000
    monkeypatch.setattr(sandbox, "SANDBOX_UID_BASE", base)
    monkeypatch.setattr(sandbox, "SANDBOX_UID_SPAN", 1000)
    before = _descendants(os.getpid())
    yield
    assert _descendants(os.getpid()) <= before
    assert sandbox.sandbox_processes(range(base, base + 1000)) == []
    # our own limits untouched: this process can still start processes and allocate
    assert subprocess.run([sys.executable, "-c", "x = bytearray(1 << 24)"],
                          check=False).returncode == 0


def test_outcomes_are_classified(host_unharmed):
    ok = run_program("assert sum([1, 2]) == 3\n")
    assert (ok.passed, ok.status, ok.stderr_tail) == (True, "passed", "")
    failed = run_program("def f():\n    return 1\nassert f() == 2, 'wrong answer'\n")
    assert (failed.passed, failed.status) == (False, "failed")
    assert "AssertionError: wrong answer" in failed.stderr_tail
    # a completion that exits before the tests run must not count as passing them
    early = run_program("import sys\nsys.exit(0)\nassert False\n")
    assert (early.passed, early.status) == (False, "exited early")
    crashed = run_program("import ctypes\nctypes.string_at(0)\n")
    assert (crashed.passed, crashed.status) == (False, "killed: SIGSEGV")


def test_throwaway_workdir_and_minimal_environment(host_unharmed):
    result = run_program(
        "import os, sys\n"
        "open('scratch.txt', 'w').write('x' * 100)\n"  # writing in its own directory is fine
        "sys.stderr.write('CWD=' + os.getcwd() + '\\n')\n"
        "assert set(os.environ) <= {'PATH', 'LANG', 'LC_ALL', 'HOME', 'TMPDIR', 'OMP_NUM_THREADS'}"
        ", sorted(os.environ)\n"
        "assert 'GX_RUNS_ROOT' not in os.environ and sys.flags.isolated\n"
        "import sys; sys.stderr.write('UID=%d\\n' % os.getuid())\n")
    assert result.passed, result
    cwd = result.stderr_tail.split("CWD=")[1].split()[0]
    assert not Path(cwd).exists()  # deleted after the run
    uid = int(result.stderr_tail.split("UID=")[1].split()[0])
    assert (uid != 0) if OWN_UID else (uid == os.getuid())


def test_endless_loop_times_out(host_unharmed):
    result = run_program("while True:\n    pass\n", timeout_s=2)
    assert (result.passed, result.status) == (False, "timeout")


@pytest.mark.parametrize("guards", [True, False])
def test_sleeping_children_in_their_own_sessions_are_killed(host_unharmed, guards):
    # a double-forked child that leaves the process group, and the parent sleeping: the wall
    # clock ends it and nothing of it survives (host_unharmed looks for leftovers)
    source = ("import os, time\n"
              "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
              "        time.sleep(1000)\n    os._exit(0)\n"
              "time.sleep(1000)\n")
    result = run_program(source, timeout_s=2, python_guards=guards)
    assert (result.passed, result.status) == (False, "timeout")


@pytest.mark.parametrize("source, statuses", [
    ("import os\nwhile True:\n    os.fork()\n", {"failed"}),  # forks until refused, then raises
    ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
     {"timeout"}),  # refused forks swallowed: every process loops until the watchdog
])
def test_fork_bomb_is_contained(host_unharmed, source, statuses):
    if not OWN_UID and os.geteuid() == 0:
        pytest.skip(f"root without an own uid for programs ({MODE}): RLIMIT_NPROC is not enforced")
    result = run_program(source, timeout_s=3, max_processes=16, python_guards=False)
    assert not result.passed and result.status in statuses, result


def test_ten_gigabytes_are_refused(host_unharmed):
    result = run_program("x = bytearray(10 * 2**30)\nx[-1] = 1\n")
    assert (result.passed, result.status) == (False, "memory")
    assert "MemoryError" in result.stderr_tail


def test_file_size_limit(host_unharmed):
    result = run_program("open('big', 'wb').write(b'x' * (3 << 20))\n", max_file_mb=1)
    assert not result.passed and "File too large" in result.stderr_tail, result


@pytest.mark.parametrize("guards", [True, False])
def test_writing_outside_its_directory_fails(host_unharmed, tmp_path, guards):
    if not guards and not OWN_UID:
        pytest.skip(f"without the Python guard only a separate uid protects our files ({MODE})")
    by_open, by_shell = tmp_path / "by_open.txt", tmp_path / "by_shell.txt"
    sources = [f"open({str(by_open)!r}, 'w').write('escaped')\n"]
    if OWN_UID:  # a subprocess goes around the Python guard; the separate uid still stops it
        sources.append("import subprocess\n"
                       f"subprocess.run(['sh', '-c', 'echo escaped > {by_shell}'], check=True)\n")
    for source in sources:
        result = run_program(source, python_guards=guards)
        assert (result.passed, result.status) == (False, "failed"), result
    assert not by_open.exists() and not by_shell.exists()


@pytest.mark.parametrize("guards", [True, False])
def test_opening_a_socket_fails(host_unharmed, guards):
    if not guards and not NET_NAMESPACE:
        pytest.skip(f"no network namespace here ({MODE}): only the Python guard stops sockets")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        result = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), "
                             "timeout=5).sendall(b'leak')\n", python_guards=guards)
        assert (result.passed, result.status) == (False, "failed"), result
        with pytest.raises(BlockingIOError):  # no connection ever reached the listener
            listener.accept()


def test_a_broken_interpreter_is_an_error_result_not_a_crash():
    result = run_program("x = 1\n", python="/nonexistent/python3")
    assert not result.passed and result.status.startswith("error"), result


@pytest.fixture(scope="module")
def reference_results() -> dict:
    """HumanEval canonical solutions, HumanEval `pass` bodies and MBPP reference code, each
    program assembled by its shipped task declaration (what `gx eval` runs), as one batch on 2
    workers (MBPP 123, the slowest at ~5-10 s, first so it overlaps the rest)."""
    from gemini_core.eval.task_examples import load_examples
    from gemini_core.eval.tasks import load_tasks
    he_spec, mbpp_spec = load_tasks("humaneval,mbpp", overrides={"num_fewshot": 0})
    humaneval = load_examples(he_spec, 0)
    mbpp = sorted(load_examples(mbpp_spec, 0), key=lambda ex: ex.id != "123")
    programs = ([ex.program(ex.gold) for ex in mbpp] + [ex.program(ex.gold) for ex in humaneval]
                + [ex.program("    pass\n") for ex in humaneval])
    assert check_program(mbpp[0].program_prefix + mbpp[0].gold, mbpp[0].program_suffix,
                         timeout_s=60).passed  # the convenience assembles the same
    results = run_many(programs, workers=2, timeout_s=60)
    n = len(humaneval)
    return {"mbpp": results[:len(mbpp)], "humaneval": results[len(mbpp):len(mbpp) + n],
            "humaneval_pass_body": results[len(mbpp) + n:]}


def test_humaneval_canonical_solutions_all_pass(reference_results):
    results = reference_results["humaneval"]
    assert len(results) == 164
    assert [r.status for r in results if not r.passed] == []


def test_humaneval_pass_bodies_all_fail(reference_results):
    results = reference_results["humaneval_pass_body"]
    assert sum(r.passed for r in results) == 0 and len(results) == 164


def test_mbpp_reference_code_passes_its_tests(reference_results):
    results = reference_results["mbpp"]
    # measured: all 500 of the test split pass with a 60 s timeout (and the 10 of the prompt
    # split: 510 of 510 when every record runs)
    assert sum(r.passed for r in results) == 500, [r for r in results if not r.passed][:3]
