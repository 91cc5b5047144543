"""`gx data prepare` end to end on a small slice of the real corpus with planted problems:
duplicates, a near-duplicate, PII, blocklisted text, bad records; determinism across worker
counts; the cleaned output trains a tiny model through `gx run`."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gemini_core.data.curation import config as curation_config
from gemini_core.data.curation import pipeline
from gemini_core.errors import UserError
from gemini_core.experiment import load_experiment

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ("books", "wiki", "math", "code", "web", "multilingual")
DOCS = 30  # per domain and split: enough for the classifier and a tiny training run


def read_docs(path: Path, n: int) -> list[dict]:
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line))
            if len(out) == n:
                break
    return out


def write_jsonl_gz(path: Path, records: list[dict], tail: bytes = b"") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode() + tail
    path.write_bytes(gzip.compress(data, mtime=0))


PII_TEXT = (
    "The community garden on Elm Street opens again this spring, and every neighbour who wants "
    "a plot is welcome to join us. Last year we grew tomatoes, beans, squash and a great many "
    "herbs, and the harvest festival in September brought more than two hundred visitors. "
    "This year the committee would like to add a small orchard and a shaded bench for the "
    "older members, so we are looking for volunteers who can help with planting in April.\n"
    "If you would like a plot, write to jane.doe@example.org before the end of March, or call "
    "the office at (555) 123-4567 on weekday mornings. The sign-up sheet is also hosted on our "
    "small server at 192.168.10.20, which any computer in the library can reach. Please bring "
    "your own gloves to the first meeting; tools, seeds and compost are provided by the city.\n"
    "Our thanks go to the volunteers who kept the paths clear all winter, to the bakery that "
    "donated bread for the festival, and to the school whose pupils painted the new signs.")


def planted_corpus(root: Path, corpus: Path) -> dict:
    """Real documents per domain, plus problems planted in web."""
    planted = {}
    for domain in DOMAINS:
        for split in ("train", "valid"):
            docs = read_docs(corpus / domain / f"{split}.jsonl.gz", DOCS if split == "train"
                             else 8)
            if domain == "web" and split == "train":
                original = docs[0]["text"]
                words = original.split()
                words[10:13] = ["quite", "different", "words"]  # a near-duplicate
                docs += [{"text": "  " + original.upper() + "\n"},  # same up to case, spacing
                         {"text": original},  # an exact duplicate of docs[0]
                         {"text": " ".join(words)},
                         {"text": PII_TEXT}]
                planted["near"] = " ".join(words)
            write_jsonl_gz(root / domain / f"{split}.jsonl.gz", docs)
    blocklist = root / "_filters" / "ldnoobw"
    blocklist.mkdir(parents=True)
    for lang in ("en", "de"):
        src = corpus / "_filters" / "ldnoobw" / f"{lang}.txt"
        (blocklist / f"{lang}.txt").write_bytes(src.read_bytes())
    return planted


@pytest.fixture(scope="module")
def raw(tmp_path_factory, corpus_root) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("raw")
    return root, planted_corpus(root, corpus_root)


def load(root: Path, *overrides: str):
    return load_experiment(str(REPO / "experiments" / "data_prep.py"),
                           [f"--config.data.root={root}", *overrides],
                           schema=curation_config.CurationConfig,
                           convert=curation_config.from_config_dict).config


def output_records(out: Path, domain: str, split: str = "train") -> list[dict]:
    with gzip.open(out / domain / f"{split}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory) -> tuple[Path, Path]:
    root, _ = raw
    runs = tmp_path_factory.mktemp("runs")
    out = pipeline.prepare(load(root, "--config.output.examples=2"), runs, workers=2,
                           log=lambda _: None)
    return out, runs


def test_prepare_removes_duplicates_masks_pii_and_reports(prepared, raw):
    out, _ = prepared
    _, planted = raw
    report = json.loads((out / "report.json").read_text())
    web = report["domains"]["web"]
    assert web["removed"]["dedup/exact"]["docs"] >= 1
    assert web["removed"]["dedup/near"]["docs"] >= 1
    texts = [r["text"] for r in output_records(out, "web")]
    assert planted["near"] not in texts
    masked = [r for r in output_records(out, "web") if "community garden" in r["text"]]
    assert masked and "jane.doe@example.org" not in masked[0]["text"]
    assert masked[0]["pii"] == {"email": 1, "phone": 1, "ip": 1}, masked[0]["pii"]
    assert "(555) 123-4567" not in masked[0]["text"] and "192.168.10.20" not in masked[0]["text"]
    for domain in DOMAINS:
        d = report["domains"][domain]
        assert d["docs_in"] == DOCS + 8 + (4 if domain == "web" else 0)
        assert 0 < d["docs_out"] <= d["docs_in"]
        assert d["output"]["valid"]["docs"] > 0
        for split in ("train", "valid"):  # the report's counts are what was written
            records = output_records(out, domain, split)
            assert d["output"][split]["docs"] == len(records)
            assert d["output"][split]["bytes"] == sum(len(r["text"].encode()) for r in records)
        for r in output_records(out, domain)[:3]:
            assert {"text", "id", "source", "lang", "blocklist_matches", "pii",
                    "quality_score"} <= set(r)
    # code and math are judged by their own rules: most of them survive
    assert report["domains"]["code"]["docs_out"] >= DOCS * 0.6
    assert report["domains"]["math"]["docs_out"] >= DOCS * 0.6
    text = (out / "report.txt").read_text()
    assert "dedup" in text and "web" in text and "PII masked" in text


def test_output_is_byte_identical_across_workers_and_reused(prepared, raw, tmp_path):
    out2, runs = prepared
    root, _ = raw
    cfg = load(root, "--config.output.examples=2", f"--config.output.dir={tmp_path / 'one'}")
    out1 = pipeline.prepare(cfg, runs, workers=1, log=lambda _: None)
    for domain in DOMAINS:
        for split in ("train", "valid"):
            a = (out1 / domain / f"{split}.jsonl.gz").read_bytes()
            b = (out2 / domain / f"{split}.jsonl.gz").read_bytes()
            assert a == b, (domain, split)
    lines = []
    again = pipeline.prepare(cfg, runs, workers=2, log=lines.append)
    assert again == out1 and any("already prepared" in line for line in lines)


def test_a_changed_threshold_is_a_new_output(prepared, raw):
    out, runs = prepared
    root, _ = raw
    cfg = load(root, "--config.output.examples=2", "--config.safety.max_matches=0")
    fp_a = pipeline.fingerprint(pipeline.identity(cfg, pipeline.plan_shards(cfg), "b", "c"))
    cfg_b = load(root, "--config.output.examples=2")
    fp_b = pipeline.fingerprint(pipeline.identity(cfg_b, pipeline.plan_shards(cfg_b), "b", "c"))
    assert fp_a != fp_b
    assert json.loads((out / "report.json").read_text())["fingerprint"][:8] in out.name


def test_bad_records_are_counted_or_strict_errors(raw, tmp_path, corpus_root):
    root = tmp_path / "bad"
    for domain in ("wiki", "web"):
        for split in ("train", "valid"):
            docs = read_docs(corpus_root / domain / f"{split}.jsonl.gz", 12)
            write_jsonl_gz(root / domain / f"{split}.jsonl.gz", docs,
                           tail=b'{"text": broken\n' if domain == "web" and split == "train"
                           else b"")
    args = ("--config.data.domains=('wiki','web')", "--config.classifier.enabled=false",
            "--config.safety.enabled=false")
    out = pipeline.prepare(load(root, *args), tmp_path / "runs", workers=1, log=lambda _: None)
    report = json.loads((out / "report.json").read_text())
    assert report["domains"]["web"]["bad"] == {"invalid_json": 1}
    assert "web/train.jsonl.gz:13" in report["domains"]["web"]["bad_examples"][0]["message"]
    with pytest.raises(UserError, match=r"train\.jsonl\.gz:13: not valid JSON.*--strict"):
        pipeline.prepare(load(root, *args, f"--config.output.dir={tmp_path / 'strict'}"),
                         tmp_path / "runs", workers=1, strict=True, log=lambda _: None)
    assert not (tmp_path / "strict").exists()
    assert not list((tmp_path).glob(".strict.tmp-*"))


def test_config_errors_name_the_key(raw, tmp_path):
    root, _ = raw
    with pytest.raises(UserError, match=r"config\.classifier\.positives: 'nope'"):
        load(root, "--config.classifier.positives=('nope',)")
    with pytest.raises(UserError, match=r"config\.dedup\.bands=7: must divide"):
        load(root, "--config.dedup.bands=7")
    with pytest.raises(UserError, match=r"config\.quality\.params\.min_wrds"):
        pipeline.prepare(load(root, "--config.quality.params={'min_wrds': 3}"), tmp_path,
                         log=lambda _: None)
    with pytest.raises(UserError, match=r"no such domain folder"):
        pipeline.prepare(load(tmp_path / "nowhere"), tmp_path, log=lambda _: None)


def test_hugging_face_source_on_local_files_and_unreachable_hub(raw, tmp_path, monkeypatch):
    root, _ = raw
    only_wiki = ("--config.data.domains=('wiki',)", "--config.classifier.enabled=false",
                 "--config.safety.enabled=false", "--config.dedup.near=false")
    files = pipeline.prepare(load(root, *only_wiki, f"--config.output.dir={tmp_path / 'f'}"),
                             tmp_path / "runs", workers=1, log=lambda _: None)
    hf = {"kind": "hf", "hf_name": "json",
          "hf_data_files": {s: str(root / "wiki" / f"{s}.jsonl.gz") for s in ("train", "valid")}}
    via_hf = pipeline.prepare(load(root, *only_wiki, f"--config.data.sources={{'wiki': {hf}}}",
                                   f"--config.output.dir={tmp_path / 'h'}"),
                              tmp_path / "runs", workers=1, log=lambda _: None)
    assert [r["text"] for r in output_records(files, "wiki")] == \
        [r["text"] for r in output_records(via_hf, "wiki")]
    remote = {"kind": "hf", "hf_name": "nobody/no-such-dataset"}
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(UserError, match=r"no-such-dataset"):
        pipeline.prepare(load(root, *only_wiki, f"--config.data.sources={{'wiki': {remote}}}"),
                         tmp_path / "runs", workers=1, log=lambda _: None)


def test_cleaned_output_trains_through_gx_run(prepared, tmp_path):
    out, _ = prepared
    from test_run import TINY  # pytest puts tests/ on sys.path (rootdir conftest)
    proc = subprocess.run(
        [sys.executable, "-m", "gx", "--runs-root", str(tmp_path / "runs"), "run",
         "experiments/quickstart.py", *TINY, f"--config.data.root={out}",
         "--config.train.steps=8", "--config.train.checkpoint_every=0",
         "--config.train.eval_every=0", "--config.tracking.wandb=false"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "multilingual" in proc.stdout and "bpb" in proc.stdout


def test_gx_data_report_prints_the_table(prepared):
    out, _ = prepared
    proc = subprocess.run([sys.executable, "-m", "gx", "data", "report", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "docs in" in proc.stdout and "multilingual" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "gx", "data", "report",
                          str(out / "nope")], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
