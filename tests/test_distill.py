"""Distillation on real runs: a teacher run, then students that reference it by run id."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemini_core.experiment import load_experiment
from gemini_core.runs.metrics import read_metrics
from gemini_core.runs.rundir import RunDir
from gemini_core.train import distill, trainer


def test_kl_forward_reverse_and_topk_match_their_definitions():
    rng = np.random.default_rng(0)
    s_NxV = jnp.asarray(rng.normal(size=(5, 11)), jnp.float32)
    t_NxV = jnp.asarray(rng.normal(size=(5, 11)) * 2, jnp.float32)
    tau = 1.7
    p = np.asarray(jax.nn.softmax(t_NxV / tau)), np.asarray(jax.nn.softmax(s_NxV / tau))
    forward = (p[0] * (np.log(p[0]) - np.log(p[1]))).sum(-1)
    reverse = (p[1] * (np.log(p[1]) - np.log(p[0]))).sum(-1)
    np.testing.assert_allclose(distill.kl_full(s_NxV, t_NxV, tau, "forward"), forward, rtol=1e-5)
    np.testing.assert_allclose(distill.kl_full(s_NxV, t_NxV, tau, "reverse"), reverse, rtol=1e-5)
    assert float(jnp.max(jnp.abs(distill.kl_full(t_NxV, t_NxV, tau, "forward")))) < 1e-6
    # the top-K form with K = V is the full forward KL
    logp_NxK, ids_NxK = jax.lax.top_k(jax.nn.log_softmax(t_NxV / tau), 11)
    np.testing.assert_allclose(distill.kl_topk(s_NxV, logp_NxK, ids_NxK, tau), forward, rtol=1e-5)


def _config(role: str, corpus, cache, *extra: str):
    return load_experiment(f"experiments/distill_nano.py:role={role},size=tiny", [
        f"--config.data.root={corpus}", f"--config.data.cache_dir={cache}",
        "--config.tracking.wandb=false", *extra]).config


@pytest.fixture(scope="module")
def teacher(corpus_root, tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("runs")
    summary = trainer.run_experiment(_config("teacher", corpus_root, data_cache), root,
                                   log=lambda _: None)
    return root, data_cache, summary["run_id"]


def _student(teacher, corpus, *extra: str) -> dict:
    root, cache, teacher_id = teacher
    cfg = _config("student", corpus, cache, f"--config.distill.teacher={teacher_id}", *extra)
    return trainer.run_experiment(cfg, root, log=lambda _: None)


def test_student_trains_towards_its_teacher(teacher, corpus_root):
    root, cache, teacher_id = teacher
    summary = _student(teacher, corpus_root)
    run = RunDir(root, "distill_nano_tiny", summary["run_id"])
    teacher_run = RunDir(root, "distill_teacher_tiny", teacher_id)
    # the teacher enters the student's identity by content, not by name
    assert run.config()["distill"]["teacher"] == teacher_run.config()["fingerprint"]
    rows = [r for r in read_metrics(run.path) if "train/kl" in r]
    assert rows and all(np.isfinite(r["train/kl"]) and r["train/kl"] >= 0 for r in rows)
    assert all(np.isfinite(r["train/loss"]) for r in rows)

    # alpha = 0 is training from scratch: the same eval loss as the plain trainer's run
    plain = trainer.run_experiment(_config("scratch", corpus_root, cache), root, log=lambda _: None)
    zero = _student(teacher, corpus_root, "--config.distill.alpha=0.0")
    np.testing.assert_allclose(zero["eval/mean/loss"], plain["eval/mean/loss"], rtol=1e-5)
    assert abs(summary["eval/mean/loss"] - plain["eval/mean/loss"]) > 1e-4  # the KL acts

    # the teacher's cached top K with K = vocab is the full forward KL (f16 log-probs aside)
    full_k = _student(teacher, corpus_root, "--config.distill.top_k=384")
    np.testing.assert_allclose(full_k["eval/mean/loss"], summary["eval/mean/loss"], rtol=2e-3)
    assert list((cache / "distill").glob("*-top384-*/ids.npy"))


def _gx_student(root, corpus_root, cache, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gx", "--runs-root", str(root), "run",
         "experiments/distill_nano.py:size=tiny", f"--config.data.root={corpus_root}",
         f"--config.data.cache_dir={cache}", "--config.tracking.wandb=false", *extra],
        capture_output=True, text=True)


def _error_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines and lines[-1].startswith("gx: error: "), proc.stderr
    return lines[-1]


def test_teacher_errors(teacher, corpus_root, tmp_path):
    root, cache, teacher_id = teacher
    # a student whose tokenizer differs (another vocabulary size): refused before training,
    # naming the key, and both tokenizers
    students = sorted((root / "distill_nano_tiny").glob("*"))
    line = _error_line(_gx_student(root, corpus_root, cache,
                                   f"--config.distill.teacher={teacher_id}",
                                   "--config.data.tokenizer.vocab_size=320"))
    assert line.startswith(f"gx: error: config.distill.teacher={teacher_id!r}: the teacher's "
                           "tokenizer ("), line
    assert "is not the student's" in line and "data.tokenizer settings" in line, line
    assert sorted((root / "distill_nano_tiny").glob("*")) == students  # no run started
    line = _error_line(_gx_student(root, corpus_root, cache,
                                   "--config.distill.teacher=no_such_run"))
    assert "no_such_run: no such run" in line, line
    proc = subprocess.run(
        [sys.executable, "-m", "gx", "run", "experiments/distill_nano.py:size=tiny",
         "--config.distill.kl=reverse", "--config.distill.top_k=8", "--dry-run"],
        capture_output=True, text=True)
    assert proc.returncode == 2 and "config.distill.top_k" in proc.stderr, proc.stderr
