"""`gx data prepare`: raw domain files -> cleaned data root + report, on Ray Data.

Two phases, so that the result is byte-identical with any number of workers and on a rerun:
  1. filter (parallel, one Ray Data task per input shard): normalize, language, quality rules,
     safety, classifier, PII masking; kept documents are written as one gzip member (mtime 0)
     per shard, with their dedup keys and MinHash signatures beside it, and the shard returns
     its counts and removed-text examples;
  2. dedup (driver, sequential): shards in the global order (domain, split, file, line), so
     "keep the first" is the same decision whoever processed which shard; only the parts that
     lost duplicates are rewritten (duplicates are rare: a second parallel pass over every part
     would cost more than it saves); the parts are concatenated per domain and split into
     `<out>/<domain>/<split>.jsonl.gz` (concatenated gzip members are one valid gzip file).
Everything is written under a temporary directory renamed into place at the end, so an
interrupted prepare never leaves an output that looks complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from gemini_core.config import to_json_dict
from gemini_core.scale import ray_local
from gemini_core.data.curation import classifier as classifier_lib
from gemini_core.data.curation import dedup as dedup_lib
from gemini_core.data.curation import langid, pii, quality, safety
from gemini_core.data.curation import config as config_lib
from gemini_core.data.curation.config import CurationConfig
from gemini_core.data.curation.normalize import normalize
from gemini_core.data.curation.sources import Shard, check_hf_source, plan_shards, read_shard
from gemini_core.data.sources import Bad
from gemini_core.errors import UserError
from gemini_core.runs.rundir import fingerprint, write_json_atomic

FORMAT = 4  # bump when the output layout or any stage's behaviour changes
BATCH_DOCS = 256  # documents per batch inside a shard: bounds memory, amortizes the classifier
SNIPPET_CHARS = 240
STAGES = ("quality", "safety", "classifier")  # the per-document stages that drop, in order

Log = Callable[[str], None]


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


def quality_params(cfg: CurationConfig) -> dict[str, quality.QualityParams]:
    """Per-domain rules; a misspelt parameter fails here, before any data is read."""
    base = quality.params_from(cfg.quality.params, "config.quality.params")
    for domain in cfg.quality.overrides:
        if domain not in cfg.data.domains:
            raise UserError(f"config.quality.overrides.{domain}: not in config.data.domains")
    return {d: quality.params_for(d, base, {k: dict(v) for k, v in cfg.quality.overrides.items()})
            for d in cfg.data.domains}


def dedup_params(cfg: CurationConfig) -> dedup_lib.DedupParams:
    d = cfg.dedup
    return dedup_lib.DedupParams(exact=d.exact, near=d.near, ngram=d.ngram, num_perm=d.num_perm,
                                 bands=d.bands, threshold=d.threshold, seed=cfg.seed)


def blocklist_dir(cfg: CurationConfig) -> Path:
    return Path(cfg.safety.blocklist_dir or Path(cfg.data.root) / "_filters" / "ldnoobw")


# ---------------------------------------------------------------------------------------------
# phase 1: per-document filters (runs in Ray workers)


class _ShardStats:
    """Counts and examples of one shard; plain dicts so they cross process boundaries."""

    def __init__(self, shard: Shard, examples: int):
        self.d: dict[str, Any] = {
            "index": shard.index, "domain": shard.domain, "split": shard.split,
            "source": shard.label, "docs_in": 0, "bytes_in": 0, "docs_out": 0, "bytes_out": 0,
            "bad": {}, "bad_examples": [], "removed": {s: {"docs": 0, "bytes": 0} for s in STAGES},
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
        self.cfg = config_lib.from_config_dict(plan.cfg_json)
        self.blocklist = (safety.Blocklist.load(Path(plan.blocklist_dir))
                          if plan.blocklist_dir else None)
        self.classifier = (classifier_lib.QualityClassifier.load(Path(plan.classifier_path))
                           if plan.classifier_path else None)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        out = []
        for item in batch["shard"]:
            try:
                out.append(json.dumps(self.filter_shard(Shard(**json.loads(item)))))
            except UserError as e:  # crosses back to the driver as a value, raised there
                out.append(json.dumps({"user_error": str(e)}))
        return {"stats": out}

    def filter_shard(self, shard: Shard) -> dict:
        t0 = time.perf_counter()
        stats = _ShardStats(shard, self.cfg.output.examples)
        work = Path(self.plan.work_dir)
        keys, sigs, ids, sizes = [], [], [], []
        with _gzip_writer(work / f"{shard.index:06d}.part.gz") as out:
            for batch in _batches(read_shard(shard), stats):
                for record, key, sig in self._filter_batch(shard, batch, stats):
                    out.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
                    keys.append(key)
                    sigs.append(sig)
                    ids.append(record["id"])
                    sizes.append(len(record["text"].encode("utf-8")))
        np.savez(work / f"{shard.index:06d}.npz", keys=_stack(keys, (0, 16), np.uint8),
                 sigs=_stack(sigs, (0, self.plan.dedup.num_perm), np.uint64),
                 ids=np.asarray(ids, dtype=str), sizes=np.asarray(sizes, np.int64))
        whole_file = shard.first_line == 1 and not shard.end_line
        if whole_file and not stats.d["docs_in"] and not stats.d["bad"]:
            stats.count("bad", "empty_file")
            stats.d["bad_examples"].append({"line": 0, "kind": "empty_file",
                                            "message": f"{shard.label}: no documents"})
        stats.d["seconds"] = time.perf_counter() - t0
        return stats.d

    def _filter_batch(self, shard: Shard, batch: list[tuple[int, str]], stats: _ShardStats):
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

    def _scores(self, texts: list[str]) -> list[float | None]:
        """Every document's score is kept (it ranks any domain); only apply_to ones drop."""
        if self.classifier is None or not texts:
            return [None] * len(texts)
        return [float(s) for s in self.classifier.score(texts)]


