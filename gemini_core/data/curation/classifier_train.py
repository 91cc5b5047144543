"""The quality classifier `gx data prepare` uses: the configured model, or one trained on a
sample of the corpus (positives vs negatives, train split) and cached by content under
`<runs root>/.cache/classifiers/`; `gx data train-classifier` trains it on its own.

Records that cannot be read while sampling are read errors, said as such: --strict stops at the
first, naming its file and line; otherwise they are skipped with a warning, and if too few
documents are left to train on, the error names the unreadable file before the count.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np

from gemini_core.data.curation import classifier as classifier_lib
from gemini_core.data.curation.config import CurationConfig
from gemini_core.data.curation.filter_pass import FORMAT
from gemini_core.data.curation.normalize import normalize
from gemini_core.data.curation.sources import Shard, limit_shards, plan_shards, read_shard
from gemini_core.data.sources import Bad
from gemini_core.errors import UserError
from gemini_core.runs.rundir import fingerprint, write_json_atomic

Log = Callable[[str], None]


def sample_docs(shards: list[Shard], domains: tuple[str, ...], limit: int, seed: int,
                bad: list[Bad]) -> list[str]:
    """A uniform sample of at most `limit` normalized train documents of `domains`
    (reservoir sampling: memory holds `limit` documents, whatever the corpus size); the
    records that could not be read are appended to `bad`."""
    rng, sample, seen = random.Random(seed), [], 0
    for shard in shards:
        if shard.domain not in domains or shard.split != "train":
            continue
        for _, text in read_shard(shard):
            if isinstance(text, Bad):
                bad.append(text)
                continue
            seen += 1
            if len(sample) < limit:
                sample.append(normalize(text))
            elif (j := rng.randrange(seen)) < limit:
                sample[j] = normalize(text)
    return sample


def _train(pos: list[str], neg: list[str], seed: int, bad: list[Bad]
           ) -> tuple[classifier_lib.QualityClassifier, dict]:
    try:
        return classifier_lib.QualityClassifier.train(
            pos, neg, classifier_lib.ClassifierParams(seed=seed))
    except UserError as e:
        if not bad:
            raise
        # the unreadable records are the likely cause of too few documents: named first
        raise UserError(f"{bad[0].message} ({len(bad):,} unreadable record(s) among the "
                        f"classifier's training documents; without them: {e})") from None


def classifier_path(cfg: CurationConfig, shards: list[Shard], cache: Path, log: Log,
                    strict: bool = False) -> Path:
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
    bad: list[Bad] = []
    pos = sample_docs(shards, cl.positives, cl.max_docs_per_class, cfg.seed, bad)
    neg = sample_docs(shards, cl.negatives, cl.max_docs_per_class, cfg.seed, bad)
    if bad and strict:
        raise UserError(f"{bad[0].message} (--strict: {len(bad):,} bad record(s) in the "
                        "classifier's training documents; nothing was written)")
    if bad:
        log(f"warning: classifier: skipped {len(bad):,} unreadable record(s) of its training "
            f"documents; first: {bad[0].message}")
    model, metrics = _train(pos, neg, cfg.seed, bad)
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
