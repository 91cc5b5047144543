"""Running a recipe (`gx run RECIPE [--dry-run] [--force STEP]`): what is missing runs in
order under the recipe's lock, each step's state recorded before and after; a dry run says what
would run and why, and runs nothing."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from gemini_core.errors import UserError
from gx.recipe.decide import MAYBE, RUN, UP_TO_DATE, decide
from gx.recipe.graph import Step, StepGraph, build_graph, validate_step
from gx.recipe.kinds import Log, StepContext, Tokenizer
from gx.recipe.load import load_recipe
from gx.recipe.refs import param_value
from gx.recipe.state import hold_lock, now, read_state, running_elsewhere, write_state
from gx.recipe.tree import jsonable

VERDICTS = {RUN: "would run", UP_TO_DATE: "up to date", MAYBE: "may run", "running": "running"}


def dry_run(graph: StepGraph, force: str | None) -> str:
    """Which steps would run and why; reads only the state files, runs nothing."""
    width = max(map(len, graph.steps))
    lines = [f"recipe {graph.recipe.name}: {len(graph.steps)} steps, state in {graph.state_dir}"
             " (dry run: nothing runs)"]
    known: dict[str, dict | None] = {}
    for step in graph.steps.values():
        rec = read_state(graph.state_dir, step.name)
        if running_elsewhere(rec):
            verdict, reasons = "running", [f"by pid {rec['pid']} on {rec['host']} since "
                                           f"{rec.get('start')}"]
        else:
            verdict, reasons = decide(graph, step, rec, force == step.name, known)
        known[step.name] = (rec or {}).get("outputs") if verdict == UP_TO_DATE else None
        lines.append(f"  {step.name:<{width}}  {VERDICTS[verdict]:<10}  "
                     f"{step.spec.kind} {step.spec.experiment}".rstrip())
        lines += [f"  {'':<{width}}    {reason}" for reason in reasons]
    return "\n".join(lines)


def _input_values(graph: StepGraph, step: Step, outputs: Mapping[str, dict]) -> dict[str, Any]:
    return {key: param_value(graph.recipe, ref) if ref.is_param else
            outputs[ref.step][ref.output] for key, ref in step.refs.items()}


def _check_tokenizer(graph: StepGraph, step: Step, out: dict,
                     outputs: Mapping[str, dict]) -> None:
    """A step bound to a tokenizer step's settings must have used that very tokenizer
    (distillation compares distributions over token ids: a silent mismatch would be wrong)."""
    for key, ref in step.refs.items():
        if ref.is_param or not isinstance(graph.steps[ref.step].kind, Tokenizer):
            continue
        want, got = outputs[ref.step]["fingerprint"], out.get("tokenizer")
        if got and got != want:
            raise UserError(f"step {step.name}: trained with tokenizer {got[:12]}, not step "
                            f"{ref.step}'s {want[:12]} ({key} <- {ref.text}): give it the "
                            f"tokenizer step's data (root, domains, train_file, text_field)")


def _header(graph: StepGraph, step: Step, index: int, state: str) -> dict:
    return {"recipe": graph.recipe.name, "step": step.name, "index": index,
            "kind": step.spec.kind, "experiment": step.spec.experiment, "state": state,
            "pid": os.getpid(), "host": socket.gethostname()}


def run_step(graph: StepGraph, step: Step, index: int, reasons: list[str], forced: bool,
             outputs: Mapping[str, dict], previous: dict | None, log: Log) -> dict:
    values = _input_values(graph, step, outputs)
    typed = validate_step(step, values)
    rec = {**_header(graph, step, index, "running"), "start": now(),
           "fingerprint": step.fingerprint, "config": step.config,
           "inputs": {key: {"ref": ref.text, "fingerprint": step.input_fps[key],
                            "value": jsonable(values[key])} for key, ref in step.refs.items()},
           "outputs": {}, "reasons": reasons, "runs": (previous or {}).get("runs", 0) + 1}
    write_state(graph.state_dir, step.name, rec)
    log(f"recipe: [{index + 1}/{len(graph.steps)}] {step.name} ({step.spec.kind} {step.label}): "
        f"running: {'; '.join(reasons)}")
    t0 = time.perf_counter()
    ctx = StepContext(graph.runs_root, step.name, forced,
                      {**step.overrides, **{k: v["value"] for k, v in rec["inputs"].items()}},
                      log)
    try:
        out = jsonable(step.kind.run(typed, ctx))
        _check_tokenizer(graph, step, out, outputs)
    except BaseException as e:
        rec.update(state="failed", end=now(), error=f"{type(e).__name__}: {e}"[:2000])
        write_state(graph.state_dir, step.name, rec)
        raise
    rec.update(state="done", end=now(), seconds=round(time.perf_counter() - t0, 2),
               outputs=out, summary=step.kind.describe(out))
    write_state(graph.state_dir, step.name, rec)
    log(f"recipe: {step.name} done in {rec['seconds']:.1f}s: {rec['summary']}")
    return out


def _mark_queued(graph: StepGraph, records: Mapping[str, dict | None],
                 force: str | None) -> None:
    """Steps sure to run are marked queued first, so `gx ls` shows what this run has ahead."""
    certain: dict[str, dict | None] = {}
    for index, step in enumerate(graph.steps.values()):
        rec = records[step.name]
        verdict, _ = decide(graph, step, rec, force == step.name, certain)
        certain[step.name] = (rec or {}).get("outputs") if verdict == UP_TO_DATE else None
        if verdict == RUN:
            write_state(graph.state_dir, step.name,
                        {**(rec or {}), **_header(graph, step, index, "queued"), "queued": now()})


def execute(graph: StepGraph, force: str | None = None, log: Log = print) -> dict[str, dict]:
    """Runs what is missing, in order, holding the recipe's lock; returns each step's outputs."""
    with hold_lock(graph.state_dir, graph.recipe.name, log):
        records = {name: read_state(graph.state_dir, name) for name in graph.steps}
        _mark_queued(graph, records, force)
        outputs: dict[str, dict] = {}
        ran = []
        for index, step in enumerate(graph.steps.values()):
            rec = records[step.name]
            verdict, reasons = decide(graph, step, rec, force == step.name, outputs)
            if verdict == UP_TO_DATE:
                log(f"recipe: [{index + 1}/{len(graph.steps)}] {step.name}: up to date "
                    f"({rec.get('summary') or rec.get('fingerprint', '')[:12]})")
                outputs[step.name] = rec["outputs"]
                continue
            outputs[step.name] = run_step(graph, step, index, reasons, force == step.name,
                                          outputs, rec, log)
            ran.append(step.name)
    log(f"recipe {graph.recipe.name}: {len(ran)} of {len(graph.steps)} steps ran"
        + (f" ({', '.join(ran)})" if ran else ", all up to date") + f"; state in {graph.state_dir}")
    return outputs


def main(spec: str, overrides: Sequence[str], runs_root: Path, *, force: str | bool = False,
         dry_run_only: bool = False, log: Log = print) -> int:
    """`gx run RECIPE [--dry-run] [--force STEP]`."""
    recipe, path = load_recipe(spec, overrides)
    steps = ", ".join(recipe.steps)
    if force is True:
        raise UserError(f"--force: name the recipe step to rerun, --force STEP (steps: {steps})")
    if force and force not in recipe.steps:
        raise UserError(f"--force {force}: no such step in recipe {recipe.name} (steps: {steps})")
    graph = build_graph(recipe, path, runs_root)
    if dry_run_only:
        log(dry_run(graph, force or None))
        return 0
    execute(graph, force or None, log)
    return 0
