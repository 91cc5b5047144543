"""DoReMi's Group-DRO proxy on real data: the weight update follows its law exactly, the run is
a real run dir (metrics, summary, checkpoint with alpha), and a done run is reused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gemini_core.train import trainer
from gemini_core.experiment import load_experiment
from gemini_core.runs.rundir import RunDir
from gemini_core.runs.tracking import read_metrics
from sweeps import config as sweep_config
from sweeps.doremi import DoReMiConfig, train_doremi

DOMAINS = ("books", "wiki", "math", "code", "web", "multilingual")


@pytest.fixture(scope="module")
def proxy(corpus_root, data_cache):
    exp = load_experiment("experiments/mixture_sweep.py:size=tiny", [
        f"--config.proxy.data.root={corpus_root}", f"--config.proxy.data.cache_dir={data_cache}",
        "--config.proxy.tracking.wandb=false", "--config.proxy.train.log_every=1",
        "--config.proxy.train.checkpoint_every=0"],
        schema=sweep_config.SweepConfig, convert=sweep_config.from_config_dict)
    return sweep_config.proxy_config(exp.config)


def test_dro_weights_follow_exponentiated_gradient(proxy, tmp_path):
    root = tmp_path / "runs"
    reference = trainer.run_experiment(proxy, root, log=lambda _: None)
    ref_run = RunDir(root, proxy.name, reference["run_id"])
    eta = 0.5
    summary = train_doremi(proxy, ref_run, DoReMiConfig(eta=eta, smoothing=0.0), root,
                           log=lambda _: None)
    run = RunDir(root, f"{proxy.name}_doremi", summary["run_id"])
    assert run.status()["state"] == "done"
    assert run.config()["reference_run"] == ref_run.run_id
    rows = [r for r in read_metrics(run.path) if "doremi/alpha/books" in r]
    assert len(rows) == proxy.train.steps
    excess_TxK = np.array([[r[f"doremi/excess/{d}"] for d in DOMAINS] for r in rows])
    alpha_TxK = np.array([[r[f"doremi/alpha/{d}"] for d in DOMAINS] for r in rows])
    assert (excess_TxK >= 0).all() and excess_TxK.sum() > 0
    # with no smoothing, alpha_t = softmax(eta * sum of the excess losses so far) from uniform
    # (a domain absent from a step's batch gets no update: its logged excess is the 0 it used)
    logits_TxK = eta * np.cumsum(excess_TxK, axis=0)
    expected_TxK = np.exp(logits_TxK - logits_TxK.max(1, keepdims=True))
    expected_TxK /= expected_TxK.sum(1, keepdims=True)
    np.testing.assert_allclose(alpha_TxK, expected_TxK, rtol=2e-4, atol=1e-6)
    weights = np.array([summary[f"doremi/weights/{d}"] for d in DOMAINS])
    np.testing.assert_allclose(weights, alpha_TxK.mean(0), rtol=1e-4)
    assert abs(weights.sum() - 1) < 1e-5
    assert np.isfinite(summary["eval/mean/loss"])

    # a second call with the same inputs reuses the done run
    again = train_doremi(proxy, ref_run, DoReMiConfig(eta=eta, smoothing=0.0), root,
                         log=lambda _: None)
    assert again["run_id"] == summary["run_id"]
    assert json.loads((run.path / "status.json").read_text())["end"] == run.status()["end"]


def test_doremi_config_errors(corpus_root, tmp_path):
    import subprocess
    import sys
    proc = subprocess.run(
        [sys.executable, "-m", "gx", "--runs-root", str(tmp_path), "sweep",
         "experiments/mixture_sweep.py:size=tiny", f"--config.proxy.data.root={corpus_root}",
         "--config.method=doremi", "--config.doremi.eta=-1"],
        capture_output=True, text=True)
    assert proc.returncode == 2 and "config.doremi.eta=-1" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
