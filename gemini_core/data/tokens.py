"""Token arrays per domain and split, plus manifest.json: what training and evaluation read.

Each domain file becomes one flat array of token ids on disk (uint16 when the vocabulary fits,
else uint32) with EOS after every document, memory-mapped on load. The cache dir is named by a
fingerprint over the tokenizer and the source files' contents, so moving the corpus changes
nothing, and the manifest holds no paths: its hash identifies the data of a run.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from gemini_core.config import DataConfig
from gemini_core.data import media_data, modality, synthetic
from gemini_core.data.sources import (
    BadRecords,
    domain_file,
    file_sha256,
    iter_documents,
    text_batches,
)
from gemini_core.data.tokenizer import (
    Tokenizer,
    build_once,
    normalize_weights,
    train_or_load_tokenizer,
    write_json,
)
from gemini_core.errors import UserError
from gemini_core.runs.rundir import fingerprint

FORMAT = 1  # bump when the array layout or the manifest changes
SPLITS = ("train", "valid")
BATCH_CHARS = 1 << 21  # text per encode call: bounds memory, long enough for all threads

Log = Callable[[str], None]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


@dataclasses.dataclass(frozen=True)
class EncodedFile:
    tokens: np.memmap  # 1-D token ids, EOS after each document
    entry: dict  # the manifest entry: file, sha256, documents, bytes, tokens, ...


@dataclasses.dataclass(frozen=True)
class PreparedData:
    dir: Path
    manifest: dict
    manifest_hash: str
    tokenizer: Tokenizer
    train: dict[str, np.memmap]
    valid: dict[str, np.memmap]
    token_bytes: np.ndarray  # (vocab_size,) UTF-8 bytes per token id
    sample_weights: dict[str, float]  # what the tokenizer's sample was drawn with
    root: Path  # the data root read: data.root, or the cache's with synthetic domains
    media: media_data.MediaData | None = None  # the modality domains' tables and labels


# ---------------------------------------------------------------------------------------------
# encoding


def _flatten(ids: list[list[int]], eos: int, dtype: np.dtype) -> np.ndarray:
    total = sum(map(len, ids)) + len(ids)
    for doc in ids:
        doc.append(eos)
    return np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=total)


def encode_file(tokenizer: Tokenizer, path: Path, out_path: Path, *, text_field: str,
                on_bad_record: str, bad: BadRecords, num_threads: int) -> dict:
    """Streams one source file into `out_path` (raw token ids); returns its manifest entry."""
    dtype = token_dtype(tokenizer.vocab_size)
    token_bytes = tokenizer.token_bytes()
    docs = n_bytes = n_tokens = decoded_bytes = 0
    with open(out_path, "wb") as out:
        for batch in text_batches(iter_documents(path, text_field, on_bad_record, bad),
                                  BATCH_CHARS):
            flat = _flatten(tokenizer.encode_batch(batch, num_threads), tokenizer.eos_id, dtype)
            flat.tofile(out)
            docs += len(batch)
            n_bytes += sum(len(t.encode("utf-8")) for t in batch)
            n_tokens += len(flat)
            decoded_bytes += int(token_bytes[flat].sum(dtype=np.int64))
    text_tokens = n_tokens - docs  # EOS carries no text
    return {
        "file": path.name, "sha256": file_sha256(path), "documents": docs, "bytes": n_bytes,
        "tokens": n_tokens, "bytes_per_token": round(n_bytes / max(text_tokens, 1), 4),
        "token_bytes_mismatch": n_bytes - decoded_bytes,  # 0 unless a text holds U+2581
        "bad_records": bad.for_file(path),
    }


def open_tokens(path: Path, dtype: np.dtype | str, count: int) -> np.memmap:
    return np.memmap(path, dtype=np.dtype(dtype), mode="r", shape=(count,))


def _array_name(domain: str, split: str) -> str:
    return f"{domain}.{split}.bin"


def encode_split(tokenizer: Tokenizer, root: Path, domains: Sequence[str], file_name: str,
                 out_dir: Path, *, split: str = "", text_field: str = "text",
                 on_bad_record: str = "error", num_workers: int = 0, log: Log = print,
                 bad: BadRecords | None = None) -> dict[str, EncodedFile]:
    """Tokenizes `root/<domain>/<file_name>` for each domain into `out_dir/<domain>.<split>.bin`.

    Also what `gx eval --data DIR` uses to tokenize another folder with an existing tokenizer.
    """
    split = split or file_name.split(".")[0]
    bad = bad if bad is not None else BadRecords()
    threads = num_workers or os.cpu_count() or 1
    paths = {d: domain_file(Path(root), d, file_name) for d in domains}  # all missing first
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    out: dict[str, EncodedFile] = {}
    for domain, path in paths.items():
        t0 = time.perf_counter()
        array_path = Path(out_dir) / _array_name(domain, split)
        entry = encode_file(tokenizer, path, array_path, text_field=text_field,
                            on_bad_record=on_bad_record, bad=bad, num_threads=threads)
        entry.update(file=file_name, array=array_path.name)
        seconds = max(time.perf_counter() - t0, 1e-9)
        log(f"data: {split}/{domain}: {entry['documents']:,} docs, {entry['bytes'] / 1e6:.2f} MB"
            f" -> {entry['tokens']:,} tokens ({entry['bytes_per_token']:.2f} bytes/token) in "
            f"{seconds:.1f}s, {entry['bytes'] / 1e6 / seconds:.1f} MB/s")
        if entry["token_bytes_mismatch"]:
            log(f"data: warning: {path}: the texts have {entry['bytes']:,} UTF-8 bytes, their "
                f"pieces {entry['bytes'] - entry['token_bytes_mismatch']:,} (U+2581 in a text "
                "reads back as a space): bits-per-byte is slightly off for this file")
        out[domain] = EncodedFile(open_tokens(array_path, token_dtype(tokenizer.vocab_size),
                                              entry["tokens"]), entry)
    return out


# ---------------------------------------------------------------------------------------------
# sample weights


def _text_bytes(path: Path, text_field: str, on_bad_record: str, cache_root: Path) -> int:
    """UTF-8 bytes of a file's documents, cached by content (it needs a full parse)."""
    key = fingerprint({"format": FORMAT, "sha256": file_sha256(path), "text_field": text_field})
    cached = Path(cache_root) / "stats" / f"{key[:16]}.json"
    if cached.is_file():
        stats = json.loads(cached.read_text())
        if not (stats["bad_records"] and on_bad_record == "error"):
            return stats["bytes"]
    bad = BadRecords()
    n_bytes = sum(len(t.encode("utf-8")) for t in
                  iter_documents(path, text_field, on_bad_record, bad))
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}")
    write_json(tmp, {"bytes": n_bytes, "bad_records": bad.for_file(path)})
    os.replace(tmp, cached)
    return n_bytes


