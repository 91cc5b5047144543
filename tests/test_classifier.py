"""The hashed n-gram quality classifier: features against a pure-Python reference, the AUC
against a pairwise count, training on toy and real data (../shared/corpus), files."""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from gemini_core.data.curation import classifier as clf
from gemini_core.data.curation.classifier import ClassifierParams, QualityClassifier, auc, featurize
from gemini_core.errors import UserError

M64 = (1 << 64) - 1


def read_texts(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


# ---------------------------------------------------------------------------------------------
# features


def _mix_ref(h: int) -> int:
    h ^= h >> 30
    h = h * 0xBF58476D1CE4E5B9 & M64
    h ^= h >> 27
    h = h * 0x94D049BB133111EB & M64
    return h ^ h >> 31


def reference_features(text: str, p: ClassifierParams) -> dict[int, float]:
    """Column -> value of one text, the slow obvious way."""
    data = text[:p.max_chars].lower().encode("utf-8", "replace")
    tokens = re.findall(rb"[0-9a-z\x80-\xff]+|[^\x00-\x20\x7f0-9a-z\x80-\xff]", data)
    hashes = []
    for tok in tokens:
        h = 0
        for b in tok:  # Horner: sum of b_j * P^(len-1-j) mod 2^64
            h = (h * 0x100000001B3 + b) & M64
        hashes.append(_mix_ref(h))
    counts = collections.Counter(h % p.buckets for h in hashes)
    grams = hashes
    for n in range(2, p.ngrams + 1):
        grams = [_mix_ref((g * 0x9E3779B97F4A7C15 + hashes[i + n - 1] + n) & M64)
                 for i, g in enumerate(grams[:-1])]
        counts.update(g % p.buckets for g in grams)
    values = {c: math.log1p(k) for c, k in counts.items()}
    norm = math.sqrt(sum(v * v for v in values.values()))
    return {c: v / norm for c, v in values.items()}


TEXTS = [
    "The cat sat on the mat. The cat, again!",
    "",
    "   \n\t  ",
    "déjà vu: Ünïcödé — 漢字とかな, ok?",
    "x",
    "def f(a, b):\n    return a+b  # sum\n",
    "a" * 50 + " tail beyond max_chars",
    "UPPER lower MiXeD 123 4.56",
]


@pytest.mark.parametrize("ngrams,buckets", [(1, 1 << 18), (2, 1 << 18), (3, 1000)])
def test_features_match_reference(ngrams, buckets):
    p = ClassifierParams(ngrams=ngrams, buckets=buckets, max_chars=60)
    x = featurize(TEXTS, p)
    assert x.indptr.shape == (len(TEXTS) + 1,)
    for i, text in enumerate(TEXTS):
        lo, hi = x.indptr[i], x.indptr[i + 1]
        got = dict(zip(x.indices[lo:hi].tolist(), x.values[lo:hi].tolist()))
        want = reference_features(text, p)
        assert got.keys() == want.keys(), text
        np.testing.assert_allclose([got[c] for c in want], list(want.values()), rtol=1e-6)
        assert np.all(np.diff(x.indices[lo:hi]) > 0)  # columns sorted and unique in a row
    # no n-gram across documents: "x" alone and "x" next to other texts give the same row
    alone = featurize(["x"], p)
    assert alone.indices.tolist() == x.indices[x.indptr[4]:x.indptr[5]].tolist()


def test_rows_gathers_entries():
    x = featurize(TEXTS, ClassifierParams())
    rows = np.array([5, 0, 1, 5])
    row_E, col_E, val_E = x.rows(rows)
    for r, doc in enumerate(rows):
        lo, hi = x.indptr[doc], x.indptr[doc + 1]
        assert col_E[row_E == r].tolist() == x.indices[lo:hi].tolist()
        assert val_E[row_E == r].tolist() == x.values[lo:hi].tolist()


# ---------------------------------------------------------------------------------------------
# auc


def brute_force_auc(pos, neg) -> float:
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def test_auc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        pos = rng.integers(0, 6, rng.integers(1, 40)).astype(float)
        neg = rng.integers(0, 6, rng.integers(1, 40)).astype(float) - rng.integers(0, 2)
        assert auc(pos, neg) == pytest.approx(brute_force_auc(pos, neg), abs=1e-12)
    assert auc([1, 2, 3], [0, -1]) == 1.0
    assert auc([0, -1], [1, 2, 3]) == 0.0
    assert auc([0.5] * 4, [0.5] * 7) == 0.5
    assert math.isnan(auc([], [1.0]))


# ---------------------------------------------------------------------------------------------
# training on toy data


def toy_docs(n: int, words: list[str], seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    filler = ["the", "of", "and", "a", "to", "in", "is", "it"]
    return [" ".join(rng.choice(words + filler, rng.integers(20, 80))) for _ in range(n)]


GOOD = ["theorem", "history", "century", "species", "river", "treaty", "novel", "orbit"]
BAD = ["click", "buy", "cheap", "login", "cookie", "subscribe", "deal", "free"]

SMALL = ClassifierParams(buckets=1 << 12, epochs=3)


@pytest.fixture(scope="module")
def toy():
    pos, neg = toy_docs(120, GOOD, 1), toy_docs(80, BAD, 2)
    return pos, neg, QualityClassifier.train(pos, neg, SMALL)


def test_toy_separable_set_is_learned(toy):
    pos, neg, (model, metrics) = toy
    assert metrics["auc"] == pytest.approx(1.0)
    assert metrics["accuracy"] == pytest.approx(1.0)
    assert metrics["n_holdout"] == 24 + 16 and metrics["n_train"] == 200 - 40
    assert (metrics["positives"], metrics["negatives"]) == (120, 80)
    s_pos, s_neg = model.score(toy_docs(30, GOOD, 3)), model.score(toy_docs(30, BAD, 4))
    assert auc(s_pos, s_neg) == 1.0
    assert s_pos.dtype == np.float32 and s_pos.min() > 0.5 > s_neg.max()


def test_score_shapes_and_batching(toy, monkeypatch):
    pos, neg, (model, _) = toy
    assert model.score([]).shape == (0,)
    empty = model.score(["", "  "])
    assert empty[0] == empty[1] == np.float32(clf.sigmoid(np.float64(model.bias)))
    texts = pos[:10] + neg[:10]
    together = model.score(texts)
    assert np.all((together >= 0) & (together <= 1))
    # a text's score does not depend on what it is batched with (the pipeline batches freely)
    monkeypatch.setattr(clf, "BATCH_BYTES", 300)
    assert model.score(texts).tolist() == together.tolist()
    assert [model.score([t])[0] for t in texts] == together.tolist()


def test_training_is_deterministic_given_seed(toy):
    pos, neg, (model, metrics) = toy
    again, metrics_again = QualityClassifier.train(pos, neg, SMALL)
    assert again.fingerprint == model.fingerprint
    assert np.array_equal(again.weights, model.weights) and metrics_again == metrics
    other, _ = QualityClassifier.train(pos, neg, dataclasses.replace(SMALL, seed=1))
    assert other.fingerprint != model.fingerprint


def test_too_few_documents_or_bad_params():
    with pytest.raises(UserError, match="3 positive documents, need at least 10"):
        QualityClassifier.train(["good text"] * 3, ["bad text"] * 20, SMALL)
    with pytest.raises(UserError, match="negative documents"):
        QualityClassifier.train(["good text"] * 20, [], SMALL)
    with pytest.raises(UserError, match=r"classifier\.holdout=1\.0"):
        QualityClassifier.train(["a"] * 20, ["b"] * 20, ClassifierParams(holdout=1.0))
    with pytest.raises(UserError, match=r"classifier\.buckets=0"):
        ClassifierParams(buckets=0).check()


# ---------------------------------------------------------------------------------------------
# files


def test_save_load_round_trip(toy, tmp_path):
    pos, neg, (model, metrics) = toy
    path = tmp_path / "sub" / "quality.npz"
    model.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["quality.npz"]  # no temp file left
    loaded = QualityClassifier.load(path)
    assert loaded.fingerprint == model.fingerprint
    assert loaded.params == model.params and loaded.metrics == metrics
    texts = pos[:5] + neg[:5] + ["", "unseen words entirely"]
    assert loaded.score(texts).tolist() == model.score(texts).tolist()
    model.save(path)  # overwriting is fine
    assert QualityClassifier.load(path).fingerprint == model.fingerprint


def test_load_missing_or_corrupt_names_the_path(toy, tmp_path):
    _, _, (model, _) = toy
    missing = tmp_path / "none.npz"
    with pytest.raises(UserError, match=re.escape(str(missing))):
        QualityClassifier.load(missing)
    good = tmp_path / "good.npz"
    model.save(good)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:1000])
    text = tmp_path / "text.npz"
    text.write_text("not a zip")
    wrong_shape = tmp_path / "shape.npz"
    with np.load(good) as z:
        np.savez(wrong_shape, **{k: z[k] for k in z.files if k != "weights"},
                 weights=np.zeros(7, np.float32))
    for bad in (truncated, text, wrong_shape):
        with pytest.raises(UserError, match=re.escape(str(bad))):
            QualityClassifier.load(bad)


# ---------------------------------------------------------------------------------------------
# the real corpus


@pytest.fixture(scope="module")
def real(corpus_root):
    texts = {(d, s): read_texts(corpus_root / d / f"{s}.jsonl.gz")
             for d in ("wiki", "books", "web") for s in ("train", "valid")}
    pos = texts["wiki", "train"] + texts["books", "train"]
    model, metrics = QualityClassifier.train(pos, texts["web", "train"], ClassifierParams())
    return texts, model, metrics


def test_real_corpus_better_than_chance_on_held_out_data(real):
    texts, model, metrics = real
    # wiki+books vs raw web is an easy distinction: measured AUC 0.997 / accuracy 0.99 on the
    # held-out 20% of train, 1.000 / 0.98 on the valid split
    assert metrics["auc"] > 0.95 and metrics["accuracy"] > 0.9
    s_pos = model.score(texts["wiki", "valid"] + texts["books", "valid"])
    s_neg = model.score(texts["web", "valid"])
    assert auc(s_pos, s_neg) > 0.95
    accuracy = ((s_pos >= 0.5).sum() + (s_neg < 0.5).sum()) / (len(s_pos) + len(s_neg))
    assert accuracy > 0.9
