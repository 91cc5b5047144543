"""A SentencePiece tokenizer trained on our own pretraining mix, cached by content fingerprint.

The training sample draws `sample_chars` characters from the domains' training files in
proportion to the sample weights, so the vocabulary reflects the mix the model will see. Each
domain contributes chunks of at most CHUNK_CHARS characters (a huge code file cannot eat its
domain's share) picked by a seeded shuffle. The model is lossless on bytes: identity
normalisation, no dummy prefix, whitespace kept, byte fallback — so decode(encode(t)) == t and
a text's UTF-8 length is the sum of its pieces' byte lengths (`token_bytes`), which bits-per-byte
needs. Caveat: the literal character U+2581 ('▁') in a text reads back as a space.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import heapq
import io
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import sentencepiece as spm

from gemini_core.config import DataConfig, TokenizerConfig
from gemini_core.data.sources import BadRecords, domain_file, file_sha256, iter_documents
from gemini_core.errors import UserError
from gemini_core.runs.rundir import fingerprint

FORMAT = 1  # bump when the sample, the trainer options or the files change
SAMPLE_SEED = 0
CHUNK_CHARS = 4096
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
N_SPECIAL = 4 + 256  # control pieces + byte-fallback pieces
WHITESPACE = "\u2581"  # SentencePiece's visible space

Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# cache entries: built once, published atomically


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    # concurrent sweep trials wait for one builder instead of all building the same entry
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def build_once(final: Path, is_complete: Callable[[Path], bool],
               build: Callable[[Path], None]) -> bool:
    """Ensures the cache entry `final` exists; True when this call built it.

    `build` fills a fresh temp dir that is renamed to `final` only when complete, so a killed
    process never leaves an entry that later looks complete.
    """
    final = Path(final)
    with _locked(final.parent / f".{final.name}.lock"):
        if final.is_dir():
            if is_complete(final):
                return False
            shutil.rmtree(final)  # damaged by hand: rebuild rather than trust it
        for stale in final.parent.glob(f".tmp-{final.name}-*"):  # a killed builder's leftovers
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp's 0700 would keep a shared cache from other users
            build(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return True


def write_json(path: Path, obj: object, sort_keys: bool = True) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=sort_keys, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# the tokenizer


class Tokenizer:
    """A trained SentencePiece model in its cache dir (`spm.model`, `tokenizer.json`)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.meta = json.loads((self.path / "tokenizer.json").read_text())
        self.fingerprint: str = self.meta["fingerprint"]
        self._sp = spm.SentencePieceProcessor(model_file=str(self.path / "spm.model"))
        self.vocab_size: int = self._sp.get_piece_size()
        self.eos_id: int = self._sp.eos_id()
        self._token_bytes: np.ndarray | None = None

    def __reduce__(self):  # e.g. to a Ray worker: reload from the shared cache dir
        return Tokenizer, (self.path,)

    def __repr__(self) -> str:
        return f"Tokenizer({self.fingerprint[:16]}, vocab_size={self.vocab_size})"

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int,
                               num_threads=num_threads or os.cpu_count() or 1)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int], list[int]]:
        """encode(text) and each token's [start, end) in characters of `text`.

        A character spelled by several byte-fallback pieces gives its span to the last of them;
        the ones before it have an empty span (start == end) at the character's start.
        """
        out = self._sp.encode(text, out_type="offset_mapping")
        starts, ends = zip(*out["offsets"]) if out["offsets"] else ((), ())
        return list(out["ids"]), list(starts), list(ends)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def token_bytes(self) -> np.ndarray:
        """(vocab_size,) int32, read-only: UTF-8 bytes each piece decodes to."""
        if self._token_bytes is None:
            sp = self._sp
            out = np.zeros(self.vocab_size, np.int32)
            for i in range(self.vocab_size):
                if sp.is_control(i) or sp.is_unknown(i):
                    continue  # EOS, padding: no text
                if sp.is_byte(i):
                    out[i] = 1
                else:
                    out[i] = len(sp.id_to_piece(i).replace(WHITESPACE, " ").encode("utf-8"))
            out.flags.writeable = False
            self._token_bytes = out
        return self._token_bytes


# ---------------------------------------------------------------------------------------------
# the training sample


def document_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """A text as the start of a document: [EOS] + its ids. Training packs documents with EOS
    after each one, so EOS is the model's "start of document" (there is no BOS); scoring and
    generation both begin a prompt this way."""
    return [tokenizer.eos_id] + tokenizer.encode(text)


