"""Whether a step runs, and why: its recorded state against what it is now (fingerprint, the
fields that changed, its inputs' current values, whether its outputs are still there)."""

from __future__ import annotations

import json
import socket
from typing import Any, Mapping

from gx.recipe.graph import Step, StepGraph
from gx.recipe.refs import param_value

RUN, UP_TO_DATE, MAYBE = "run", "up to date", "maybe"


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def config_diff(old: Mapping, new: Mapping, limit: int = 12) -> list[str]:
    """The flattened fields whose values differ: `key: old -> new`."""
    lines = []
    for key in sorted(set(old) | set(new)):
        if key not in old:
            lines.append(f"{key}: new field = {_show(new[key])}")
        elif key not in new:
            lines.append(f"{key}: removed (was {_show(old[key])})")
        elif old[key] != new[key]:
            lines.append(f"{key}: {_show(old[key])} -> {_show(new[key])}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more fields"]
    return lines


def _state_reasons(rec: dict) -> list[str]:
    """Why a recorded state other than done means the step runs again."""
    state = rec.get("state")
    if state == "running":
        gone = "is gone" if rec.get("host") == socket.gethostname() else \
            "is not on this host (assumed gone)"
        return [f"interrupted: marked running by pid {rec.get('pid')} on {rec.get('host')}, "
                f"which {gone}"]
    if state == "failed":
        return [f"failed last time: {(rec.get('error') or '?')[:300]}"]
    if state == "queued":
        return ["queued by a run that did not get to it"]
    return [] if state == "done" else [f"unknown state {state!r}"]


def _changes(graph: StepGraph, step: Step, rec: dict) -> list[str]:
    """What differs from the recorded run: fields, then inputs whose upstream changed."""
    changed = config_diff(rec.get("config") or {}, step.config)
    recorded = rec.get("inputs") or {}
    for key, ref in step.refs.items():
        old = recorded.get(key) or {}
        if old.get("fingerprint") == step.input_fps[key] or old.get("ref") != ref.text:
            continue  # unchanged, or the reference itself changed (in the diff above)
        if ref.is_param:
            changed.append(f"input {key} <- {ref.text} changed: "
                           f"{_show(old.get('value'))} -> {_show(param_value(graph.recipe, ref))}")
        else:
            changed.append(f"input {key} <- {ref.text} changed: step {ref.step} changed")
    return changed or [f"fingerprint changed ({step.spec.kind} step definition)"]


def decide(graph: StepGraph, step: Step, rec: dict | None, forced: bool,
           known: Mapping[str, dict | None]) -> tuple[str, list[str]]:
    """(RUN | UP_TO_DATE | MAYBE, reasons). `known`: each upstream step's current outputs, or
    None where they are not known yet (it would run first)."""
    reasons = ["forced (--force)"] if forced else []
    if rec is None or "fingerprint" not in rec:
        return RUN, reasons + ["new: this step has not run yet"]
    reasons += _state_reasons(rec)
    maybe = []
    if rec.get("fingerprint") != step.fingerprint:
        reasons += _changes(graph, step, rec)
    elif rec.get("state") == "done":
        problem = step.kind.check(rec.get("outputs") or {})
        if problem:
            reasons.append(f"outputs not trusted: {problem}")
        for key, ref in step.refs.items():
            if ref.is_param:
                continue
            current = known.get(ref.step)
            if current is None:
                maybe.append(ref.step)
            elif current.get(ref.output) != ((rec.get("inputs") or {}).get(key) or {}).get("value"):
                reasons.append(f"input {key} <- {ref.text} has a new value: step {ref.step} "
                               "reran with other outputs")
    if reasons:
        return RUN, reasons
    if maybe:
        ups = ", ".join(sorted(set(maybe)))
        return MAYBE, [f"runs only if {ups} gives other outputs when it reruns"]
    return UP_TO_DATE, []
