"""Benchmark contamination (gemini_core/data/curation/contamination.py): planted GSM8K test
questions in a small data root — one verbatim (counts), one sharing only 12 consecutive words
(does not) — through the report, the `gx data contamination` command and the decontamination
rule of `gx data prepare`; the rule off leaves every curation fingerprint as it was; the real
corpus's GSM8K near-duplicates."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from gemini_core.data.curation import config as curation_config
from gemini_core.data.curation import contamination, pipeline
from gemini_core.data.curation.sources import Shard, plan_shards
from gemini_core.errors import UserError
from gemini_core.experiment import load_experiment
from gemini_core.runs.rundir import fingerprint
from gx import cli

REPO = Path(__file__).resolve().parents[1]
DOCS = 12  # real documents per domain and split
VERBATIM, PARTIAL = 0, 1  # GSM8K test examples planted (ids gsm8k:1 and gsm8k:2)
FILLER = "zebra quokka marmalade"


@pytest.fixture(scope="module")
def benchmarks(corpus_root) -> Path:
    return corpus_root.parent / "benchmarks"


@pytest.fixture(scope="module")
def gsm8k(benchmarks) -> list[contamination.TaskText]:
    return contamination.load_task_texts(benchmarks, ["gsm8k"])["gsm8k"]


def write_jsonl_gz(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    path.write_bytes(gzip.compress(data.encode(), mtime=0))


def real_docs(path: Path, n: int) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for _, line in zip(range(n), f)]


@pytest.fixture(scope="module")
def planted(tmp_path_factory, corpus_root, gsm8k) -> dict:
    """math and web from the real corpus; web's train ends with a document quoting a GSM8K test
    question verbatim, math's with one that shares 12 consecutive words with another."""
    root = tmp_path_factory.mktemp("planted")
    twelve = " ".join(contamination.words(gsm8k[PARTIAL].prompt)[4:16])
    docs = {}
    for domain in ("math", "web"):
        for split in ("train", "valid"):
            docs[domain, split] = real_docs(corpus_root / domain / f"{split}.jsonl.gz", DOCS)
    docs["web", "train"].append("A reader sent us this puzzle from a worksheet.\n\n"
                                f"{gsm8k[VERBATIM].prompt}\n\nWe will post the answer next week.")
    docs["math", "train"].append(f"Problem: {FILLER} {twelve} {FILLER}. Solve it carefully.")
    for (domain, split), texts in docs.items():
        write_jsonl_gz(root / domain / f"{split}.jsonl.gz", texts)
    return {"root": root, "twelve": twelve, "docs": docs}


def test_normalisation_is_case_punctuation_and_apostrophe_blind():
    assert contamination.words("Janet’s ducks, LAY 16 eggs!") == \
        contamination.words("janet's ducks lay 16 eggs") == ["janets", "ducks", "lay", "16", "eggs"]
    # an n-gram never spans two texts: two 12-word halves of a 13-word text hold none
    text = "one two three four five six seven eight nine ten eleven twelve thirteen"
    hashes, _ = contamination.ngram_hashes([text], 13)
    halves, _ = contamination.ngram_hashes([" ".join(text.split()[:12]), "thirteen"], 13)
    assert len(hashes) == 1 and len(halves) == 0


def test_report_counts_the_verbatim_question_not_the_twelve_word_overlap(planted, gsm8k):
    assert len(planted["twelve"].split()) == 12
    texts = {"gsm8k": gsm8k}
    report = contamination.contamination_report(texts, planted["root"], log=lambda _: None)
    task = report["tasks"]["gsm8k"]
    assert (task["examples"], task["contaminated"], task["too_short"]) == (1319, 1, 0)
    assert task["contaminated_ids"] == [gsm8k[VERBATIM].id] == ["gsm8k:1"]
    assert task["domains"] == {"web": 1} and task["share"] == pytest.approx(1 / 1319)
    web, math = report["domains"]["web"], report["domains"]["math"]
    assert (web["documents"], web["overlapping"], web["by_task"]) == (2 * DOCS + 1, 1, {"gsm8k": 1})
    assert (math["documents"], math["overlapping"]) == (2 * DOCS + 1, 0)
    # the threshold is what decides: at 12 words the partial one counts too
    at12 = contamination.contamination_report(texts, planted["root"], n=12, log=lambda _: None)
    assert at12["tasks"]["gsm8k"]["contaminated_ids"] == ["gsm8k:1", "gsm8k:2"]
    assert at12["tasks"]["gsm8k"]["domains"] == {"math": 1, "web": 1}