def _batches(items: Iterable[tuple[int, str | Bad]], stats: _ShardStats):
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
def _gzip_writer(path: Path):
    """A gzip member with mtime 0 and no file name in its header: the bytes never vary."""
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0,
                                                compresslevel=6, filename="") as gz:
        yield gz


def _stack(rows: list, empty_shape: tuple[int, int], dtype) -> np.ndarray:
    rows = [r for r in rows if r is not None]
    if not rows:
        return np.zeros(empty_shape, dtype)
    if isinstance(rows[0], bytes):
        return np.frombuffer(b"".join(rows), np.uint8).reshape(len(rows), -1)
    return np.stack([np.asarray(r) for r in rows])


# ---------------------------------------------------------------------------------------------
# phase 2: dedup on the driver, in the global order


def dedup_shards(plan: Plan, shards: list[Shard], log: Log) -> tuple[dict[int, set[int]], dict]:
    """Row numbers to drop per shard, and the counts and examples for the report."""
    p = plan.dedup
    if not (p.exact or p.near):
        return {}, {}
    deduper = dedup_lib.Deduper(p)
    drops: dict[int, set[int]] = {}
    removed: dict[str, dict[str, dict]] = {}
    work = Path(plan.work_dir)
    for shard in shards:
        arrays = np.load(work / f"{shard.index:06d}.npz")
        keys, sigs, ids, sizes = arrays["keys"], arrays["sigs"], arrays["ids"], arrays["sizes"]
        for row, doc_id in enumerate(ids.tolist()):
            found = deduper.add(doc_id, keys[row].tobytes() if p.exact else None,
                                sigs[row] if p.near else None)
            if found is None:
                continue
            kind, original = found
            drops.setdefault(shard.index, set()).add(row)
            entry = removed.setdefault(shard.domain, {}).setdefault(
                f"dedup/{kind}", {"docs": 0, "bytes": 0, "cross_domain": 0, "examples": [],
                                  "rows": [], "split_docs": {}, "split_bytes": {}})
            entry["docs"] += 1
            entry["bytes"] += int(sizes[row])
            entry["split_docs"][shard.split] = entry["split_docs"].get(shard.split, 0) + 1
            entry["split_bytes"][shard.split] = (entry["split_bytes"].get(shard.split, 0)
                                                 + int(sizes[row]))
            entry["cross_domain"] += original.split("/")[0] != shard.domain
            if len(entry["examples"]) < plan.cfg_json["output"]["examples"]:
                entry["examples"].append({"where": doc_id, "duplicate_of": original,
                                          "shard": shard.index, "row": row})
    _fill_dedup_examples(work, removed)
    log(f"dedup: {sum(len(v) for v in drops.values()):,} duplicates removed")
    return drops, removed


