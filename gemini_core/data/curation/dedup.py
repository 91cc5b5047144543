"""Exact and near-duplicate detection: per-document keys and MinHash signatures, then one pass.

The work is split the way the pipeline runs it. `exact_key` and `signatures` are pure
functions of (text, params) — they run in parallel workers and give the same bytes whatever the
worker count or batch composition. `Deduper` then sees every document once, in the global
deterministic order, on the driver, and keeps the first of each group of duplicates.

Exact: blake2b-128 of the text lowercased, NFC, whitespace collapsed (punctuation kept).

Near (MinHash LSH, Broder 1997; Leskovec et al., Mining of Massive Datasets ch. 3):
  tokens     NFC, lowercase; whitespace, punctuation (P*), symbols (S*) and controls (Cc)
             separate words and are dropped. Characters of scripts written without spaces
             (Chinese, Japanese kana, Thai, Lao, Khmer, Myanmar) are tokens on their own, so
             those texts get character n-grams.
  shingles   `ngram` consecutive tokens, hashed to 64 bits; a text with fewer tokens than
             `ngram` is one shingle of all of them (so short texts still get a signature).
  signature  sig[k] = min over shingles of (a_k * x + b_k) mod 2^32, x the top 32 bits of the
             shingle hash, a_k odd (so each k is a bijection of the 32-bit keys), (a_k, b_k)
             from (seed, k). The shingle hashes are already pseudo-random, so the family only
             has to decorrelate the k's: measured unbiased with the binomial variance
             J(1-J)/num_perm (tests/test_dedup.py), and uint32 runs twice as fast as the
             uint64 multiply-shift (a*h + b) >> 32. P[sig_x[k] == sig_y[k]] = J(x, y).
  index      rows = num_perm // bands rows per band; two documents are candidates when any band
             agrees entirely, P = 1 - (1 - J^rows)^bands (0.95 at J=0.8, 0.61 at 0.7, 0.06 at 0.5
             for 128 = 16 x 8), and a candidate is a duplicate when the fraction of agreeing
             signature entries (the Jaccard estimate) is >= threshold.

Speed: everything is vectorised over all characters / shingles of a batch of texts (no Python
loop per word or per document): ~25-40 MB/s per core (web: ~28), see tests/test_dedup.py.
Call `signatures` on batches: `signature` on one short text pays ~0.1 ms of numpy call overhead.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import unicodedata
from typing import Sequence

import numpy as np

from gemini_core.data.sources import text_batches
from gemini_core.errors import UserError

_U64 = np.uint64
_TABLE_TOP = 0x20000  # codepoints above: one class (mostly CJK ideograph extensions)
_OFFSETS = 256  # per-character multipliers cycle with this period inside very long words
_BATCH_CHARS = 1 << 20  # characters per internal batch: temporaries take ~50 bytes a character
_BLOCK_SHINGLES = 2048  # (num_perm, block) uint32 work buffer: 1 MiB, stays in cache
_FLUSH_AT = 1 << 18  # index entries held in a dict before they merge into the sorted arrays


@dataclasses.dataclass(frozen=True)
class DedupParams:
    exact: bool = True
    near: bool = True
    ngram: int = 5
    num_perm: int = 128
    bands: int = 16  # rows per band = num_perm // bands
    threshold: float = 0.8  # on the Jaccard estimate of an LSH candidate
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("ngram", "num_perm", "bands"):
            if getattr(self, key) <= 0:
                raise UserError(f"config.dedup.{key}={getattr(self, key)}: must be positive")
        if self.num_perm % self.bands:
            raise UserError(f"config.dedup.bands={self.bands}: must divide "
                            f"config.dedup.num_perm={self.num_perm}")
        if not 0.0 < self.threshold <= 1.0:
            raise UserError(f"config.dedup.threshold={self.threshold}: must be in (0, 1]")

    @property
    def rows(self) -> int:
        return self.num_perm // self.bands


def detection_probability(jaccard: float, bands: int, rows: int) -> float:
    """P(an LSH band agrees) for a pair at this Jaccard: the S-curve 1 - (1 - s^r)^b."""
    return 1.0 - (1.0 - jaccard ** rows) ** bands


# ---- exact --------------------------------------------------------------------------------

def exact_key(text: str) -> bytes:
    """16-byte digest of the normalized text (lowercased, whitespace collapsed, NFC) — equal
    keys = exact duplicates."""
    norm = " ".join(unicodedata.normalize("NFC", text.lower()).split())
    return hashlib.blake2b(norm.encode("utf-8", "surrogatepass"), digest_size=16).digest()


# ---- constants ----------------------------------------------------------------------------

def _fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer, in place: a bijection with full avalanche."""
    x ^= x >> _U64(33)
    x *= _U64(0xFF51AFD7ED558CCD)
    x ^= x >> _U64(33)
    x *= _U64(0xC4CEB9FE1A85EC53)
    x ^= x >> _U64(33)
    return x


