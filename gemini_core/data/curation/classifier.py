"""Model-based quality classifier: hashed word n-grams and a logistic regression, in numpy.

Trained by our own command on positive examples (e.g. wiki + books) against negatives (e.g. raw
web); its score, P(positive), is kept on every record and the pipeline drops documents below a
threshold. fastText-style, no scipy and no Python loop over words, so scoring keeps up with the
rest of the pipeline (tens of MB/s per core):

features  A document (its first `max_chars` characters, lowercased) is cut into tokens — runs
          of letters/digits/non-ASCII bytes, and each ASCII punctuation mark on its own — and
          every token and every n-gram of up to `ngrams` consecutive tokens is hashed into one
          of `buckets` columns. A column's value is log1p(its count), and each document's row
          is L2-normalised, so long and short documents score on the same scale.
hashing   Vectorised over a whole batch of documents: a token's polynomial hash is a difference
          of prefix sums (below), mixed by the splitmix64 finaliser. Pure uint64 arithmetic, so
          the same text gives the same columns on every platform and in every process (Python's
          own str hash is salted per process).
model     Logistic regression, minibatch Adagrad with L2, the classes weighted to equal total
          weight (the positive pool is usually not the size of the negative one), a seeded
          order: the same inputs and seed give the same weights bit for bit.

A sparse matrix here is `Features`: CSR arrays built by hand (`indptr`, `indices`, `values`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from gemini_core.errors import UserError

FORMAT = 1  # bump when the features, the hash or the file layout change
MIN_DOCS = 10  # per class: fewer cannot give both a training set and a held-out one
BATCH_DOCS = 32  # minibatch size of the SGD
BATCH_BYTES = 1 << 20  # text hashed per vectorised pass: bounds the temporaries
THRESHOLD = 0.5  # for the held-out accuracy; the pipeline's drop threshold is its own setting

# byte classes for the tokenizer
_SPACE, _WORD, _PUNCT = 0, 1, 2
_BYTE_CLASS = np.full(256, _PUNCT, np.int8)
_BYTE_CLASS[:0x21] = _SPACE  # controls and space
_BYTE_CLASS[0x7F] = _SPACE
for _lo, _hi in ((ord("0"), ord("9")), (ord("a"), ord("z")), (ord("A"), ord("Z")), (0x80, 0xFF)):
    _BYTE_CLASS[_lo:_hi + 1] = _WORD  # every UTF-8 byte of a non-ASCII character is a letter

# polynomial hash mod 2^64: P odd, so it has an inverse Q and the hash of bytes s..e-1 is
# (A[e] - A[s]) * P^(e-1) with A the prefix sums of b_j * Q^j — no loop over tokens
_P = 0x100000001B3  # the FNV-64 prime
_Q = pow(_P, -1, 1 << 64)
_NGRAM_MUL = np.uint64(0x9E3779B97F4A7C15)  # odd: combines a running n-gram hash with a token


# ---------------------------------------------------------------------------------------------
# parameters


@dataclasses.dataclass(frozen=True)
class ClassifierParams:
    buckets: int = 1 << 18  # hashed feature columns
    ngrams: int = 2  # 1 = words only, 2 = words and bigrams, ...
    epochs: int = 4
    lr: float = 0.5  # Adagrad step size
    l2: float = 1e-6
    max_chars: int = 20_000  # per document, for speed: the start of a text shows its quality
    holdout: float = 0.2  # share of each class kept out of training to measure the model
    seed: int = 0

    def check(self, where: str = "classifier") -> "ClassifierParams":
        """Raises UserError naming the first bad field; returns self."""
        for name in ("buckets", "ngrams", "epochs", "max_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{where}.{name}={value!r}: must be a positive integer")
        if self.buckets > 1 << 30:
            raise UserError(f"{where}.buckets={self.buckets}: at most 2^30 (the weights are "
                            "4 bytes each)")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"{where}.lr={self.lr!r}: must be > 0")
        if not (isinstance(self.l2, (int, float)) and math.isfinite(self.l2) and self.l2 >= 0):
            raise UserError(f"{where}.l2={self.l2!r}: must be >= 0")
        if not (isinstance(self.holdout, (int, float)) and 0 < self.holdout < 1):
            raise UserError(f"{where}.holdout={self.holdout!r}: must be in (0, 1)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UserError(f"{where}.seed={self.seed!r}: must be a non-negative integer")
        return self


# ---------------------------------------------------------------------------------------------
# features


@dataclasses.dataclass(frozen=True)
class Features:
    """A sparse (N, buckets) matrix in CSR form; columns sorted within a row."""
    indptr: np.ndarray  # (N+1,) int64
    indices: np.ndarray  # (nnz,) int32 column
    values: np.ndarray  # (nnz,) float32, each row of unit L2 norm (or empty)

    @property
    def num_rows(self) -> int:
        return len(self.indptr) - 1

    def rows(self, rows_R: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row position in rows_R, column, value) of the entries of the given rows."""
        start_R, end_R = self.indptr[rows_R], self.indptr[rows_R + 1]
        len_R = end_R - start_R
        row_E = np.repeat(np.arange(len(rows_R)), len_R)
        # each entry's offset inside its row, added to its row's start
        first_R = np.cumsum(len_R) - len_R
        pos_E = np.arange(int(len_R.sum())) - np.repeat(first_R - start_R, len_R)
        return row_E, self.indices[pos_E], self.values[pos_E]


