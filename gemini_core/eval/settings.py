"""What a run evaluates downstream (`config.eval`): the typed section and its checks, which
gemini_core.config's ExperimentConfig holds and from_config_dict calls."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from gemini_core.errors import UserError

TASK_SPLITS = ("all", "search", "heldout")  # halves of a task's examples (eval.task_examples)


@dataclasses.dataclass(frozen=True)
class DownstreamConfig:
    """Downstream tasks scored during and after training (gemini_core.eval.downstream). What is
    measured, not what is trained: not in the fingerprint, and a done run asked for tasks it
    lacks evaluates them on its final checkpoint."""

    tasks: tuple[str, ...] = ()  # shipped task names, names in `declare`, task files (.py)
    declare: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # name -> declaration
    every_steps: int = 0  # 0 = only at the end of training
    limit: int = 200  # examples per task in training (a fixed, seeded subset); 0 = all
    final_limit: int = -1  # examples per task at the end; -1 = `limit`, 0 = all
    shots: int = -1  # few-shot examples; -1 = each task's own
    batch_size: int = 32  # scoring and generation batch
    max_new_tokens: int = 256  # generative tasks (each task's stop strings end a sample sooner)
    generate: bool = True  # False: generate and code tasks score their gold's bpb only: cheap
    # a fixed half of each task's examples: sweeps' proxies score `search`, their validation
    # `heldout`; each task is then named <task>@<split>, so the halves' figures never mix
    split: str = "all"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    downstream: DownstreamConfig = DownstreamConfig()


def check_downstream(d: DownstreamConfig) -> None:
    p = "config.eval.downstream"
    for name in ("every_steps", "limit"):
        if not getattr(d, name) >= 0:
            raise UserError(f"{p}.{name}={getattr(d, name)!r}: must be >= 0")
    for name in ("batch_size", "max_new_tokens"):
        if not getattr(d, name) > 0:
            raise UserError(f"{p}.{name}={getattr(d, name)!r}: must be > 0")
    for name in ("final_limit", "shots"):
        if getattr(d, name) < -1:
            raise UserError(f"{p}.{name}={getattr(d, name)}: must be -1 (the default) or >= 0")
    if d.every_steps and not d.tasks:
        raise UserError(f"{p}.every_steps={d.every_steps} with no {p}.tasks: name the tasks")
    if d.split not in TASK_SPLITS:
        raise UserError(f"{p}.split={d.split!r}: must be one of {', '.join(TASK_SPLITS)}")