@functools.cache
def _constants(tag: str, count: int) -> np.ndarray:
    """`count` fixed pseudo-random uint64 from blake2b, never from an RNG whose stream could
    change between numpy versions: signatures must match across machines and releases."""
    words = [hashlib.blake2b(f"gemini_core.dedup/{tag}/{i}".encode(), digest_size=8).digest()
             for i in range(count)]
    out = np.frombuffer(b"".join(words), dtype="<u8").astype(_U64)
    out.flags.writeable = False
    return out


@functools.cache
def _odd(tag: str, count: int) -> np.ndarray:
    # odd multipliers are invertible mod 2^64: no information is thrown away
    out = _constants(tag, count) | _U64(1)
    out.flags.writeable = False
    return out


@functools.cache
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a_P odd, b_P) uint32 of the hash family x -> a * x + b mod 2^32, from (num_perm, seed)."""
    a_P = (_odd(f"perm-a/{seed}", num_perm) >> _U64(32)).astype(np.uint32) | np.uint32(1)
    b_P = (_constants(f"perm-b/{seed}", num_perm) >> _U64(32)).astype(np.uint32)
    a_P.flags.writeable = b_P.flags.writeable = False
    return a_P, b_P


# scripts written without spaces between words: each character is a token of its own
_UNSEGMENTED = ((0x0E00, 0x0EFF),  # Thai, Lao
                (0x1000, 0x109F),  # Myanmar
                (0x1780, 0x17FF),  # Khmer
                (0x2E80, 0x2FDF),  # CJK radicals, Kangxi radicals
                (0x3005, 0x3007),  # ideographic iteration mark, closing mark, number zero
                (0x3040, 0x30FF),  # Hiragana, Katakana
                (0x3100, 0x312F), (0x31A0, 0x31FF),  # Bopomofo, Katakana extensions
                (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF),  # CJK ideographs
                (0xFF66, 0xFF9F))  # halfwidth Katakana
_WORD, _SEP, _CHAR = 0, 1, 2


@functools.cache
def _char_classes() -> np.ndarray:
    """uint8 class per codepoint < _TABLE_TOP, and one for all above: _SEP separates words,
    _CHAR is a token by itself, _WORD is part of a word."""
    cls = np.full(_TABLE_TOP + 1, _WORD, dtype=np.uint8)
    for lo, hi in _UNSEGMENTED:
        cls[lo:hi + 1] = _CHAR
    cls[_TABLE_TOP] = _CHAR  # planes 2-3: CJK ideograph extensions B-H (and rare others)
    for c in range(_TABLE_TOP):
        ch = chr(c)
        cat = unicodedata.category(ch)
        # P*/S* are punctuation and symbols, Cc controls; M* (combining marks, e.g. Devanagari
        # vowel signs) and Cf (zero-width joiners) are inside words and stay
        if ch.isspace() or cat[0] in "PS" or cat == "Cc":
            cls[c] = _SEP
    cls.flags.writeable = False
    return cls


# ---- shingles -----------------------------------------------------------------------------

def _codepoints(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(codepoints_L uint32, doc_start_D) of the normalized texts joined by a newline (a
    separator, so no word spans two texts)."""
    norm = [unicodedata.normalize("NFC", t.lower()) for t in texts]
    lens_D = np.fromiter((len(t) for t in norm), dtype=np.int64, count=len(norm))
    doc_start_D = np.zeros(len(norm), dtype=np.int64)
    np.cumsum(lens_D[:-1] + 1, out=doc_start_D[1:])
    joined = "\n".join(norm).encode("utf-32-le", "surrogatepass")
    return np.frombuffer(joined, dtype="<u4"), doc_start_D


