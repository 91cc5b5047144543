"""Synthetic domains declared in config (`data.synthetic`): the passkey documents, their checks,
and a run that trains on one beside a real domain."""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
from pathlib import Path

import pytest

from gemini_core.data import synthetic
from gemini_core.errors import UserError

SPEC = synthetic.SyntheticDomain(train_documents=40, valid_documents=5, min_fillers=2,
                                 max_fillers=12, seed=7)


def test_passkey_documents_hide_one_key_and_end_with_it():
    docs = list(synthetic.documents(SPEC, "train"))
    assert len(docs) == 40 and docs == list(synthetic.documents(SPEC, "train"))  # seeded
    assert docs != list(synthetic.documents(SPEC, "valid"))[:5]
    depths = []
    for doc in docs:
        key = re.search(r"The pass key is (\d{5})\. Remember it\. \1 is the pass key\.", doc)
        assert key, doc
        assert doc.startswith(synthetic.INTRO)
        assert doc.endswith(f"{synthetic.QUESTION} {key.group(1)}")
        fillers = sum(doc.count(s) for s in synthetic.FILLER)
        assert 2 <= fillers <= 12
        before = sum(doc[:key.start()].count(s) for s in synthetic.FILLER)
        depths.append(before / max(fillers, 1))
    assert min(depths) < 0.3 and max(depths) > 0.7  # needles at every depth


@pytest.mark.parametrize("section, message", [
    ({"nope": {}}, "config.data.synthetic.nope: 'nope' is not in config.data.domains"),
    ({"passkey": {"kind": "maze"}}, "config.data.synthetic.passkey.kind='maze': must be one of"),
    ({"passkey": {"min_fillers": 9, "max_fillers": 3}},
     "config.data.synthetic.passkey.min_fillers=9, max_fillers=3"),
    ({"passkey": {"train_documents": 0}},
     "config.data.synthetic.passkey.train_documents=0: must be >= 1"),
])
def test_synthetic_mistakes_name_the_key(section, message):
    from gemini_core.experiment import load_experiment

    with pytest.raises(UserError, match=re.escape(message)):
        load_experiment("experiments/quickstart.py", [
            "--config.data.domains=('web','passkey')", f"--config.data.synthetic={section!r}",
            "--config.mixture.stages.base.weights={'web':1.0}",
            "--config.mixture.stages.anneal.weights={'web':1.0}"])


def test_materialize_links_the_real_domains_beside_the_generated_one(tmp_path, corpus_root):
    from gemini_core.experiment import load_experiment

    cfg = load_experiment("experiments/quickstart.py", [
        f"--config.data.root={corpus_root}", "--config.data.domains=('web','passkey')",
        "--config.mixture.stages.base.weights={'web':1.0}",
        "--config.mixture.stages.anneal.weights={'web':1.0}"]).config
    data = dataclasses.replace(cfg.data, synthetic={"passkey": SPEC})
    root = Path(synthetic.materialize(data, tmp_path).root)
    assert (root / "web").resolve() == (corpus_root / "web").resolve()
    train = root / "passkey" / data.train_file
    with gzip.open(train, "rt") as f:
        texts = [json.loads(line)["text"] for line in f]
    assert texts == list(synthetic.documents(SPEC, "train"))
    first = train.read_bytes()
    again = Path(synthetic.materialize(data, tmp_path).root)
    assert again == root and (again / "passkey" / data.train_file).read_bytes() == first


def test_a_run_trains_on_a_synthetic_domain_beside_a_real_one(tmp_path, corpus_root, data_cache):
    from test_run import TINY

    from gemini_core.experiment import load_experiment
    from gemini_core.runs.rundir import iter_runs
    from gemini_core.train import trainer

    # declared like any domain: in data.domains, the mixture, and data.synthetic
    overrides = [*TINY, f"--config.data.root={corpus_root}",
                 f"--config.data.cache_dir={data_cache}", "--config.tracking.wandb=false",
                 "--config.data.domains=('web','passkey')",
                 "--config.data.synthetic={'passkey': {'kind': 'passkey', "
                 "'train_documents': 600, 'valid_documents': 40, 'max_fillers': 30}}",
                 "--config.mixture.stages.base.weights={'web':0.5,'passkey':0.5}",
                 "--config.mixture.stages.anneal.weights={'web':0.2,'passkey':0.8}"]
    cfg = load_experiment("experiments/quickstart.py", overrides).config
    summary = trainer.run_experiment(cfg, tmp_path / "runs", log=lambda _: None)
    assert summary["eval/passkey/loss"] > 0 and summary["eval/web/loss"] > 0
    [run] = list(iter_runs(tmp_path / "runs"))
    config = run.config()
    assert config["data"]["synthetic"]["passkey"]["max_fillers"] == 30  # in the identity
    root = Path(config["paths"]["data_root"])
    assert (root / "passkey").is_dir() and (root / "web").is_dir()
