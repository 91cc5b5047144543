"""`gx data prepare` end to end on a small slice of the real corpus with planted problems:
duplicates, a near-duplicate, PII, blocklisted text, bad records; determinism across worker
counts; the cleaned output trains a tiny model through `gx run`. Through the CLI as a user meets
them: --strict never reuses an output made by skipping bad records, a read error is said as one
wherever the reading happens (the classifier's sample too), an empty input file or split is an
error, and temporaries of killed prepares are cleaned up."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gemini_core.data.curation import config as curation_config
from gemini_core.data.curation import pipeline
from gemini_core.data.curation.sources import plan_shards
from gemini_core.errors import UserError
from gemini_core.experiment import load_experiment
from gemini_core.runs.rundir import fingerprint

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
    # planted after the 30 real documents (lines 1-30): line 31 is docs[0] upper-cased and
    # re-spaced, 32 docs[0] itself (both exact duplicates of line 1), 33 docs[0] with three
    # words changed (near); the real documents hold none among themselves
    exact, near = web["removed"]["dedup/exact"], web["removed"]["dedup/near"]
    assert (exact["docs"], near["docs"], exact["cross_domain"], near["cross_domain"]) == (2, 1, 0, 0)
    assert sorted(e["where"].rsplit(":", 1)[1] for e in web["examples"]["dedup/exact"]) == \
        ["31", "32"]
    assert [e["where"].rsplit(":", 1)[1] for e in web["examples"]["dedup/near"]] == ["33"]
    assert all(e["duplicate_of"].endswith(":1") for e in
               web["examples"]["dedup/exact"] + web["examples"]["dedup/near"])
    assert all(not any(k.startswith("dedup/") for k in report["domains"][d]["removed"])
               for d in DOMAINS if d != "web")
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
    fp_a = fingerprint(pipeline.identity(cfg, plan_shards(cfg), "b", "c"))
    cfg_b = load(root, "--config.output.examples=2")
    fp_b = fingerprint(pipeline.identity(cfg_b, plan_shards(cfg_b), "b", "c"))
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
    with pytest.raises(UserError, match=r"config\.data\.root='.*nowhere': no such directory"):
        load(tmp_path / "nowhere")  # at load, before any data is read


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


# ---------------------------------------------------------------------------------------------
# hardening, through the CLI


def gx(*args: str, runs: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gx", "--runs-root", str(runs), *args],
                          cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "offline"})


def assert_one_line_error(proc: subprocess.CompletedProcess, *parts: str) -> str:
    """Exit 2, no traceback, and the error line names every part; returns that line."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("gx: error:")]
    for part in parts:
        assert part in line, (part, line)
    return line


def write_truncated(path: Path, records: list[dict], keep: float) -> int:
    """A .jsonl.gz cut to `keep` of its compressed bytes; returns the whole lines left in it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode(), mtime=0)
    path.write_bytes(data[:int(len(data) * keep)])
    lines = 0
    try:
        with gzip.open(path, "rt") as f:
            for line in f:
                lines += line.endswith("\n")
    except EOFError:
        pass
    return lines


def small_root(root: Path, corpus: Path, domains: tuple[str, ...], n: int = 12) -> Path:
    for domain in domains:
        for split in ("train", "valid"):
            write_jsonl_gz(root / domain / f"{split}.jsonl.gz",
                           read_docs(corpus / domain / f"{split}.jsonl.gz", n))
    return root


NO_MODELS = ("--config.data.domains=('wiki','web')", "--config.classifier.enabled=false",
             "--config.safety.enabled=false")


@pytest.fixture(scope="module")
def truncated(tmp_path_factory, corpus_root) -> dict:
    """A non-strict `gx data prepare` of a root whose web/train.jsonl.gz is cut short."""
    tmp = tmp_path_factory.mktemp("truncated")
    root = small_root(tmp / "root", corpus_root, ("wiki", "web"))
    bad_file = root / "web" / "train.jsonl.gz"
    whole = write_truncated(bad_file, read_docs(corpus_root / "web" / "train.jsonl.gz", 12), 0.8)
    assert 0 < whole < 12
    out, runs = tmp / "out", tmp / "runs"
    args = ("data", "prepare", "experiments/data_prep.py", f"--config.data.root={root}",
            *NO_MODELS, f"--config.output.dir={out}", "--workers=1")
    return {"proc": gx(*args, runs=runs), "args": args, "out": out, "runs": runs,
            "bad_file": bad_file, "whole": whole}


def test_cli_prepare_counts_a_truncated_file_without_strict(truncated):
    proc, out = truncated["proc"], truncated["out"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"data: cleaned data root {out}" in proc.stdout
    assert "web: bad records: truncated 1" in proc.stdout
    web = json.loads((out / "report.json").read_text())["domains"]["web"]
    assert web["bad"] == {"truncated": 1}
    assert web["docs_in"] == truncated["whole"] + 12  # the whole lines of train, and valid


def test_strict_never_reuses_an_output_made_by_skipping_bad_records(truncated):
    """Issue 28, finding 3: a --strict run after a non-strict one was 'already prepared'."""
    before = (truncated["out"] / "report.json").read_bytes()
    strict = gx(*truncated["args"], "--strict", runs=truncated["runs"])
    line = assert_one_line_error(strict, str(truncated["bad_file"]), "truncated",
                                 f"after line {truncated['whole']}", "--strict",
                                 "prepared without --strict")
    assert "already prepared" not in strict.stdout, line
    assert (truncated["out"] / "report.json").read_bytes() == before  # refused, not rewritten
    again = gx(*truncated["args"], runs=truncated["runs"])  # without --strict: reused
    assert again.returncode == 0 and "already prepared" in again.stdout


def test_temporaries_of_killed_prepares_are_removed(truncated):
    """Issue 28, finding 6: `.<out>.tmp-<pid>-<host>/` of a prepare killed with -9 (no
    `finally` ran) stayed forever. A dead pid's are removed at the next start, whatever that
    start then does; a live prepare's are left alone."""
    out = truncated["out"]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid, host = int(dead.stdout), socket.gethostname()
    stale = [out.parent / f".{out.name}.tmp-{dead_pid}-{host}",
             out.parent / f".{out.name}.tmp-{dead_pid}"]  # the name before hosts were in it
    live = out.parent / f".{out.name}.tmp-{os.getpid()}-{host}"
    other_host = out.parent / f".{out.name}.tmp-{dead_pid}-not-{host}"
    for d in (*stale, live, other_host):
        (d / ".work").mkdir(parents=True)
        (d / ".work" / "000000.part.gz").write_bytes(b"half a part")
    proc = gx(*truncated["args"], runs=truncated["runs"])
    assert proc.returncode == 0 and "already prepared" in proc.stdout, proc.stderr[-2000:]
    assert not any(d.exists() for d in stale)
    assert live.exists() and other_host.exists()
    assert sum(f"left by prepare pid {dead_pid}" in ln for ln in proc.stdout.splitlines()) == 2
    for d in (live, other_host):
        shutil.rmtree(d)


