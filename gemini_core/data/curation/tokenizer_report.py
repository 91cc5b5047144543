"""`gx data tokenizer-report`: why the Gemini reports train their own tokenizer, in one table.

On each domain's valid split it compares bytes per token of three encodings: raw UTF-8 bytes
(1.0 by definition), a SentencePiece model trained on the mix of all domains, and one trained on
a single domain (web by default) with the same settings (`data.tokenizer`). A tokenizer fitted
to one kind of text spends its vocabulary on that kind: it compresses its own domain a bit
better and code, math or other languages much worse — more tokens for the same text, so less
text per training step and per context window.

Both tokenizers come from `train_or_load_tokenizer`, cached by content, so a second report (or a
training run with the same settings) reuses them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping

from gemini_core.config import DataConfig
from gemini_core.data.sources import BadRecords, domain_file, iter_documents, text_batches
from gemini_core.data.tokenizer import Tokenizer, train_or_load_tokenizer
from gemini_core.data.tokens import BATCH_CHARS, resolve_sample_weights
from gemini_core.errors import UserError

RAW, MIX = "raw", "mix"

Log = Callable[[str], None]


def single_key(domain: str) -> str:
    return f"single:{domain}"


def _count(path: Path, tokenizers: Mapping[str, Tokenizer], data: DataConfig,
           threads: int) -> dict:
    """Documents, UTF-8 bytes, skipped records and, per tokenizer, tokens (no EOS) of a file."""
    docs = n_bytes = 0
    tokens = dict.fromkeys(tokenizers, 0)
    bad = BadRecords()
    for batch in text_batches(iter_documents(path, data.text_field, data.on_bad_record, bad),
                              BATCH_CHARS):
        docs += len(batch)
        n_bytes += sum(len(t.encode("utf-8")) for t in batch)
        for name, tok in tokenizers.items():
            tokens[name] += sum(map(len, tok.encode_batch(batch, threads)))
    return {"documents": docs, "bytes": n_bytes, "tokens": tokens,
            "bad_records": bad.for_file(path)}  # {} unless on_bad_record="skip" skipped some


def _bytes_per_token(n_bytes: int, tokens: Mapping[str, int]) -> dict[str, float]:
    return {RAW: 1.0, **{name: n_bytes / max(n, 1) for name, n in tokens.items()}}


def tokenizer_report(data: DataConfig, *, single_domain: str = "web", cache_root: Path,
                     mix_weights: Mapping[str, float] | str = "uniform",
                     log: Log = print) -> dict:
    """Bytes per token on each domain's valid split: raw bytes, the mix's tokenizer, one domain's.

    `mix_weights` draws the mix tokenizer's sample: a mapping domain -> weight, "uniform" or
    "natural" (as `resolve_sample_weights`). Returns
        {"vocab_size", "model_type", "valid_file", "single_domain",
         "columns": ["raw", "mix", "single:<domain>"],
         "tokenizers": {column: {"fingerprint", "sample_weights"}},
         "domains": {d: {"documents", "bytes", "bad_records", "tokens": {column: n},
                         "bytes_per_token": {column: x}, "single_over_mix": ratio}},
         "mean": {column: x},  # unweighted over domains: each domain counts once
         "pooled": {"bytes", "tokens", "bytes_per_token", "single_over_mix"}}  # all text as one
    """
    if single_domain not in data.domains:
        raise UserError(f"single_domain={single_domain!r}: not one of config.data.domains "
                        f"({', '.join(data.domains)})")
    single = single_key(single_domain)
    weights = {MIX: resolve_sample_weights(data, mix_weights, cache_root),
               single: {single_domain: 1.0}}
    tokenizers = {name: train_or_load_tokenizer(data, w, cache_root, log)
                  for name, w in weights.items()}
    paths = {d: domain_file(Path(data.root), d, data.valid_file) for d in data.domains}
    threads = data.num_workers or os.cpu_count() or 1

    domains = {}
    for d, path in paths.items():
        entry = _count(path, tokenizers, data, threads)
        entry["bytes_per_token"] = _bytes_per_token(entry["bytes"], entry["tokens"])
        entry["single_over_mix"] = entry["tokens"][single] / max(entry["tokens"][MIX], 1)
        domains[d] = entry
        log(f"tokenizer-report: {d}: {entry['bytes']:,} bytes, bytes/token "
            + ", ".join(f"{k} {v:.3f}" for k, v in entry["bytes_per_token"].items()))
    columns = [RAW, MIX, single]
    total_bytes = sum(e["bytes"] for e in domains.values())
    total_tokens = {name: sum(e["tokens"][name] for e in domains.values()) for name in tokenizers}
    return {
        "vocab_size": data.tokenizer.vocab_size,
        "model_type": data.tokenizer.model_type,
        "valid_file": data.valid_file,
        "single_domain": single_domain,
        "columns": columns,
        "tokenizers": {name: {"fingerprint": tok.fingerprint,
                              "sample_weights": {d: w for d, w in weights[name].items() if w > 0}}
                       for name, tok in tokenizers.items()},
        "domains": domains,
        "mean": {c: sum(e["bytes_per_token"][c] for e in domains.values()) / len(domains)
                 for c in columns},
        "pooled": {"bytes": total_bytes, "tokens": total_tokens,
                   "bytes_per_token": _bytes_per_token(total_bytes, total_tokens),
                   "single_over_mix": total_tokens[single] / max(total_tokens[MIX], 1)},
    }


def format_report(report: dict) -> str:
    """A Markdown table: bytes per token per domain (higher = fewer tokens for the same text)
    and how many more tokens the single-domain tokenizer needs than the mix's."""
    single = report["single_domain"]
    key = single_key(single)
    header = (f"| domain | valid bytes | raw bytes | mix | {single}-only | "
              f"tokens {single}-only / mix |")
    lines = [f"Bytes per token on each domain's {report['valid_file']} "
             f"({report['model_type']}, vocab {report['vocab_size']:,}; higher = better "
             "compression)", "", header, "|---|---:|---:|---:|---:|---:|"]

    def row(name: str, n_bytes: str, bpt: Mapping[str, float], ratio: str) -> str:
        return (f"| {name} | {n_bytes} | {bpt[RAW]:.2f} | {bpt[MIX]:.2f} | {bpt[key]:.2f} | "
                f"{ratio} |")

    for d, e in report["domains"].items():
        lines.append(row(d, f"{e['bytes']:,}", e["bytes_per_token"],
                         f"{e['single_over_mix']:.2f}x"))
    lines.append(row("mean of domains", "", report["mean"], ""))
    pooled = report["pooled"]
    lines.append(row("all (pooled)", f"{pooled['bytes']:,}", pooled["bytes_per_token"],
                     f"{pooled['single_over_mix']:.2f}x"))
    return "\n".join(lines)