_POWERS = (np.ones(0, np.uint64), np.ones(0, np.uint64))  # one tuple: swapped atomically


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P^j and Q^j mod 2^64 for j < n (cached, grown by doubling)."""
    global _POWERS
    p_pow, q_pow = _POWERS
    if len(p_pow) < n:
        size = max(n, 2 * len(p_pow), 1 << 16)
        tables = []
        for base in (_P, _Q):
            pw = np.full(size, base, np.uint64)
            pw[0] = 1
            tables.append(np.cumprod(pw, dtype=np.uint64))  # wraps: arithmetic mod 2^64
        _POWERS = p_pow, q_pow = tables[0], tables[1]
    return p_pow[:n], q_pow[:n]


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit moves every output bit (buckets = low bits)."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def _token_hashes(buf_L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start offset, hash) of every token in a byte buffer."""
    cls_L = _BYTE_CLASS[buf_L]
    word_L = cls_L == _WORD
    punct_L = cls_L == _PUNCT
    prev_word_L = np.concatenate(([False], word_L[:-1]))
    next_word_L = np.concatenate((word_L[1:], [False]))
    start_T = np.flatnonzero((word_L & ~prev_word_L) | punct_L)
    end_T = np.flatnonzero((word_L & ~next_word_L) | punct_L) + 1
    p_L, q_L = _powers(len(buf_L))
    prefix = np.zeros(len(buf_L) + 1, np.uint64)
    np.cumsum(buf_L.astype(np.uint64) * q_L, out=prefix[1:])
    hash_T = (prefix[end_T] - prefix[start_T]) * p_L[end_T - 1]
    return start_T, _mix(hash_T)


def _batch_keys(texts: Sequence[str], p: ClassifierParams) -> np.ndarray:
    """doc * buckets + column for every n-gram occurrence of a batch, sorted (int64)."""
    parts = [t[:p.max_chars].lower().encode("utf-8", "replace") for t in texts]
    # one space between documents, so no token runs across two of them
    offsets_N = np.cumsum([0] + [len(b) + 1 for b in parts[:-1]])
    buf_L = np.frombuffer(b" ".join(parts), np.uint8)
    start_T, hash_T = _token_hashes(buf_L)
    doc_T = np.searchsorted(offsets_N, start_T, side="right") - 1
    buckets = np.uint64(p.buckets)
    keys = [doc_T * p.buckets + (hash_T % buckets).astype(np.int64)]
    gram_G = hash_T
    for n in range(2, p.ngrams + 1):
        # the n-gram starting at token i: the (n-1)-gram there extended by token i+n-1,
        # kept only when all its tokens are in one document
        gram_G = _mix(gram_G[:-1] * _NGRAM_MUL + hash_T[n - 1:] + np.uint64(n))
        doc_G = doc_T[:len(gram_G)]
        same_G = doc_G == doc_T[n - 1:]
        keys.append(doc_G[same_G] * p.buckets + (gram_G[same_G] % buckets).astype(np.int64))
    out = np.concatenate(keys)
    out.sort()
    return out