def test_classifier_sample_names_a_truncated_file(tmp_path, corpus_root):
    """Issue 28, finding 3: with the classifier on, a truncated web file was reported as
    'quality classifier: 3 negative documents, need at least 10'."""
    root = small_root(tmp_path / "root", corpus_root, ("books", "wiki", "web"))
    bad_file = root / "web" / "train.jsonl.gz"
    whole = write_truncated(bad_file, read_docs(corpus_root / "web" / "train.jsonl.gz", 12), 0.3)
    assert whole < 10  # too few negatives left to train on
    cfg = ("experiments/data_prep.py", f"--config.data.root={root}",
           "--config.data.domains=('books','wiki','web')", "--config.safety.enabled=false")
    runs = tmp_path / "runs"
    for command in (("data", "train-classifier", *cfg), ("data", "prepare", *cfg)):
        line = assert_one_line_error(gx(*command, runs=runs), str(bad_file), "truncated",
                                     f"after line {whole}", "unreadable",
                                     "negative documents, need at least")
        assert line.index(str(bad_file)) < line.index("need at least")  # the cause first
    strict = gx("data", "prepare", *cfg, "--strict", runs=runs)
    assert_one_line_error(strict, str(bad_file), "truncated", "--strict")
    assert not (runs / "data").exists()


def test_gx_data_train_classifier_prints_held_out_metrics(raw, tmp_path):
    root, _ = raw
    args = ("data", "train-classifier", "experiments/data_prep.py", f"--config.data.root={root}")
    first = gx(*args, runs=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "classifier: trained on 60 wiki+books vs 34 web docs" in first.stdout
    (model,) = (tmp_path / ".cache" / "classifiers").glob("*.npz")
    metrics = json.loads(model.with_suffix(".json").read_text())
    assert f"held-out accuracy {metrics['accuracy']:.3f}, AUC {metrics['auc']:.3f}" in first.stdout
    again = gx(*args, runs=tmp_path)
    assert again.returncode == 0 and f"classifier: reusing {model}" in again.stdout
    off = gx(*args, "--config.classifier.enabled=false", runs=tmp_path)
    assert_one_line_error(off, "config.classifier.enabled=False: nothing to train")


@pytest.mark.parametrize("strict", [False, True])
def test_a_zero_byte_input_file_is_an_error(tmp_path, corpus_root, strict):
    """Issue 28, finding 7: it prepared into an empty split (a warning), which `gx run` then
    rejected."""
    root = small_root(tmp_path / "root", corpus_root, ("wiki", "web"))
    empty = root / "web" / "valid.jsonl.gz"
    empty.write_bytes(b"")
    out = tmp_path / "out"
    proc = gx("data", "prepare", "experiments/data_prep.py", f"--config.data.root={root}",
              *NO_MODELS, f"--config.output.dir={out}", *(["--strict"] if strict else []),
              runs=tmp_path / "runs")
    assert_one_line_error(proc, str(empty), "empty file (0 bytes", "'web'", "'valid'")
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_an_input_or_output_split_without_documents_is_an_error(tmp_path, corpus_root):
    root = small_root(tmp_path / "root", corpus_root, ("wiki", "web"))
    blank = root / "web" / "valid.jsonl.gz"
    blank.write_bytes(gzip.compress(b"\n\n", mtime=0))  # not 0 bytes: found when read
    with pytest.raises(UserError, match=rf"{blank}: no documents \(domain 'web', split 'valid'\)"):
        pipeline.prepare(load(root, *NO_MODELS, f"--config.output.dir={tmp_path / 'a'}"),
                         tmp_path / "runs", workers=1, log=lambda _: None)
    write_jsonl_gz(blank, read_docs(corpus_root / "web" / "valid.jsonl.gz", 12))
    # filters that leave nothing: an output no run can read is not written either
    with pytest.raises(UserError, match=r"web/train\.jsonl\.gz would have no documents: domain "
                                        r"'web' read 24 documents, the filters removed quality 24"):
        pipeline.prepare(load(root, *NO_MODELS, "--config.quality.overrides={'web': "
                              "{'min_words': 100000}}", f"--config.output.dir={tmp_path / 'b'}"),
                         tmp_path / "runs", workers=1, log=lambda _: None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert not list(tmp_path.glob(".[ab].tmp-*"))
