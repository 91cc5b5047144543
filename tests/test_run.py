"""End to end through the real CLI on ../shared/corpus: run, reuse, resume after kill -9, identity.

One prepared data cache (tokenizer + token arrays) is shared by every test here, so the corpus
is tokenized once per session.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from gemini_core.experiment import load_experiment
from gemini_core.runs.rundir import RunDir, iter_runs
from gemini_core.train import trainer

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--config.model.d_model=32", "--config.model.num_layers=1", "--config.model.num_heads=2",
    "--config.model.mlp_dim=64", "--config.data.seq_len=32",
    "--config.data.tokenizer.vocab_size=384", "--config.data.tokenizer.sample_chars=200000",
    "--config.train.batch_size=4", "--config.train.steps=24", "--config.train.log_every=4",
    "--config.train.eval_every=12", "--config.train.eval_batches=1",
    "--config.train.checkpoint_every=6", "--config.optimizer.warmup_steps=2",
]


@pytest.fixture(scope="module")
def cache_dir(data_cache):
    return data_cache


def gx(*args: str, runs_root: Path, cache: Path, corpus: Path, check=True, **kw):
    cmd = [sys.executable, "-m", "gx", "--runs-root", str(runs_root), *args]
    if args and args[0] == "run":
        cmd += [f"--config.data.root={corpus}", f"--config.data.cache_dir={cache}"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def only_run(runs_root: Path) -> RunDir:
    runs = list(iter_runs(runs_root))
    assert len(runs) == 1, runs
    return runs[0]


def final_params(run: RunDir) -> dict:
    step = max(int(p.name) for p in run.checkpoints.iterdir() if p.name.isdigit())
    # CheckpointManager keeps the one item of each step under `default/`
    return ocp.StandardCheckpointer().restore((run.checkpoints / str(step) / "default").absolute())


def flat(tree) -> dict:
    import jax
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_run_end_to_end_then_reuse(tmp_path, cache_dir, corpus_root):
    runs = tmp_path / "runs"
    proc = gx("run", "experiments/quickstart.py", *TINY, runs_root=runs, cache=cache_dir,
              corpus=corpus_root)
    run = only_run(runs)
    assert run.status()["state"] == "done"
    summary = run.summary()
    for domain in ("books", "wiki", "math", "code", "web", "multilingual", "mean"):
        assert f"eval/{domain}/bpb" in summary and summary[f"eval/{domain}/bpb"] > 0
        assert domain in proc.stdout  # the final table
    rows = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses[-1] < losses[0]
    assert {"mixture/math", "perf/tokens_per_sec", "perf/mfu", "train/lr",
            "train/math/loss"} <= set(rows[0])
    assert "train/loss" in proc.stdout and "-> " in proc.stdout  # first and last loss
    cfg = run.config()
    assert cfg["run_id"] == run.run_id == f"quickstart-{cfg['fingerprint'][:8]}"
    assert (run.path / "wandb").is_dir()

    again = gx("run", "experiments/quickstart.py", *TINY, runs_root=runs, cache=cache_dir,
               corpus=corpus_root)
    assert "already done" in again.stdout
    assert len(list(iter_runs(runs))) == 1

    ls = gx("ls", runs_root=runs, cache=cache_dir, corpus=corpus_root)
    assert run.run_id in ls.stdout and "done" in ls.stdout and "24/24" in ls.stdout
    show = gx("show", run.run_id[:12], runs_root=runs, cache=cache_dir, corpus=corpus_root)
    assert "train.steps = 24" in show.stdout and "mean" in show.stdout

    ev = gx("eval", run.run_id, "--data", str(corpus_root), runs_root=runs, cache=cache_dir,
            corpus=corpus_root)
    assert "multilingual" in ev.stdout and "bpb" in ev.stdout
    # the same valid files through the run's tokenizer and final checkpoint: the run's numbers
    saved = json.loads(next((run.path / "eval").glob("valid-*.json")).read_text())
    assert saved["step"] == 24
    for key, value in saved["metrics"].items():
        assert value == pytest.approx(summary[key], rel=1e-6), key


def test_kill_then_resume_is_bit_identical(tmp_path, cache_dir, corpus_root):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    gx("run", "experiments/quickstart.py", *TINY, runs_root=straight, cache=cache_dir,
       corpus=corpus_root)

    cmd = [sys.executable, "-m", "gx", "--runs-root", str(killed), "run",
           "experiments/quickstart.py", *TINY, f"--config.data.root={corpus_root}",
           f"--config.data.cache_dir={cache_dir}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until a checkpoint mid-run is finalized, then kill -9
        ckpts = list(killed.glob("*/*/checkpoints/*"))
        if any(p.name.isdigit() and 6 <= int(p.name) < 24 for p in ckpts):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = only_run(killed)
    assert run.status()["state"] == "running"  # what it was doing when it died

    resumed = gx("run", "experiments/quickstart.py", *TINY, runs_root=killed, cache=cache_dir,
                 corpus=corpus_root)
    assert "resuming" in resumed.stdout
    assert run.status()["state"] == "done"
    a, b = flat(final_params(only_run(straight))), flat(final_params(run))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    steps = [json.loads(line)["step"] for line in run.metrics_path.read_text().splitlines()]
    assert steps == sorted(steps)  # nothing replayed twice after the resume


def test_user_errors_exit_2_without_traceback(tmp_path, cache_dir, corpus_root):
    runs = tmp_path / "runs"
    bad = gx("run", "experiments/quickstart.py", "--config.model.num_heads=3", runs_root=runs,
             cache=cache_dir, corpus=corpus_root, check=False)
    assert bad.returncode == 2
    assert "config.model.num_heads=3: must divide config.model.d_model=128" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = gx("run", "experiments/quickstart.py", "--config.data.domains=('web','nope')",
                 "--config.mixture.stages.base.weights={'web': 1.0}",
                 "--config.mixture.stages.anneal.weights={'web': 1.0}",
                 runs_root=runs, cache=cache_dir, corpus=corpus_root, check=False)
    assert missing.returncode == 2 and "nope" in missing.stderr
    assert "Traceback" not in missing.stderr
    assert not runs.exists() or not list(iter_runs(runs))


def test_dry_run_prints_the_plan_without_data(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gx", "run",
                           "experiments/pretrain.py:size=nano", "--dry-run"],
                          cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "GX_RUNS_ROOT": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for needle in ("params", "FLOPs/token", "chinchilla", "memory", "tokens per domain", "math"):
        assert needle in out
    assert not any(tmp_path.iterdir())  # nothing written, nothing read


def test_fingerprint_identity(tmp_path, cache_dir, corpus_root):
    def fp(root: Path, *overrides: str) -> str:
        exp = load_experiment(str(REPO / "experiments/quickstart.py"),
                              [f"--config.data.root={root}", f"--config.data.cache_dir={cache_dir}",
                               *TINY, *overrides])
        return trainer.prepare(exp.config, tmp_path / "runs", log=lambda _: None).fingerprint

    base = fp(corpus_root)
    assert fp(corpus_root) == base  # stable
    moved = tmp_path / "moved-corpus"
    shutil.copytree(corpus_root, moved, ignore=shutil.ignore_patterns("_filters", "LICENSES"))
    assert fp(moved) == base  # data identified by content, not path
    assert fp(corpus_root, "--config.train.steps=25") != base
    assert fp(corpus_root, "--config.optimizer.b2=0.99") != base
    assert fp(corpus_root, "--config.tracking.job_type=other") != base
