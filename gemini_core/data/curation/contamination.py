"""Benchmark contamination: which task examples share a word n-gram with a data root
(`gx data contamination`), and the rule of `gx data prepare` that drops training documents
sharing one with a declared benchmark (`config.decontaminate`).

The convention is GPT-3's and lm-evaluation-harness's decontamination: 13-word n-grams of
normalised text. Normalisation: lower-case; delete every Unicode punctuation (P*) and symbol
(S*) character (a superset of lm-eval's ASCII `string.punctuation`, so a curly apostrophe is
treated like a straight one; deleted, not replaced by a space, so "don't" is "dont" and
"<<16-3-4=9>>9" one word); split on whitespace. An n-gram never spans two texts. A text of fewer
than n words has no n-gram and can never match: its example is counted as too short (most XCOPA
premises; scripts written without spaces, such as Chinese and Thai, are few long "words").
An example is contaminated when its prompt or its answer shares an n-gram with a document.

Hashing: each word is hashed once with 64-bit blake2b; an n-gram's hash chains its words'
hashes (xor, then multiply by an odd constant, mod 2^64: order-sensitive), computed with numpy
over a whole batch of documents. The benchmark side (every n-gram of every example, small) is
a sorted array; the corpus side is streamed, document batch by document batch.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import json
import sys
import time
import unicodedata
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from gemini_core.data.sources import BadRecords, domain_file, iter_documents, text_batches
from gemini_core.errors import UserError

Log = Callable[[str], None]
NGRAM = 13
DATA_FILE = "data.jsonl.gz"  # <benchmarks>/<task>/data.jsonl.gz
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")  # a domain's files, when not named
BATCH_CHARS = 1 << 20  # documents hashed together: amortises numpy, bounds memory
PROGRESS_EVERY_S = 10.0
IDS_KEPT = 20  # contaminated example ids kept per task in the report


class TaskText(NamedTuple):
    """One benchmark example as text to check: its id, its prompt, its answer ("" = none)."""

    id: str
    prompt: str
    answer: str


TaskTexts = Mapping[str, Sequence[TaskText]]  # task name -> its examples


# task -> (id fields, prompt fields, answer fields) of the records of <task>/data.jsonl.gz.
# A dotted path walks into objects and, through a list, takes every element's value; several
# fields' values are joined by a newline (several ids by "/"); no id field: the line number.
# Multiple-choice answers are all the choices: a document holding any of them is evidence.
TASK_FIELDS: Mapping[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "gsm8k": ((), ("question",), ("answer",)),
    "humaneval": (("task_id",), ("prompt",), ("canonical_solution",)),
    "mbpp": (("task_id",), ("text",), ("code",)),
    "arc_easy": (("id",), ("question.stem",), ("question.choices.text",)),
    "arc_challenge": (("id",), ("question.stem",), ("question.choices.text",)),
    "piqa": ((), ("goal",), ("sol1", "sol2")),
    "lambada": ((), ("text",), ()),
    "xcopa": (("lang", "split", "idx"), ("premise",), ("choice1", "choice2")),
}


# ---------------------------------------------------------------------------------------------
# normalisation and hashing


@functools.cache
def _strip_table() -> dict[int, None]:
    """Every Unicode punctuation and symbol code point -> deleted (built once: ~0.3 s)."""
    return {c: None for c in range(sys.maxunicode + 1)
            if unicodedata.category(chr(c))[0] in "PS"}


def words(text: str) -> list[str]:
    """The normalised words of `text` (see the module docstring)."""
    return text.lower().translate(_strip_table()).split()


_WORD_HASHES: dict[str, int] = {}
_WORD_CACHE_MAX = 2_000_000  # entries; cleared when full (a corpus's vocabulary is far smaller)
_MIX = np.uint64(0x100000001B3)  # the 64-bit FNV prime: odd, so the multiply is a bijection


def _word_hash(word: str) -> int:
    h = _WORD_HASHES.get(word)
    if h is None:
        if len(_WORD_HASHES) >= _WORD_CACHE_MAX:
            _WORD_HASHES.clear()
        h = int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(),
                           "little")
        _WORD_HASHES[word] = h
    return h


def ngram_hashes(texts: Sequence[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(hashes_M, text_M): the hash of every n-gram of every text, and which text it is in."""
    per_text = [words(t) for t in texts]
    lengths_T = np.fromiter((len(w) for w in per_text), np.int64, len(per_text))
    total = int(lengths_T.sum())
    if total < n:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    word_W = np.fromiter((_word_hash(w) for ws in per_text for w in ws), np.uint64, total)
    text_W = np.repeat(np.arange(len(per_text)), lengths_T)
    m = total - n + 1
    hashes_M = np.zeros(m, np.uint64)
    for j in range(n):  # uint64 arithmetic wraps mod 2^64, as intended
        hashes_M = (hashes_M ^ word_W[j:j + m]) * _MIX
    inside_M = text_W[:m] == text_W[n - 1:]  # windows that cross into the next text are none
    return hashes_M[inside_M], text_W[:m][inside_M]


