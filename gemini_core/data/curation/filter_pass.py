"""Phase 1 of `gx data prepare`: the per-document filters of one input shard, in a Ray worker.

Normalize, language, quality rules, safety, decontamination (when declared), classifier, PII
masking, in that order; a shard's kept documents are written as one gzip member (mtime 0) with
their dedup keys and MinHash signatures beside it, and the shard returns its counts and
removed-text examples as plain data.
Everything here is a pure function of (shard, plan), so the output never depends on which
worker ran which shard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from gemini_core.data.curation import classifier as classifier_lib
from gemini_core.data.curation import config as config_lib
from gemini_core.data.curation import contamination, langid, pii, quality, safety
from gemini_core.data.curation import dedup as dedup_lib
from gemini_core.data.curation.config import CurationConfig
from gemini_core.data.curation.normalize import normalize
from gemini_core.data.curation.sources import Shard, read_shard
from gemini_core.data.sources import Bad
from gemini_core.errors import UserError

FORMAT = 4  # bump when the output layout or any stage's behaviour changes
BATCH_DOCS = 256  # documents per batch inside a shard: bounds memory, amortizes the classifier
SNIPPET_CHARS = 240
STAGES = ("quality", "safety", "classifier")  # the per-document stages that drop, in order
# drops documents that share an n-gram with a declared benchmark (between safety and the
# classifier); a stage of the report only when declared, so reports without it are unchanged
DECONTAMINATE = "decontaminate"


# ---------------------------------------------------------------------------------------------
# what the workers need: plain, picklable settings (each worker loads the heavy parts once)


@dataclasses.dataclass(frozen=True)
class Plan:
    cfg_json: dict  # the CurationConfig as JSON: its mapping proxies do not pickle to workers
    quality_params: dict[str, quality.QualityParams]  # domain -> resolved rules
    blocklist_dir: str | None
    classifier_path: str | None
    dedup: dedup_lib.DedupParams
    work_dir: str
    classifier_threshold: float
    decontaminate: str | None = None  # the benchmarks' saved contamination.NgramIndex


def quality_params(cfg: CurationConfig) -> dict[str, quality.QualityParams]:
    """Per-domain rules; a misspelt parameter fails here, before any data is read."""
    base = quality.params_from(cfg.quality.params, "config.quality.params")
    for domain in cfg.quality.overrides:
        if domain not in cfg.data.domains:
            raise UserError(f"config.quality.overrides.{domain}: not in config.data.domains")
    return {d: quality.params_for(d, base, {k: dict(v) for k, v in cfg.quality.overrides.items()})
            for d in cfg.data.domains}


def blocklist_dir(cfg: CurationConfig) -> Path:
    return Path(cfg.safety.blocklist_dir or Path(cfg.data.root) / "_filters" / "ldnoobw")


# ---------------------------------------------------------------------------------------------
# phase 1: per-document filters (runs in Ray workers)


class ShardStats:
    """Counts and examples of one shard; plain dicts so they cross process boundaries."""

    def __init__(self, shard: Shard, examples: int, stages: tuple[str, ...] = STAGES):
        self.d: dict[str, Any] = {
            "index": shard.index, "domain": shard.domain, "split": shard.split,
            "source": shard.label, "docs_in": 0, "bytes_in": 0, "docs_out": 0, "bytes_out": 0,
            "bad": {}, "bad_examples": [], "removed": {s: {"docs": 0, "bytes": 0} for s in stages},
            "rules_first": {}, "rules_any": {}, "examples": {}, "pii": {}, "languages": {},
            "normalized_changed": 0}
        self.examples = examples

    def bad(self, line: int, item: Bad) -> None:
        self.d["bad"][item.kind] = self.d["bad"].get(item.kind, 0) + 1
        if len(self.d["bad_examples"]) < 5:
            self.d["bad_examples"].append({"line": line, "kind": item.kind, "message": item.message})

    def removed(self, stage: str, rule: str, text: str, n_bytes: int, where: str) -> None:
        self.d["removed"][stage]["docs"] += 1
        self.d["removed"][stage]["bytes"] += n_bytes
        self.d["rules_first"][rule] = self.d["rules_first"].get(rule, 0) + 1
        kept = self.d["examples"].setdefault(rule, [])
        if len(kept) < self.examples:
            kept.append({"where": where, "text": text[:SNIPPET_CHARS]})

    def count(self, key: str, name: str, n: int = 1) -> None:
        self.d[key][name] = self.d[key].get(name, 0) + n


class FilterWorker:
    """Ray Data callable class: builds the blocklist and classifier once per worker process."""

    def __init__(self, plan: Plan):
        self.plan = plan
        # checked on the driver; a worker may run elsewhere, or in another folder
        self.cfg = config_lib.from_config_dict(plan.cfg_json, paths=False)
        self.blocklist = (safety.Blocklist.load(Path(plan.blocklist_dir))
                          if plan.blocklist_dir else None)
        self.classifier = (classifier_lib.QualityClassifier.load(Path(plan.classifier_path))
                           if plan.classifier_path else None)
        self.benchmarks = (contamination.NgramIndex.load(Path(plan.decontaminate))
                           if plan.decontaminate else None)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        out = []
        for item in batch["shard"]:
            shard = Shard(**json.loads(item))
            try:
                out.append(json.dumps(self.filter_shard(shard)))
            except UserError as e:  # crosses back to the driver as a value, raised there
                out.append(json.dumps({"user_error": str(e), "index": shard.index}))
        return {"stats": out}

    def filter_shard(self, shard: Shard) -> dict:
        t0 = time.perf_counter()
        stats = ShardStats(shard, self.cfg.output.examples,
                           STAGES + (DECONTAMINATE,) if self.benchmarks else STAGES)
        work = Path(self.plan.work_dir)
        keys, sigs, ids, sizes = [], [], [], []
        with gzip_writer(work / f"{shard.index:06d}.part.gz") as out:
            for batch in record_batches(read_shard(shard), stats):
                for record, key, sig in self._filter_batch(shard, batch, stats):
                    out.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
                    keys.append(key)
                    sigs.append(sig)
                    ids.append(record["id"])
                    sizes.append(len(record["text"].encode("utf-8")))
        np.savez(work / f"{shard.index:06d}.npz", keys=stack(keys, (0, 16), np.uint8),
                 sigs=stack(sigs, (0, self.plan.dedup.num_perm), np.uint64),
                 ids=np.asarray(ids, dtype=str), sizes=np.asarray(sizes, np.int64))
        whole_file = shard.first_line == 1 and not shard.end_line
        if whole_file and not stats.d["docs_in"] and not stats.d["bad"]:
            # it would prepare into an empty split, which no training run can read
            raise UserError(f"{shard.label}: no documents (domain {shard.domain!r}, split "
                            f"{shard.split!r}); every input file needs at least one")
        stats.d["seconds"] = time.perf_counter() - t0
        return stats.d

    def _filter_batch(self, shard: Shard, batch: list[tuple[int, str]], stats: ShardStats):
        plan, cfg, domain = self.plan, self.cfg, shard.domain
        params = plan.quality_params.get(domain)
        survivors = []  # (line, text, lang, matches)
        for line, raw in batch:
            n_bytes = len(raw.encode("utf-8"))
            stats.d["docs_in"] += 1
            stats.d["bytes_in"] += n_bytes
            text = normalize(raw)
            stats.d["normalized_changed"] += text != raw
            lang, _ = langid.detect(text) if cfg.langid.enabled else ("und", 0.0)
            stats.count("languages", lang)
            where = f"{shard.label}:{line}"
            if cfg.quality.enabled:
                failures = quality.quality_failures(text, lang, params)
                for rule in failures:
                    stats.count("rules_any", f"quality/{rule}")
                if failures:
                    stats.removed("quality", f"quality/{failures[0]}", text, n_bytes, where)
                    continue
            matches = self.blocklist.count(text, lang) if self.blocklist else 0
            if matches > cfg.safety.max_matches and domain not in cfg.safety.exempt:
                stats.count("rules_any", "safety/blocklist")
                stats.removed("safety", "safety/blocklist", text, n_bytes, where)
                continue
            survivors.append((line, text, lang, matches, n_bytes))
        survivors = self._decontaminate(shard, survivors, stats)
        scores = self._scores([s[1] for s in survivors])
        drops_low = domain in cfg.classifier.apply_to
        kept = []
        for (line, text, lang, matches, n_bytes), score in zip(survivors, scores):
            if drops_low and score is not None and score < plan.classifier_threshold:
                stats.count("rules_any", "classifier/low_score")
                stats.removed("classifier", "classifier/low_score", text, n_bytes,
                              f"{shard.label}:{line}")
                continue
            counts: dict[str, int] = {}
            if cfg.pii.enabled:
                text, counts = pii.mask_pii(text)
                for kind, n in counts.items():
                    stats.count("pii", kind, n)
            record = {"text": text, "id": f"{domain}/{shard.split}/{shard.index}:{line}",
                      "source": f"{shard.label}:{line}", "lang": lang,
                      "blocklist_matches": matches, "pii": counts}
            if score is not None:
                record["quality_score"] = round(float(score), 6)
            kept.append((line, record))
        texts = [r["text"] for _, r in kept]
        sig_NxP = (dedup_lib.signatures(texts, plan.dedup) if plan.dedup.near and texts
                   else [None] * len(texts))
        for (line, record), sig in zip(kept, sig_NxP):
            key = dedup_lib.exact_key(record["text"]) if plan.dedup.exact else None
            stats.d["docs_out"] += 1
            stats.d["bytes_out"] += len(record["text"].encode("utf-8"))
            yield record, key, sig

    def _decontaminate(self, shard: Shard, survivors: list[tuple], stats: ShardStats
                       ) -> list[tuple]:
        """Drops the documents that share an n-gram with a declared benchmark; the rule is
        named by the first such task in the declared order."""
        if self.benchmarks is None or not survivors:
            return survivors
        kept = []
        for doc, tasks in zip(survivors, self.benchmarks.tasks_hit([s[1] for s in survivors])):
            if not tasks:
                kept.append(doc)
                continue
            line, text, _, _, n_bytes = doc
            for task in tasks:
                stats.count("rules_any", f"{DECONTAMINATE}/{task}")
            stats.removed(DECONTAMINATE, f"{DECONTAMINATE}/{tasks[0]}", text, n_bytes,
                          f"{shard.label}:{line}")
        return kept

    def _scores(self, texts: list[str]) -> list[float | None]:
        """Every document's score is kept (it ranks any domain); only apply_to ones drop."""
        if self.classifier is None or not texts:
            return [None] * len(texts)
        return [float(s) for s in self.classifier.score(texts)]


def record_batches(items: Iterable[tuple[int, str | Bad]], stats: ShardStats
                   ) -> Iterator[list[tuple[int, str]]]:
    """(line, text) in lists of BATCH_DOCS; bad records are counted in `stats`, not passed on."""
    batch = []
    for line, item in items:
        if isinstance(item, Bad):
            stats.bad(line, item)
            continue
        batch.append((line, item))
        if len(batch) == BATCH_DOCS:
            yield batch
            batch = []
    if batch:
        yield batch


@contextlib.contextmanager
def gzip_writer(path: Path):
    """A gzip member with mtime 0 and no file name in its header: the bytes never vary."""
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0,
                                                compresslevel=6, filename="") as gz:
        yield gz


def stack(rows: list, empty_shape: tuple[int, int], dtype) -> np.ndarray:
    rows = [r for r in rows if r is not None]
    if not rows:
        return np.zeros(empty_shape, dtype)
    if isinstance(rows[0], bytes):
        return np.frombuffer(b"".join(rows), np.uint8).reshape(len(rows), -1)
    return np.stack([np.asarray(r) for r in rows])
