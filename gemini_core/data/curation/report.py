"""The report of `gx data prepare`: per domain, documents and bytes in and out, what each rule
removed (with examples), bad records, PII counts, languages; as report.json beside the output
and as a table (`gx data report DIR`). report.json also says whether its output can be reused:
which records were bad (a --strict run refuses an output made by skipping them) and which output
files are empty.
"""

from __future__ import annotations

import json
from pathlib import Path

from gemini_core.data.curation.config import CurationConfig
from gemini_core.data.curation.filter_pass import DECONTAMINATE, STAGES
from gemini_core.errors import UserError

COLUMN = {DECONTAMINATE: "decontam"}  # a stage's column header, where its name is too wide


def load_report(out: Path) -> dict | None:
    """The report of a finished prepare output, or None (none, or unreadable)."""
    try:
        return json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return None


def read_report(out: Path) -> dict:
    report = load_report(out)
    if report is None:
        raise UserError(f"{out}: no readable report.json; not a `gx data prepare` output")
    return report


def merge_counts(into: dict, counts: dict) -> None:
    """Adds `counts` into `into`, key by key."""
    for k, v in counts.items():
        into[k] = into.get(k, 0) + v


def written_file(stats: list[dict], dup_removed: dict, domain: str, split: str) -> dict:
    """Documents and text bytes of one output file: the filters' survivors less duplicates."""
    shards = [s for s in stats if (s["domain"], s["split"]) == (domain, split)]
    dups = dup_removed.get(domain, {}).values()
    return {"file": f"{domain}/{split}.jsonl.gz",
            "docs": sum(s["docs_out"] for s in shards)
            - sum(v["split_docs"].get(split, 0) for v in dups),
            "bytes": sum(s["bytes_out"] for s in shards)
            - sum(v["split_bytes"].get(split, 0) for v in dups)}


def build_report(cfg: CurationConfig, stats: list[dict], dup_removed: dict,
                 written: list[tuple[str, str]], seconds: dict) -> dict:
    domains: dict[str, dict] = {}
    for s in stats:
        d = domains.setdefault(s["domain"], {
            "docs_in": 0, "bytes_in": 0, "removed": {}, "rules_any": {}, "examples": {},
            "pii": {}, "languages": {}, "bad": {}, "bad_examples": [], "normalized_changed": 0,
            "sources": []})
        for key in ("docs_in", "bytes_in", "normalized_changed"):
            d[key] += s[key]
        for stage, r in s["removed"].items():
            merge_counts(d["removed"].setdefault(stage, {"docs": 0, "bytes": 0}), r)
        for key in ("rules_any", "pii", "languages", "bad"):
            merge_counts(d[key], s[key])
        merge_counts(d.setdefault("rules_first", {}), s["rules_first"])
        for rule, ex in s["examples"].items():
            kept = d["examples"].setdefault(rule, [])
            kept += ex[: cfg.output.examples - len(kept)]
        d["bad_examples"] += s["bad_examples"][: 5 - len(d["bad_examples"])]
        d["sources"].append(s["source"])
    for domain, kinds in dup_removed.items():
        d = domains[domain]
        for kind, entry in kinds.items():
            d["removed"][kind] = {"docs": entry["docs"], "bytes": entry["bytes"],
                                  "cross_domain": entry["cross_domain"]}
            d["rules_first"][kind] = entry["docs"]
            d["examples"][kind] = entry["examples"]
    for domain, split in written:
        domains[domain].setdefault("output", {})[split] = written_file(stats, dup_removed, domain,
                                                                   split)
    for d in domains.values():
        d["docs_out"] = sum(o["docs"] for o in d.get("output", {}).values())
        d["bytes_out"] = sum(o["bytes"] for o in d.get("output", {}).values())
    total_in = sum(d["bytes_in"] for d in domains.values())
    return {"name": cfg.name, "domain_order": list(cfg.data.domains), "domains": domains,
            "seconds": seconds,
            "mb_per_s": total_in / 1e6 / seconds["total"] if seconds["total"] else None}