# ---------------------------------------------------------------------------------------------
# the benchmark side


def default_benchmarks(data_root: str | Path) -> Path:
    """Where the benchmarks are when not named: `benchmarks/` beside the corpus folder (the
    layout of ../shared: corpus/ and benchmarks/)."""
    return Path(data_root).absolute().parent / "benchmarks"


def known_task(task: str, where: str) -> None:
    if task not in TASK_FIELDS:
        raise UserError(f"{where}: unknown task {task!r} (known: {', '.join(TASK_FIELDS)})")


def benchmark_file(benchmarks: Path, task: str, where: str = "--tasks") -> Path:
    known_task(task, where)
    path = Path(benchmarks) / task / DATA_FILE
    if not path.is_file():
        raise UserError(f"{path}: no such file (task {task!r}; the benchmarks folder holds "
                        f"<task>/{DATA_FILE})")
    return path


def _values(record: Any, path: str, where: str) -> list[str]:
    node: list[Any] = [record]
    for part in path.split("."):
        nxt = []
        for item in node:
            for value in (item if isinstance(item, list) else [item]):
                if not isinstance(value, dict) or part not in value:
                    raise UserError(f"{where}: record has no field {path!r}")
                nxt.append(value[part])
        node = nxt
    flat = [v for item in node for v in (item if isinstance(item, list) else [item])]
    return [str(v) for v in flat]


def _task_text(task: str, record: Any, where: str, line: int) -> TaskText:
    id_fields, prompt_fields, answer_fields = TASK_FIELDS[task]
    ids = ["/".join(_values(record, f, where)) for f in id_fields]
    return TaskText("/".join(ids) if ids else f"{task}:{line}",
                    "\n".join(v for f in prompt_fields for v in _values(record, f, where)),
                    "\n".join(v for f in answer_fields for v in _values(record, f, where)))


