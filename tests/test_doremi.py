"""DoReMi's Group-DRO proxy on real data, trained by gemini_core's one loop: the logged excess
equals per-domain losses of the proxy and reference checkpoints computed here, independently,
on the same batch; alpha follows a numpy exponentiated-gradient update fed with them; alpha is
held in checkpoints, so a resumed run ends with the same weights; a done run is reused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from flax import nnx

from gemini_core.data.sampler import Sampler
from gemini_core.experiment import load_experiment
from gemini_core.runs.checkpoint import Checkpointer
from gemini_core.runs.rundir import RunDir
from gemini_core.runs.tracking import STEP_KEY, read_metrics
from gemini_core.train import step_fns, trainer
from sweeps import config as sweep_config
from sweeps.doremi import DoReMiConfig, train_doremi

DOMAINS = ("books", "wiki", "math", "code", "web", "multilingual")
K = len(DOMAINS)
ETA, SMOOTHING = 1.0, 0.1
MID = 16  # a checkpoint inside the run (checkpoint_every=8; the last two are kept)


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def proxy(corpus_root, data_cache):
    exp = load_experiment("experiments/mixture_sweep.py:size=tiny", [
        f"--config.proxy.data.root={corpus_root}", f"--config.proxy.data.cache_dir={data_cache}",
        "--config.proxy.tracking.wandb=false", "--config.proxy.train.log_every=1",
        "--config.proxy.train.checkpoint_every=8"],
        schema=sweep_config.SweepConfig, convert=sweep_config.from_config_dict)
    return sweep_config.proxy_config(exp.config)


def restore(run: RunDir, like, step: int | None = None):
    """The run's checkpoint at `step` (the latest when None) into `like`'s shapes."""
    ckpt = Checkpointer(run.checkpoints, keep=100, async_save=False)
    try:
        return ckpt.restore(step or ckpt.latest_step(), like)
    finally:
        ckpt.close()


def excess_K(graphdef, proxy_state, ref_state, tokens_BxT1, domain_B) -> np.ndarray:
    """Per-domain mean over rows of the per-token excess NLL, clipped at 0; 0 where absent."""
    def nll_BxT(state):
        model = nnx.merge(graphdef, state).model
        return np.asarray(model.token_nll(tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]), np.float64)

    excess_B = np.maximum(nll_BxT(proxy_state) - nll_BxT(ref_state), 0.0).mean(-1)
    return np.array([excess_B[domain_B == k].mean() if (domain_B == k).any() else 0.0
                     for k in range(K)])


def eg_update(alpha_K: np.ndarray, excess_K: np.ndarray, present_K: np.ndarray) -> np.ndarray:
    logits_K = np.log(alpha_K) + ETA * np.where(present_K, excess_K, 0.0)
    soft_K = np.exp(logits_K - logits_K.max())
    return (1 - SMOOTHING) * soft_K / soft_K.sum() + SMOOTHING / K


def test_dro_excess_and_weights_match_independent_losses(proxy, tmp_path):
    root, steps = tmp_path / "runs", proxy.train.steps
    reference = trainer.run_experiment(proxy, root, log=quiet)
    ref_run = RunDir(root, proxy.name, reference["run_id"])
    dc = DoReMiConfig(eta=ETA, smoothing=SMOOTHING)
    summary = train_doremi(proxy, ref_run, dc, root, log=quiet)
    run = RunDir(root, f"{proxy.name}_doremi", summary["run_id"])
    assert run.status()["state"] == "done"
    assert run.config()["reference_run"] == ref_run.run_id
    rows = {r[STEP_KEY]: r for r in read_metrics(run.path) if "doremi/alpha/books" in r}
    assert sorted(rows) == list(range(1, steps + 1))
    logged = {name: np.array([[rows[s][f"doremi/{name}/{d}"] for d in DOMAINS]
                              for s in range(1, steps + 1)]) for name in ("alpha", "excess")}

    # independently: the proxy at init (step 1) and at checkpoint MID (step MID + 1), each
    # against the reference's final checkpoint, on the batch the sampler gives for that step
    p = trainer.prepare(proxy, root, log=quiet)
    sampler = Sampler(p.schedule, DOMAINS, p.data.train, total_steps=steps,
                      batch_size=proxy.train.batch_size, seq_len=proxy.data.seq_len,
                      seed=proxy.seed)
    graphdef, init = step_fns.init_state(proxy.model, proxy.optimizer, steps, proxy.seed)
    ref_state = restore(ref_run, init)
    blank = {"alpha_K": np.zeros(K, np.float32), "alpha_sum_K": np.zeros(K, np.float32)}
    mid = restore(run, {"state": init, "carry": blank}, MID)
    for done, proxy_state, alpha_K in ((0, init, np.full(K, 1 / K)),
                                       (MID, mid["state"], np.asarray(mid["carry"]["alpha_K"]))):
        tokens_BxT1, domain_B = sampler.batch(done)
        want_K = excess_K(graphdef, proxy_state, ref_state, tokens_BxT1, domain_B)
        assert want_K.max() > 0.01  # a real excess: the proxy is behind the reference
        # float32 rounding apart (they agree to ~3e-7); clipping per row instead of per token
        # would be off by ~3e-3
        np.testing.assert_allclose(logged["excess"][done], want_K, rtol=1e-5, atol=1e-6)
        present_K = np.bincount(domain_B, minlength=K) > 0
        np.testing.assert_allclose(logged["alpha"][done], eg_update(alpha_K, want_K, present_K),
                                   rtol=1e-5, atol=1e-7)
    # the checkpoint holds alpha as it was logged, and its running sum
    np.testing.assert_allclose(mid["carry"]["alpha_K"], logged["alpha"][MID - 1], rtol=1e-6)
    np.testing.assert_allclose(mid["carry"]["alpha_sum_K"], logged["alpha"][:MID].sum(0),
                               rtol=1e-5)
    weights_K = np.array([summary[f"doremi/weights/{d}"] for d in DOMAINS])
    np.testing.assert_allclose(weights_K, logged["alpha"].mean(0), rtol=1e-4)
    assert abs(weights_K.sum() - 1) < 1e-5 and np.isfinite(summary["eval/mean/loss"])

    # a second call with the same inputs reuses the done run
    end = run.status()["end"]
    assert train_doremi(proxy, ref_run, dc, root, log=quiet)["run_id"] == summary["run_id"]
    assert json.loads((run.path / "status.json").read_text())["end"] == end

    # interrupted after MID: it resumes from that checkpoint (params and alpha) to the same end
    shutil.rmtree(run.checkpoints / str(steps))
    run.set_status("preempted")
    resumed = train_doremi(proxy, ref_run, dc, root, log=quiet)
    np.testing.assert_array_equal(
        [resumed[f"doremi/weights/{d}"] for d in DOMAINS], weights_K)
    again = [r for r in read_metrics(run.path) if "doremi/alpha/books" in r]
    assert [r[STEP_KEY] for r in again] == list(range(1, steps + 1))
    np.testing.assert_array_equal([again[-1][f"doremi/alpha/{d}"] for d in DOMAINS],
                                  logged["alpha"][-1])


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
