"""Tracking: metrics.jsonl and a real offline W&B run, read back from disk (no mocks).

Every test runs with HOME (and the XDG folders) pointed at an empty directory and the current
directory in another: both must stay empty, whatever W&B does. A fake WANDB_API_KEY is set so
we can check that it lands in no file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gemini_core.config import TrackingConfig
from gemini_core.runs.metrics import read_metrics, truncate_metrics
from gemini_core.runs.tracking import Tracker
from gemini_core.runs.wandb_offline import read_offline_run

FAKE_KEY = "fakekey-0123456789abcdef0123456789abcdef01234567"
RUN_ID = "mix-1a2b3c4d"
CONFIG = {"name": "mix", "model": {"d_model": 32, "num_layers": 1},
          "data": {"domains": ["web", "code"]}, "seed": 0}
DOMAINS = ("web", "code")


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An empty HOME and cwd, a fake API key, and no W&B settings of the machine's user."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME"):
        monkeypatch.delenv(var, raising=False)
    for var in [v for v in os.environ if v.startswith("WANDB_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.chdir(cwd)
    yield tmp_path
    assert not list(home.rglob("*")), "something was written under HOME"
    assert not list(cwd.rglob("*")), "something was written in the current directory"
    assert not any(v in os.environ for v in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR",
                                             "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"))
    assert_no_secret(tmp_path)


def assert_no_secret(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert FAKE_KEY.encode() not in path.read_bytes(), f"API key written to {path}"


def step_metrics(step: int, shift: float = 0.0) -> dict[str, float]:
    """Train metrics and mixture weights; values distinct per step (and per session via shift)."""
    out = {"train/loss": 5.0 / step + shift, "train/lr": 1e-3 * step,
           "perf/tokens_per_sec": 1000.0 + step}
    out.update({f"mixture/{d}": w for d, w in zip(DOMAINS, (0.75, 0.25))})
    if step % 3 == 0:  # a non-finite value must survive both stores
        out["train/grad_norm"] = float("inf")
    return out


def eval_metrics(step: int, shift: float = 0.0) -> dict[str, float]:
    out = {}
    for i, d in enumerate(DOMAINS):
        out[f"eval/{d}/loss"] = 3.0 / step + i + shift
        out[f"eval/{d}/bpb"] = 1.5 / step + i + shift
    return out


def final_summary(step: int, shift: float = 0.0) -> dict[str, float]:
    # not the values of the last logged row: W&B committing that row after the summary would
    # overwrite it, and the test would not see it if they were equal
    return eval_metrics(step, shift + 0.5)


def run_session(run_dir: Path, steps, *, eval_at, shift=0.0, resume_step=None, wandb=True,
                lines=None) -> dict[int, dict]:
    """One Tracker, used the way the trainer does: train metrics, then eval at the same step."""
    expected: dict[int, dict] = {}
    tracker = Tracker(run_dir, run_id=RUN_ID, group="mix", config=CONFIG,
                      tracking=TrackingConfig(wandb=wandb, tags=("test", "tiny")),
                      resume_step=resume_step, log=(lines if lines is not None else []).append)
    for s in steps:
        expected[s] = step_metrics(s, shift)
        tracker.log(s, expected[s])
        if s in eval_at:
            tracker.log(s, eval_metrics(s, shift))
            expected[s] = {**expected[s], **eval_metrics(s, shift)}
    tracker.summary(final_summary(steps[-1], shift))
    tracker.finish()
    return expected


def rows_by_step(rows: list[dict]) -> dict[int, dict]:
    out = {}
    for row in rows:
        assert row["step"] not in out, f"step {row['step']} appears twice"
        out[row["step"]] = {k: v for k, v in row.items() if k != "step"}
    return out


def test_offline_wandb_round_trip(env):
    run_dir = env / "runs" / "mix" / RUN_ID
    lines: list[str] = []
    expected = run_session(run_dir, [2, 4, 6], eval_at={4, 6}, lines=lines)

    # metrics.jsonl: one line per step, the logged values exactly
    text = (run_dir / "metrics.jsonl").read_text()
    assert len(text.splitlines()) == 3
    assert rows_by_step([json.loads(line) for line in text.splitlines()]) == expected

    got = read_offline_run(run_dir)
    assert rows_by_step(got["history"]) == expected
    assert got["id"] == RUN_ID and got["name"] == RUN_ID and got["group"] == "mix"
    assert got["project"] == "gemini-core" and got["job_type"] == "train"
    assert got["tags"] == ["test", "tiny"]
    assert got["config"] == CONFIG
    assert {k: got["summary"][k] for k in final_summary(6)} == final_summary(6)
    assert got["exit_code"] == 0 and got["sessions"] == 1

    # our one line: where the files are and how to upload them
    assert len(lines) == 1 and "wandb sync" in lines[0] and str(run_dir / "wandb") in lines[0]
    assert list((run_dir / "wandb").glob(f"offline-run-*-{RUN_ID}/run-{RUN_ID}.wandb"))


def test_resume_truncates_and_continues_the_same_wandb_run(env):
    run_dir = env / "runs" / "mix" / RUN_ID
    # first attempt: logged through step 6, then "killed" mid-write of step 7
    first = run_session(run_dir, [1, 2, 3, 4, 5, 6], eval_at={3, 6}, shift=100.0)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step":7,"train/lo')
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]  # torn line ignored

    # resumed from the checkpoint at step 4: steps 5 and 6 are logged again, with new values
    lines: list[str] = []
    second = run_session(run_dir, [5, 6, 7, 8], eval_at={8}, resume_step=4, lines=lines)
    assert any("dropped 3 row(s) after step 4" in line for line in lines)
    expected = {**{s: first[s] for s in (1, 2, 3, 4)}, **second}

    text = (run_dir / "metrics.jsonl").read_text()
    assert text.endswith("\n")
    assert rows_by_step([json.loads(line) for line in text.splitlines()]) == expected

    sessions = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(sessions) == 2 and all((p / f"run-{RUN_ID}.wandb").exists() for p in sessions)
    got = read_offline_run(run_dir)
    assert got["sessions"] == 2 and got["id"] == RUN_ID
    assert rows_by_step(got["history"]) == expected
    assert {k: got["summary"][k] for k in final_summary(8)} == final_summary(8)


def test_no_wandb_writes_only_metrics(env):
    run_dir = env / "run"
    expected = run_session(run_dir, [1, 2], eval_at={2}, wandb=False)
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]
    assert rows_by_step(read_metrics(run_dir)) == expected


def test_wandb_mode_disabled_is_respected(env, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run_dir = env / "run"
    run_session(run_dir, [1], eval_at=set())
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]


def test_offline_wandb_failure_is_not_fatal(env):
    run_dir = env / "run"
    run_dir.mkdir()
    (run_dir / "wandb").write_text("a file where W&B wants its folder")
    lines: list[str] = []
    expected = run_session(run_dir, [1, 2], eval_at={2}, lines=lines)
    assert rows_by_step(read_metrics(run_dir)) == expected
    assert any(line.startswith("warning: W&B offline run could not start") for line in lines)


def test_truncate_metrics_keeps_whole_rows_up_to_the_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step":1,"a":1.0}\n{"step":2,"a":2.0}\n{"step":3,"a":3.0}\n{"step":4,"a"')
    assert truncate_metrics(tmp_path, 2) == 2
    assert path.read_text() == '{"step":1,"a":1.0}\n{"step":2,"a":2.0}\n'
    assert truncate_metrics(tmp_path, 2) == 0
    assert truncate_metrics(tmp_path / "missing", 2) == 0


def test_steps_must_increase_and_values_be_numbers(tmp_path):
    tracker = Tracker(tmp_path, run_id=RUN_ID, group="mix", config={},
                      tracking=TrackingConfig(wandb=False), log=lambda line: None)
    tracker.log(3, {"train/loss": 1.0})
    tracker.log(3, {"eval/web/loss": 2.0})  # same step, another call: merged
    with pytest.raises(ValueError, match="step 2 logged after step 3"):
        tracker.log(2, {"train/loss": 1.0})
    with pytest.raises(TypeError, match="metric train/loss at step 4"):
        tracker.log(4, {"train/loss": "high"})
    with pytest.raises(ValueError, match="'step'"):
        tracker.log(4, {"step": 1.0})
    tracker.log(4, {"train/loss": 0.5})
    tracker.finish()
    assert read_metrics(tmp_path) == [{"step": 3, "train/loss": 1.0, "eval/web/loss": 2.0},
                                      {"step": 4, "train/loss": 0.5}]
    # a Tracker starting again (no resume step) begins a fresh history
    Tracker(tmp_path, run_id=RUN_ID, group="mix", config={},
            tracking=TrackingConfig(wandb=False), log=lambda line: None).finish()
    assert read_metrics(tmp_path) == []