def load_task_texts(benchmarks: str | Path, tasks: Sequence[str],
                    where: str = "--tasks") -> dict[str, list[TaskText]]:
    """The texts to check of each task, read by TASK_FIELDS from <benchmarks>/<task>/."""
    if not tasks:
        raise UserError(f"{where}: name at least one task (known: {', '.join(TASK_FIELDS)})")
    for task in tasks:
        known_task(task, where)
    if not Path(benchmarks).is_dir():
        raise UserError(f"{benchmarks}: no such benchmarks folder (one <task>/{DATA_FILE} per "
                        "task)")
    files = {task: benchmark_file(Path(benchmarks), task, where) for task in tasks}
    out: dict[str, list[TaskText]] = {}
    for task, path in files.items():
        texts = []
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{line}: not valid JSON ({e.msg})") from None
                texts.append(_task_text(task, record, f"{path}:{line}", line))
        out[task] = texts
    return out


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclasses.dataclass(frozen=True, eq=False)  # arrays: compared by identity
class NgramIndex:
    """Every n-gram of every example of some tasks: rows (hash, example), sorted by hash."""

    n: int
    tasks: tuple[str, ...]
    hashes_H: np.ndarray  # uint64, sorted
    owner_H: np.ndarray  # int64: the example (global index) of each row
    task_E: np.ndarray  # int64: the task (index into tasks) of each example
    ids_E: tuple[str, ...]
    too_short_E: np.ndarray  # bool: the example has no n-gram

    @staticmethod
    def build(task_texts: TaskTexts, n: int = NGRAM) -> "NgramIndex":
        if n < 1:
            raise UserError(f"ngram={n}: must be >= 1 (words per n-gram)")
        tasks = tuple(task_texts)
        examples = [(t, ex) for t, task in enumerate(tasks) for ex in task_texts[task]]
        # prompt and answer are separate texts: no n-gram spans the two
        hashes_M, text_M = ngram_hashes([s for _, ex in examples for s in (ex.prompt, ex.answer)],
                                        n)
        rows = np.unique(np.stack([hashes_M, (text_M // 2).astype(np.uint64)]), axis=1)
        owner = rows[1].astype(np.int64)
        return NgramIndex(n, tasks, rows[0], owner,
                          np.array([t for t, _ in examples], np.int64),
                          tuple(ex.id for _, ex in examples),
                          np.bincount(owner, minlength=len(examples)) == 0)

    def save(self, path: Path) -> None:
        np.savez(path, n=self.n, tasks=np.array(self.tasks, str), hashes=self.hashes_H,
                 owner=self.owner_H, task=self.task_E, ids=np.array(self.ids_E, str),
                 too_short=self.too_short_E)

    @staticmethod
    def load(path: Path) -> "NgramIndex":
        z = np.load(path)
        return NgramIndex(int(z["n"]), tuple(str(t) for t in z["tasks"]), z["hashes"],
                          z["owner"], z["task"], tuple(str(i) for i in z["ids"]),
                          z["too_short"])

    def hits(self, texts: Sequence[str]) -> dict[int, set[int]]:
        """text index -> the examples it shares an n-gram with, for the texts that share one."""
        hashes_M, text_M = ngram_hashes(texts, self.n)
        if not len(hashes_M) or not len(self.hashes_H):
            return {}
        lo_M = np.searchsorted(self.hashes_H, hashes_M)
        found_M = self.hashes_H[np.minimum(lo_M, len(self.hashes_H) - 1)] == hashes_M
        out: dict[int, set[int]] = {}
        if not found_M.any():
            return out
        hi_M = np.searchsorted(self.hashes_H, hashes_M[found_M], side="right")
        for text, lo, hi in zip(text_M[found_M], lo_M[found_M], hi_M):
            out.setdefault(int(text), set()).update(self.owner_H[lo:hi].tolist())
        return out

    def tasks_hit(self, texts: Sequence[str]) -> list[tuple[str, ...]]:
        """Per text, the tasks (in declared order) it shares an n-gram with; () for none."""
        hits = self.hits(texts)
        return [tuple(self.tasks[t] for t in sorted({int(self.task_E[e]) for e in hits[i]}))
                if i in hits else () for i in range(len(texts))]


# ---------------------------------------------------------------------------------------------
# the corpus side: `gx data contamination`


def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(DATA_SUFFIXES))


def domain_files(root: Path, domains: Sequence[str] | None,
                 files: Sequence[str] | None) -> dict[str, list[Path]]:
    """Each domain's files to read: the named ones (checked as every reader does), else every
    .jsonl/.jsonl.gz/.parquet file of its folder. Domains: the named ones, else every folder
    that holds such files (a corpus keeps LICENSES/ and _filters/ beside them)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--data-root {root}: no such folder (the data root: one folder per "
                        "domain)")
    if not domains:
        domains = sorted(p.name for p in root.iterdir() if p.is_dir()
                         and not p.name.startswith(("_", ".")) and _data_files(p))
        if not domains:
            raise UserError(f"--data-root {root}: no domain folder with data files "
                            f"({', '.join(DATA_SUFFIXES)}) in it")
    out = {}
    for domain in domains:
        if files:
            out[domain] = [domain_file(root, domain, name) for name in files]
            continue
        if not (root / domain).is_dir():
            domain_file(root, domain, "-")  # raises, naming the domains the root has
        out[domain] = _data_files(root / domain)
        if not out[domain]:
            raise UserError(f"{root / domain}: no data files ({', '.join(DATA_SUFFIXES)}) in "
                            f"domain {domain!r}")
    return out


class _Scan:
    """The counts of one pass: per task the contaminated examples by domain, per domain the
    documents and those that overlap each task."""

    def __init__(self, index: NgramIndex):
        self.index = index
        self.examples_by_domain: dict[str, set[int]] = {}
        self.domains: dict[str, dict] = {}

    def domain(self, name: str) -> dict:
        return self.domains.setdefault(name, {"documents": 0, "overlapping": 0, "by_task": {},
                                              "files": [], "bad_records": 0})

    def add(self, domain: str, texts: list[str]) -> int:
        d = self.domain(domain)
        d["documents"] += len(texts)
        hits = self.index.hits(texts)
        seen = self.examples_by_domain.setdefault(domain, set())
        for examples in hits.values():
            d["overlapping"] += 1
            seen.update(examples)
            for task in {self.index.tasks[self.index.task_E[e]] for e in examples}:
                d["by_task"][task] = d["by_task"].get(task, 0) + 1
        return len(hits)

    def tasks(self) -> dict[str, dict]:
        out = {}
        idx = self.index
        for t, task in enumerate(idx.tasks):
            mine = np.flatnonzero(idx.task_E == t)
            found = sorted({e for s in self.examples_by_domain.values() for e in s
                            if idx.task_E[e] == t})
            by_domain = {d: sum(1 for e in s if idx.task_E[e] == t)
                         for d, s in self.examples_by_domain.items()}
            out[task] = {"examples": len(mine), "too_short": int(idx.too_short_E[mine].sum()),
                         "contaminated": len(found),
                         "share": len(found) / len(mine) if len(mine) else 0.0,
                         "domains": {d: n for d, n in by_domain.items() if n},
                         "contaminated_ids": [idx.ids_E[e] for e in found[:IDS_KEPT]]}
        return out


def _scan_file(scan: _Scan, domain: str, path: Path, text_field: str, log: Log) -> None:
    bad = BadRecords()
    t0 = last = time.perf_counter()
    docs = overlapping = 0
    for batch in text_batches(iter_documents(path, text_field, "skip", bad), BATCH_CHARS):
        overlapping += scan.add(domain, batch)
        docs += len(batch)
        now = time.perf_counter()
        if now - last >= PROGRESS_EVERY_S:
            last = now
            log(f"contamination: {domain}: {path.name}: {docs:,} documents, "
                f"{docs / (now - t0):,.0f} documents/s")
    elapsed = time.perf_counter() - t0
    d = scan.domain(domain)
    d["files"].append(str(path))
    d["bad_records"] += bad.total
    for line in bad.report():
        log(f"contamination: {line}")
    log(f"contamination: {domain}/{path.name}: {docs:,} documents, {overlapping:,} overlapping, "
        f"{docs / elapsed if elapsed else 0:,.0f} documents/s")


def contamination_report(task_texts: TaskTexts, data_root: str | Path, *,
                         domains: Sequence[str] | None = None,
                         files: Sequence[str] | None = None, n: int = NGRAM,
                         text_field: str = "text", log: Log = print) -> dict:
    """Per task: examples, too short to check, contaminated (prompt or answer shares an n-gram
    with a document of the data root), share, and in which domains; per domain: documents and
    those overlapping any task. One streaming pass over the data root."""
    t0 = time.perf_counter()
    paths = domain_files(Path(data_root), domains, files)
    index = NgramIndex.build(task_texts, n)
    log(f"contamination: {len(index.ids_E):,} examples of {len(index.tasks)} tasks, "
        f"{len(np.unique(index.hashes_H)):,} distinct {n}-grams")
    scan = _Scan(index)
    for domain, domain_paths in paths.items():
        scan.domain(domain)
        for path in domain_paths:
            _scan_file(scan, domain, path, text_field, log)
    seconds = time.perf_counter() - t0
    documents = sum(d["documents"] for d in scan.domains.values())
    return {"data_root": str(Path(data_root).resolve()), "ngram": n,
            "normalisation": "lower-case; Unicode punctuation and symbols deleted; "
                             "whitespace-split words",
            "tasks": scan.tasks(), "domains": scan.domains, "domain_order": list(paths),
            "documents": documents, "seconds": seconds,
            "documents_per_s": documents / seconds if seconds else None}


def format_table(report: dict) -> str:
    n = report["ngram"]
    lines = [f"contamination: {n}-word n-grams of each example's prompt and answer in "
             f"{report['data_root']} ({report['documents']:,} documents, "
             f"{report['seconds']:.1f}s)",
             f"{'task':<16}{'examples':>10}{f'<{n} words':>11}{'contaminated':>14}{'share':>9}"
             "  domains"]
    lines.append("-" * (len(lines[1]) + 10))
    for task, t in report["tasks"].items():
        where = ", ".join(f"{d} {k:,}" for d, k in t["domains"].items()) or "-"
        lines.append(f"{task:<16}{t['examples']:>10,}{t['too_short']:>11,}"
                     f"{t['contaminated']:>14,}{t['share']:>9.2%}  {where}")
    lines += ["", f"{'domain':<16}{'documents':>10}{'overlapping':>13}  tasks"]
    for domain in report["domain_order"]:
        d = report["domains"][domain]
        tasks = ", ".join(f"{t} {k:,}" for t, k in d["by_task"].items()) or "-"
        bad = f" ({d['bad_records']:,} bad records skipped)" if d["bad_records"] else ""
        lines.append(f"{domain:<16}{d['documents']:>10,}{d['overlapping']:>13,}  {tasks}{bad}")
    return "\n".join(lines)


def parse_tasks(spec: str) -> list[str]:
    """`--tasks gsm8k,arc_easy` -> names, each known (one line naming the unknown one)."""
    names = [t.strip() for t in spec.split(",") if t.strip()]
    for name in names:
        known_task(name, "--tasks")
    if not names:
        raise UserError(f"--tasks {spec!r}: name at least one task (known: "
                        f"{', '.join(TASK_FIELDS)})")
    return list(dict.fromkeys(names))