def resolve_sample_weights(data: DataConfig, sample_weights: Mapping[str, float] | str,
                           cache_root: Path) -> dict[str, float]:
    """A weight per domain: as given, "uniform", or "natural" (shares of training-text bytes,
    since token counts need the tokenizer these weights are for)."""
    domains = data.domains
    if isinstance(sample_weights, str):
        if sample_weights == "uniform":
            return {d: 1.0 / len(domains) for d in domains}
        if sample_weights == "natural":
            sizes = {d: _text_bytes(domain_file(Path(data.root), d, data.train_file),
                                    data.text_field, data.on_bad_record, cache_root)
                     for d in domains}
            total = sum(sizes.values())
            return {d: n / total for d, n in sizes.items()}
        raise UserError(f"sample_weights={sample_weights!r}: expected a mapping domain -> "
                        "weight, 'natural' or 'uniform'")
    return normalize_weights(sample_weights, domains)


# ---------------------------------------------------------------------------------------------
# prepare


def _is_complete(path: Path) -> bool:
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        return False
    manifest = json.loads(manifest_path.read_text())
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for splits in manifest["domains"].values():
        for entry in splits.values():
            array = path / entry["array"]
            if not array.is_file() or array.stat().st_size != entry["tokens"] * itemsize:
                return False
    return True


def manifest_hash(manifest: dict) -> str:
    return fingerprint(manifest)


def _raise_recorded_bad(data: DataConfig, manifest: dict) -> None:
    """A cache built with on_bad_record="skip" must not let "error" pass silently: re-read the
    first file with bad records, which raises the same error an uncached run would."""
    for domain, splits in manifest["domains"].items():
        for entry in splits.values():
            if entry["bad_records"]:
                path = domain_file(Path(data.root), domain, entry["file"])
                for _ in iter_documents(path, data.text_field, "error", BadRecords()):
                    pass


def report(manifest: dict, log: Log, skipped: bool = True) -> None:
    log(f"data: {'domain':<14}{'train tokens':>14}{'valid tokens':>14}{'bytes/token':>13}")
    for domain, splits in manifest["domains"].items():
        train, valid = splits["train"], splits["valid"]
        log(f"data: {domain:<14}{train['tokens']:>14,}{valid['tokens']:>14,}"
            f"{train['bytes_per_token']:>13.2f}")
    for domain, splits in manifest["domains"].items():
        for split, entry in splits.items():
            bad = entry["bad_records"] if skipped else {}
            if bad:
                kinds = ", ".join(f"{k} {n:,}" for k, n in bad["counts"].items())
                log(f"data: skipped in {domain}/{entry['file']}: {kinds} (first lines "
                    f"{', '.join(map(str, bad['first_lines']))})")


