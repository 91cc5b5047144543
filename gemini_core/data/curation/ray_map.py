"""One Ray Data map over a list of work items, with a progress line per finished item.

Each item is a JSON string in one block of its own, so a slow item never holds back others;
results come back in completion order (callers re-order them by their own index).
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

Log = Callable[[str], None]


def ray_map(items: list[dict], column: str, fn: Any, workers: int, progress: "Progress",
            result: str, **kwargs: Any) -> list[str]:
    """fn (a function, or a callable class run as an actor pool) over items, `workers` at a
    time; the `result` column of each output row."""
    import ray.data
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False  # callers re-order the results by their index
    ds = ray.data.from_items([{column: json.dumps(item)} for item in items],
                             override_num_blocks=len(items))
    strategy = ray.data.ActorPoolStrategy if isinstance(fn, type) else ray.data.TaskPoolStrategy
    ds = ds.map_batches(fn, batch_size=1, compute=strategy(size=workers), num_cpus=1, **kwargs)
    out = []
    for row in ds.iter_rows():
        out.append(row[result])
        progress.done(row[result])
    return out


class Progress:
    """One line per finished shard: shards done, documents, MB/s, ETA."""

    def __init__(self, stage: str, total: int, total_bytes: int, log: Log):
        self.stage, self.total, self.total_bytes, self.log = stage, total, total_bytes, log
        self.n, self.bytes, self.t0 = 0, 0, time.perf_counter()

    def done(self, result: str) -> None:
        self.n += 1
        try:
            stats = json.loads(result)
            self.bytes += stats.get("bytes_in", 0) if isinstance(stats, dict) else 0
        except ValueError:
            stats = None
        elapsed = time.perf_counter() - self.t0
        rate = self.bytes / 1e6 / elapsed if elapsed else 0.0
        left = (elapsed / self.n) * (self.total - self.n)
        extra = f", {self.bytes / 1e6:.1f} MB, {rate:.2f} MB/s" if self.bytes else ""
        label = (f" ({stats['domain']}/{stats['split']})"
                 if isinstance(stats, dict) and "domain" in stats else "")
        self.log(f"{self.stage}: {self.n}/{self.total} shards{label}{extra}, eta {left:.0f}s")
