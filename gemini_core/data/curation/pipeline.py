"""`gx data prepare`: raw domain files -> cleaned data root + report, on Ray Data.

Two phases, so that the result is byte-identical with any number of workers and on a rerun:
  1. filter (`filter_pass`, parallel, one Ray Data task per input shard): normalize, language,
     quality rules, safety, decontamination (declared benchmarks), classifier, PII masking;
  2. dedup (`dedup_pass`, driver, sequential, in the global order), then the output files.
Everything is written under a temporary directory renamed into place at the end, so an
interrupted prepare never leaves an output that looks complete; the temporaries a killed
prepare left are removed by the next one. A finished output is reused when its config and input
are the same, unless this run would have refused it (--strict and skipped bad records).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Callable

from gemini_core.config import to_json_dict
from gemini_core.data.curation import classifier as classifier_lib
from gemini_core.data.curation import contamination, safety
from gemini_core.data.curation import report as report_lib
from gemini_core.data.curation.classifier_train import classifier_path, classifier_threshold
from gemini_core.data.curation.config import (
    CurationConfig,
    benchmarks_dir,
    dedup_params,
    without_off_sections,
)
from gemini_core.data.curation.contamination import benchmark_file, file_digest
from gemini_core.data.curation.dedup_pass import assemble, dedup_shards
from gemini_core.data.curation.filter_pass import (
    FORMAT,
    FilterWorker,
    Plan,
    blocklist_dir,
    quality_params,
)
from gemini_core.data.curation.ray_map import Progress, ray_map

# read_report: the reader of what prepare writes, offered beside it (gx data report, the recipe)
from gemini_core.data.curation.report import format_report, read_report  # noqa: F401
from gemini_core.data.curation.sources import Shard, check_hf_source, limit_shards, plan_shards
from gemini_core.errors import UserError
from gemini_core.runs.rundir import fingerprint, pid_alive, write_json_atomic
from gemini_core.scale import ray_local

Log = Callable[[str], None]
TMP_MARK = ".tmp-"  # .<output name>.tmp-<pid>-<host>: a prepare in progress


def identity(cfg: CurationConfig, shards: list[Shard], blocklist_fp: str | None,
             classifier_fp: str | None) -> dict:
    """Everything that decides the output bytes; paths, workers and strictness do not."""
    resolved = to_json_dict(cfg)
    resolved["data"].pop("root")
    resolved["output"].pop("dir")
    resolved.pop("workers")
    resolved.pop("strict")
    resolved["safety"].pop("blocklist_dir")
    resolved["classifier"].pop("model")
    resolved = without_off_sections(resolved)
    ident = {"format": FORMAT, "config": resolved, "blocklist": blocklist_fp,
             "classifier": classifier_fp,
             "inputs": sorted({(s.domain, s.split, Path(s.path).name if s.kind == "files"
                                else s.label, s.sha256) for s in shards})}
    if cfg.decontaminate.tasks:  # the benchmarks by content, and what is read of them
        resolved["decontaminate"].pop("benchmarks")
        ident["benchmarks"] = {
            task: {"sha256": file_digest(benchmark_file(benchmarks_dir(cfg), task)),
                   "fields": contamination.TASK_FIELDS[task]}
            for task in cfg.decontaminate.tasks}
    return ident


def default_output(cfg: CurationConfig, runs_root: Path, fp: str) -> Path:
    if cfg.output.dir:
        return Path(cfg.output.dir).absolute()
    return runs_root / "data" / f"{cfg.name}-{fp[:8]}"


# ---------------------------------------------------------------------------------------------
# temporaries


def temporary_dir(out: Path) -> Path:
    return out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-{socket.gethostname()}"


def remove_stale_temporaries(out: Path, log: Log) -> list[Path]:
    """Removes the temporaries of `out` whose prepare is no longer running on this host (killed
    with -9: no `finally` ran); another host's, or a live one's, are left alone."""
    removed, here = [], socket.gethostname()
    for tmp in sorted(out.parent.glob(f".{out.name}{TMP_MARK}*")):
        pid, _, host = tmp.name[len(f".{out.name}{TMP_MARK}"):].partition("-")
        host = host or here  # named before the host was in the name: made on this host
        if not pid.isdigit() or host != here or pid_alive(int(pid), host):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
        log(f"data: removed {tmp} (left by prepare pid {pid}, no longer running)")
    return removed


# ---------------------------------------------------------------------------------------------
# the whole prepare


def check_reusable(out: Path, report: dict, strict: bool) -> None:
    """A finished output is reused only when this run would have written it too."""
    empty = report_lib.empty_outputs(report)  # written before empty outputs were refused
    if empty:
        raise UserError(f"{out}: {empty[0]} has no documents, so no training run can read it "
                        "(--force prepares it again and says why)")
    n_bad, first = report_lib.bad_records(report)
    if strict and n_bad:
        raise UserError(f"{first} (--strict: {out} was prepared without --strict, skipping "
                        f"{n_bad:,} bad record(s); fix the input, or drop --strict to reuse it)")


def prepare(cfg: CurationConfig, runs_root: Path, *, workers: int = 0, strict: bool = False,
            force: bool = False, log: Log = print) -> Path:
    """Runs the pipeline (or reuses an identical finished output); returns the output dir."""
    runs_root = Path(runs_root).absolute()
    workers = workers or cfg.workers or os.cpu_count() or 1
    strict = strict or cfg.strict
    q_params = quality_params(cfg) if cfg.quality.enabled else {}
    shards = limit_shards(plan_shards(cfg), cfg.data.max_docs)
    for shard in shards:
        check_hf_source(shard)
    block_dir = blocklist_dir(cfg) if cfg.safety.enabled else None
    block_fp = safety.Blocklist.load(block_dir).fingerprint if block_dir else None
    cache = runs_root / ".cache"
    cl_path = (classifier_path(cfg, shards, cache, log, strict) if cfg.classifier.enabled
               else None)
    cl_fp = classifier_lib.QualityClassifier.load(cl_path).fingerprint if cl_path else None
    threshold = classifier_threshold(cfg, cl_path) if cl_path else 0.0
    ident = identity(cfg, shards, block_fp, cl_fp)
    fp = fingerprint(ident)
    out = default_output(cfg, runs_root, fp)
    remove_stale_temporaries(out, log)
    done = report_lib.load_report(out)
    if done and done.get("fingerprint") == fp and not force:
        check_reusable(out, done, strict)
        log(f"data: {out} is already prepared with this config and input (--force redoes it)")
        return out
    if out.exists() and not force and not done:
        raise UserError(f"{out}: exists and is not a finished prepare output; choose another "
                        "config.output.dir or remove it")
    tmp = temporary_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)
    work = tmp / ".work"
    work.mkdir(parents=True)
    try:
        plan = Plan(to_json_dict(cfg), q_params, str(block_dir) if block_dir else None,
                    str(cl_path) if cl_path else None, dedup_params(cfg), str(work), threshold,
                    decontaminate=_benchmark_index(cfg, work, log))
        report = _run(cfg, shards, plan, tmp, workers, strict, log)
        report.update(fingerprint=fp, identity=ident, workers=workers,
                      classifier_threshold=threshold)
        if cl_path and cl_path.with_suffix(".json").is_file():
            report["classifier_metrics"] = json.loads(cl_path.with_suffix(".json").read_text())
        shutil.rmtree(work)
        write_json_atomic(tmp / "report.json", report)
        (tmp / "report.txt").write_text(format_report(report) + "\n")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(format_report(report))
    log(f"data: cleaned data root {out}")
    return out


def _benchmark_index(cfg: CurationConfig, work: Path, log: Log) -> str | None:
    """The n-grams of the declared benchmarks, saved for the filter workers; None when off."""
    d = cfg.decontaminate
    if not d.tasks:
        return None
    texts = contamination.load_task_texts(benchmarks_dir(cfg), d.tasks,
                                          "config.decontaminate.tasks")
    index = contamination.NgramIndex.build(texts, d.ngram)
    path = work / "decontaminate.npz"
    index.save(path)
    log(f"decontaminate: {len(index.ids_E):,} examples of {', '.join(d.tasks)}, "
        f"{len(index.hashes_H):,} {d.ngram}-grams")
    return str(path)


def _filter(shards: list[Shard], plan: Plan, workers: int, log: Log) -> list[dict]:
    """Phase 1 on Ray: each shard's stats, in the global order."""
    total_bytes = sum(Path(s.path).stat().st_size for s in shards if s.kind == "files")
    log(f"filter: {len(shards)} shards on {workers} Ray workers")
    # largest first: a big file started last would leave the other workers idle at the end
    by_size = sorted(shards, key=lambda s: -(Path(s.path).stat().st_size
                                             if s.kind == "files" else 0))
    stats = [json.loads(s) for s in ray_map(
        [dataclasses.asdict(s) for s in by_size], "shard", FilterWorker, workers,
        Progress("filter", len(shards), total_bytes, log), "stats",
        fn_constructor_kwargs={"plan": plan})]
    errors = sorted((s for s in stats if "user_error" in s), key=lambda s: s["index"])
    if errors:  # the first in the global order: the same error whatever the worker count
        raise UserError(errors[0]["user_error"])
    return sorted(stats, key=lambda s: s["index"])


def _run(cfg: CurationConfig, shards: list[Shard], plan: Plan, tmp: Path, workers: int,
         strict: bool, log: Log) -> dict:
    t0 = time.perf_counter()
    ray_local.init_ray(log, num_cpus=workers)
    stats = _filter(shards, plan, workers, log)
    t_filter = time.perf_counter() - t0
    bad = [e for s in stats for e in s["bad_examples"]]
    if strict and bad:
        raise UserError(f"{bad[0]['message']} (--strict: "
                        f"{sum(sum(s['bad'].values()) for s in stats):,} bad records in all; "
                        "nothing was written)")
    drops, dup_removed = dedup_shards(plan, shards, log)
    written = assemble(Path(plan.work_dir), shards, drops, tmp)
    t_dedup = time.perf_counter() - t0 - t_filter
    report = report_lib.build_report(cfg, stats, dup_removed, written, {
        "filter": t_filter, "dedup": t_dedup, "total": time.perf_counter() - t0})
    empty = report_lib.empty_outputs(report)
    if empty:
        raise UserError(f"{report_lib.why_empty(report, empty[0])} (nothing was written)")
    return report