def featurize(texts: Sequence[str], p: ClassifierParams) -> Features:
    """The (len(texts), p.buckets) feature rows of the texts."""
    indptr = [np.zeros(1, np.int64)]
    indices, values = [], []
    nnz = 0
    for lo, hi in _batch_ranges(texts, p.max_chars):
        keys = _batch_keys(texts[lo:hi], p)
        first = np.flatnonzero(np.diff(keys, prepend=-1))  # keys >= 0: first one counts
        count_E = np.diff(np.append(first, len(keys)))
        key_E = keys[first]
        doc_E = key_E // p.buckets
        value_E = np.log1p(count_E)
        norm_N = np.sqrt(np.bincount(doc_E, weights=value_E * value_E, minlength=hi - lo))
        value_E /= norm_N[doc_E]
        indices.append((key_E % p.buckets).astype(np.int32))
        values.append(value_E.astype(np.float32))
        indptr.append(nnz + np.cumsum(np.bincount(doc_E, minlength=hi - lo)))
        nnz += len(key_E)
    return Features(np.concatenate(indptr), np.concatenate(indices or [np.zeros(0, np.int32)]),
                    np.concatenate(values or [np.zeros(0, np.float32)]))


def _batch_ranges(texts: Sequence[str], max_chars: int) -> list[tuple[int, int]]:
    out, lo, size = [], 0, 0
    for i, t in enumerate(texts):
        size += min(len(t), max_chars) + 1
        if size >= BATCH_BYTES:
            out.append((lo, i + 1))
            lo, size = i + 1, 0
    if lo < len(texts):
        out.append((lo, len(texts)))
    return out


# ---------------------------------------------------------------------------------------------
# metrics


def auc(scores_pos: Sequence[float], scores_neg: Sequence[float]) -> float:
    """Area under the ROC curve: P(a positive outscores a negative), a tie counting half
    (the Mann-Whitney U statistic over n_pos * n_neg). NaN when a class is empty."""
    pos = np.asarray(scores_pos, np.float64).ravel()
    neg = np.asarray(scores_neg, np.float64).ravel()
    if not len(pos) or not len(neg):
        return float("nan")
    both = np.concatenate((pos, neg))
    order = np.argsort(both, kind="stable")
    sorted_ = both[order]
    # average rank (1-based) of each group of tied values
    first = np.flatnonzero(np.concatenate(([True], sorted_[1:] != sorted_[:-1])))
    last = np.append(first[1:], len(both)) - 1
    group = np.cumsum(np.concatenate(([True], sorted_[1:] != sorted_[:-1]))) - 1
    ranks = np.empty(len(both))
    ranks[order] = (first + last)[group] / 2 + 1
    u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow warning for large |z|


# ---------------------------------------------------------------------------------------------
# the model