def _word_hashes(cp_L: np.ndarray, start_W: np.ndarray, end_W: np.ndarray) -> np.ndarray:
    """uint64 hash per word cp_L[start:end], position independent: sum over its characters of
    (c + 1) * R[offset % 256] (a random linear form: two different words of equal length, up
    to 256 characters, collide with probability ~2^-64), then the word length, a finalizer."""
    L = cp_L.size
    word_start_L = np.zeros(L, dtype=np.int64)
    word_start_L[start_W] = start_W
    np.maximum.accumulate(word_start_L, out=word_start_L)  # start of the word each char is in
    offset_L = np.arange(L, dtype=np.int64)
    offset_L -= word_start_L
    offset_L &= _OFFSETS - 1
    term_L = _odd("char-offset", _OFFSETS)[offset_L]
    term_L *= cp_L.astype(_U64) + _U64(1)
    prefix_L1 = np.zeros(L + 1, dtype=_U64)
    np.cumsum(term_L, out=prefix_L1[1:])  # wraps mod 2^64, so differences stay exact
    h_W = prefix_L1[end_W] - prefix_L1[start_W]
    h_W += (end_W - start_W).astype(_U64) * _odd("word-length", 1)[0]
    return _fmix64(h_W)


def word_tokens(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(token hashes_T uint64, tokens per text_D): words, and single characters of the scripts
    written without spaces (so Chinese, Japanese and Thai get character n-grams, and a mixed
    text gets both, with no per-text mode to guess)."""
    cp_L, doc_start_D = _codepoints(texts)
    cls_L = _char_classes()[np.minimum(cp_L, _TABLE_TOP)]
    tok_L = cls_L != _SEP
    alone_L = cls_L == _CHAR
    # a token starts at a token char after a separator or a lone char (or at 0), or at a
    # lone char; symmetrically for ends
    brk_L = ~tok_L | alone_L  # after this char, a new token must start
    start_L = tok_L.copy()
    start_L[1:] &= brk_L[:-1]
    start_L |= alone_L
    end_L = tok_L.copy()
    end_L[:-1] &= brk_L[1:]
    end_L |= alone_L
    start_T = np.flatnonzero(start_L)
    end_T = np.flatnonzero(end_L) + 1
    doc_T = np.searchsorted(doc_start_D, start_T, side="right") - 1
    return _word_hashes(cp_L, start_T, end_T), np.bincount(doc_T, minlength=len(texts))


def shingles(tok_T: np.ndarray, count_D: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(shingle hashes_S uint64, shingles per text_D): every `n` consecutive tokens of a text
    as sum_k tok[i + k] * M_k (order matters: distinct odd M_k), finalized; a text with fewer
    than n tokens, the empty text included, is one shingle of all its tokens."""
    D, T = count_D.size, tok_T.size
    M_n = _odd("shingle-position", n)
    tok_start_D = np.zeros(D, dtype=np.int64)
    np.cumsum(count_D[:-1], out=tok_start_D[1:])
    short_D = count_D < n

    S = max(T - n + 1, 0)
    full_S = tok_T[:S] * M_n[0]
    for k in range(1, n):
        full_S += tok_T[k:k + S] * M_n[k]
    # keep the windows that lie inside one text: start i with i + n <= end of its text
    doc_T = np.repeat(np.arange(D), count_D)
    ok_S = np.arange(S) + n <= (tok_start_D + count_D)[doc_T[:S]]

    short = np.flatnonzero(short_D)
    whole = count_D[short].astype(_U64) * _odd("short-text", 1)[0]  # also tells 'a' from 'a a'
    for k in range(n - 1):
        has = count_D[short] > k
        whole[has] += tok_T[tok_start_D[short[has]] + k] * M_n[k]

    shingle_doc = np.concatenate([doc_T[:S][ok_S], short])
    order = np.argsort(shingle_doc, kind="stable")
    sh_S = _fmix64(np.concatenate([full_S[ok_S], whole])[order])
    per_doc_D = np.where(short_D, 1, count_D - n + 1)
    return sh_S, per_doc_D


def _minhash(sh_S: np.ndarray, per_doc_D: np.ndarray, p: DedupParams) -> np.ndarray:
    """(D, num_perm) uint32: per text, min over its shingles x of a_k * x + b_k mod 2^32."""
    a_P, b_P = _permutations(p.num_perm, p.seed)
    x_S = (sh_S >> _U64(32)).astype(np.uint32)  # the finalizer's best-mixed bits
    D = per_doc_D.size
    first_D = np.zeros(D + 1, dtype=np.int64)
    np.cumsum(per_doc_D, out=first_D[1:])
    sig_PxD = np.full((p.num_perm, D), np.iinfo(np.uint32).max, dtype=np.uint32)
    # (perm, shingle) layout: numpy's reduceat is fast along the contiguous axis only
    buf = np.empty((p.num_perm, _BLOCK_SHINGLES), dtype=np.uint32)
    for lo in range(0, x_S.size, _BLOCK_SHINGLES):
        hi = min(lo + _BLOCK_SHINGLES, x_S.size)
        blk_PxK = buf[:, :hi - lo]
        np.multiply(a_P[:, None], x_S[None, lo:hi], out=blk_PxK)
        blk_PxK += b_P[:, None]
        # each text's shingles are one contiguous run inside the block: reduce per run
        d0 = np.searchsorted(first_D, lo, side="right") - 1
        d1 = np.searchsorted(first_D, hi, side="left")
        cuts = np.maximum(first_D[d0:d1], lo) - lo
        np.minimum(sig_PxD[:, d0:d1], np.minimum.reduceat(blk_PxK, cuts, axis=1),
                   out=sig_PxD[:, d0:d1])
    return np.ascontiguousarray(sig_PxD.T)


def signatures(texts: Sequence[str], p: DedupParams) -> np.ndarray:
    """(N, num_perm) uint32 MinHash signatures; row i depends on texts[i] and p only."""
    out_NxP = np.empty((len(texts), p.num_perm), dtype=np.uint32)
    lo = 0
    for batch in text_batches(texts, _BATCH_CHARS):
        tok_T, count_D = word_tokens(batch)
        sh_S, per_doc_D = shingles(tok_T, count_D, p.ngram)
        out_NxP[lo:lo + len(batch)] = _minhash(sh_S, per_doc_D, p)
        lo += len(batch)
    return out_NxP


def signature(text: str, p: DedupParams) -> np.ndarray:
    """(num_perm,) uint32 MinHash signature (the same row `signatures` gives in any batch)."""
    return signatures([text], p)[0]


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Fraction of agreeing signature entries: unbiased for the shingle-set Jaccard, with
    standard deviation sqrt(J (1 - J) / num_perm) (0.035 at J = 0.8, num_perm = 128)."""
    return float(np.count_nonzero(sig_a == sig_b)) / sig_a.shape[-1]


def band_keys(sig_NxP: np.ndarray, p: DedupParams) -> np.ndarray:
    """(N, bands) uint64, N = 1 for one (num_perm,) signature: one key per band, equal when
    the band's rows all agree (up to a ~2^-64 collision, which the Jaccard check behind the
    index absorbs). The band index is mixed in, so one table holds every band."""
    rows_NxBxR = np.asarray(sig_NxP).reshape(-1, p.bands, p.rows).astype(_U64)
    key_NxB = (rows_NxBxR * _odd("band-row", p.rows)).sum(axis=2, dtype=_U64)
    key_NxB += _odd("band-index", p.bands)
    return _fmix64(key_NxB)


# ---- the sequential pass ------------------------------------------------------------------

class MultiMap:
    """uint64 key -> int values in insertion order at ~12 bytes an entry: a sorted numpy run
    plus a dict of recent entries merged into it every `flush_at` entries (a plain dict of 1.6e7
    Python ints — 1e6 documents x 16 bands — would take ~1.5 GB)."""

    def __init__(self, flush_at: int | None = None):
        self._keys = np.empty(0, dtype=_U64)
        self._vals = np.empty(0, dtype=np.uint32)
        self._recent: dict[int, list[int]] = {}
        self._n_recent = 0
        self._flush_at = flush_at or _FLUSH_AT

    def __len__(self) -> int:
        return self._keys.size + self._n_recent

    def get(self, keys: list[int]) -> list[int]:
        """Values of all the keys: per key, older (sorted run) before recent."""
        out: list[int] = []
        if self._keys.size:
            q = np.array(keys, dtype=_U64)
            lo = np.searchsorted(self._keys, q)
            hit = self._keys[np.minimum(lo, self._keys.size - 1)] == q
            for i in np.flatnonzero(hit).tolist():
                hi = np.searchsorted(self._keys, q[i], side="right")
                out.extend(self._vals[lo[i]:hi].tolist())
        for k in keys:
            vs = self._recent.get(k)
            if vs:
                out.extend(vs)
        return out

    def add(self, keys: list[int], value: int) -> None:
        for k in keys:
            vs = self._recent.get(k)
            if vs is None:
                self._recent[k] = [value]
            else:
                vs.append(value)
        self._n_recent += len(keys)
        if self._n_recent >= self._flush_at:
            self._flush()

    def _flush(self) -> None:
        new_keys = np.fromiter((k for k, vs in self._recent.items() for _ in vs), dtype=_U64,
                               count=self._n_recent)
        new_vals = np.fromiter((v for vs in self._recent.values() for v in vs), dtype=np.uint32,
                               count=self._n_recent)
        order = np.argsort(new_keys, kind="stable")  # stable: a key's values stay in order
        new_keys, new_vals = new_keys[order], new_vals[order]
        at = np.searchsorted(self._keys, new_keys, side="right")  # after the older values
        self._keys = np.insert(self._keys, at, new_keys)
        self._vals = np.insert(self._vals, at, new_vals)
        self._recent, self._n_recent = {}, 0


class Deduper:
    """Feed every document once, in the global order; it keeps the first of each duplicate
    group. Only kept documents are indexed, so a verdict always names a kept document.

    Memory per kept document: its id, 16 bytes of exact key, 4 * num_perm bytes of signature
    and ~12 * (bands + 1) bytes of index: ~0.8 KB at the defaults, ~1 GB for 1e6 documents.
    """

    def __init__(self, p: DedupParams):
        self.p = p
        self.stats = {"seen": 0, "kept": 0, "exact": 0, "near": 0}
        self._ids: list[str] = []
        self._keys_Kx16 = np.zeros((1024, 16), dtype=np.uint8)  # exact keys of kept docs
        self._sigs_KxP = np.zeros((1024, p.num_perm), dtype=np.uint32)  # their signatures
        self._exact = MultiMap()  # first 8 key bytes -> kept index (all 16 are compared)
        self._near = MultiMap()  # band key -> kept indices
        # integer count >= threshold * P, with slack for a threshold like 0.8 not being binary
        self._min_agree = int(np.ceil(p.threshold * p.num_perm - 1e-9))

    def add(self, doc_id: str, key: bytes | None, sig: np.ndarray | None
            ) -> tuple[str, str] | None:
        """None if the document is kept (and indexed), else ("exact" | "near", id of the kept
        document it duplicates: for near, the first kept LSH candidate, in insertion order,
        whose estimated Jaccard is >= threshold)."""
        self.stats["seen"] += 1
        key64 = bkeys = None
        if self.p.exact and key is not None:
            if len(key) != 16:
                raise ValueError(f"exact key of {doc_id!r}: {len(key)} bytes, expected 16")
            key64 = [int.from_bytes(key[:8], "little")]
            for j in self._exact.get(key64):
                if self._keys_Kx16[j].tobytes() == key:
                    self.stats["exact"] += 1
                    return "exact", self._ids[j]
        if self.p.near and sig is not None:
            sig = np.asarray(sig)
            if sig.shape != (self.p.num_perm,):
                raise ValueError(f"signature of {doc_id!r}: shape {sig.shape}, expected "
                                 f"({self.p.num_perm},)")
            sig = sig.astype(np.uint32, copy=False)
            bkeys = band_keys(sig, self.p)[0].tolist()
            cands = self._near.get(bkeys)
            if cands:
                cands_C = np.unique(cands)  # kept indices ascend in insertion order
                agree_C = np.count_nonzero(self._sigs_KxP[cands_C] == sig, axis=1)
                hit = np.flatnonzero(agree_C >= self._min_agree)
                if hit.size:
                    self.stats["near"] += 1
                    return "near", self._ids[int(cands_C[hit[0]])]
        self._keep(doc_id, key, key64, sig, bkeys)
        return None

    def _keep(self, doc_id: str, key: bytes | None, key64: list[int] | None,
              sig: np.ndarray | None, bkeys: list[int] | None) -> None:
        k = len(self._ids)
        if k == self._sigs_KxP.shape[0]:  # grow by doubling: amortized O(1) appends
            self._sigs_KxP = np.concatenate([self._sigs_KxP, np.zeros_like(self._sigs_KxP)])
            self._keys_Kx16 = np.concatenate([self._keys_Kx16, np.zeros_like(self._keys_Kx16)])
        self._ids.append(doc_id)
        if key64 is not None:
            self._keys_Kx16[k] = np.frombuffer(key, dtype=np.uint8)
            self._exact.add(key64, k)
        if bkeys is not None:
            self._sigs_KxP[k] = sig
            self._near.add(bkeys, k)
        self.stats["kept"] += 1
