"""Reading a domain's documents: `<root>/<domain>/<file>` as .jsonl, .jsonl.gz or .parquet.

Reading streams (a file is never held in memory as a list of records). Every problem is one
`UserError` naming the file and line. With on_bad_record="skip" the record-level problems
(invalid UTF-8, invalid JSON, a record without a string text field, a truncated .gz) are counted
per file in a `BadRecords` instead; a missing file or one without any document is always an
error, so a dataset is never silently partial.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

from gemini_core.errors import UserError

KINDS = ("invalid_utf8", "invalid_json", "invalid_record", "truncated")
LINES_KEPT = 5  # first line numbers of bad records kept per file, for the report
SKIP_HINT = "(config.data.on_bad_record='skip' skips and counts such records)"


@dataclasses.dataclass
class FileBadRecords:
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    lines: list[int] = dataclasses.field(default_factory=list)
    first: str = ""  # the first problem's message

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return {"counts": dict(sorted(self.counts.items())), "first_lines": list(self.lines)}


class BadRecords:
    """Skipped records, per file: count by kind, the first few line numbers."""

    def __init__(self) -> None:
        self.files: dict[str, FileBadRecords] = {}

    def add(self, path: Path | str, kind: str, line: int, message: str) -> None:
        entry = self.files.setdefault(str(path), FileBadRecords())
        entry.counts[kind] = entry.counts.get(kind, 0) + 1
        if len(entry.lines) < LINES_KEPT:
            entry.lines.append(line)
        entry.first = entry.first or message

    def for_file(self, path: Path | str) -> dict:
        """The manifest's form: {} for a clean file."""
        entry = self.files.get(str(path))
        return entry.to_dict() if entry else {}

    @property
    def total(self) -> int:
        return sum(f.total for f in self.files.values())

    def report(self) -> list[str]:
        out = []
        for path, entry in self.files.items():
            kinds = ", ".join(f"{k} {n:,}" for k, n in sorted(entry.counts.items()))
            lines = ", ".join(map(str, entry.lines)) + (", ..." if entry.total > len(entry.lines)
                                                        else "")
            out.append(f"skipped {entry.total:,} bad records in {path} ({kinds}; lines {lines}); "
                       f"first: {entry.first}")
        return out


# ---------------------------------------------------------------------------------------------
# where the files are


