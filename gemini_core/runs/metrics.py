"""`metrics.jsonl`, the primary record of a run's metrics (the trainer, `gx show` and sweeps read
it): one JSON object per logged step, {"step": s, name: value, ...}, written whole line by whole
line, so a kill leaves at worst a torn last line, which every reader here skips.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

METRICS_FILE = "metrics.jsonl"
STEP_KEY = "step"  # also logged to W&B as the x-axis of every chart


def metrics_path(run_dir: Path) -> Path:
    return Path(run_dir) / METRICS_FILE


def parse_lines(data: bytes) -> tuple[list[dict], int]:
    """Rows of whole, valid lines, and how many lines were dropped (a torn tail, junk)."""
    lines = data.split(b"\n")
    whole, tail = lines[:-1], lines[-1]  # no trailing newline = a write cut short by a kill
    rows, dropped = [], int(bool(tail.strip()))
    for line in whole:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(row, dict) and isinstance(row.get(STEP_KEY), int):
            rows.append(row)
        else:
            dropped += 1
    return rows, dropped


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of `metrics.jsonl` ({"step": s, ...}), ignoring a torn last line."""
    try:
        data = metrics_path(run_dir).read_bytes()
    except FileNotFoundError:
        return []
    return parse_lines(data)[0]


def write_rows_atomic(path: Path, rows: list[dict]) -> None:
    # write-then-rename: a kill during the rewrite leaves the old file, never a half one
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.writelines(dump_row(row) for row in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def truncate_metrics(run_dir: Path, keep_through: int) -> int:
    """Keeps rows with step <= keep_through (and drops a torn last line); returns rows dropped.

    A run resumed from the checkpoint at `keep_through` logs the later steps again, so rows past
    it would become duplicates, and rows a killed process logged after its last checkpoint
    describe training that the resumed run does not continue from.
    """
    path = metrics_path(run_dir)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    rows, dropped = parse_lines(data)
    kept = [row for row in rows if row[STEP_KEY] <= keep_through]
    dropped += len(rows) - len(kept)
    if dropped:
        write_rows_atomic(path, kept)
    return dropped


def dump_row(row: Mapping[str, Any]) -> str:
    return json.dumps(row, separators=(",", ":")) + "\n"


def as_floats(step: int, metrics: Mapping[str, float]) -> dict[str, float]:
    """Checks names; numpy / JAX scalars become plain floats; errors name the metric."""
    out = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name or name == STEP_KEY or name.startswith("_"):
            raise ValueError(f"metric name {name!r} at step {step}: must be a non-empty string, "
                             f"not {STEP_KEY!r}, not starting with '_' (reserved by W&B)")
        try:
            out[name] = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"metric {name} at step {step}: expected a number, got "
                            f"{type(value).__name__} {value!r}") from None
    return out
