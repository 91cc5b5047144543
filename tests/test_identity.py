"""Run identity is a contract: the same config gives the same fingerprint across refactors, so
moving modules cannot silently invalidate every cached run (DESIGN.md, "Identity")."""

from pathlib import Path

from gemini_core.experiment import load_experiment
from gemini_core.runs.rundir import fingerprint, run_id
from gemini_core.train import trainer

# sha256 of the quickstart's identity with the manifest hash "0"*64, taken before the package
# restructure; change it only together with a note that every cached run gets a new id
REPO = Path(__file__).resolve().parents[1]
QUICKSTART = "6ed269f41d5cb1ec53b41e7641e43a54376734d180beba03739129d014c31e5d"


def _quickstart_identity(*overrides: str) -> dict:
    cfg = load_experiment(str(REPO / "experiments/quickstart.py"),
                          ["--config.data.root=../shared/corpus", *overrides]).config
    schedule = trainer.declared_schedule(cfg).validate(cfg.data.domains)
    ident = trainer.identity(cfg, schedule, "0" * 64)
    ident.pop("distill")  # as trainer.prepare does for a run without a teacher
    return ident


def test_quickstart_fingerprint_is_pinned():
    fp = fingerprint(_quickstart_identity())
    assert fp == QUICKSTART
    assert run_id("quickstart", fp) == "quickstart-6ed269f4"


def test_where_and_how_a_run_runs_is_not_its_identity():
    placement = _quickstart_identity("--config.data.root=/elsewhere", "--config.mesh.preset=fsdp",
                                     "--config.faults.snapshot_every=7")
    assert fingerprint(placement) == QUICKSTART
    # the kernel and remat policy compute the same losses from the same checkpoints
    execution = _quickstart_identity("--config.model.attention=blockwise",
                                     "--config.model.remat=full")
    assert fingerprint(execution) == QUICKSTART


def test_what_a_run_computes_is_its_identity():
    assert fingerprint(_quickstart_identity("--config.seed=1")) != QUICKSTART
    assert fingerprint(_quickstart_identity("--config.optimizer.lr=0.001")) != QUICKSTART
    # fields added later count once they leave the default that reproduces the older runs
    assert fingerprint(_quickstart_identity("--config.data.document_mask=True")) != QUICKSTART
    # the same losses, but stacked weights in its checkpoints
    assert fingerprint(_quickstart_identity("--config.model.scan_layers=True")) != QUICKSTART
    assert fingerprint(_quickstart_identity("--config.model.rope.method=linear",
                                            "--config.model.rope.factor=2.0")) != QUICKSTART