def prepare_data(data: DataConfig, sample_weights: Mapping[str, float] | str,
                 cache_root: Path, log: Log = print,
                 encoders: Mapping | None = None) -> PreparedData:
    """Tokenizer (trained or cached) and token arrays (encoded or cached) for `data` (its
    synthetic domains generated into the cache first: gemini_core.data.synthetic); with
    modality domains, their token arrays and media tables too (built with `encoders`,
    config.model.encoders: gemini_core.data.modality)."""
    if not data.modalities:
        return _prepare_text(data, sample_weights, cache_root, log)
    text = dataclasses.replace(data, domains=data.text_domains, modalities={})
    if not isinstance(sample_weights, str):  # the tokenizer's sample: the text domains' share
        kept = {d: w for d, w in sample_weights.items() if d in text.domains}
        total = sum(kept.values())
        sample_weights = ({d: w / total for d, w in kept.items()} if total > 0 else "uniform")
    prepared = _prepare_text(text, sample_weights, cache_root, log)
    ordered = {d: data.modalities[d] for d in data.domains if d in data.modalities}
    media = media_data.prepare_media(ordered, encoders or {}, prepared.tokenizer, cache_root, log)
    manifest = {**prepared.manifest,
                "domains": {d: prepared.manifest["domains"].get(d) or media.entries[d]
                            for d in data.domains},
                "media": {"format": modality.FORMAT, "dir": media.dir.name}}
    for name, splits in media.entries.items():
        log(f"data: {name:<14}{splits['train']['tokens']:>14,}{splits['valid']['tokens']:>14,}"
            f"{splits['train']['bytes_per_token']:>13.2f}  ({data.modalities[name].kind})")
    return dataclasses.replace(
        prepared, manifest=manifest, manifest_hash=manifest_hash(manifest), media=media,
        train={d: prepared.train.get(d, media.train.get(d)) for d in data.domains},
        valid={d: prepared.valid.get(d, media.valid.get(d)) for d in data.domains})


def _prepare_text(data: DataConfig, sample_weights: Mapping[str, float] | str,
                  cache_root: Path, log: Log = print) -> PreparedData:
    data = synthetic.materialize(data, cache_root)
    root, cache_root = Path(data.root), Path(cache_root)
    files = {split: getattr(data, f"{split}_file") for split in SPLITS}
    sources = {d: {s: domain_file(root, d, f) for s, f in files.items()} for d in data.domains}
    weights = resolve_sample_weights(data, sample_weights, cache_root)
    tokenizer = train_or_load_tokenizer(data, weights, cache_root, log)
    fp = fingerprint({
        "format": FORMAT, "tokenizer": tokenizer.fingerprint, "text_field": data.text_field,
        "sources": {d: {s: [p.name, file_sha256(p)] for s, p in splits.items()}
                    for d, splits in sources.items()}})
    final = cache_root / "tokens" / fp[:16]

    def build(tmp: Path) -> None:
        t0 = time.perf_counter()
        bad = BadRecords()
        encoded = {s: encode_split(tokenizer, root, data.domains, f, tmp, split=s,
                                   text_field=data.text_field, on_bad_record=data.on_bad_record,
                                   num_workers=data.num_workers, log=log, bad=bad)
                   for s, f in files.items()}
        manifest = {
            "format": FORMAT,
            "tokenizer": {"fingerprint": tokenizer.fingerprint,
                          "vocab_size": tokenizer.vocab_size},
            "dtype": token_dtype(tokenizer.vocab_size).name, "eos_id": tokenizer.eos_id,
            "text_field": data.text_field,
            "domains": {d: {s: encoded[s][d].entry for s in SPLITS} for d in data.domains},
        }
        write_json(tmp / "manifest.json", manifest, sort_keys=False)  # domains in config order
        seconds = time.perf_counter() - t0
        total = sum(e.entry["bytes"] for split in encoded.values() for e in split.values())
        log(f"data: encoded {total / 1e6:.1f} MB in {seconds:.1f}s ({total / 1e6 / seconds:.1f} "
            f"MB/s, {data.num_workers or os.cpu_count()} threads)")
        for line in bad.report():
            log(f"data: {line}")

    built = build_once(final, _is_complete, build)
    manifest = json.loads((final / "manifest.json").read_text())
    if data.on_bad_record == "error":
        _raise_recorded_bad(data, manifest)
    if not built:
        log(f"data: reusing token arrays {final}")
    report(manifest, log, skipped=not built)  # a build has just told them in detail
    arrays = {s: {d: open_tokens(final / manifest["domains"][d][s]["array"], manifest["dtype"],
                                 manifest["domains"][d][s]["tokens"]) for d in data.domains}
              for s in SPLITS}
    return PreparedData(dir=final, root=root, manifest=manifest,
                        manifest_hash=manifest_hash(manifest),
                        tokenizer=tokenizer, train=arrays["train"], valid=arrays["valid"],
                        token_bytes=tokenizer.token_bytes(), sample_weights=weights)
