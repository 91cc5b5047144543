"""Downstream evaluation: declared tasks (gemini_core.eval.tasks) scored on one model.

Each kind is scored the way its task's README describes, with what scoring.py and
generate.py provide:

- multiple_choice: log p(choice | context) of every choice; acc (lowest summed NLL), acc_norm
  (lowest NLL per unit of length, the task's `norm_length`), bpb of the gold choice;
- generate: a greedy (or declared) completion, exact match of the answer `answer_pattern`
  pulls out of it; bpb of the reference solution;
- code: `samples` completions per problem, each run against the task's tests in the sandbox;
  pass@k by the unbiased estimator; bpb of the reference code;
- last_word (LAMBADA): acc (the greedy continuation is the last word), ppl, bpb.

bpb (bits per UTF-8 byte of the gold answer given the prompt) is the signal that ranks data at
small scale, where accuracies sit near chance (OLMo/DataDecide): every task has it, and
`downstream/mean/bpb` is its mean over the evaluated tasks. Every value carries its standard
error over examples (`<metric>_stderr`).

`evaluate_run_tasks` is `gx eval RUN --tasks ...`: the run's checkpoint (loaded_run), a printed
table, and `downstream.json` in the run directory, written once at the end (a failed evaluation
leaves the previous file as it was).

A split ("search" or "heldout": one fixed half of each task's examples, task_examples) renames
every task <task>@<split> (`with_split`): its figures are `downstream/<task>@<split>/<metric>`
everywhere, and a done run asked for the other half lacks that name, so it is evaluated rather
than the wrong half's figures reused.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Sequence

import numpy as np

from gemini_core.data.tokenizer import Tokenizer
from gemini_core.errors import UserError
from gemini_core.eval import media_tasks, metrics, sandbox, scoring, task_examples
from gemini_core.eval.loaded_run import load_run
from gemini_core.eval.tasks import Example, TaskSpec, check_split, load_tasks, metric_names
from gemini_core.eval.tasks import exact_match as spec_exact_match
from gemini_core.model import generate as gen
from gemini_core.runs.rundir import RunDir, read_json, write_json_atomic
from gemini_core.scale.sharding import Layout

Log = Callable[[str], None]
FILE = "downstream.json"
PREFIX = "downstream"


@dataclasses.dataclass(frozen=True)
class Settings:
    """How a list of tasks is evaluated (from config.eval.downstream or `gx eval`'s flags)."""

    limit: int | None = None  # examples per task: None = each task's own limit, 0 = all
    shots: int = -1  # few-shot examples: -1 = each task's own
    batch_size: int = 32
    max_new_tokens: int = 256  # generative tasks whose declaration leaves it 0
    seed: int = 0  # sampling (code tasks' samples)
    code_workers: int = 0  # sandbox processes at a time; 0 = the CPU count
    generate: bool = True  # False: generate and code tasks score their gold's bpb only


@dataclasses.dataclass(frozen=True)
class TaskResult:
    task: str
    kind: str
    metrics: dict[str, metrics.Estimate]  # metric -> value, stderr, n
    examples: int
    seconds: float
    truncated: int  # examples whose context was cut from the left to fit the window

    def flat(self) -> dict[str, float]:
        out = {}
        for name, est in self.metrics.items():
            out[f"{PREFIX}/{self.task}/{name}"] = est.value
            if not math.isnan(est.stderr):  # one example has none
                out[f"{PREFIX}/{self.task}/{name}_stderr"] = est.stderr
        return out


@dataclasses.dataclass(frozen=True)
class Model:
    """What the scorers need of a model: itself, its tokenizer, its window and its mesh."""

    model: Any  # gemini_core.model.transformer.Transformer
    tokenizer: Tokenizer
    seq_len: int
    layout: Layout | None = None
    media: Any = None  # gemini_core.data.media_data.MediaData: media_choice tasks' items


def task_specs(items: Sequence[str] | str, *, shots: int = -1, declared=None,
               split: str = "all", split_key: str = "split") -> list[TaskSpec]:
    """The named tasks (shipped names, declared names, task files), `shots` and `split`
    applied; `split_key` is what a bad split's error names."""
    check_split(split_key, split)
    overrides = {"num_fewshot": shots} if shots >= 0 else None
    return with_split(load_tasks(items, overrides=overrides, declared=declared), split)


def with_split(specs: Sequence[TaskSpec], split: str) -> list[TaskSpec]:
    """Each task on one half of its examples, named <task>@<split>: the name is what runs'
    figures are keyed by (metrics, summary.json, downstream.json, add_missing_tasks), so the two
    halves and the whole never share one. "all" leaves the tasks as declared."""
    if split == "all":
        return list(specs)
    return [dataclasses.replace(s, split=split, name=f"{s.name}@{split}") for s in specs]


# ---------------------------------------------------------------------------------------------
# the kinds


def _loglik(m: Model, requests: list[tuple[str, str]], s: Settings, log: Log
            ) -> list[scoring.LogLik]:
    return scoring.loglikelihood(m.model, m.tokenizer, requests, seq_len=m.seq_len,
                                 batch_size=s.batch_size, layout=m.layout, log=log)


def _bpb(liks: Sequence[scoring.LogLik]) -> metrics.Estimate:
    return metrics.mean_stderr([metrics.bits_per_byte(x.nll, x.bytes) for x in liks])


def _requests(spec: TaskSpec, examples: list[Example]) -> list[tuple[str, str]]:
    """What a task scores: every choice of a multiple-choice question, else the gold answer."""
    if spec.kind == "multiple_choice":
        return [(ex.context, choice) for ex in examples for choice in ex.choices]
    return [(ex.context, ex.gold) for ex in examples]


def _multiple_choice(examples: list[Example], liks: list[scoring.LogLik]
                     ) -> dict[str, metrics.Estimate]:
    liks_iter = iter(liks)
    acc, acc_norm, gold = [], [], []
    for ex in examples:
        mine = [next(liks_iter) for _ in ex.choices]
        a, a_norm = metrics.mc_scores([x.nll for x in mine], ex.choice_lengths, ex.gold_index)
        acc.append(a)
        acc_norm.append(a_norm)
        gold.append(mine[ex.gold_index])
    return {"acc": metrics.mean_stderr(acc), "acc_norm": metrics.mean_stderr(acc_norm),
            "bpb": _bpb(gold)}


def _sampling(m: Model, spec: TaskSpec, s: Settings, log: Log) -> gen.SamplingConfig:
    """The task's sampling, its new tokens capped at half the model's context: the prompt and
    its completion stay inside the window the model was trained on (the prompt's start is cut
    off if need be), rather than decoding at positions it never saw."""
    wanted = spec.max_new_tokens or s.max_new_tokens
    new = min(wanted, m.seq_len // 2)
    if new < wanted:
        log(f"{spec.name}: {new} new tokens at most, not {wanted}: half the model's context of "
            f"{m.seq_len} tokens")
    return gen.SamplingConfig(max_new_tokens=new, temperature=spec.temperature,
                              top_k=spec.top_k, top_p=spec.top_p, seed=s.seed,
                              stop=tuple(spec.stop))


def _complete(m: Model, prompts: list[str], sampling: gen.SamplingConfig, s: Settings,
              log: Log) -> list[str]:
    out = gen.generate(m.model, m.tokenizer, prompts, sampling, batch_size=s.batch_size,
                       max_len=m.seq_len, layout=m.layout, log=log)
    return [c.text for c in out]


def _generate(m: Model, spec: TaskSpec, examples: list[Example], s: Settings, log: Log
              ) -> dict[str, metrics.Estimate]:
    outputs = _complete(m, [ex.context for ex in examples], _sampling(m, spec, s, log), s, log)
    em = [spec_exact_match(spec, ex, out) for ex, out in zip(examples, outputs)]
    return {"exact_match": metrics.mean_stderr(em)}


def _code(m: Model, spec: TaskSpec, examples: list[Example], s: Settings, log: Log
          ) -> dict[str, metrics.Estimate]:
    n = spec.samples
    # each problem's prompt n times: the sampler keys every prompt index on its own
    prompts = [ex.context for ex in examples for _ in range(n)]
    outputs = _complete(m, prompts, _sampling(m, spec, s, log), s, log)
    programs = [ex.program_prefix + out + ex.program_suffix
                for ex, out in zip((ex for ex in examples for _ in range(n)), outputs)]
    results = sandbox.run_many(programs, workers=s.code_workers or None, timeout_s=spec.timeout_s)
    passed = np.array([r.passed for r in results]).reshape(len(examples), n)
    counts = [(n, int(c)) for c in passed.sum(axis=1)]
    return {f"pass@{k}": metrics.pass_at_k_estimate(counts, k) for k in spec.pass_k}


def _values(m: Model, spec: TaskSpec, examples: list[Example], liks: list[scoring.LogLik],
            s: Settings, log: Log) -> dict[str, metrics.Estimate]:
    """A task's metrics from its scored requests (and, for generative kinds, its samples)."""
    if spec.kind == "multiple_choice":
        values = _multiple_choice(examples, liks)
    elif not s.generate and spec.kind in ("generate", "code"):
        values = {"bpb": _bpb(liks)}  # no sampling: what a sweep's proxies can afford
    elif spec.kind == "generate":
        values = {**_generate(m, spec, examples, s, log), "bpb": _bpb(liks)}
    elif spec.kind == "code":
        values = {**_code(m, spec, examples, s, log), "bpb": _bpb(liks)}
    else:  # last_word
        values = {"acc": metrics.mean_stderr([float(x.greedy) for x in liks]),
                  "ppl": metrics.perplexity([x.nll for x in liks]), "bpb": _bpb(liks)}
    assert tuple(values) == metric_names(spec, s.generate), tuple(values)
    return values


def _truncated(spec: TaskSpec, examples: list[Example], liks: list[scoring.LogLik]) -> int:
    """Examples with a context cut from the left to fit the model's window."""
    if spec.kind != "multiple_choice":
        return sum(1 for x in liks if x.truncated)
    out, start = 0, 0
    for ex in examples:
        out += any(x.truncated for x in liks[start: start + len(ex.choices)])
        start += len(ex.choices)
    return out


def evaluate_tasks(m: Model, specs: Sequence[TaskSpec], s: Settings, log: Log = print
                   ) -> list[TaskResult]:
    """Every task's requests scored in one pass (their batches shared, so a handful of compiled
    shapes serve all tasks), then each task's generation and metrics. A task's seconds: its
    loading, its share of the scoring pass (by requests) and its own generation. Media tasks
    (media_choice) score their items' captions on their own (gemini_core.eval.media_tasks)."""
    media = {spec.name: _media_choice(m, spec, s, log)
             for spec in specs if spec.kind == "media_choice"}
    text = iter(_text_tasks(m, [spec for spec in specs if spec.kind != "media_choice"], s, log))
    return [media[spec.name] if spec.name in media else next(text) for spec in specs]


def _media_choice(m: Model, spec: TaskSpec, s: Settings, log: Log) -> TaskResult:
    t0 = time.perf_counter()
    values, n = media_tasks.evaluate(m.model, m.tokenizer, m.seq_len, m.media, spec, s.limit,
                                     s.batch_size, m.layout, log)
    result = TaskResult(spec.name, spec.kind, values, n, time.perf_counter() - t0, 0)
    log(f"  {spec.name}: " + ", ".join(f"{k} {v.value:.4g}" for k, v in values.items())
        + f" ({n} examples, {result.seconds:.1f} s)")
    return result


def _text_tasks(m: Model, specs: Sequence[TaskSpec], s: Settings, log: Log
                ) -> list[TaskResult]:
    if not specs:
        return []
    t0 = time.perf_counter()
    loaded = [task_examples.load_examples(spec, s.limit) for spec in specs]
    requests = [_requests(spec, ex) for spec, ex in zip(specs, loaded)]
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    log(f"scoring {sum(len(r) for r in requests):,} requests of {len(specs)} task(s)")
    liks = _loglik(m, [r for task in requests for r in task], s, log)
    score_s = time.perf_counter() - t0
    total = max(1, sum(len(r) for r in requests))
    results, start = [], 0
    for spec, examples, mine in zip(specs, loaded, requests):
        t0 = time.perf_counter()
        task_liks = liks[start: start + len(mine)]
        start += len(mine)
        truncated = _truncated(spec, examples, task_liks)
        values = _values(m, spec, examples, task_liks, s, log)
        seconds = (time.perf_counter() - t0 + (load_s + score_s) * len(mine) / total)
        result = TaskResult(spec.name, spec.kind, values, len(examples), seconds, truncated)
        log(f"  {spec.name}: " + ", ".join(f"{k} {v.value:.4g}" for k, v in values.items())
            + f" ({result.examples} examples, {result.seconds:.1f} s)")
        results.append(result)
    return results


def evaluate_task(m: Model, spec: TaskSpec, s: Settings, log: Log = print) -> TaskResult:
    return evaluate_tasks(m, [spec], s, log)[0]


def flat_metrics(results: Sequence[TaskResult]) -> dict[str, float]:
    """`downstream/<task>/<metric>` (+ `_stderr`) and `downstream/mean/bpb` over the tasks."""
    out: dict[str, float] = {}
    for r in results:
        out.update(r.flat())
    if results:
        out[f"{PREFIX}/mean/bpb"] = float(np.mean([r.metrics["bpb"].value for r in results]))
    return out


# ---------------------------------------------------------------------------------------------
# output


def _num(x: float) -> str:
    return f"{x:.4f}" if abs(x) < 1000 else f"{x:.3g}"  # a tiny model's LAMBADA ppl: 3e+06


def format_table(results: Sequence[TaskResult], contamination: dict[str, float] | None = None
                 ) -> str:
    width = max([16] + [len(r.task) + 2 for r in results])  # <task>@heldout is long
    head = (f"{'task':<{width}}{'metric':<13}{'value':>9}{'stderr':>9}{'examples':>10}"
            f"{'seconds':>9}" + (f"{'contam.':>9}" if contamination else ""))
    rows = [head, "-" * len(head)]
    for r in results:
        for i, (name, est) in enumerate(r.metrics.items()):
            first = i == 0
            row = (f"{r.task if first else '':<{width}}{name:<13}{_num(est.value):>9}"
                   f"{'' if math.isnan(est.stderr) else _num(est.stderr):>9}"
                   f"{est.n if first else '':>10}{f'{r.seconds:.1f}' if first else '':>9}")
            if contamination and first and r.task in contamination:
                row += f"{contamination[r.task]:>8.1%} "
            rows.append(row)
    if results:
        mean = float(np.mean([r.metrics["bpb"].value for r in results]))
        rows.append(f"{'mean':<{width}}{'bpb':<13}{mean:>9.4f}")
    return "\n".join(rows)


def task_record(r: TaskResult, spec: TaskSpec, s: Settings) -> dict:
    return {"kind": r.kind, "examples": r.examples, "seconds": round(r.seconds, 3),
            "truncated": r.truncated, "num_fewshot": spec.num_fewshot,
            "limit": s.limit if s.limit is not None else spec.limit, "split": spec.split,
            "path": spec.path,
            "metrics": {k: {"value": v.value, "stderr": None if math.isnan(v.stderr) else
                            v.stderr, "n": v.n} for k, v in r.metrics.items()}}


def write_results(run: RunDir, step: int, records: dict[str, dict]) -> dict:
    """Merges this evaluation's tasks into the run's downstream.json (other tasks of the same
    step kept; any of an older step dropped), written atomically; returns the file's content."""
    path = run.path / FILE
    old = read_json(path) if path.is_file() else {}
    tasks = dict(old.get("tasks", {})) if old.get("step") == step else {}
    tasks.update(records)
    flat = {}
    for name, rec in tasks.items():
        for metric, v in rec["metrics"].items():
            flat[f"{PREFIX}/{name}/{metric}"] = v["value"]
            if v["stderr"] is not None:
                flat[f"{PREFIX}/{name}/{metric}_stderr"] = v["stderr"]
    flat[f"{PREFIX}/mean/bpb"] = float(np.mean([t["metrics"]["bpb"]["value"]
                                                for t in tasks.values()]))
    content = {"run_id": run.run_id, "step": step, "tasks": tasks, "metrics": flat}
    write_json_atomic(path, content)
    return content


def evaluate_run_tasks(run: RunDir, items: Sequence[str] | str, settings: Settings,
                       log: Log = print, *, split: str = "all") -> list[TaskResult]:
    """`gx eval RUN --tasks ... [--split S]`: every task validated before the checkpoint is
    read."""
    if settings.limit is not None and settings.limit < 0:
        raise UserError(f"--limit={settings.limit}: must be >= 0 (0 = every example)")
    specs = task_specs(items, shots=settings.shots, split=split, split_key="--split")
    loaded = load_run(run, log=lambda msg: log(f"eval: {msg}"))
    m = Model(loaded.model, loaded.tokenizer, loaded.seq_len, loaded.layout, loaded.media())
    log(f"{run.run_id} at step {loaded.step}: {len(specs)} task(s)")
    results = evaluate_tasks(m, specs, settings, log)
    write_results(run, loaded.step, {r.task: task_record(r, spec, settings)
                                     for r, spec in zip(results, specs)})
    log(format_table(results))
    log(f"saved {run.path / FILE}")
    return results


# ---------------------------------------------------------------------------------------------
# inside training (config.eval.downstream)


def configured_specs(dc: Any) -> list[TaskSpec]:
    """The tasks of a `DownstreamConfig`, validated (at run preparation: before any compile)."""
    if not dc.tasks:
        return []
    return task_specs(list(dc.tasks), shots=dc.shots, declared=dc.declare, split=dc.split,
                      split_key="config.eval.downstream.split")


@dataclasses.dataclass(frozen=True)
class InTraining:
    """The downstream evaluations of a run: every `every_steps` on `limit` examples per task,
    and at the end on `final_limit`."""

    specs: tuple[TaskSpec, ...]
    tokenizer: Tokenizer
    seq_len: int
    layout: Layout | None
    settings: Settings
    final_settings: Settings
    every_steps: int
    media: Any = None  # the run's MediaData, for media_choice tasks

    @classmethod
    def from_config(cls, dc: Any, specs: Sequence[TaskSpec], tokenizer: Tokenizer, seq_len: int,
                    layout: Layout | None, seed: int, media: Any = None) -> "InTraining | None":
        if not specs:
            return None
        s = Settings(limit=dc.limit, shots=dc.shots, batch_size=dc.batch_size,
                     max_new_tokens=dc.max_new_tokens, seed=seed, generate=dc.generate)
        final = dataclasses.replace(s, limit=dc.limit if dc.final_limit < 0 else dc.final_limit)
        return cls(tuple(specs), tokenizer, seq_len, layout, s, final, dc.every_steps, media)

    def due(self, done: int, total: int) -> bool:
        return bool(self.every_steps) and done % self.every_steps == 0 and done < total

    def evaluate(self, model: Any, *, final: bool, log: Log) -> list[TaskResult]:
        m = Model(model, self.tokenizer, self.seq_len, self.layout, self.media)
        return evaluate_tasks(m, self.specs, self.final_settings if final else self.settings,
                              log)

    def record(self, run: RunDir, step: int, results: Sequence[TaskResult]) -> dict:
        """The end-of-training evaluation into the run's downstream.json (returned)."""
        return write_results(run, step, {r.task: task_record(r, spec, self.final_settings)
                                  for r, spec in zip(results, self.specs)})


def add_missing_tasks(run: RunDir, dc: Any, specs: Sequence[TaskSpec], seed: int,
                      log: Log = print) -> dict:
    """A done run asked for tasks its summary lacks: they are evaluated on its final checkpoint
    and added to summary.json and downstream.json; returns the summary."""
    summary = run.summary() or {}
    missing = [s for s in specs if any(f"{PREFIX}/{s.name}/{m}" not in summary
                                       for m in metric_names(s, dc.generate))]
    if not missing:
        return summary
    log(f"{run.run_id}: evaluating {len(missing)} downstream task(s) it lacks: "
        + ", ".join(s.name for s in missing))
    loaded = load_run(run, log)
    tasks = InTraining.from_config(dc, missing, loaded.tokenizer, loaded.seq_len, loaded.layout,
                                   seed, loaded.media())
    results = tasks.evaluate(loaded.model, final=True, log=log)
    summary.update(tasks.record(run, loaded.step, results)["metrics"])  # all tasks' mean too
    run.write_summary(summary)
    return summary
