"""Faults (gemini_core.scale.faults): rollback to in-memory snapshots, SDC checks, kill -9 and SIGTERM.

Every run here trains the same tiny model on two small domains of ../shared/corpus, so one
uninterrupted reference run (the `reference` fixture) gives the parameters every faulted run must
end with, bit for bit. Faults are injected with the documented test hooks (GX_TEST_NAN,
GX_TEST_FLIP_BIT), real signals and a real Ray actor. Runs go through the real CLI entry
(`cli.main`, in this process, or `python -m gemini_core.cli` for the runs that are killed).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gemini_core.runs import wandb_offline
from gemini_core.runs.metrics import read_metrics
from gemini_core.runs.rundir import RunDir, iter_runs
from gemini_core.scale import fault_hooks, faults, replica
from gx import cli

REPO = Path(__file__).resolve().parents[1]
STEPS = 60
TINY = [
    "--config.model.d_model=32", "--config.model.num_layers=1", "--config.model.num_heads=2",
    "--config.model.mlp_dim=64", "--config.data.seq_len=32",
    "--config.data.tokenizer.vocab_size=320", "--config.data.tokenizer.sample_chars=100000",
    "--config.data.domains=('wiki','web')",
    "--config.mixture.stages.base.weights={'wiki': 0.5, 'web': 0.5}",
    "--config.mixture.stages.anneal.weights={'wiki': 0.3, 'web': 0.7}",
    "--config.train.batch_size=4", f"--config.train.steps={STEPS}", "--config.train.log_every=1",
    "--config.train.eval_every=25", "--config.train.eval_batches=1",
    "--config.train.checkpoint_every=5", "--config.optimizer.warmup_steps=2",
    "--config.faults.snapshot_every=4", "--config.faults.sdc_check_every=6",
]
# runs that do not look at W&B skip it (a second each); their parameters are the same
NO_WANDB = "--config.tracking.wandb=false"
NO_CKPT = "--config.train.checkpoint_every=0"  # only the final checkpoint


@pytest.fixture(scope="module")
def cache_dir(data_cache):
    return data_cache


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in (fault_hooks.ENV_FLIP, fault_hooks.ENV_NAN):
        monkeypatch.delenv(var, raising=False)


def run_args(runs: Path, cache: Path, corpus: Path, *extra: str) -> list[str]:
    return ["--runs-root", str(runs), "run", str(REPO / "experiments/quickstart.py"), *TINY,
            *extra, f"--config.data.root={corpus}", f"--config.data.cache_dir={cache}"]


def gx(argv: list[str]) -> int:
    """The `gx` command in this process (its imports and compiled steps are reused)."""
    return cli.main(argv)


def resumed_from(text: str) -> int:
    found = re.findall(r"resuming \S+ from step (\d+)", text)
    return int(found[-1]) if found else 0


def only_run(runs: Path) -> RunDir:
    found = list(iter_runs(runs))
    assert len(found) == 1, found
    return found[0]


def checkpoint_steps(run: RunDir) -> list[int]:
    return sorted(int(p.name) for p in run.checkpoints.iterdir() if p.name.isdigit())


def params_at(run: RunDir, step: int | None = None) -> dict:
    step = step or max(checkpoint_steps(run))
    tree = ocp.StandardCheckpointer().restore((run.checkpoints / str(step) / "default").absolute())
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def losses(run: RunDir) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run.path) if "train/loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir, corpus_root):
    """The uninterrupted run: final parameters and per-step losses."""
    runs = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        assert gx(run_args(runs, cache_dir, corpus_root, NO_WANDB)) == 0
    run = only_run(runs)
    assert run.summary()["faults/sdc_checks"] == STEPS // 6
    return {"params": params_at(run), "losses": losses(run)}


def test_faults_settings_are_checked_at_the_config_boundary(tmp_path, capsys):
    for override, message in [
            ("--config.faults.snapshot_every=-1", "config.faults.snapshot_every=-1: must be >= 0"),
            ("--config.faults.sdc_max_mismatches=0",
             "config.faults.sdc_max_mismatches=0: must be > 0"),
            ("--config.faults.snapshots=3", "config.faults.snapshots: unknown key")]:
        assert gx(run_args(tmp_path, tmp_path, tmp_path, override)) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing read or written


# ---------------------------------------------------------------------------------------------
# rollback to an in-memory snapshot


def test_transient_nan_rolls_back_and_ends_bit_identical(tmp_path, cache_dir, corpus_root,
                                                        reference, monkeypatch, capsys):
    monkeypatch.setenv(fault_hooks.ENV_NAN, "27")  # the state goes NaN before step 27, once
    assert gx(run_args(tmp_path, cache_dir, corpus_root, NO_WANDB)) == 0
    run = only_run(tmp_path)
    out = capsys.readouterr().out
    assert "non-finite loss at step 27: rolled back to the in-memory snapshot of step 24" in out
    events = faults.read_events(run.path)
    assert [(e["event"], e["step"], e["to_step"]) for e in events] == [("rollback", 27, 24)]
    assert run.summary()["faults/rollbacks"] == 1
    # the replay recomputed steps 25..27 exactly: one row per step, the reference's values
    assert losses(run) == reference["losses"]
    assert [r["step"] for r in read_metrics(run.path)] == list(range(1, STEPS + 1))
    assert_same_params(params_at(run), reference["params"])


def test_deterministic_nan_stops_the_run_instead_of_looping(tmp_path, cache_dir, corpus_root,
                                                            monkeypatch, capsys):
    monkeypatch.setenv(fault_hooks.ENV_NAN, "27:always")  # comes back on every replay: bad data
    assert gx(run_args(tmp_path, cache_dir, corpus_root, NO_WANDB)) == 1
    err = capsys.readouterr().err
    assert "non-finite loss (nan) at step 27 again after rolling back to step 24" in err
    assert "recurs deterministically" in err and "Traceback" not in err
    run = only_run(tmp_path)
    st = run.status()
    assert st["state"] == "failed" and "recurs deterministically" in st["error"]
    assert [e["event"] for e in faults.read_events(run.path)] == ["rollback"]  # once, not more
    # nothing after the bad step reached disk; what did is finite
    assert checkpoint_steps(run)[-1] == 25
    assert all(np.isfinite(v).all() for v in params_at(run).values()
               if np.issubdtype(v.dtype, np.floating))


# ---------------------------------------------------------------------------------------------
# silent data corruption


def test_bit_flip_is_caught_by_the_sdc_check_and_the_step_redone(tmp_path, cache_dir, corpus_root,
                                                                 reference, monkeypatch, capsys):
    monkeypatch.setenv(fault_hooks.ENV_FLIP, "12")  # step 12 is checked (sdc_check_every=6)
    assert gx(run_args(tmp_path, cache_dir, corpus_root, NO_WANDB, NO_CKPT)) == 0
    run = only_run(tmp_path)
    out = capsys.readouterr().out
    assert "SDC check at step 12" in out and "cpu:0" in out and "redoing the step" in out
    (event,) = faults.read_events(run.path)
    assert event["event"] == "sdc_mismatch" and event["step"] == 12
    assert event["devices"] == ["cpu:0"] and len(event["leaves"]) == 1
    assert run.summary()["faults/sdc_mismatches"] == 1
    assert_same_params(params_at(run), reference["params"])


def test_bit_flip_on_an_unchecked_step_goes_unnoticed(tmp_path, cache_dir, corpus_root,
                                                      reference, monkeypatch):
    # the control: the same flip one step later, where no check runs, corrupts the run silently
    monkeypatch.setenv(fault_hooks.ENV_FLIP, "13")
    assert gx(run_args(tmp_path, cache_dir, corpus_root, NO_WANDB, NO_CKPT)) == 0
    run = only_run(tmp_path)
    assert faults.read_events(run.path) == []
    got = params_at(run)
    assert any(not np.array_equal(got[k], reference["params"][k]) for k in got)


def test_repeated_mismatches_stop_the_run(tmp_path, cache_dir, corpus_root, monkeypatch, capsys):
    monkeypatch.setenv(fault_hooks.ENV_FLIP, "12:always")
    assert gx(run_args(tmp_path, cache_dir, corpus_root, NO_WANDB, NO_CKPT)) == 1
    err = capsys.readouterr().err
    assert "silent data corruption: 3 recomputed steps disagreed" in err
    assert "step 12 on device(s) cpu:0" in err and "Traceback" not in err
    run = only_run(tmp_path)
    assert run.status()["state"] == "failed"
    assert [e["mismatches"] for e in faults.read_events(run.path)] == [1, 2, 3]


# ---------------------------------------------------------------------------------------------
# preemption


def _when_step(run_glob: Path, step: int, action) -> threading.Thread:
    def watch():
        deadline = time.time() + 120
        while time.time() < deadline:
            rows = [r for p in run_glob.parent.glob(run_glob.name) for r in read_metrics(p)]
            if rows and rows[-1]["step"] >= step:
                action()
                return
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_sigterm_checkpoints_marks_preempted_and_resumes(tmp_path, cache_dir, corpus_root,
                                                        reference, capsys):
    runs = tmp_path / "runs"
    handler = signal.getsignal(signal.SIGTERM)
    # SIGTERM to this very process once step 17 is logged, while `gx run` trains in it
    watcher = _when_step(runs / "quickstart" / "*", 17,
                         lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert gx(run_args(runs, cache_dir, corpus_root, NO_WANDB)) == 143
    watcher.join()
    assert signal.getsignal(signal.SIGTERM) is handler  # ours is gone again
    err = capsys.readouterr().err
    run = only_run(runs)
    stopped = checkpoint_steps(run)[-1]
    assert f"preempted (SIGTERM): stopped after step {stopped}, checkpoint" in err
    assert stopped >= 17  # the step it was on (checkpoint_every=5 has its own too)
    st = run.status()
    assert st["state"] == "preempted" and "end" in st and "error" not in st
    assert read_metrics(run.path)[-1]["step"] == stopped  # the row of its last step is there
    assert gx(["--runs-root", str(runs), "ls"]) == 0
    assert "preempted" in capsys.readouterr().out

    assert gx(run_args(runs, cache_dir, corpus_root, NO_WANDB)) == 0  # the same command resumes
    assert resumed_from(capsys.readouterr().out) == stopped
    assert run.status()["state"] == "done"
    assert losses(run) == reference["losses"]
    assert_same_params(params_at(run), reference["params"])


# ---------------------------------------------------------------------------------------------
# kill -9


def _rows_whole_and_increasing(run: RunDir) -> int:
    lines = run.metrics_path.read_bytes().split(b"\n")
    assert lines[-1] == b""  # ends with a newline: no torn last row
    steps = [json.loads(line)["step"] for line in lines[:-1]]
    assert steps == sorted(set(steps)), steps  # no duplicate, no step twice
    return steps[-1] if steps else 0


def _checkpoints_sound(run: RunDir, allow_tmp: bool) -> None:
    for p in run.checkpoints.iterdir():
        if p.name.isdigit():  # what orbax would pick up: finalized, whole
            assert (p / "_CHECKPOINT_METADATA").is_file()
            assert (p / "default" / "_METADATA").is_file()
        else:  # a save the kill cut short: never a step, removed at the next start
            assert allow_tmp and ".orbax-checkpoint-tmp" in p.name, p.name


def test_kill_9_at_random_steps_then_resume_is_bit_identical(tmp_path, cache_dir, corpus_root,
                                                             reference, capsys):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "gx", *run_args(runs, cache_dir, corpus_root)]
    rng = random.Random(os.environ.get("GX_TEST_SEED", "faults"))
    killed_at, starts = [], []
    for i in range(5):
        target = (killed_at[-1] if killed_at else 0) + rng.randint(2, 7)
        log = tmp_path / f"attempt-{i}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, "WANDB_MODE": "offline"})
        deadline = time.time() + 180
        # rows past the previous kill can only come from this process
        while time.time() < deadline and proc.poll() is None:
            rows = [r for p in runs.glob("quickstart/*") for r in read_metrics(p)]
            if rows and rows[-1]["step"] >= target:
                break
            time.sleep(0.005)
        assert proc.poll() is None, f"attempt {i} ended before step {target}: {log.read_text()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        run = only_run(runs)
        st = json.loads((run.path / "status.json").read_text())  # parseable
        assert st["state"] == "running" and st["pid"] == proc.pid  # what it was doing
        assert run.shown_state() == "interrupted"  # and `gx ls` knows it is gone
        if i == 0:
            assert gx(["--runs-root", str(runs), "ls"]) == 0
            assert "interrupted" in capsys.readouterr().out
        killed_at.append(_rows_whole_and_increasing(run))
        _checkpoints_sound(run, allow_tmp=True)
        starts.append(resumed_from(log.read_text()))

    assert gx(run_args(runs, cache_dir, corpus_root)) == 0  # the same command, to the end
    starts.append(resumed_from(capsys.readouterr().out))
    # each attempt resumed from the last checkpoint before the previous kill: steps between
    # checkpoints were computed again
    assert starts[0] == 0 and all(s <= k for s, k in zip(starts[1:], killed_at))
    assert any(s < k for s, k in zip(starts[1:], killed_at))
    run = only_run(runs)
    assert run.status()["state"] == "done"
    _checkpoints_sound(run, allow_tmp=False)
    assert _rows_whole_and_increasing(run) == STEPS
    assert [r["step"] for r in read_metrics(run.path)] == list(range(1, STEPS + 1))
    assert losses(run) == reference["losses"]
    assert_same_params(params_at(run), reference["params"])

    # one W&B run, continued by every attempt: each opened a session with the run's id. A killed
    # session keeps only what wandb-core flushed (every 15 s by default: these flushed nothing),
    # so each resumed session restates metrics.jsonl through its resume step, and the last one
    # alone holds the whole history, exact
    sessions = list((run.path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(sessions) == 6 and all(p.name == f"run-{run.run_id}.wandb" for p in sessions)
    # read back with wandb's own reader (wandb_offline.read_offline_run's pieces), the last session
    # only: each read is a process start
    last = wandb_offline.Session(wandb_offline.inspect_records(
        max(sessions, key=lambda p: p.parent.name)))
    assert last.meta["run_id"] == run.run_id and last.exit_code == 0
    history = {h["step"]: h["train/loss"] for h in last.history if "train/loss" in h}
    assert sorted(history) == list(range(1, STEPS + 1))
    assert all(reference["losses"][k] == v for k, v in history.items())


# ---------------------------------------------------------------------------------------------
# the Ray replica


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # ray.init starts its daemons
def test_ray_replica_restores_a_restarted_trainer(tmp_path, cache_dir, corpus_root, reference,
                                                  monkeypatch, capsys):
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    temp = Path("/tmp") / f"gx-ray-faults-{os.getpid()}"  # short: Ray's socket paths live in it
    if ray.is_initialized():  # e.g. Ray Data of an earlier test in this process
        ray.shutdown()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _temp_dir=str(temp))
    try:
        # the first trainer dies at step 30 (a NaN that recurs) with checkpoints only every 25
        # steps; the replica actor (its own process) holds the newest good snapshot, step 28
        args = run_args(tmp_path, cache_dir, corpus_root, NO_WANDB,
                        "--config.train.checkpoint_every=25")
        monkeypatch.setenv(fault_hooks.ENV_NAN, "30:always")
        assert gx(args) == 1
        run = only_run(tmp_path)
        assert checkpoint_steps(run) == [25]
        fp = run.config()["fingerprint"]
        assert replica.replica_step(run.run_id, run.path, fp) == 28
        (holder,) = replica.replica_holders(ray)  # one node: one holder, on it
        assert ray.get(holder.node.remote()) == ray.get_runtime_context().get_node_id()

        monkeypatch.delenv(fault_hooks.ENV_NAN)
        capsys.readouterr()
        assert gx(args) == 0  # the restarted trainer resumes from memory, not from step 25
        out = capsys.readouterr().out
        assert "resuming from the in-memory replica at step 28" in out
        assert [e["step"] for e in faults.read_events(run.path)
                if e["event"] == "replica_restore"] == [28]
        assert losses(run) == reference["losses"]
        assert_same_params(params_at(run), reference["params"])
        assert replica.replica_step(run.run_id, run.path, fp) is None  # a done run lets its replica go
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