def normalize_weights(weights: Mapping[str, float], domains: Sequence[str],
                      path: str = "sample_weights") -> dict[str, float]:
    """Every domain's weight (0 where absent), checked and rescaled to sum exactly to 1."""
    unknown = [d for d in weights if d not in domains]
    if unknown:
        raise UserError(f"{path}.{unknown[0]}: unknown domain (known: {', '.join(domains)})")
    out = {}
    for d in domains:
        w = weights.get(d, 0.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise UserError(f"{path}.{d}={w!r}: expected a non-negative number")
        out[d] = float(w)
    total = sum(out.values())
    if abs(total - 1.0) > 1e-6:
        raise UserError(f"{path}: weights sum to {total:.8g}, not 1 (within 1e-6)")
    return {d: w / total for d, w in out.items()}


def chunks(text: str, limit: int = CHUNK_CHARS) -> Iterator[str]:
    """Pieces of at most `limit` characters, cut after a newline or space where one is near."""
    start = 0
    while len(text) - start > limit:
        end = start + limit
        cut = text.rfind("\n", start + limit // 2, end)
        if cut < 0:
            cut = text.rfind(" ", start + limit // 2, end)
        end = cut + 1 if cut >= 0 else end
        yield text[start:end]
        start = end
    if start < len(text):
        yield text[start:]


def domain_sample(path: Path, budget: int, domain: str, text_field: str,
                  on_bad_record: str) -> list[str]:
    """Chunks of one file totalling >= budget chars (or all of it), in a seeded shuffle order.

    Each chunk gets a seeded random key; the result is the shortest prefix, by key, that
    reaches the budget. One streaming pass keeps only that prefix (a max-heap on the key).
    """
    rng = random.Random(f"gemini_core.tokenizer:{SAMPLE_SEED}:{domain}")
    heap: list[tuple[float, int, str]] = []  # (-key, index, chunk): the largest key on top
    total = 0
    index = 0
    for text in iter_documents(path, text_field, on_bad_record, BadRecords()):
        for chunk in chunks(text):
            key = rng.random()
            index += 1
            if total >= budget and -heap[0][0] < key:
                continue  # it would be the first to go
            heapq.heappush(heap, (-key, index, chunk))
            total += len(chunk)
            while total - len(heap[0][2]) >= budget:
                total -= len(heapq.heappop(heap)[2])
    return [chunk for _, _, chunk in sorted(heap, reverse=True)]


def draw_sample(data: DataConfig, weights: Mapping[str, float],
                log: Log = print) -> tuple[list[str], dict[str, int]]:
    """The training sentences, and the characters each domain gave."""
    sample: list[str] = []
    per_domain: dict[str, int] = {}
    for domain, w in weights.items():
        if w <= 0:
            continue
        budget = max(1, round(data.tokenizer.sample_chars * w))  # a tiny weight still counts
        path = domain_file(Path(data.root), domain, data.train_file)
        got = domain_sample(path, budget, domain, data.text_field, data.on_bad_record)
        per_domain[domain] = sum(map(len, got))
        if per_domain[domain] < budget:
            log(f"tokenizer: domain {domain!r} has only {per_domain[domain]:,} characters, "
                f"below its share {budget:,} of the sample: using all of it")
        sample += got
    return sample, per_domain


@dataclasses.dataclass(frozen=True)
class Alphabet:
    kept: int  # characters with their own piece
    wanted: int  # what character_coverage alone would keep
    coverage: float  # share of the sample's characters that the kept ones cover


def restrict_alphabet(sample: Sequence[str], coverage: float, vocab_size: int
                      ) -> tuple[list[str], Alphabet]:
    """The sample cut at characters that get no piece of their own, and what was kept.

    SentencePiece gives every covered character a piece. With a small vocabulary and a
    multilingual mix, 0.9995 coverage keeps thousands of CJK characters and leaves hardly any
    room for merges (and SentencePiece refuses coverage below 0.98). So we choose the alphabet
    here: the most frequent characters up to `coverage` (SentencePiece's rule), at most a third
    of the learnable pieces (a half or a quarter gave fewer bytes/token on our corpus at vocab
    4096). Rarer characters are cut out of the sample, so no merge spans them; at encoding time
    byte fallback spells them, and no merge spans a byte piece either.
    """
    counts = collections.Counter()
    for s in sample:
        counts.update(s)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    if not ranked:
        return list(sample), Alphabet(0, 0, 1.0)
    cum = np.cumsum([n for _, n in ranked]) / sum(counts.values())
    wanted = min(int(np.searchsorted(cum, coverage, side="left")) + 1, len(ranked))
    kept = min(wanted, max(1, (vocab_size - N_SPECIAL) // 3))
    alphabet = Alphabet(kept, wanted, float(cum[kept - 1]))
    if kept == len(ranked):
        return list(sample), alphabet
    cut = next(c for c in map(chr, range(0xFFFF, 0, -1)) if c not in counts)
    table = {ord(c): cut for c, _ in ranked[kept:]}
    return [p for s in sample for p in s.translate(table).split(cut) if p], alphabet


def _spm_message(e: RuntimeError) -> str:
    # "INTERNAL: src/x.cc(94) [condition] message": the message, else the condition
    m = re.match(r"^\w+: \S+\(\d+\) \[(.*?)\] ?(.*)$", str(e), re.S)
    return (m.group(2).strip() or m.group(1)) if m else str(e)


def train_model(sample: Sequence[str], cfg: TokenizerConfig) -> bytes:
    """The serialized SentencePiece model; no files written."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample), model_writer=model,
            model_type=cfg.model_type, vocab_size=cfg.vocab_size,
            character_coverage=1.0, byte_fallback=True, split_digits=True,
            normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            split_by_whitespace=True, max_sentence_length=4 * CHUNK_CHARS,  # bytes
            num_threads=os.cpu_count() or 1,
            pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
            minloglevel=2)
    except RuntimeError as e:
        raise UserError(f"config.data.tokenizer: SentencePiece cannot train a "
                        f"{cfg.model_type} vocabulary of vocab_size={cfg.vocab_size} on "
                        f"sample_chars={cfg.sample_chars:,}: {_spm_message(e)}") from None
    return model.getvalue()


# ---------------------------------------------------------------------------------------------
# identity and cache


def tokenizer_identity(data: DataConfig, weights: Mapping[str, float]) -> dict:
    """What the tokenizer depends on: config, weights, training files by content."""
    used = {d: w for d, w in weights.items() if w > 0}
    cfg = dataclasses.asdict(data.tokenizer)
    cfg.pop("sample_weights")  # the rule; the resolved weights below are what matters
    return {
        "format": FORMAT,
        "sentencepiece": spm.__version__,
        "config": cfg,
        "sample_weights": {d: round(w, 9) for d, w in used.items()},
        "sources": {d: file_sha256(domain_file(Path(data.root), d, data.train_file))
                    for d in used},
        "text_field": data.text_field,
    }


def _is_complete(path: Path) -> bool:
    return (path / "spm.model").is_file() and (path / "tokenizer.json").is_file()


def train_or_load_tokenizer(data: DataConfig, sample_weights: Mapping[str, float],
                            cache_root: Path, log: Log = print) -> Tokenizer:
    weights = normalize_weights(sample_weights, data.domains)
    ident = tokenizer_identity(data, weights)
    fp = fingerprint(ident)
    final = Path(cache_root) / "tokenizers" / fp[:16]

    def build(tmp: Path) -> None:
        cfg = data.tokenizer
        t0 = time.perf_counter()
        sample, per_domain = draw_sample(data, weights, log)
        sentences, alphabet = restrict_alphabet(sample, cfg.character_coverage, cfg.vocab_size)
        if alphabet.kept < alphabet.wanted:
            log(f"tokenizer: character_coverage={cfg.character_coverage} would give "
                f"{alphabet.wanted:,} characters a piece of their own, over a third of the "
                f"{cfg.vocab_size - N_SPECIAL:,} learnable pieces; keeping the {alphabet.kept:,} "
                f"most frequent (coverage {alphabet.coverage:.4f}), rarer ones fall back to bytes")
        t1 = time.perf_counter()
        model = train_model(sentences, cfg)
        t2 = time.perf_counter()
        (tmp / "spm.model").write_bytes(model)
        write_json(tmp / "tokenizer.json", {
            **ident, "fingerprint": fp, "vocab_size": cfg.vocab_size,
            "alphabet": dataclasses.asdict(alphabet),
            "sample_chars_per_domain": per_domain,
            "sample_seconds": round(t1 - t0, 3), "train_seconds": round(t2 - t1, 3)})
        log(f"tokenizer: trained {cfg.model_type} vocab {cfg.vocab_size:,} on "
            f"{sum(per_domain.values()) / 1e6:.2f}M chars ("
            + ", ".join(f"{d} {n / 1e6:.2f}M" for d, n in per_domain.items())
            + f") in {t2 - t1:.1f}s (+{t1 - t0:.1f}s sampling)")

    built = build_once(final, _is_complete, build)
    tok = Tokenizer(final)
    if not built:
        log(f"tokenizer: reusing {final} ({data.tokenizer.model_type} vocab {tok.vocab_size:,})")
    return tok