def format_report(report: dict) -> str:
    """The human-readable report: per domain docs and MB in/out, then what each rule removed."""
    # report.json is written with sorted keys; show domains in the config's order
    order = report.get("domain_order") or list(report["domains"])
    domains = {d: report["domains"][d] for d in order if d in report["domains"]}
    # a stage that ran only when declared has a column only then
    stages = STAGES + tuple(s for s in (DECONTAMINATE,)
                            if any(s in d["removed"] for d in domains.values()))
    lines = [f"{'domain':<14}{'docs in':>10}{'docs out':>10}{'kept':>7}{'MB in':>9}{'MB out':>9}"
             + "".join(f"{COLUMN.get(s, s):>12}" for s in (*stages, "dedup"))]
    lines.append("-" * len(lines[0]))
    for domain, d in domains.items():
        removed = d["removed"]
        dedup = sum(v["docs"] for k, v in removed.items() if k.startswith("dedup/"))
        kept = d["docs_out"] / d["docs_in"] if d["docs_in"] else 0.0
        lines.append(f"{domain:<14}{d['docs_in']:>10,}{d['docs_out']:>10,}{kept:>7.0%}"
                     f"{d['bytes_in'] / 1e6:>9.2f}{d['bytes_out'] / 1e6:>9.2f}"
                     + "".join(f"{removed.get(s, {}).get('docs', 0):>12,}" for s in stages)
                     + f"{dedup:>12,}")
    lines.append("")
    lines.append("removed by rule (first rule that dropped the document; any = every failing "
                 "document)")
    for domain, d in domains.items():
        rules = sorted(d["rules_first"].items(), key=lambda kv: -kv[1])
        if not rules:
            continue
        lines.append(f"  {domain}: " + ", ".join(
            f"{r} {n:,} (any {d['rules_any'].get(r, n):,})" for r, n in rules))
        for rule, _ in rules[:3]:
            for ex in d["examples"].get(rule, [])[:1]:
                snippet = " ".join(ex["text"].split())[:100]
                lines.append(f"      {rule} e.g. {ex['where']}: {snippet!r}")
    for domain, d in domains.items():
        if d["pii"]:
            lines.append(f"  {domain}: PII masked: " + ", ".join(
                f"{k} {n:,}" for k, n in sorted(d["pii"].items())))
        if d["bad"]:
            lines.append(f"  {domain}: bad records: " + ", ".join(
                f"{k} {n:,}" for k, n in sorted(d["bad"].items()))
                + f" (first: {d['bad_examples'][0]['message']})")
        top = sorted(d["languages"].items(), key=lambda kv: -kv[1])[:5]
        lines.append(f"  {domain}: languages " + ", ".join(f"{k} {n:,}" for k, n in top))
        empty = [s for s, o in d.get("output", {}).items() if not o["docs"]]
        if empty:
            lines.append(f"  {domain}: WARNING: no documents left in {', '.join(empty)}")
    metrics = report.get("classifier_metrics")
    if metrics:
        lines.append(f"classifier: held-out accuracy {metrics['accuracy']:.3f}, "
                     f"AUC {metrics['auc']:.3f}")
    sec = report["seconds"]
    mbps = report.get("mb_per_s")
    lines.append(f"time: filter {sec['filter']:.1f}s, dedup {sec['dedup']:.1f}s, total "
                 f"{sec['total']:.1f}s" + (f" ({mbps:.2f} MB/s)" if mbps else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# whether an output can be used (a fresh one, or a finished one about to be reused)


def bad_records(report: dict) -> tuple[int, str]:
    """How many records the prepare skipped as unreadable, and the first one's message (it names
    the file and line), in the domain order."""
    order = report.get("domain_order") or list(report["domains"])
    total, first = 0, ""
    for domain in order:
        d = report["domains"].get(domain, {})
        total += sum(d.get("bad", {}).values())
        first = first or next((e["message"] for e in d.get("bad_examples", [])), "")
    return total, first


def empty_outputs(report: dict) -> list[str]:
    """Output files with no documents (`<domain>/<split>.jsonl.gz`): no training run can read
    them."""
    return [o["file"] for d in report["domains"].values()
            for o in d.get("output", {}).values() if not o["docs"]]


def why_empty(report: dict, file: str) -> str:
    """What emptied one output file: its documents in, bad records, and each stage's removals
    (counted over its domain: the stages count per domain, dedup per split)."""
    domain, split = file.split("/")[0], file.split("/")[1].split(".")[0]
    d = report["domains"][domain]
    removed = ", ".join(f"{stage} {r['docs']:,}" for stage, r in d["removed"].items() if r["docs"])
    bad = sum(d["bad"].values())
    return (f"{file} would have no documents: domain {domain!r} read {d['docs_in']:,} documents"
            + (f" and {bad:,} bad records" if bad else "")
            + (f", the filters removed {removed} (over all its splits)" if removed else "")
            + f"; add documents to split {split!r} or loosen the filters")