def domain_file(root: Path, domain: str, file_name: str) -> Path:
    """`root/domain/file_name`, or a UserError that says which part is missing."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data root {root} does not exist or is not a folder "
                        "(config.data.root)")
    folder = root / domain
    if not folder.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir() and
                         not p.name.startswith(("_", ".")))
        raise UserError(f"domain {domain!r}: no folder {folder} (domains found in {root}: "
                        f"{', '.join(present) or 'none'}; config.data.domains)")
    path = folder / file_name
    if not path.is_file():
        present = sorted(p.name for p in folder.iterdir() if p.is_file())
        raise UserError(f"domain {domain!r}: missing file {path} (files there: "
                        f"{', '.join(present) or 'none'})")
    return path


_SHA_CACHE: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    """Content hash; memoised per process on (path, size, mtime) since several steps ask."""
    st = os.stat(path)
    key = (str(Path(path).absolute()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


# ---------------------------------------------------------------------------------------------
# records


class Bad(NamedTuple):
    kind: str
    message: str


def check_text(record: object, path: Path, line: int, text_field: str) -> str | Bad:
    where = f"{path}:{line}"
    if not isinstance(record, dict):
        return Bad("invalid_record", f"{where}: expected a JSON object with a {text_field!r} "
                    f"field, got {type(record).__name__}")
    if text_field not in record:
        keys = ", ".join(map(repr, list(record)[:8])) or "none"
        return Bad("invalid_record", f"{where}: record has no {text_field!r} field "
                    f"(its keys: {keys}; config.data.text_field)")
    text = record[text_field]
    if not isinstance(text, str):
        return Bad("invalid_record", f"{where}: field {text_field!r} is "
                    f"{type(text).__name__}, expected a string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON may escape a lone surrogate: not encodable text
        return Bad("invalid_utf8", f"{where}: field {text_field!r} holds a lone surrogate "
                    f"{text[e.start]!r} at character {e.start}: not valid UTF-8 text")
    return text


def _jsonl_records(path: Path, text_field: str, lines: tuple[int, int] = (1, 0)
                   ) -> Iterator[tuple[int, str | Bad]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    first, end = lines
    line = 0
    try:
        with opener(path, "rb") as f:
            for line, raw in enumerate(f, 1):
                if line < first:
                    continue  # before this reader's range: not even decoded
                if end and line >= end:
                    return
                if line == 1:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
                if not raw.strip():
                    continue
                try:
                    decoded = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield line, Bad("invalid_utf8", f"{path}:{line}: invalid UTF-8 at byte "
                                     f"{e.start} of the line ({e.reason})")
                    continue
                try:
                    record = json.loads(decoded)
                except json.JSONDecodeError as e:
                    yield line, Bad("invalid_json", f"{path}:{line}: not valid JSON "
                                     f"({e.msg.removesuffix(' at')} at column {e.colno})")
                    continue
                yield line, check_text(record, path, line, text_field)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        yield line + 1, Bad("truncated", f"{path}: compressed data is truncated or corrupt "
                             f"after line {line} (the last complete line): {e}")


def _parquet_records(path: Path, text_field: str) -> Iterator[tuple[int, str | Bad]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a broken footer
        raise UserError(f"{path}: not a readable parquet file ({e})") from None
    if text_field not in pf.schema_arrow.names:
        raise UserError(f"{path}: no column {text_field!r} (columns: "
                        f"{', '.join(pf.schema_arrow.names)}; config.data.text_field)")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            yield row, check_text({text_field: value}, path, row, text_field)


def _text_file(path: Path, text_field: str) -> Iterator[tuple[int, str | Bad]]:
    del text_field  # a plain-text file is one document
    raw = path.read_bytes()
    try:
        yield 1, raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        yield 1, Bad("invalid_utf8", f"{path}:1: invalid UTF-8 at byte {e.start} ({e.reason})")


def records(path: Path, text_field: str, lines: tuple[int, int] = (1, 0)
            ) -> Iterator[tuple[int, str | Bad]]:
    """(line or row, text or the problem) for each record of a .jsonl[.gz], .parquet or .txt
    file (a .txt file is one document); problems are values, for callers that count them.
    `lines` = [first, end) limits a .jsonl file to a range of its lines (end 0 = to the end)."""
    path = Path(path)
    if path.suffix == ".parquet":
        return _parquet_records(path, text_field)
    if path.suffix == ".txt":
        return _text_file(path, text_field)
    return _jsonl_records(path, text_field, lines)


def line_chunks(path: Path, chunk_bytes: int) -> list[tuple[int, int]]:
    """[first, end) line ranges of about `chunk_bytes` uncompressed each, covering a .jsonl
    file; one range (1, 0) for other formats or a small file. A truncated .gz ends the last
    range at the end of the file (0), so its reader still meets the error."""
    path = Path(path)
    if not path.name.endswith((".jsonl", ".jsonl.gz")):
        return [(1, 0)]
    opener = gzip.open if path.name.endswith(".gz") else open
    starts, size = [1], 0
    try:
        with opener(path, "rb") as f:
            for line, raw in enumerate(f, 1):
                if size >= chunk_bytes:
                    starts.append(line)
                    size = 0
                size += len(raw)
    except (EOFError, zlib.error, gzip.BadGzipFile):
        pass
    return [(a, b) for a, b in zip(starts, starts[1:] + [0])]


def text_batches(texts: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    """Consecutive texts in lists of about `max_chars` characters (a list closes at the text
    that reaches it): batches big enough to amortize a vectorised call, small enough to bound
    its memory."""
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def iter_documents(path: Path, text_field: str, on_bad_record: str,
                   bad: BadRecords) -> Iterator[str]:
    """The text of each record, in file order (.jsonl, .jsonl.gz, .parquet)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    documents = 0
    for line, item in records(path, text_field):
        if isinstance(item, Bad):
            if on_bad_record != "skip":
                hint = "" if item.kind == "truncated" else f" {SKIP_HINT}"
                raise UserError(item.message + hint)
            bad.add(path, item.kind, line, item.message)
            continue
        documents += 1
        yield item
    if not documents:
        skipped = bad.files.get(str(path))
        why = f" ({skipped.total:,} bad records skipped)" if skipped else ""
        raise UserError(f"{path}: no documents{why}; every domain file needs at least one")