def _fill_dedup_examples(work: Path, removed: dict) -> None:
    """The text of each example duplicate, read back from its shard's part."""
    wanted: dict[int, list[dict]] = {}
    for kinds in removed.values():
        for entry in kinds.values():
            entry.pop("rows")
            for ex in entry["examples"]:
                wanted.setdefault(ex.pop("shard"), []).append(ex)
    for index, examples in wanted.items():
        rows = {ex.pop("row"): ex for ex in examples}
        with gzip.open(work / f"{index:06d}.part.gz", "rt", encoding="utf-8") as f:
            for row, line in enumerate(f):
                if row in rows:
                    rows[row]["text"] = json.loads(line)["text"][:SNIPPET_CHARS]


def drop_rows(part: Path, rows: set[int]) -> None:
    """Rewrites a part without the given rows."""
    tmp = part.with_suffix(".tmp")
    with gzip.open(part, "rb") as src, _gzip_writer(tmp) as dst:
        for row, line in enumerate(src):
            if row not in rows:
                dst.write(line)
    os.replace(tmp, part)


def assemble(work: Path, shards: list[Shard], drops: dict[int, set[int]],
             out_tmp: Path) -> list[tuple[str, str]]:
    """Concatenates the parts per domain and split, in the global order."""
    written = []
    for shard in shards:
        part = work / f"{shard.index:06d}.part.gz"
        if shard.index in drops:
            drop_rows(part, drops[shard.index])
        target = out_tmp / shard.domain / f"{shard.split}.jsonl.gz"
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "ab") as dst, open(part, "rb") as src:
            shutil.copyfileobj(src, dst)
        if (shard.domain, shard.split) not in written:
            written.append((shard.domain, shard.split))
    return written


# ---------------------------------------------------------------------------------------------
# Ray


def _ray_map(items: list[dict], column: str, fn, workers: int, progress: "Progress",
             result: str, **kwargs) -> list[str]:
    import ray.data
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False  # results are re-ordered by index below
    ds = ray.data.from_items([{column: json.dumps(item)} for item in items],
                             override_num_blocks=len(items))
    strategy = ray.data.ActorPoolStrategy if isinstance(fn, type) else ray.data.TaskPoolStrategy
    ds = ds.map_batches(fn, batch_size=1, compute=strategy(size=workers), num_cpus=1, **kwargs)
    out = []
    for row in ds.iter_rows():
        out.append(row[result])
        progress.done(row[result])
    return out


class Progress:
    """One line per finished shard: shards done, documents, MB/s, ETA."""

    def __init__(self, stage: str, total: int, total_bytes: int, log: Log):
        self.stage, self.total, self.total_bytes, self.log = stage, total, total_bytes, log
        self.n, self.bytes, self.t0 = 0, 0, time.perf_counter()

    def done(self, result: str) -> None:
        self.n += 1
        try:
            stats = json.loads(result)
            self.bytes += stats.get("bytes_in", 0) if isinstance(stats, dict) else 0
        except ValueError:
            stats = None
        elapsed = time.perf_counter() - self.t0
        rate = self.bytes / 1e6 / elapsed if elapsed else 0.0
        left = (elapsed / self.n) * (self.total - self.n)
        extra = f", {self.bytes / 1e6:.1f} MB, {rate:.2f} MB/s" if self.bytes else ""
        label = (f" ({stats['domain']}/{stats['split']})"
                 if isinstance(stats, dict) and "domain" in stats else "")
        self.log(f"{self.stage}: {self.n}/{self.total} shards{label}{extra}, eta {left:.0f}s")


# ---------------------------------------------------------------------------------------------
# identity, classifier, the whole prepare


