"""Raw documents for curation: local files by glob, or a Hugging Face dataset, as shards.

A shard is one unit of parallel work: a range of lines of one input file of one domain and
split, or one split of a HF dataset (streamed: it cannot be cut without reading it). Shards are planned on the driver,
in a fixed order (config domain order, split order, sorted paths), so output and the "keep the
first" rule of dedup never depend on how many workers there are.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import socket
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from gemini_core.data.curation.config import CurationConfig, SourceConfig
from gemini_core.data.sources import Bad, check_text, file_sha256, line_chunks, records
from gemini_core.errors import UserError

BUILDERS = ("json", "parquet", "csv", "text", "arrow")  # datasets' local-file builders
# a large file is cut into line ranges of about this many bytes, so that workers finish
# together; the cut depends only on the file, never on the number of workers
CHUNK_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class Shard:
    domain: str
    split: str
    index: int  # position in the global order
    kind: str  # files | hf
    path: str  # the file, or the HF dataset name
    text_field: str
    hf_config: str = ""
    hf_split: str = ""
    hf_data_files: str = ""
    sha256: str = ""  # of the file: identifies the content (HF: name/config/split instead)
    first_line: int = 1  # this shard's [first_line, end_line) of the file; end 0 = to its end
    end_line: int = 0

    @property
    def label(self) -> str:
        if self.kind == "hf":
            return f"hf:{self.path}/{self.hf_config or 'default'}/{self.hf_split}"
        return self.path


def _glob(root: Path, domain: str, pattern: str) -> list[str]:
    full = pattern if os.path.isabs(pattern) else str(root / domain / pattern)
    return sorted(glob.glob(full, recursive=True))


def _file_shards(cfg: CurationConfig, domain: str, split: str, source: SourceConfig | None,
                 text_field: str, start: int) -> list[Shard]:
    root = Path(cfg.data.root)
    pattern = (source.files.get(split) if source else None) or cfg.data.files[split]
    paths = [p for p in _glob(root, domain, pattern) if os.path.isfile(p)]
    if not paths:
        where = root / domain / pattern if not os.path.isabs(pattern) else Path(pattern)
        if not (root / domain).is_dir() and not os.path.isabs(pattern):
            raise UserError(f"{root / domain}: no such domain folder (config.data.root="
                            f"{cfg.data.root!r}, domain {domain!r})")
        raise UserError(f"{where}: no file matches (domain {domain!r}, split {split!r})")
    shards = []
    for p in paths:
        if os.path.getsize(p) == 0:  # known before any work starts: said before any starts
            raise UserError(f"{p}: empty file (0 bytes; domain {domain!r}, split {split!r}): "
                            "every input file needs at least one document")
        sha = file_sha256(Path(p))
        for first, end in line_chunks(Path(p), CHUNK_BYTES):
            shards.append(Shard(domain, split, start + len(shards), "files",
                                str(Path(p).absolute()), text_field, sha256=sha,
                                first_line=first, end_line=end))
    return shards


def plan_shards(cfg: CurationConfig) -> list[Shard]:
    """Every shard of every domain and split, in the global order; missing input is an error."""
    shards: list[Shard] = []
    for domain in cfg.data.domains:
        source = cfg.data.sources.get(domain)
        text_field = (source.text_field if source else "") or cfg.data.text_field
        for split in cfg.data.files:
            if source and source.kind == "hf":
                shards.append(Shard(domain, split, len(shards), "hf", source.hf_name, text_field,
                                    hf_config=source.hf_config,
                                    hf_split=source.hf_splits.get(split, split),
                                    hf_data_files=source.hf_data_files.get(split, "")))
            else:
                shards += _file_shards(cfg, domain, split, source, text_field, len(shards))
    return shards


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


def _hub_reachable(timeout: float = 5.0) -> str | None:
    """None if the Hub's host answers on its port; else why not. Checked up front because the
    datasets library retries an unreachable Hub for tens of seconds before it gives up."""
    from huggingface_hub import constants
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError as e:
        return f"{url.hostname}: {e}"
    return None


def _is_hub_dataset(shard: Shard) -> bool:
    return shard.path not in BUILDERS and not Path(shard.path).exists()


def check_hf_source(shard: Shard) -> None:
    """A clear error before any work starts when a hub dataset cannot be reached."""
    if shard.kind != "hf" or not _is_hub_dataset(shard):
        return
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return  # the user asked for the local cache; load_dataset says if it is not there
    why = _hub_reachable()
    if why:
        raise UserError(f"Hugging Face dataset {shard.path!r} (domain {shard.domain!r}): the "
                        f"Hub cannot be reached ({why}); use local files, or HF_HUB_OFFLINE=1 "
                        "with a dataset already in the cache")


def _hf_records(shard: Shard) -> Iterator[tuple[int, str | Bad]]:
    import datasets
    try:
        # files given for our split are the builder's split of the same name
        files = {shard.hf_split: shard.hf_data_files} if shard.hf_data_files else None
        ds = datasets.load_dataset(shard.path, shard.hf_config or None, split=shard.hf_split,
                                   data_files=files, streaming=True)
    except Exception as e:  # datasets raises many types; all mean "this source is unusable"
        raise UserError(f"Hugging Face dataset {shard.label} (domain {shard.domain!r}): "
                        f"{type(e).__name__}: {e}") from None
    where = Path(shard.label)
    for row, record in enumerate(ds, 1):
        yield row, check_text(record, where, row, shard.text_field)


def read_shard(shard: Shard) -> Iterator[tuple[int, str | Bad]]:
    """(line or row, text or the problem) in order."""
    if shard.kind == "hf":
        return _hf_records(shard)
    if not os.path.isfile(shard.path):
        raise UserError(f"{shard.path}: no such file")
    return records(Path(shard.path), shard.text_field, (shard.first_line, shard.end_line))