def _split(n: int, holdout: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices: a seeded share of one class, at least one on each side."""
    perm = rng.permutation(n)
    n_hold = min(n - 1, max(1, round(holdout * n)))
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def _fit(x: Features, y_N: np.ndarray, p: ClassifierParams,
         rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Logistic regression weights (buckets,) and bias by minibatch Adagrad."""
    n = x.num_rows
    n_pos = int(y_N.sum())
    # each class carries half the total weight, so the bias does not learn the pool sizes
    weight_N = np.where(y_N > 0, n / (2 * n_pos), n / (2 * (n - n_pos)))
    w_B = np.zeros(p.buckets)
    g2_B = np.full(p.buckets, 1e-12)  # Adagrad's sum of squared gradients
    bias, g2_bias = 0.0, 1e-12
    for _ in range(p.epochs):
        order = rng.permutation(n)
        for lo in range(0, n, BATCH_DOCS):
            rows_R = order[lo:lo + BATCH_DOCS]
            row_E, col_E, val_E = x.rows(rows_R)
            z_R = np.bincount(row_E, weights=w_B[col_E] * val_E, minlength=len(rows_R)) + bias
            err_R = (sigmoid(z_R) - y_N[rows_R]) * weight_N[rows_R] / len(rows_R)
            grad_B = np.bincount(col_E, weights=err_R[row_E] * val_E, minlength=p.buckets)
            grad_B += p.l2 * w_B
            g2_B += grad_B * grad_B
            w_B -= p.lr * grad_B / np.sqrt(g2_B)
            grad_bias = float(err_R.sum())
            g2_bias += grad_bias * grad_bias
            bias -= p.lr * grad_bias / math.sqrt(g2_bias)
    return w_B, bias


class QualityClassifier:
    """Weights and bias of a trained model; `score` gives P(positive) per text."""

    def __init__(self, weights: np.ndarray, bias: float, params: ClassifierParams,
                 metrics: dict | None = None):
        w_B = np.array(weights, np.float32)  # a copy: the model never changes under a caller
        if w_B.shape != (params.buckets,):
            raise ValueError(f"weights of shape {w_B.shape}, expected ({params.buckets},)")
        w_B.flags.writeable = False
        self.weights = w_B
        self.bias = float(np.float32(bias))  # float32, as saved: a loaded model scores alike
        self.params = params
        self.metrics = dict(metrics or {})
        h = hashlib.sha256()
        h.update(json.dumps({"format": FORMAT, "params": dataclasses.asdict(params),
                             "bias": np.float32(bias).tobytes().hex()}, sort_keys=True).encode())
        h.update(w_B.astype("<f4").tobytes())
        self.fingerprint: str = h.hexdigest()

    def __repr__(self) -> str:
        return f"QualityClassifier({self.fingerprint[:16]}, buckets={self.params.buckets})"

    @classmethod
    def train(cls, positives: Sequence[str], negatives: Sequence[str],
              p: ClassifierParams = ClassifierParams()) -> tuple["QualityClassifier", dict]:
        """Splits off p.holdout of each class, trains on the rest; metrics on the held-out."""
        p.check()
        for name, docs in (("positive", positives), ("negative", negatives)):
            if len(docs) < MIN_DOCS:
                raise UserError(f"quality classifier: {len(docs)} {name} documents, need at least "
                                f"{MIN_DOCS} (some for training, some held out to measure it)")
        rng = np.random.default_rng(p.seed)
        pos_train, pos_hold = _split(len(positives), p.holdout, rng)
        neg_train, neg_hold = _split(len(negatives), p.holdout, rng)
        train_texts = [positives[i] for i in pos_train] + [negatives[i] for i in neg_train]
        y_N = np.concatenate((np.ones(len(pos_train)), np.zeros(len(neg_train))))
        w_B, bias = _fit(featurize(train_texts, p), y_N, p, rng)
        model = cls(w_B, bias, p)
        s_pos = model.score([positives[i] for i in pos_hold])
        s_neg = model.score([negatives[i] for i in neg_hold])
        right_pos, right_neg = int((s_pos >= THRESHOLD).sum()), int((s_neg < THRESHOLD).sum())
        metrics = {
            "accuracy": (right_pos + right_neg) / (len(s_pos) + len(s_neg)),
            "balanced_accuracy": (right_pos / len(s_pos) + right_neg / len(s_neg)) / 2,
            "auc": auc(s_pos, s_neg),
            "threshold": THRESHOLD,
            "n_train": len(train_texts), "n_holdout": len(s_pos) + len(s_neg),
            "positives": len(positives), "negatives": len(negatives),
        }
        model.metrics = dict(metrics)
        return model, metrics

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """(N,) float32 in [0, 1]: P(positive) of each text."""
        texts = list(texts)
        x = featurize(texts, self.params)
        row_E = np.repeat(np.arange(len(texts)), np.diff(x.indptr))
        z_N = np.bincount(row_E, weights=self.weights[x.indices] * x.values,
                          minlength=len(texts)) + self.bias
        return sigmoid(z_N).astype(np.float32)

    # -----------------------------------------------------------------------------------------
    # files

    def save(self, path: Path) -> None:
        """One .npz (weights, bias, params, metrics), written to a temp file then renamed."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, format=np.int64(FORMAT), weights=self.weights,
                 bias=np.float32(self.bias),
                 params=np.array(json.dumps(dataclasses.asdict(self.params), sort_keys=True)),
                 metrics=np.array(json.dumps(self.metrics, sort_keys=True)))
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.write(buf.getvalue())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> "QualityClassifier":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such quality classifier file (train one first)")
        try:
            with np.load(path, allow_pickle=False) as z:
                fmt = int(z["format"])
                if fmt != FORMAT:
                    raise UserError(f"{path}: quality classifier format {fmt}, this version "
                                    f"reads {FORMAT}: train it again")
                fields = json.loads(str(z["params"]))
                weights, bias = z["weights"], float(z["bias"])
                metrics = json.loads(str(z["metrics"])) if "metrics" in z else {}
        except UserError:
            raise
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise UserError(f"{path}: not a readable quality classifier file ({e})") from None
        known = {f.name for f in dataclasses.fields(ClassifierParams)}
        if not isinstance(fields, dict) or set(fields) - known:
            raise UserError(f"{path}: unexpected classifier parameters {fields!r}")
        params = ClassifierParams(**fields).check(where=f"{path}: params")
        if weights.shape != (params.buckets,) or not np.isfinite(weights).all() \
                or not math.isfinite(bias):
            raise UserError(f"{path}: corrupt quality classifier (weights of shape "
                            f"{weights.shape} for {params.buckets} buckets, or not finite)")
        return cls(weights, bias, params, metrics)
