"""Phase 2 of `gx data prepare`: dedup on the driver, in the global order, then the output files.

Shards are visited in the global order (domain, split, file, line), so "keep the first" is the
same decision whoever filtered which shard. Only the parts that lost duplicates are rewritten
(duplicates are rare: a second parallel pass over every part would cost more than it saves);
the parts are concatenated per domain and split into `<out>/<domain>/<split>.jsonl.gz`
(concatenated gzip members are one valid gzip file).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from gemini_core.data.curation import dedup as dedup_lib
from gemini_core.data.curation.filter_pass import SNIPPET_CHARS, Plan, gzip_writer
from gemini_core.data.curation.sources import Shard

Log = Callable[[str], None]


def dedup_shards(plan: Plan, shards: list[Shard], log: Log) -> tuple[dict[int, set[int]], dict]:
    """Row numbers to drop per shard, and the counts and examples for the report."""
    p = plan.dedup
    if not (p.exact or p.near):
        return {}, {}
    deduper = dedup_lib.Deduper(p)
    drops: dict[int, set[int]] = {}
    removed: dict[str, dict[str, dict]] = {}
    work = Path(plan.work_dir)
    for shard in shards:
        arrays = np.load(work / f"{shard.index:06d}.npz")
        keys, sigs, ids, sizes = arrays["keys"], arrays["sigs"], arrays["ids"], arrays["sizes"]
        for row, doc_id in enumerate(ids.tolist()):
            found = deduper.add(doc_id, keys[row].tobytes() if p.exact else None,
                                sigs[row] if p.near else None)
            if found is None:
                continue
            kind, original = found
            drops.setdefault(shard.index, set()).add(row)
            entry = removed.setdefault(shard.domain, {}).setdefault(
                f"dedup/{kind}", {"docs": 0, "bytes": 0, "cross_domain": 0, "examples": [],
                                  "rows": [], "split_docs": {}, "split_bytes": {}})
            entry["docs"] += 1
            entry["bytes"] += int(sizes[row])
            entry["split_docs"][shard.split] = entry["split_docs"].get(shard.split, 0) + 1
            entry["split_bytes"][shard.split] = (entry["split_bytes"].get(shard.split, 0)
                                                 + int(sizes[row]))
            entry["cross_domain"] += original.split("/")[0] != shard.domain
            if len(entry["examples"]) < plan.cfg_json["output"]["examples"]:
                entry["examples"].append({"where": doc_id, "duplicate_of": original,
                                          "shard": shard.index, "row": row})
    fill_dedup_examples(work, removed)
    log(f"dedup: {sum(len(v) for v in drops.values()):,} duplicates removed")
    return drops, removed


def fill_dedup_examples(work: Path, removed: dict) -> None:
    """The text of each example duplicate, read back from its shard's part."""
    wanted: dict[int, list[dict]] = {}
    for kinds in removed.values():
        for entry in kinds.values():
            entry.pop("rows")
            for ex in entry["examples"]:
                wanted.setdefault(ex.pop("shard"), []).append(ex)
    for index, examples in wanted.items():
        rows = {ex.pop("row"): ex for ex in examples}
        with gzip.open(work / f"{index:06d}.part.gz", "rt", encoding="utf-8") as f:
            for row, line in enumerate(f):
                if row in rows:
                    rows[row]["text"] = json.loads(line)["text"][:SNIPPET_CHARS]


def drop_rows(part: Path, rows: set[int]) -> None:
    """Rewrites a part without the given rows."""
    tmp = part.with_suffix(".tmp")
    with gzip.open(part, "rb") as src, gzip_writer(tmp) as dst:
        for row, line in enumerate(src):
            if row not in rows:
                dst.write(line)
    os.replace(tmp, part)


def assemble(work: Path, shards: list[Shard], drops: dict[int, set[int]],
             out_tmp: Path) -> list[tuple[str, str]]:
    """Concatenates the parts per domain and split, in the global order."""
    written = []
    for shard in shards:
        part = work / f"{shard.index:06d}.part.gz"
        if shard.index in drops:
            drop_rows(part, drops[shard.index])
        target = out_tmp / shard.domain / f"{shard.split}.jsonl.gz"
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "ab") as dst, open(part, "rb") as src:
            shutil.copyfileobj(src, dst)
        if (shard.domain, shard.split) not in written:
            written.append((shard.domain, shard.split))
    return written
