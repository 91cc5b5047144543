"""A stage of its own sequence length (a long-context stage) in the mixture schedule: the
sampler's batches, the config's checks, and a run that trains across the change of length,
with RoPE scaled from that stage on, resumed from a checkpoint before it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from gemini_core.data.mixture import MixtureSchedule, Stage
from gemini_core.data.sampler import Sampler
from gemini_core.errors import UserError

DOMAINS = ("web", "code")


def _tokens(n: int = 20_000) -> dict[str, np.ndarray]:
    # each domain its own arithmetic stream: a window's tokens say where it was cut
    return {"web": np.arange(n, dtype=np.int64) % 30_000,
            "code": (np.arange(n, dtype=np.int64) + 50_000) % 90_000}


def _schedule(long_len: int | None) -> MixtureSchedule:
    return MixtureSchedule((Stage(0.0, {"web": 0.5, "code": 0.5}),
                            Stage(0.75, {"web": 0.25, "code": 0.75}, long_len)))


def _sampler(long_len: int | None) -> Sampler:
    return Sampler(_schedule(long_len), DOMAINS, _tokens(), total_steps=40, batch_size=8,
                   seq_len=32, seed=3)


def test_a_long_stage_keeps_the_tokens_per_step_in_fewer_longer_rows():
    s = _sampler(128)
    for step in range(40):
        tokens_BxW, domain_B = s.batch(step)
        rows, length = (8, 32) if step < 30 else (2, 128)
        assert tokens_BxW.shape == (rows, length + 1) and s.shape(step) == (rows, length)
        assert len(domain_B) == rows == s.counts(step).sum()
        # every row is a contiguous window of its domain
        for row, d in zip(tokens_BxW, domain_B):
            stream = _tokens()[DOMAINS[d]]
            start = int(np.flatnonzero(stream == row[0])[0])
            np.testing.assert_array_equal(row, stream[start:start + length + 1])
    # the long stage's 10 steps x 2 rows follow its weights: 5 web rows, 15 code rows
    counts = sum(s.counts(step) for step in range(30, 40))
    assert counts.tolist() == [5, 15]


def test_the_base_stages_stream_is_the_one_without_the_long_stage():
    long, plain = _sampler(128), _sampler(None)
    for step in range(30):
        np.testing.assert_array_equal(long.batch(step)[0], plain.batch(step)[0])
    # and the long stage draws its own windows: none of them is a base-length window
    assert long.drawn_before(40, 129).tolist() == [5, 15]
    assert long.drawn_before(40, 33).tolist() == plain.drawn_before(30).tolist()
    # realized epochs count each length against its own windows
    epochs = long.epochs()
    windows = {w: (20_000 - w + 1) // w for w in (33, 129)}
    assert epochs["code"] == pytest.approx(plain.drawn_before(30)[1] / windows[33]
                                           + 15 / windows[129])


def test_a_stage_length_that_does_not_divide_the_step_is_refused():
    with pytest.raises(UserError, match=r"schedule.stages\[1\].seq_len=96: must divide the 256 "
                                        r"tokens of a step"):
        Sampler(_schedule(96), DOMAINS, _tokens(), total_steps=40, batch_size=8, seq_len=32,
                seed=0)
    # the schedule's JSON carries seq_len only where a stage sets one
    assert "seq_len" not in json.dumps(_schedule(None).to_dict())
    again = MixtureSchedule.from_dict(_schedule(128).to_dict())
    assert again == _schedule(128) and again.to_dict()["stages"][1]["seq_len"] == 128


def test_stage_seq_len_in_a_config_is_checked_with_its_key_path():
    from gemini_core.experiment import load_experiment

    with pytest.raises(UserError, match=r"config.mixture.stages.anneal.seq_len=100: must divide "
                                        r"the 4,096 tokens of a step"):
        load_experiment("experiments/quickstart.py",
                        ["--config.mixture.stages.anneal.seq_len=100"])


def test_rope_scaling_applies_from_the_first_long_stage_on():
    from gemini_core.config import ModelConfig, RopeScaling
    from gemini_core.train.context_stages import stage_models

    yarn = RopeScaling(method="yarn", factor=4.0, original_length=32)
    model = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=2, rope=yarn)
    three = MixtureSchedule((Stage(0.0, {"web": 1.0}), Stage(0.5, {"web": 1.0}),
                             Stage(0.8, {"web": 1.0}, 128)))
    assert [m.rope.method for m in stage_models(model, three, 32)] == ["none", "none", "yarn"]
    # no longer stage: the declared scaling throughout (a run already at its long context)
    assert [m.rope for m in stage_models(model, _schedule(None), 32)] == [yarn, yarn]


# the run: 24 steps of 4 x 32 tokens, the last stage (from step 21) 1 x 128 tokens with YaRN
LONG_STAGE = ["--config.mixture.stages.anneal.seq_len=128",
              "--config.model.rope.method=yarn", "--config.model.rope.factor=4",
              "--config.model.rope.original_length=32", "--config.data.document_mask=True",
              "--config.tracking.wandb=false"]


def _run(runs: Path, corpus_root: Path, data_cache: Path) -> dict:
    from test_run import TINY

    from gemini_core.experiment import load_experiment
    from gemini_core.train import trainer

    overrides = [*TINY, *LONG_STAGE, f"--config.data.root={corpus_root}",
                 f"--config.data.cache_dir={data_cache}", "--config.train.checkpoint_every=6"]
    cfg = load_experiment("experiments/quickstart.py", overrides).config
    lines: list[str] = []
    summary = trainer.run_experiment(cfg, runs, log=lines.append)
    return {"summary": summary, "log": "\n".join(lines)}


def _params(run_dir: Path, step: int) -> list[np.ndarray]:
    import jax

    from gemini_core.config import OptimizerConfig, model_from_json
    from gemini_core.runs.checkpoint import Checkpointer
    from gemini_core.runs.rundir import read_json
    from gemini_core.train import step_fns

    cfg = read_json(run_dir / "config.json")
    _, like = step_fns.init_state(model_from_json(cfg["model"]),
                                  OptimizerConfig(**cfg["optimizer"]), cfg["train"]["steps"],
                                  cfg["seed"])
    ckpt = Checkpointer(run_dir / "checkpoints", keep=5, async_save=False)
    try:
        return [np.asarray(x) for x in jax.tree.leaves(ckpt.restore(step, like))]
    finally:
        ckpt.close()


def test_a_run_trains_across_the_change_of_length_and_resumes_across_it(
        tmp_path, corpus_root, data_cache):
    from gemini_core.runs.metrics import read_metrics
    from gemini_core.runs.rundir import iter_runs

    straight = _run(tmp_path / "straight", corpus_root, data_cache)
    [run] = list(iter_runs(tmp_path / "straight"))
    config = json.loads((run.path / "config.json").read_text())
    assert config["mixture"]["stages"][1]["seq_len"] == 128
    rows = {r["step"]: r for r in read_metrics(run.path) if "train/loss" in r}
    assert sorted(rows) == [4, 8, 12, 16, 20, 24]
    assert all(np.isfinite(r["train/loss"]) for r in rows.values())
    assert straight["summary"]["tokens"] == 24 * 4 * 32
    assert "step 1: stage 1, 4 x 32 tokens per step, RoPE unscaled" in straight["log"]
    assert "step 21: stage 2, 1 x 128 tokens per step, RoPE yarn x4" in straight["log"]

    # a run interrupted after its step-18 checkpoint (before the long stage at step 21): its
    # later checkpoints never written; the same command resumes it across the change
    copy = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", copy, symlinks=True)
    [interrupted] = list(iter_runs(copy))
    for ckpt in interrupted.checkpoints.iterdir():
        if ckpt.name.isdigit() and int(ckpt.name) > 18:
            shutil.rmtree(ckpt)
    interrupted.set_status("running")
    resumed = _run(copy, corpus_root, data_cache)
    assert "resuming" in resumed["log"] and "from step 18" in resumed["log"], resumed["log"]
    assert "step 19: stage 1, 4 x 32 tokens per step" in resumed["log"]
    assert "step 21: stage 2, 1 x 128 tokens per step, RoPE yarn x4" in resumed["log"]
    for got, want in zip(_params(interrupted.path, 24), _params(run.path, 24)):
        np.testing.assert_array_equal(got, want)
    assert resumed["summary"]["eval/mean/loss"] == straight["summary"]["eval/mean/loss"]


def test_pretrain_declares_a_long_context_stage():
    from gemini_core.experiment import load_experiment
    from gemini_core.train.trainer import declared_schedule

    cfg = load_experiment("experiments/pretrain.py:size=nano,d=256,long=4", []).config
    schedule = declared_schedule(cfg)
    assert schedule.seq_lens(cfg.data.seq_len) == [256, 1024]
    assert schedule.batch_sizes(cfg.train.batch_size, cfg.data.seq_len) == [16, 4]
    assert "passkey" in cfg.data.domains and cfg.data.synthetic["passkey"].kind == "passkey"
    assert cfg.model.rope.method == "yarn" and cfg.model.rope.factor == 4
    assert cfg.model.rope.original_length == 256 and cfg.data.document_mask
    plain = load_experiment("experiments/pretrain.py:size=nano,d=256", []).config
    assert "passkey" not in plain.data.domains and plain.model.rope.method == "none"