def identity(cfg: CurationConfig, shards: list[Shard], blocklist_fp: str | None,
             classifier_fp: str | None) -> dict:
    """Everything that decides the output bytes; paths, workers and strictness do not."""
    resolved = to_json_dict(cfg)
    resolved["data"].pop("root")
    resolved["output"].pop("dir")
    resolved.pop("workers")
    resolved.pop("strict")
    resolved["safety"].pop("blocklist_dir")
    resolved["classifier"].pop("model")
    return {"format": FORMAT, "config": resolved, "blocklist": blocklist_fp,
            "classifier": classifier_fp,
            "inputs": sorted({(s.domain, s.split, Path(s.path).name if s.kind == "files"
                               else s.label, s.sha256) for s in shards})}


def _sample_docs(shards: list[Shard], domains: tuple[str, ...], limit: int,
                 seed: int) -> list[str]:
    """A uniform sample of at most `limit` normalized train documents of `domains`
    (reservoir sampling: memory holds `limit` documents, whatever the corpus size)."""
    rng, sample, seen = random.Random(seed), [], 0
    for shard in shards:
        if shard.domain not in domains or shard.split != "train":
            continue
        for _, text in read_shard(shard):
            if isinstance(text, Bad):
                continue
            seen += 1
            if len(sample) < limit:
                sample.append(normalize(text))
            elif (j := rng.randrange(seen)) < limit:
                sample[j] = normalize(text)
    return sample


def classifier_path(cfg: CurationConfig, shards: list[Shard], cache: Path, log: Log) -> Path:
    """A trained quality classifier: the configured model, or one trained here and cached."""
    cl = cfg.classifier
    if cl.model:
        classifier_lib.QualityClassifier.load(Path(cl.model))  # a clear error if unusable
        return Path(cl.model)
    key = fingerprint({"format": FORMAT, "positives": cl.positives, "negatives": cl.negatives,
                       "max_docs": cl.max_docs_per_class, "seed": cfg.seed,
                       "params": dataclasses.asdict(classifier_lib.ClassifierParams()),
                       "inputs": [[s.domain, s.sha256, s.label] for s in shards
                                  if s.split == "train"
                                  and s.domain in cl.positives + cl.negatives]})
    path = cache / "classifiers" / f"{key[:16]}.npz"
    if path.is_file():
        log(f"classifier: reusing {path}")
        return path
    t0 = time.perf_counter()
    pos = _sample_docs(shards, cl.positives, cl.max_docs_per_class, cfg.seed)
    neg = _sample_docs(shards, cl.negatives, cl.max_docs_per_class, cfg.seed)
    model, metrics = classifier_lib.QualityClassifier.train(
        pos, neg, classifier_lib.ClassifierParams(seed=cfg.seed))
    # percentiles of the negatives' scores: drop_fraction picks its threshold among them
    metrics["negative_score_percentiles"] = np.percentile(
        model.score(neg), np.arange(101)).round(6).tolist()
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    write_json_atomic(path.with_suffix(".json"), metrics)
    log(f"classifier: trained on {len(pos):,} {'+'.join(cl.positives)} vs {len(neg):,} "
        f"{'+'.join(cl.negatives)} docs in {time.perf_counter() - t0:.1f}s; held-out "
        f"accuracy {metrics['accuracy']:.3f}, AUC {metrics['auc']:.3f}")
    return path


def classifier_threshold(cfg: CurationConfig, path: Path) -> float:
    cl = cfg.classifier
    if cl.threshold > 0:
        return cl.threshold
    metrics_path = path.with_suffix(".json")
    if not metrics_path.is_file():
        raise UserError(f"config.classifier.model={str(path)!r}: has no {metrics_path.name} "
                        "with its score percentiles; set config.classifier.threshold instead")
    percentiles = json.loads(metrics_path.read_text())["negative_score_percentiles"]
    return float(np.interp(cl.drop_fraction * 100, np.arange(101), percentiles))


