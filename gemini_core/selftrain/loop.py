"""ReST^EM (Singh et al. 2023, "Beyond Human Data"): sample, verify, fine-tune, repeat.

    iteration i:  E-step  K samples of every train problem from policy_{i-1} (policy_0 = base),
                          verified; at most C distinct correct ones kept per problem
                  M-step  fine-tune the *base* on the kept samples (loss on the solutions),
                          early-stopped on the valid problems -> policy_i
    baselines:    the base; SFT = the base fine-tuned on the human solutions of the same train
                  problems, with the same M-step settings
    every policy: greedy accuracy, pass@k from n samples and the gold solutions' bpb on the
                  test problems, which nothing trains or stops on

Every piece of work is a directory with a fingerprint of what it computes (gemini_core.runs):
an E-step `<runs>/<name>_estep/<id>/` (shards of samples, kept.jsonl, summary.json), an M-step a
run `<runs>/<name>_mstep/<id>/`, a policy's held-out evaluation `<policy run>/selftrain_eval/
<key>/`; the job `<runs>/<name>/<id>/` holds the report (report.json, report.md, a plot, W&B).
An interrupted or repeated command finds what is done and does the rest.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

from gemini_core.config import to_json_dict
from gemini_core.errors import UserError
from gemini_core.eval import metrics
from gemini_core.eval.tasks import Example
from gemini_core.runs.rundir import (
    RunDir,
    find_run,
    fingerprint,
    read_json,
    run_id,
    write_json_atomic,
)
from gemini_core.selftrain import finetune, problems, report, sampling
from gemini_core.selftrain.config import RestEmConfig

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Job:
    cfg: RestEmConfig
    runs_root: Path
    base: RunDir
    splits: problems.Splits
    verify: problems.Verify
    dir: RunDir

    @property
    def stop(self) -> tuple[str, ...]:
        return tuple(self.splits.spec.stop)

    @property
    def max_new_tokens(self) -> int:
        return self.cfg.sample.max_new_tokens or self.splits.spec.max_new_tokens or 96


def prepare(c: RestEmConfig, runs_root: Path, log: Log = print) -> Job:
    """Everything checked before any work: the base run and its checkpoint, the task, its
    problems and its verifier (one line each, UserError)."""
    base = find_run(runs_root, c.base)
    base_cfg = base.config() or {}
    from gemini_core.runs.checkpoint import step_dirs
    if not step_dirs(base.checkpoints):
        raise UserError(f"config.base={c.base!r}: run {base.run_id} has no checkpoint "
                        f"({base.checkpoints}); train it first (`gx run`)")
    cache = Path(base_cfg.get("data", {}).get("cache_dir") or runs_root / ".cache")
    # JAX's persistent cache (the trainer's), for this process and every Ray worker it starts:
    # each worker of each policy would otherwise compile the same decode programs again
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache / "jax"))
    from gemini_core.train.trainer import enable_compilation_cache
    enable_compilation_cache(cache)
    splits = problems.splits_for(c, base_cfg, cache)
    verify = problems.verifier(splits.spec, c.verifier)
    identity = {"base": base.run_id, **splits.identity(), "cfg": to_json_dict(
        dataclasses.replace(c, base="", tracking=None))}
    job_dir = RunDir(runs_root, c.name, run_id(c.name, fingerprint(identity)))
    for why, n in splits.dropped.items():
        if n:
            log(f"{n} generated problems left out: {why}")
    return Job(c, runs_root, base, splits, verify, job_dir)


# ---------------------------------------------------------------------------------------------
# E-step


def estep(job: Job, policy: RunDir, iteration: int, log: Log) -> tuple[list[finetune.Pair], dict]:
    """The kept (prompt, solution) pairs of one iteration, and its counts."""
    s = job.cfg.sample
    identity = {"policy": policy.run_id, **job.splits.identity(), "sample": to_json_dict(s),
                "verifier": job.cfg.verifier, "seed": job.cfg.seed, "iteration": iteration}
    name = f"{job.cfg.name}_estep"
    run = RunDir(job.runs_root, name, run_id(name, fingerprint(identity)))
    kept_path = run.path / "kept.jsonl"
    if (run.status() or {}).get("state") == "done" and kept_path.is_file():
        log(f"iteration {iteration}: E-step {run.run_id} done, reused")
        rows = [json.loads(x) for x in kept_path.read_text().splitlines()]
        return [(r["prompt"], r["completion"]) for r in rows], run.summary() or {}
    run.write_config({"name": name, "identity": identity, "policy_dir": str(policy.path)})
    run.set_status("running")
    log(f"iteration {iteration}: E-step: {s.samples} samples of {len(job.splits.train):,} "
        f"problems from {policy.run_id} at T={s.temperature} -> {run.run_id}")
    job_sampling = sampling.Sampling(s.samples, s.temperature, s.top_p, s.top_k,
                                     job.max_new_tokens, job.stop, s.batch_size,
                                     seed=job.cfg.seed * 1000 + iteration)
    started = time.perf_counter()
    samples = sampling.run_job(policy.path, job.splits.train, job_sampling, run.path,
                               job.verify, shard_problems=s.shard_problems, workers=s.workers,
                               log=log)
    kept = keep(samples, s.keep)
    rows = [{"problem": p, "prompt": job.splits.train[p].context, "completion": text}
            for p, text in kept]
    problems.write_jsonl(kept_path, rows)
    summary = counts(samples, kept, len(job.splits.train))
    summary["seconds"] = round(time.perf_counter() - started, 1)
    errors = [x.error for x in samples if x.error]
    if errors:
        log(f"  the verifier raised on {len(errors)} samples (rejected), e.g. {errors[0]}")
    summary["verifier_errors"] = len(errors)
    run.write_summary(summary)
    run.set_status("done")
    log(f"  kept {summary['kept']:,} of {summary['samples']:,} samples "
        f"({summary['correct']:,} correct); {summary['solved']:.1%} of problems solved")
    return [(r["prompt"], r["completion"]) for r in rows], summary


def keep(samples: Sequence[sampling.Sample], cap: int) -> list[tuple[int, str]]:
    """(problem, completion) of at most `cap` distinct correct samples per problem, in order."""
    out, seen = [], {}
    for s in samples:
        if not s.correct:
            continue
        texts = seen.setdefault(s.problem, set())
        key = " ".join(s.completion.split())
        if key in texts or len(texts) >= cap:
            continue
        texts.add(key)
        out.append((s.problem, s.completion))
    return out


def counts(samples: Sequence[sampling.Sample], kept: Sequence[tuple[int, str]],
           n_problems: int) -> dict:
    correct = sum(s.correct for s in samples)
    solved = len({s.problem for s in samples if s.correct})
    return {"samples": len(samples), "correct": correct, "kept": len(kept),
            "kept_fraction": len(kept) / max(len(samples), 1),
            "solved": solved / max(n_problems, 1)}


# ---------------------------------------------------------------------------------------------
# held-out evaluation


def evaluate(job: Job, policy: RunDir, log: Log) -> dict:
    """Greedy accuracy, pass@k and gold bpb of `policy` on the test problems (cached)."""
    h = job.cfg.held_out
    key = fingerprint({**job.splits.identity(), "held_out": to_json_dict(h),
                       "verifier": job.cfg.verifier, "seed": job.cfg.seed,
                       "max_new_tokens": job.max_new_tokens})[:16]
    folder = policy.path / "selftrain_eval" / key
    done = read_json(folder / "result.json")
    if done is not None:
        return done
    test, s = job.splits.test, job.cfg.sample
    log(f"held-out evaluation of {policy.run_id} on {len(test)} test problems")
    runs = {}
    for what, n, temperature in (("greedy", 1, 0.0), ("sampled", h.samples, h.temperature)):
        job_sampling = sampling.Sampling(n, temperature, 1.0, 0, job.max_new_tokens, job.stop,
                                         s.batch_size, seed=job.cfg.seed + 7919)
        runs[what] = sampling.run_job(policy.path, test, job_sampling, folder / what, job.verify,
                                      shard_problems=s.shard_problems, workers=s.workers, log=log)
    result = {"greedy": _estimate(metrics.mean_stderr([x.correct for x in runs["greedy"]]))}
    per_problem = [(h.samples, sum(x.correct for x in runs["sampled"][i * h.samples:
                                                                     (i + 1) * h.samples]))
                   for i in range(len(test))]
    for k in h.pass_k:
        result[f"pass@{k}"] = _estimate(metrics.pass_at_k_estimate(per_problem, k))
    result["bpb"] = _estimate(gold_bpb(policy, test))
    write_json_atomic(folder / "result.json", result)
    return result


def _estimate(e: metrics.Estimate) -> dict:
    return {"value": e.value, "stderr": e.stderr}


def gold_bpb(policy: RunDir, test: Sequence[Example]) -> metrics.Estimate:
    from gemini_core.eval.loaded_run import load_run
    from gemini_core.eval.scoring import loglikelihood
    loaded = load_run(policy, log=lambda _: None)
    liks = loglikelihood(loaded.model, loaded.tokenizer, [(ex.context, ex.gold) for ex in test],
                         seq_len=loaded.seq_len, layout=loaded.layout)
    return metrics.mean_stderr([metrics.bits_per_byte(x.nll, x.bytes) for x in liks])


# ---------------------------------------------------------------------------------------------
# the job


def _request(job: Job, label: str, pairs: Sequence[finetune.Pair]) -> finetune.Request:
    return finetune.Request(job.cfg.name, label, job.base, tuple(pairs), job.splits.valid,
                            job.verify, job.cfg.verifier, job.cfg.finetune, job.cfg.seed, job.max_new_tokens,
                            job.stop, job.cfg.sample.batch_size, job.cfg.tracking)


def run(job: Job, log: Log = print) -> dict:
    c = job.cfg
    done = report.read(job.dir) if (job.dir.status() or {}).get("state") == "done" else None
    if done:
        log(f"ReST^EM job {job.dir.run_id} done, reused ({job.dir.path})")
        log(report.table(done))
        return {"rows": [dataclasses.asdict(r) for r in done]}
    job.dir.write_config({"name": c.name, "method": c.method, "base": job.base.run_id,
                          "task": job.splits.spec.name, "config": to_json_dict(c),
                          "problems": {s: len(getattr(job.splits, s)) for s in problems.SPLITS}})
    job.dir.set_status("running")
    rows = [report.Row("base", job.base.run_id, evaluate(job, job.base, log))]
    log(report.line(rows[-1]))
    if c.sft_baseline:
        human = [(ex.context, ex.gold) for ex in job.splits.train]
        sft = finetune.finetune(_request(job, "sft", human), job.runs_root, log)
        rows.append(report.Row("sft", sft.run_id, evaluate(job, sft, log), sft.summary()))
        log(report.line(rows[-1]))
    policy = job.base
    for i in range(1, c.iterations + 1):
        pairs, e_counts = estep(job, policy, i, log)
        if not pairs:
            log(f"iteration {i}: no sample of any train problem was correct, nothing to "
                "fine-tune on; the report ends here (a stronger base, more samples or easier "
                "problems: config.sample.samples, config.problems)")
            break
        policy = finetune.finetune(_request(job, f"iteration {i}", pairs), job.runs_root, log)
        rows.append(report.Row(f"rest_em {i}", policy.run_id, evaluate(job, policy, log),
                               policy.summary(), e_counts))
        log(report.line(rows[-1]))
    sampling.release()
    result = report.write(job.dir, rows, c, log)
    job.dir.set_status("done")
    return result


def describe(job: Job) -> str:
    """What `gx run --dry-run` shows: the work the job would do, nothing computed."""
    c, s = job.cfg, job.splits
    return "\n".join([
        f"ReST^EM     {job.dir.run_id} -> {job.dir.path}",
        f"base        {job.base.run_id} ({job.base.path})",
        f"task        {s.spec.name}: {len(s.train):,} train / {len(s.valid):,} valid / "
        f"{len(s.test):,} test problems",
        f"iterations  {c.iterations}: E-step {c.sample.samples} samples per problem at "
        f"T={c.sample.temperature}, at most {c.sample.keep} kept, on "
        f"{c.sample.workers or 'no'} Ray worker(s); M-step from the base, at most "
        f"{c.finetune.steps} steps of {c.finetune.batch_size}, lr {c.finetune.lr}",
        f"baselines   base{', SFT on the human solutions' if c.sft_baseline else ''}",
        f"held out    greedy accuracy, pass@{', pass@'.join(map(str, c.held_out.pass_k))} of "
        f"{c.held_out.samples} samples at T={c.held_out.temperature}, gold bpb"])


def main(spec: str, overrides: Sequence[str], runs_root: Path, *, force: bool = False,
         dry_run: bool = False, log: Log = print) -> int:
    """`gx run` of a ReST^EM experiment (its config has method="rest_em")."""
    from gemini_core.experiment import load_experiment
    from gemini_core.selftrain.config import from_config_dict
    if force:
        raise UserError("--force: a ReST^EM job redoes only what is not done; delete an E-step's "
                        "or M-step's directory to redo it")
    exp = load_experiment(spec, overrides, schema=RestEmConfig, convert=from_config_dict)
    job = prepare(exp.config, runs_root, log)
    if dry_run:
        print(describe(job))
        return 0
    run(job, log)
    return 0
