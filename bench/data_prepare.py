"""Data-curation throughput and drops: our `gx data prepare` vs HuggingFace datatrove, one run.

Same input for both: the train split of every domain of the corpus. Ours runs the whole
pipeline (normalize, language id, quality rules, classifier, blocklist, PII, exact + MinHash
dedup, writing) as `gx data prepare` subprocesses with 1 and with 2 Ray workers; the
classifier is trained once beforehand (its time is reported on its own). The peer
(/work/shared/peers/datatrove_pipeline.py, one core) runs Gopher repetition + Gopher quality +
C4 quality + FineWeb quality filters, C4 bad words on the same blocklist, and exact + MinHash
dedup. MB/s = UTF-8 bytes of the input texts / wall seconds (for the peer: filter chain + both
dedups). Per core = with one worker.

usage: python bench/data_prepare.py [--corpus ../shared/corpus] [--no-peer] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEERS_SRC = Path("/work/shared/peers")
TARGET_RATIO = 3.0


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", default=str(REPO.parent / "shared" / "corpus"))
    p.add_argument("--workers", default="1,2")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--out", default="")
    return p.parse_args()


def gx(*args: str, runs: Path) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "gx", "--runs-root", str(runs),
                           *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"gx {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start, proc.stdout


def ours(corpus: str, workers: list[int], work: Path) -> dict:
    runs = work / "runs"
    common = ["experiments/data_prep.py", f"--config.data.root={corpus}",
              "--config.data.files={'train': 'train.jsonl.gz'}"]
    seconds, out = gx("data", "train-classifier", *common, runs=runs)
    print(f"ours: classifier trained in {seconds:.1f}s: {out.strip().splitlines()[-1]}", flush=True)
    results = {"classifier_s": seconds, "runs": {}}
    for n in workers:
        out_dir = work / f"out-{n}"
        seconds, _ = gx("data", "prepare", *common, f"--config.output.dir={out_dir}",
                        f"--workers={n}", "--force", runs=runs)
        report = json.loads((out_dir / "report.json").read_text())
        text_bytes = sum(d["bytes_in"] for d in report["domains"].values())
        results["runs"][n] = {"wall_s": seconds, "pipeline_s": report["seconds"]["total"],
                              "mb_per_s": text_bytes / 1e6 / seconds, "report": report,
                              "text_bytes": text_bytes}
        print(f"ours, {n} worker(s): {seconds:.1f}s wall ({report['seconds']['total']:.1f}s in "
              f"the pipeline, the rest is process and Ray start), {text_bytes / 1e6 / seconds:.2f}"
              " MB/s", flush=True)
    one, two = results["runs"].get(1), results["runs"].get(2)
    if one and two:
        a = (out_dir.parent / "out-1", out_dir.parent / "out-2")
        same = all((a[0] / p.relative_to(a[1])).read_bytes() == p.read_bytes()
                   for p in a[1].rglob("*.jsonl.gz"))
        results["identical_1_vs_2_workers"] = same
        print(f"output byte-identical with 1 and 2 workers: {same}", flush=True)
    return results


def peer(corpus: str, work: Path) -> dict | None:
    peers = Path(os.environ.get("PEERS") or Path(tempfile.gettempdir()) / "peers")
    python = peers / "venv-dt" / "bin" / "python"
    if not python.exists():
        print(f"building the peer venv with {PEERS_SRC / 'setup_peers.sh'} ...", flush=True)
        subprocess.run(["bash", str(PEERS_SRC / "setup_peers.sh")], check=True,
                       env={**os.environ, "PEERS": str(peers)}, capture_output=True)
    out = work / "peer.json"
    start = time.perf_counter()
    proc = subprocess.run([str(python), str(PEERS_SRC / "datatrove_pipeline.py"), "--corpus",
                           corpus, "--work", str(work / "dt"), "--json", str(out),
                           "--badwords-dir", str(Path(corpus) / "_filters" / "ldnoobw")],
                          capture_output=True, text=True)
    if proc.returncode:
        print(f"peer failed: {proc.stderr[-2000:]}")
        return None
    result = json.loads(out.read_text())
    dedup = result.get("dedup", {})
    dedup_s = sum(v.get("wall_s", 0) for v in dedup.values())
    result["total_s"] = result["filter_chain_wall_s"] + dedup_s
    result["mb_per_s_total"] = result["total_text_bytes"] / 1e6 / result["total_s"]
    print(f"peer: filters {result['filter_chain_wall_s']:.1f}s "
          f"({result['filter_chain_mb_per_s']:.2f} MB/s), dedup {dedup_s:.1f}s, together "
          f"{result['mb_per_s_total']:.2f} MB/s on one core (process wall "
          f"{time.perf_counter() - start:.0f}s)", flush=True)
    return result


def peer_kept(chain: dict | None) -> int | None:
    """Documents datatrove's writer received: what its filter chain kept."""
    if not chain:
        return None
    return chain["steps"][-1]["counters"].get("total", 0)