def limit_shards(shards: list[Shard], max_docs: int) -> list[Shard]:
    """The shards of the first `max_docs` records of each domain and split (config.data.
    max_docs), renumbered in the same global order; all shards when 0."""
    if not max_docs:
        return shards
    out: list[Shard] = []
    left: dict[tuple[str, str], int] = {}
    for s in shards:
        n = left.setdefault((s.domain, s.split), max_docs)
        if n <= 0:
            continue
        if s.kind != "files" or not s.path.endswith((".jsonl", ".jsonl.gz", ".txt")):
            raise UserError(f"config.data.max_docs={max_docs}: applies to local .jsonl and .txt "
                            f"files only, not {s.label} (domain {s.domain!r})")
        if s.path.endswith(".txt"):  # a .txt file is one document
            end, n_taken = s.end_line, 1
        else:  # one record per line
            end = min(s.first_line + n, s.end_line or s.first_line + n)
            n_taken = end - s.first_line
        out.append(dataclasses.replace(s, index=len(out), end_line=end))
        left[(s.domain, s.split)] = n - n_taken
    return out


def default_output(cfg: CurationConfig, runs_root: Path, fp: str) -> Path:
    if cfg.output.dir:
        return Path(cfg.output.dir).absolute()
    return runs_root / "data" / f"{cfg.name}-{fp[:8]}"


def prepare(cfg: CurationConfig, runs_root: Path, *, workers: int = 0, strict: bool = False,
            force: bool = False, log: Log = print) -> Path:
    """Runs the pipeline (or reuses an identical finished output); returns the output dir."""
    runs_root = Path(runs_root).absolute()
    workers = workers or cfg.workers or os.cpu_count() or 1
    strict = strict or cfg.strict
    q_params = quality_params(cfg) if cfg.quality.enabled else {}
    shards = limit_shards(plan_shards(cfg), cfg.data.max_docs)
    for shard in shards:
        check_hf_source(shard)
    block_dir = blocklist_dir(cfg) if cfg.safety.enabled else None
    block_fp = safety.Blocklist.load(block_dir).fingerprint if block_dir else None
    cache = runs_root / ".cache"
    cl_path = classifier_path(cfg, shards, cache, log) if cfg.classifier.enabled else None
    cl_fp = classifier_lib.QualityClassifier.load(cl_path).fingerprint if cl_path else None
    threshold = classifier_threshold(cfg, cl_path) if cl_path else 0.0
    ident = identity(cfg, shards, block_fp, cl_fp)
    fp = fingerprint(ident)
    out = default_output(cfg, runs_root, fp)
    done = _read_report(out)
    if done and done.get("fingerprint") == fp and not force:
        log(f"data: {out} is already prepared with this config and input (--force redoes it)")
        return out
    if out.exists() and not force and not done:
        raise UserError(f"{out}: exists and is not a finished prepare output; choose another "
                        "config.output.dir or remove it")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    work = tmp / ".work"
    work.mkdir(parents=True)
    try:
        report = _run(cfg, shards, Plan(to_json_dict(cfg), q_params, str(block_dir) if block_dir else None,
                                        str(cl_path) if cl_path else None, dedup_params(cfg),
                                        str(work), threshold), tmp, workers, strict, log)
        report.update(fingerprint=fp, identity=ident, workers=workers,
                      classifier_threshold=threshold)
        if cl_path and cl_path.with_suffix(".json").is_file():
            report["classifier_metrics"] = json.loads(cl_path.with_suffix(".json").read_text())
        shutil.rmtree(work)
        write_json_atomic(tmp / "report.json", report)
        (tmp / "report.txt").write_text(format_report(report) + "\n")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(format_report(report))
    log(f"data: cleaned data root {out}")
    return out


