"""`gx sweep` end to end at test scale: real Ray Tune, real proxy runs on ../shared/corpus,
resume after the driver is killed, winner.json driving `gx run`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gemini_core.data.mixture import MixtureSchedule
from gemini_core.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
TRIALS = 6


def gx(*args: str, runs: Path, env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gemini_core.cli", "--runs-root", str(runs),
                           *args], cwd=REPO, env=env, capture_output=True, text=True, **kw)


def sweep_args(corpus: Path, cache: Path) -> list[str]:
    return ["sweep", "experiments/mixture_sweep.py:size=tiny",
            f"--config.proxy.data.root={corpus}", f"--config.proxy.data.cache_dir={cache}",
            f"--config.space.trials={TRIALS}", "--config.fit.folds=2",
            "--config.fit.samples=2000", "--config.proxy.tracking.wandb=false"]


def done_runs(runs: Path) -> dict[str, str]:
    """run id -> the `end` time of each done proxy trial (validation runs left out)."""
    out = {}
    for status in runs.glob("mixture_sweep_tiny/*/status.json"):
        st = json.loads(status.read_text())
        cfg = json.loads((status.parent / "config.json").read_text())
        if st.get("state") == "done" and cfg["tracking"]["job_type"] == "proxy":
            out[status.parent.name] = st["end"]
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    ray_tmp = tmp_path_factory.mktemp("r")  # a Ray cluster of this test's own, killable
    return {**os.environ, "GX_RAY_TEMP_DIR": str(ray_tmp), "RAY_AUTH_MODE": "disabled"}


def test_sweep_resumes_after_kill_and_its_winner_trains(tmp_path, corpus_root, env):
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    cmd = [sys.executable, "-m", "gemini_core.cli", "--runs-root", str(runs),
           *sweep_args(corpus_root, cache)]
    driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(done_runs(runs)) < 2:
        time.sleep(0.2)
    finished = done_runs(runs)
    assert len(finished) >= 2, "no trial finished in time"
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and what it started in its session
    driver.wait()
    subprocess.run(["pkill", "-9", "-f", env["GX_RAY_TEMP_DIR"]], check=False)

    proc = gx(*sweep_args(corpus_root, cache), runs=runs, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = done_runs(runs)
    assert len(after) == TRIALS
    for run_id, end in finished.items():  # finished before the kill: not trained again
        assert after[run_id] == end, run_id
    sweep_dir = next((runs / "sweeps").glob("mixture_sweep_tiny-*"))
    for name in ("trials.csv", "fit.json", "winner.json", "report.txt"):
        assert (sweep_dir / name).is_file(), name
    winner = MixtureSchedule.load(sweep_dir / "winner.json")
    winner.validate(("books", "wiki", "math", "code", "web", "multilingual"))
    fit = json.loads((sweep_dir / "fit.json").read_text())
    assert fit["n_fit"] + fit["n_holdout"] + fit["n_failed"] == TRIALS
    # validated against baselines, each with 2 seeds, at proxy and at target scale
    val = json.loads((sweep_dir / "validate.json").read_text())
    for scale in ("proxy", "target"):
        cands = val["scales"][scale]["candidates"]
        assert set(cands) == {"winner", "natural", "uniform", "best_trial", "winner_no_anneal"}
        assert all(c["n"] == 2 for c in cands.values())
        assert set(val["scales"][scale]["winner_vs"]) == {"natural", "uniform", "best_trial"}
    target_runs = json.loads(next(
        p for p in (runs / "mixture_sweep_tiny").glob("*/config.json")
        if json.loads(p.read_text())["tracking"]["job_type"] == "validate"
        and json.loads(p.read_text())["train"]["steps"] == 96).read_text())
    assert target_runs["model"]["d_model"] == 64  # 2x the proxy's width
    assert "winner" in proc.stdout and "trial" in proc.stdout

    compare = gx("compare", "mixture_sweep_tiny", runs=runs, env=env)
    assert compare.returncode == 0 and "held-out" in compare.stdout, compare.stderr

    from test_run import TINY  # pytest puts tests/ on sys.path (rootdir conftest)
    run = gx("run", "experiments/quickstart.py", *TINY, f"--config.data.root={corpus_root}",
             f"--config.data.cache_dir={cache}", f"--config.data.schedule={sweep_dir / 'winner.json'}",
             "--config.train.steps=6", "--config.tracking.wandb=false", runs=runs, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    trained = RunDir(runs, "quickstart", next((runs / "quickstart").iterdir()).name)
    assert trained.config()["mixture"] == winner.to_dict()

    first_trial = next(iter(finished))
    both = gx("compare", first_trial, trained.run_id, runs=runs, env=env)
    assert both.returncode == 0, both.stderr
    assert "mixture.stages" in both.stdout and "train.steps" in both.stdout
    assert "eval/mean/loss" in both.stdout and both.stdout.count("done") >= 2


def test_sweep_config_errors_before_ray(tmp_path, corpus_root, env):
    bad = gx("sweep", "experiments/mixture_sweep.py:size=tiny",
             f"--config.proxy.data.root={corpus_root}", "--config.space.max_epochs=0.0000001",
             runs=tmp_path / "runs", env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert "config.space" in bad.stderr
    assert not (tmp_path / "runs" / "sweeps").exists()
