"""Issue 28's findings, each through the CLI where a user meets it: names that would escape the
runs root, a damaged checkpoint, damaged run records, bad paths and values, Ray's leftovers
after kill -9. docs/guarantees.md lists the guarantees these check.

Every user error must be exit 2, one line naming the thing, and no traceback. One tiny run is
trained once for the module; each test damages its own copy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_run import TINY  # pytest puts tests/ on sys.path (rootdir conftest)

from gemini_core.errors import UserError
from gemini_core.runs.rundir import RunDir, iter_runs
from gemini_core.scale import ray_local
from gx import cli

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "experiments/quickstart.py")
SWEEP = str(REPO / "experiments/mixture_sweep.py") + ":size=tiny"
LADDER = str(REPO / "experiments/scaling_ladder.py") + ":size=tiny"


def gx(*args: str, root: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "gx", "--runs-root", str(root), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "WANDB_MODE": "offline", **(env or {})})


def train_args(corpus: Path, cache: Path) -> list[str]:
    return ["run", QUICKSTART, *TINY, f"--config.data.root={corpus}",
            f"--config.data.cache_dir={cache}"]


def assert_one_line_error(code: int, out: str, err: str, *needles: str) -> str:
    assert "Traceback" not in out + err, err
    assert code == 2, (code, out[-2000:], err[-2000:])
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def in_process(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def done_run(tmp_path_factory, data_cache, corpus_root) -> RunDir:
    """A finished tiny run: checkpoints at steps 18 and 24 (keep 2)."""
    root = tmp_path_factory.mktemp("hardening") / "runs"
    proc = gx(*train_args(corpus_root, data_cache), root=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = iter_runs(root)
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["18", "24"]
    return run


def copy_run(run: RunDir, root: Path, rid: str | None = None) -> RunDir:
    rid = rid or run.run_id
    shutil.copytree(run.path, root / run.experiment / rid, symlinks=True)
    return RunDir(root, run.experiment, rid)


def mark_interrupted(run: RunDir) -> None:
    """As a kill -9 leaves it: `running`, by a process that is gone."""
    status = run.status()
    status.update(state="running", pid=2**22 + 7)  # above the default pid_max: never alive
    (run.path / "status.json").write_text(json.dumps(status))


def data_files(step_dir: Path) -> list[Path]:
    files = [p for p in (step_dir / "default").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    return files


# ---------------------------------------------------------------------------------------------
# 1. names


def test_names_are_checked_before_anything_is_written(tmp_path, capsys, monkeypatch,
                                                       corpus_root, data_cache):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # a sweep that got through would fail fast
    runs = tmp_path / "a" / "runs"
    root = ["--runs-root", str(runs)]
    for name in ("../../escaped_run", str(tmp_path / "abs_run")):
        for extra in (["--dry-run"], [f"--config.data.root={corpus_root}",
                                      f"--config.data.cache_dir={data_cache}"]):
            code, out, err = in_process(capsys, *root, "run", QUICKSTART, *TINY,
                                        f"--config.name={name}", *extra)
            assert_one_line_error(code, out, err, "config.name", "not a valid name")
    sweep = "sw<img src=x onerror=alert(1)>"
    code, out, err = in_process(capsys, *root, "sweep",
                                str(REPO / "experiments/mixture_sweep.py") + ":size=tiny",
                                f"--config.name={sweep}")
    assert_one_line_error(code, out, err, "config.name", repr(sweep))
    code, out, err = in_process(capsys, *root, "data", "prepare",
                                str(REPO / "experiments/data_prep.py"), "--config.name=../out")
    assert_one_line_error(code, out, err, "config.name='../out'")
    recipe = tmp_path / "recipe.py"
    recipe.write_text(
        "import ml_collections\n\n\ndef get_config(arg=None):\n"
        "    c = ml_collections.ConfigDict()\n    c.name = 'r'\n"
        "    c.params = dict(corpus='', wandb=False)\n    c.steps = ml_collections.ConfigDict()\n"
        "    c.steps['to/kenizer'] = dict(kind='tokenizer', config=dict(tokenizer=dict("
        "vocab_size=384, sample_weights='natural')), inputs=dict(root='ref:params.corpus'))\n"
        "    return c\n")
    code, out, err = in_process(capsys, *root, "run", str(recipe), "--dry-run")
    assert_one_line_error(code, out, err, "config.steps", "'to/kenizer'")
    # nothing was written: not the runs root, not where the names pointed
    assert sorted(os.listdir(tmp_path)) == ["recipe.py"]
    assert not Path("/escaped_run").exists()


def test_run_directory_stays_inside_the_runs_root(tmp_path):
    """Defence in depth behind the name check: a RunDir outside its root cannot be made."""
    for experiment, rid in (("..", "x"), ("a/b", "c"), ("/abs", "x"), ("q", "../../x"),
                            ("q", ""), (".", "x")):
        with pytest.raises(UserError, match="would not be inside the runs root"):
            RunDir(tmp_path, experiment, rid)
    assert RunDir(tmp_path, "q", "q-1234").path == tmp_path / "q" / "q-1234"


# ---------------------------------------------------------------------------------------------
# 2. damaged checkpoints


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, done_run, damage,
                                                            corpus_root, data_cache):
    run = copy_run(done_run, tmp_path / "runs")
    mark_interrupted(run)
    for f in data_files(run.checkpoints / "24"):
        if damage == "truncate":
            os.truncate(f, f.stat().st_size // 3)
        else:
            f.unlink()
    proc = gx(*train_args(corpus_root, data_cache), root=tmp_path / "runs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: damaged checkpoint step 24" in proc.stdout
    assert f"resuming {run.run_id} from step 18" in proc.stdout
    assert (run.checkpoints / "24.damaged").is_dir()  # kept for inspection, out of orbax's way
    assert (run.checkpoints / "24").is_dir()  # written again by the resumed run
    assert run.status()["state"] == "done"
    # resumed from step 18, the run ends exactly where the undamaged one did
    want, got = done_run.summary(), run.summary()
    for key in ("eval/mean/loss", "eval/mean/bpb", "eval/math/loss"):
        assert got[key] == want[key], key


def test_eval_on_a_damaged_or_missing_checkpoint_is_one_line(tmp_path, done_run, corpus_root):
    root = tmp_path / "runs"
    run = copy_run(done_run, root)
    for f in data_files(run.checkpoints / "24"):
        os.truncate(f, 10)
    proc = gx("eval", run.run_id, "--data", str(corpus_root), root=root)
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr,
                          str(run.checkpoints / "24"), "is damaged", "gx run")
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["18", "24"]  # eval moves nothing

    shutil.rmtree(run.checkpoints)
    proc = gx("eval", run.run_id, "--data", str(corpus_root), root=root)
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, "has no checkpoint yet")
    assert "ERROR" not in proc.stderr and not run.checkpoints.exists()

    proc = gx("eval", run.run_id, "--data", str(corpus_root), "--batches", "0", root=root)
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, "--batches=0")


def test_a_failed_run_records_one_line_and_the_traceback_in_a_log(tmp_path, corpus_root,
                                                                    data_cache):
    # a valid split shorter than one evaluation window: found inside training, recorded
    proc = gx(*train_args(corpus_root, data_cache), "--config.data.seq_len=200000",
              root=tmp_path / "runs")
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, "evaluation window")
    (run,) = iter_runs(tmp_path / "runs")
    status = run.status()
    assert status["state"] == "failed"
    assert "\n" not in status["error"]
    assert status["error"].endswith(f"(full error: {run.path / 'error.log'})")
    log = (run.path / "error.log").read_text()
    assert "Traceback (most recent call last)" in log and "evaluation window" in log


# ---------------------------------------------------------------------------------------------
# 3. damaged run records


@pytest.mark.parametrize("record", ["status.json", "config.json", "summary.json"])
def test_a_damaged_record_is_named_and_the_other_runs_still_list(tmp_path, done_run, record,
                                                                 capsys, corpus_root):
    root = tmp_path / "runs"
    healthy = copy_run(done_run, root, "quickstart-00000000")
    run = copy_run(done_run, root)
    damaged = run.path / record
    damaged.write_bytes(damaged.read_bytes()[:25])  # cut short

    code, out, err = in_process(capsys, "--runs-root", str(root), "ls")
    assert code == 0 and "Traceback" not in out + err
    rows = {line.split()[0]: line for line in out.splitlines()[1:3]}
    assert "done" in rows[healthy.run_id]
    assert f"damaged ({record})" in rows[run.run_id]
    assert str(damaged) in out

    code, out, err = in_process(capsys, "--runs-root", str(root), "show", run.run_id)
    assert_one_line_error(code, out, err, str(damaged), "damaged")
    if record == "config.json":
        code, out, err = in_process(capsys, "--runs-root", str(root), "eval", run.run_id,
                                    "--data", str(corpus_root))
        assert_one_line_error(code, out, err, str(damaged), "damaged")


def test_gx_run_names_a_damaged_status_json(tmp_path, done_run, corpus_root, data_cache):
    run = copy_run(done_run, tmp_path / "runs")
    (run.path / "status.json").write_text('{"state": "run')
    proc = gx(*train_args(corpus_root, data_cache), root=tmp_path / "runs")
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr,
                          str(run.path / "status.json"), "damaged", "delete it")


# ---------------------------------------------------------------------------------------------
# 4. bad paths and values


def test_bad_paths_and_values_are_one_line(tmp_path, capsys, corpus_root, data_cache):
    root = ["--runs-root", str(tmp_path / "runs")]
    data = [f"--config.data.root={corpus_root}", f"--config.data.cache_dir={data_cache}"]
    for extra in (["--dry-run"], data):
        code, out, err = in_process(capsys, *root, "run", QUICKSTART, *TINY, *extra,
                                    f"--config.data.schedule={tmp_path}")
        assert_one_line_error(code, out, err, "config.data.schedule", "a directory, not a file")
    notes = tmp_path / "notes.txt"
    notes.write_text("get_config = None\n")
    code, out, err = in_process(capsys, *root, "run", str(notes))
    assert_one_line_error(code, out, err, str(notes), "not a Python experiment file")
    code, out, err = in_process(capsys, "--runs-root", "/dev/null", "ls")
    assert_one_line_error(code, out, err, "/dev/null", "not a directory")
    code, out, err = in_process(capsys, *root, "run", QUICKSTART, "--dry-run",
                                f"--config.data.root={tmp_path / 'no_corpus'}")
    assert_one_line_error(code, out, err, "config.data.root", "no such directory")
    code, out, err = in_process(capsys, *root, "eval", "anything", "--data", str(corpus_root),
                                "--batches", "0")
    assert_one_line_error(code, out, err, "--batches=0")
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_recipe_data_sweep_and_ladder_mistakes_are_named_at_load(tmp_path, capsys, corpus_root,
                                                                 monkeypatch):
    """Each at load, by the key the user typed, before any data is read or Ray starts (a case
    that wrongly got past its config fails fast against an unreachable Ray)."""
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    runs = tmp_path / "runs"
    missing, afile = tmp_path / "missing", tmp_path / "a_file"
    afile.write_text("x")
    prep = str(REPO / "experiments/data_prep.py")
    corpus = f"--config.data.root={corpus_root}"
    cases = [
        # the recipe's dry run checks the corpus its first step reads
        (["run", str(REPO / "experiments/gemini_recipe.py") + ":size=tiny", "--dry-run",
          f"--config.params.corpus={missing}"],
         (f"config.params.corpus='{missing}': no such directory", "config.steps.prepare")),
        (["data", "prepare", prep, corpus, "--config.output.examples=-7"],
         ("config.output.examples=-7: must be >= 0",)),
        (["data", "prepare", prep, corpus, "--config.classifier.max_docs_per_class=-7"],
         ("config.classifier.max_docs_per_class=-7: must be >= 10",)),
        (["data", "prepare", prep, f"--config.data.root={missing}"],
         (f"config.data.root='{missing}': no such directory",)),
        (["data", "prepare", prep, corpus, f"--config.output.dir={afile}"],
         (f"config.output.dir='{afile}': a file, not a directory",)),
        (["data", "prepare", prep, corpus, f"--config.output.dir={afile / 'out'}"],
         ("config.output.dir=", f"{afile} is a file, not a directory")),
        (["scaling", "run", LADDER, "--config.fit.budgets=5"],
         ("config.fit.budgets[0]=5: below the ladder's smallest run",)),
        (["sweep", SWEEP, f"--config.proxy.data.root={missing}"],
         (f"config.proxy.data.root='{missing}': no such directory",)),
        (["sweep", SWEEP], ("config.proxy.data.root='': set it", "--config.proxy.data.root=")),
    ]
    for argv, needles in cases:
        code, out, err = in_process(capsys, "--runs-root", str(runs), *argv)
        line = assert_one_line_error(code, out, err, *needles)
        assert "config.data.root" not in line or argv[0] == "data", line
    assert not runs.exists()
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


# ---------------------------------------------------------------------------------------------
# 5. Ray's processes do not outlive a killed driver

DRIVER = """
import sys, time
from gemini_core.scale import ray_local
ray_local.init_ray(print, num_cpus=1)
import ray
ray.get(ray.remote(lambda: 1).remote())  # a worker too
print("SESSION", ray_local.own_session(ray_local.ray_temp_dir()), flush=True)
time.sleep(600)
"""


def start_driver(temp: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env={**os.environ, "GX_RAY_TEMP_DIR": str(temp)})
    for line in proc.stdout:
        if line.startswith("SESSION "):
            return proc, Path(line.split(" ", 1)[1].strip())
    raise AssertionError(f"the driver ended without starting Ray: {proc.wait()}")


def watchdog_of(driver: int) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"gemini_core.scale.ray_local" in cmd and str(driver).encode() in cmd:
                return int(entry.name)
    raise AssertionError("no watchdog")


def wait_until_gone(session: Path, seconds: float = 60) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := ray_local.session_processes(session)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds processes through /proc")
def test_a_killed_drivers_ray_does_not_outlive_it():
    temp = Path(tempfile.mkdtemp(prefix="gxr", dir="/tmp"))  # short: Ray's socket paths
    try:
        # the watchdog clears the session once its driver is killed
        driver, session = start_driver(temp)
        assert ray_local.session_processes(session)  # raylet, gcs, agents, a worker
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        assert wait_until_gone(session) == []
        assert not list((temp / ray_local.DRIVERS).glob("*.json"))

        # the watchdog killed too: the next start clears what is left
        driver, session = start_driver(temp)
        os.kill(watchdog_of(driver.pid), signal.SIGKILL)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        time.sleep(3)  # what Ray stops by itself has stopped; what is left, stays
        assert ray_local.session_processes(session)  # Ray's agents: what this is about
        second, _ = start_driver(temp)
        assert ray_local.session_processes(session) == []
        second.send_signal(signal.SIGTERM)
        second.wait()
    finally:
        for session in temp.glob("session_*_*"):
            ray_local.kill_session(session)
        shutil.rmtree(temp, ignore_errors=True)