def _run(cfg: CurationConfig, shards: list[Shard], plan: Plan, tmp: Path, workers: int,
         strict: bool, log: Log) -> dict:
    t0 = time.perf_counter()
    ray_local.init_ray(log, num_cpus=workers)
    total_bytes = sum(Path(s.path).stat().st_size for s in shards if s.kind == "files")
    log(f"filter: {len(shards)} shards on {workers} Ray workers")
    # largest first: a big file started last would leave the other workers idle at the end
    by_size = sorted(shards, key=lambda s: -(Path(s.path).stat().st_size
                                             if s.kind == "files" else 0))
    stats = [json.loads(s) for s in _ray_map(
        [dataclasses.asdict(s) for s in by_size], "shard", FilterWorker, workers,
        Progress("filter", len(shards), total_bytes, log), "stats",
        fn_constructor_kwargs={"plan": plan})]
    for s in stats:
        if "user_error" in s:
            raise UserError(s["user_error"])
    stats.sort(key=lambda s: s["index"])
    t_filter = time.perf_counter() - t0
    bad = [(s, e) for s in stats for e in s["bad_examples"]]
    if strict and bad:
        shard, first = bad[0]
        raise UserError(f"{first['message']} (--strict: {sum(sum(s['bad'].values()) for s in stats):,}"
                        " bad records in all; nothing was written)")
    drops, dup_removed = dedup_shards(plan, shards, log)
    written = assemble(Path(plan.work_dir), shards, drops, tmp)
    t_dedup = time.perf_counter() - t0 - t_filter
    t_total = time.perf_counter() - t0
    return build_report(cfg, stats, dup_removed, written,
                        {"filter": t_filter, "dedup": t_dedup, "total": t_total})


# ---------------------------------------------------------------------------------------------
# the report


def _read_report(out: Path) -> dict | None:
    try:
        return json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return None


def read_report(out: Path) -> dict:
    report = _read_report(out)
    if report is None:
        raise UserError(f"{out}: no readable report.json; not a `gx data prepare` output")
    return report


def train_classifier(cfg: CurationConfig, runs_root: Path, log: Log = print) -> Path:
    """`gx data train-classifier`: the classifier prepare would use, and its held-out metrics."""
    if not cfg.classifier.enabled:
        raise UserError("config.classifier.enabled=False: nothing to train")
    path = classifier_path(cfg, limit_shards(plan_shards(cfg), cfg.data.max_docs),
                           Path(runs_root).absolute() / ".cache", log)
    metrics_path = path.with_suffix(".json")
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        log(f"classifier {path}: held-out accuracy {metrics['accuracy']:.3f}, AUC "
            f"{metrics['auc']:.3f} ({metrics['n_holdout']:,} held-out documents)")
    return path


def _merge_counts(into: dict, counts: dict) -> None:
    for k, v in counts.items():
        into[k] = into.get(k, 0) + v


def _written(stats: list[dict], dup_removed: dict, domain: str, split: str) -> dict:
    """Documents and text bytes of one output file: the filters' survivors less duplicates."""
    shards = [s for s in stats if (s["domain"], s["split"]) == (domain, split)]
    dups = dup_removed.get(domain, {}).values()
    return {"file": f"{domain}/{split}.jsonl.gz",
            "docs": sum(s["docs_out"] for s in shards)
            - sum(v["split_docs"].get(split, 0) for v in dups),
            "bytes": sum(s["bytes_out"] for s in shards)
            - sum(v["split_bytes"].get(split, 0) for v in dups)}


def build_report(cfg: CurationConfig, stats: list[dict], dup_removed: dict,
                 written: list[tuple[str, str]], seconds: dict) -> dict:
    domains: dict[str, dict] = {}
    for s in stats:
        d = domains.setdefault(s["domain"], {
            "docs_in": 0, "bytes_in": 0, "removed": {}, "rules_any": {}, "examples": {},
            "pii": {}, "languages": {}, "bad": {}, "bad_examples": [], "normalized_changed": 0,
            "sources": []})
        for key in ("docs_in", "bytes_in", "normalized_changed"):
            d[key] += s[key]
        for stage, r in s["removed"].items():
            _merge_counts(d["removed"].setdefault(stage, {"docs": 0, "bytes": 0}), r)
        for key in ("rules_any", "pii", "languages", "bad"):
            _merge_counts(d[key], s[key])
        _merge_counts(d.setdefault("rules_first", {}), s["rules_first"])
        for rule, ex in s["examples"].items():
            kept = d["examples"].setdefault(rule, [])
            kept += ex[: cfg.output.examples - len(kept)]
        d["bad_examples"] += s["bad_examples"][: 5 - len(d["bad_examples"])]
        d["sources"].append(s["source"])
    for domain, kinds in dup_removed.items():
        d = domains[domain]
        for kind, entry in kinds.items():
            d["removed"][kind] = {"docs": entry["docs"], "bytes": entry["bytes"],
                                  "cross_domain": entry["cross_domain"]}
            d["rules_first"][kind] = entry["docs"]
            d["examples"][kind] = entry["examples"]
    for domain, split in written:
        domains[domain].setdefault("output", {})[split] = _written(stats, dup_removed, domain,
                                                                   split)
    for d in domains.values():
        d["docs_out"] = sum(o["docs"] for o in d.get("output", {}).values())
        d["bytes_out"] = sum(o["bytes"] for o in d.get("output", {}).values())
    total_in = sum(d["bytes_in"] for d in domains.values())
    return {"name": cfg.name, "domain_order": list(cfg.data.domains), "domains": domains,
            "seconds": seconds,
            "mb_per_s": total_in / 1e6 / seconds["total"] if seconds["total"] else None}