def test_cli_prints_the_table_and_writes_json(planted, benchmarks, tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = cli.main(["data", "contamination", "--tasks", "gsm8k,humaneval", "--data-root",
                   str(planted["root"]), "--benchmarks", str(benchmarks), "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    rows = {line.split()[0]: line.split() for line in printed.splitlines() if line.strip()}
    assert rows["gsm8k"][1:5] == ["1,319", "0", "1", "0.08%"] and rows["gsm8k"][5:] == ["web", "1"]
    assert rows["humaneval"][1:5] == ["164", "0", "0", "0.00%"]
    assert "documents/s" in printed  # progress of the pass
    report = json.loads(out.read_text())
    assert report["tasks"]["gsm8k"]["contaminated"] == 1
    assert report["domain_order"] == ["math", "web"]


@pytest.mark.parametrize("args, needle", [
    (["--tasks", "gsm8k,hellaswag"], "unknown task 'hellaswag' (known: gsm8k, humaneval"),
    (["--tasks", "gsm8k", "--files", "nope.jsonl"], "missing file"),
    (["--tasks", "gsm8k", "--ngram", "0"], "--ngram=0: must be >= 1"),
])
def test_cli_user_errors_are_one_line_and_exit_2(planted, benchmarks, capsys, args, needle):
    rc = cli.main(["data", "contamination", "--data-root", str(planted["root"]),
                   "--benchmarks", str(benchmarks), *args])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_cli_default_benchmarks_are_beside_the_data_root(planted, capsys):
    rc = cli.main(["data", "contamination", "--tasks", "gsm8k", "--data-root",
                   str(planted["root"])])
    err = capsys.readouterr().err
    assert rc == 2 and f"{planted['root'].parent / 'benchmarks'}: no such benchmarks folder" in err


def load(root: Path, *overrides: str):
    return load_experiment(str(REPO / "experiments" / "data_prep.py"),
                           [f"--config.data.root={root}", *overrides],
                           schema=curation_config.CurationConfig,
                           convert=curation_config.from_config_dict).config


FAST = ("--config.data.domains=('math','web')", "--config.quality.enabled=false",
        "--config.langid.enabled=false", "--config.classifier.enabled=false",
        "--config.safety.enabled=false", "--config.dedup.near=false")


def test_prepare_drops_exactly_the_planted_document_and_reports_it(planted, benchmarks,
                                                                   tmp_path, gsm8k):
    cfg = load(planted["root"], *FAST, "--config.decontaminate.tasks=('gsm8k','humaneval')",
               f"--config.decontaminate.benchmarks={benchmarks}")
    logs: list[str] = []
    out = pipeline.prepare(cfg, tmp_path / "runs", workers=1, log=logs.append)
    report = json.loads((out / "report.json").read_text())
    web, math = report["domains"]["web"], report["domains"]["math"]
    assert web["removed"]["decontaminate"]["docs"] == 1
    assert web["rules_first"]["decontaminate/gsm8k"] == 1
    assert web["rules_any"] == {"decontaminate/gsm8k": 1}
    assert web["examples"]["decontaminate/gsm8k"][0]["where"].endswith(
        f"web/train.jsonl.gz:{DOCS + 1}")
    assert math["removed"]["decontaminate"]["docs"] == 0  # the 12-word overlap stays
    with gzip.open(out / "web" / "train.jsonl.gz", "rt") as f:
        web_texts = [json.loads(line)["text"] for line in f]
    with gzip.open(out / "math" / "train.jsonl.gz", "rt") as f:
        math_texts = [json.loads(line)["text"] for line in f]
    assert not any(gsm8k[VERBATIM].prompt in t for t in web_texts)
    assert any(FILLER in t for t in math_texts)
    assert (len(web_texts), len(math_texts)) == (DOCS, DOCS + 1)  # the real ones are all kept
    header = (out / "report.txt").read_text().splitlines()[0].split()
    assert header[-2:] == ["decontam", "dedup"]
    assert any(line.startswith("decontaminate: 1,483 examples of gsm8k, humaneval")
               for line in logs), logs


# the identity of experiments/data_prep.py on a fixed input, as before decontamination existed
PINNED = {(): "1972e3a6a1f12e02a877b194f01d2b54b79879c11c6a58ca96a83d2c54dd40d5",
          ("--config.dedup.near=false", "--config.classifier.enabled=false"):
          "a4128f484ceaac866d0c05c05eb9772c60425ae8e86cfd5eb517816881583bd7"}
SHARDS = [Shard("web", "train", 0, "files", "/x/web/train.jsonl.gz", "text", sha256="0" * 64)]


def identity_fp(*overrides: str) -> str:
    cfg = load_experiment(str(REPO / "experiments" / "data_prep.py"),
                          ["--config.data.root=/nowhere", *overrides],
                          schema=curation_config.CurationConfig,
                          convert=lambda c: curation_config.from_config_dict(c, paths=False)
                          ).config
    blocklist, classifier = ("b", "c") if cfg.classifier.enabled else (None, None)
    return fingerprint(pipeline.identity(cfg, SHARDS, blocklist, classifier))


def test_off_keeps_every_fingerprint_and_on_is_identified_by_content(tmp_path, benchmarks):
    for overrides, fp in PINNED.items():
        assert identity_fp(*overrides) == fp
        assert identity_fp(*overrides, "--config.decontaminate.ngram=8") == fp  # still off
    for name in ("a", "b"):  # the same benchmark in two places
        shutil.copytree(benchmarks / "gsm8k", tmp_path / name / "gsm8k")
    on = [identity_fp("--config.decontaminate.tasks=('gsm8k',)",
                      f"--config.decontaminate.benchmarks={tmp_path / name}") for name in "ab"]
    assert on[0] == on[1] != PINNED[()]
    assert identity_fp("--config.decontaminate.tasks=('gsm8k',)", "--config.decontaminate.ngram=8",
                       f"--config.decontaminate.benchmarks={tmp_path / 'a'}") != on[0]


@pytest.mark.parametrize("overrides, needle", [
    (("--config.decontaminate.tasks=('gsm8k','nope')",),
     "config.decontaminate.tasks: unknown task 'nope' (known: gsm8k"),
    (("--config.decontaminate.tasks=('gsm8k',)", "--config.decontaminate.ngram=0"),
     "config.decontaminate.ngram=0: must be >= 1"),
    (("--config.decontaminate.tasks=('gsm8k',)", "--config.decontaminate.benchmarks=/no/such"),
     "config.decontaminate.benchmarks='/no/such': no such directory"),
])
def test_decontaminate_config_errors_name_the_key(planted, overrides, needle):
    with pytest.raises(UserError) as e:
        load(planted["root"], *FAST, *overrides)
    assert needle in str(e.value), e.value


def test_default_benchmarks_folder_is_checked_before_any_work(planted):
    with pytest.raises(UserError) as e:  # the planted root has no benchmarks/ beside it
        load(planted["root"], *FAST, "--config.decontaminate.tasks=('gsm8k',)")
    assert "config.decontaminate.benchmarks (default: benchmarks/ beside config.data.root)" \
        in str(e.value)
    assert plan_shards(load(planted["root"], *FAST))  # off: nothing about benchmarks is read


def test_real_corpus_gsm8k_near_duplicates_and_clean_humaneval(corpus_root, benchmarks):
    """SOURCES.md: no GSM8K test question is in the corpus verbatim; five share a 13-gram with
    a GSM8K train problem (near-duplicate questions and worked steps), all in math."""
    texts = contamination.load_task_texts(benchmarks, ["gsm8k", "humaneval"])
    report = contamination.contamination_report(texts, corpus_root, domains=["math", "code"],
                                                log=lambda _: None)
    gsm = report["tasks"]["gsm8k"]
    assert gsm["contaminated_ids"] == ["gsm8k:582", "gsm8k:603", "gsm8k:633", "gsm8k:713",
                                       "gsm8k:807"]
    assert gsm["domains"] == {"math": 5}
    assert report["tasks"]["humaneval"]["contaminated"] == 0
    assert report["domains"]["code"]["overlapping"] == 0