def peer_dedup(p: dict | None) -> str:
    if not p or "dedup" not in p:
        return "—"
    d = p["dedup"]
    return ", ".join(f"{kind} {sum(v['removed'].values())} in {v['wall_s']:.1f}s"
                     for kind, v in d.items())


def table(o: dict, p: dict | None) -> str:
    lines = []
    one = o["runs"].get(1)
    if one:
        head = "| | ours (1 worker) | datatrove (1 core) | ratio |"
        lines += [head, "|---|---|---|---|"]
        peer_mbps = p["mb_per_s_total"] if p else None
        ratio = one["mb_per_s"] / peer_mbps if peer_mbps else None
        lines.append(f"| MB/s per core, whole pipeline | {one['mb_per_s']:.2f} | "
                     f"{peer_mbps:.2f} | {ratio:.1f}x |" if p else
                     f"| MB/s per core | {one['mb_per_s']:.2f} | — | — |")
        if p:
            lines.append(f"| MB/s, heuristic filters only (peer) | | "
                         f"{p['filter_chain_mb_per_s']:.2f} | |")
        lines.append("")
        lines.append(f"target: >= {TARGET_RATIO}x datatrove per core: "
                     + ("met" if ratio and ratio >= TARGET_RATIO else "NOT met"))
    two = o["runs"].get(2)
    if one and two:
        lines.append(f"2 workers: {two['mb_per_s']:.2f} MB/s ({two['mb_per_s'] / one['mb_per_s']:.2f}"
                     f"x of 1 worker); byte-identical output: {o.get('identical_1_vs_2_workers')}")
    report = (one or two)["report"]
    ours_dedup = {k: sum(d["removed"].get(f"dedup/{k}", {}).get("docs", 0)
                         for d in report["domains"].values()) for k in ("exact", "near")}
    lines.append(f"dedup removed: ours exact {ours_dedup['exact']}, near {ours_dedup['near']} "
                 f"(MinHash 16x8 confirmed at Jaccard >= 0.8); datatrove {peer_dedup(p)}")
    lines += ["", "| domain | docs in | ours kept | datatrove kept (filters) | ours: top removal reasons |",
              "|---|---|---|---|---|"]
    chain = (p or {}).get("chain", {})
    for domain in report.get("domain_order") or report["domains"]:
        d = report["domains"][domain]
        kept_peer = peer_kept(chain.get(domain))
        reasons = sorted(d["rules_first"].items(), key=lambda kv: -kv[1])[:3]
        peer_cell = f"{kept_peer / d['docs_in']:.0%}" if kept_peer is not None else "—"
        lines.append(f"| {domain} | {d['docs_in']:,} | {d['docs_out'] / d['docs_in']:.0%} | "
                     f"{peer_cell} | " + ", ".join(f"{r} {n}" for r, n in reasons) + " |")
    return "\n".join(lines)


def main() -> int:
    args = parse()
    work = Path(tempfile.mkdtemp(prefix="gx-bench-data-"))
    o = ours(args.corpus, [int(n) for n in args.workers.split(",")], work)
    p = None if args.no_peer else peer(args.corpus, work)
    text = table(o, p)
    print()
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps({"ours": o, "peer": p}, indent=1, default=str))
        Path(args.out).with_suffix(".md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