def format_report(report: dict) -> str:
    """The human-readable report: per domain docs and MB in/out, then what each rule removed."""
    lines = [f"{'domain':<14}{'docs in':>10}{'docs out':>10}{'kept':>7}{'MB in':>9}{'MB out':>9}"
             + "".join(f"{s:>12}" for s in (*STAGES, "dedup"))]
    lines.append("-" * len(lines[0]))
    # report.json is written with sorted keys; show domains in the config's order
    order = report.get("domain_order") or list(report["domains"])
    domains = {d: report["domains"][d] for d in order if d in report["domains"]}
    for domain, d in domains.items():
        removed = d["removed"]
        dedup = sum(v["docs"] for k, v in removed.items() if k.startswith("dedup/"))
        kept = d["docs_out"] / d["docs_in"] if d["docs_in"] else 0.0
        lines.append(f"{domain:<14}{d['docs_in']:>10,}{d['docs_out']:>10,}{kept:>7.0%}"
                     f"{d['bytes_in'] / 1e6:>9.2f}{d['bytes_out'] / 1e6:>9.2f}"
                     + "".join(f"{removed.get(s, {}).get('docs', 0):>12,}" for s in STAGES)
                     + f"{dedup:>12,}")
    lines.append("")
    lines.append("removed by rule (first rule that dropped the document; any = every failing "
                 "document)")
    for domain, d in domains.items():
        rules = sorted(d["rules_first"].items(), key=lambda kv: -kv[1])
        if not rules:
            continue
        lines.append(f"  {domain}: " + ", ".join(
            f"{r} {n:,} (any {d['rules_any'].get(r, n):,})" for r, n in rules))
        for rule, _ in rules[:3]:
            for ex in d["examples"].get(rule, [])[:1]:
                snippet = " ".join(ex["text"].split())[:100]
                lines.append(f"      {rule} e.g. {ex['where']}: {snippet!r}")
    for domain, d in domains.items():
        if d["pii"]:
            lines.append(f"  {domain}: PII masked: " + ", ".join(
                f"{k} {n:,}" for k, n in sorted(d["pii"].items())))
        if d["bad"]:
            lines.append(f"  {domain}: bad records: " + ", ".join(
                f"{k} {n:,}" for k, n in sorted(d["bad"].items()))
                + f" (first: {d['bad_examples'][0]['message']})")
        top = sorted(d["languages"].items(), key=lambda kv: -kv[1])[:5]
        lines.append(f"  {domain}: languages " + ", ".join(f"{k} {n:,}" for k, n in top))
        empty = [s for s, o in d.get("output", {}).items() if not o["docs"]]
        if empty:
            lines.append(f"  {domain}: WARNING: no documents left in {', '.join(empty)}")
    metrics = report.get("classifier_metrics")
    if metrics:
        lines.append(f"classifier: held-out accuracy {metrics['accuracy']:.3f}, "
                     f"AUC {metrics['auc']:.3f}")
    sec = report["seconds"]
    mbps = report.get("mb_per_s")
    lines.append(f"time: filter {sec['filter']:.1f}s, dedup {sec['dedup']:.1f}s, total "
                 f"{sec['total']:.1f}s" + (f" ({mbps:.2f} MB/s)" if mbps else ""))
    return "\n".join(lines)
