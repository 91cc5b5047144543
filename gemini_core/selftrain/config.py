"""The typed config of a ReST^EM job (`gx run experiments/rest_em.py`), validated once.

Every mistake is one UserError naming the key path (`config.sample.keep`) and the value, raised
before a model is loaded or a sample drawn; whether the base run exists and has a checkpoint, and
whether the task and verifier resolve, is checked next (gemini_core.selftrain.loop.prepare),
still before any work.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import ml_collections

from gemini_core.config import TrackingConfig, to_dataclass
from gemini_core.data import word_problems
from gemini_core.errors import UserError

METHOD = "rest_em"


@dataclasses.dataclass(frozen=True)
class ProblemsConfig:
    """Which problems: the train split is sampled and fine-tuned on, `valid` early-stops the
    M-step, `test` is only ever evaluated. word_problems draws each split from its own seed; a
    benchmark task's records are split by a seeded permutation (test first, then valid, then
    train), so the splits never share a problem."""
    train: int = 1000
    valid: int = 100
    test: int = 300
    seed: int = 1  # word_problems: train from `seed`, valid `seed + 1`, test `seed + 2`
    # word_problems only: the difficulty (gemini_core.data.word_problems)
    min_steps: int = 1
    max_steps: int = 3
    max_operand: int = 20
    ops: str = "+-x"


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """The E-step: `samples` (K) completions per train problem at `temperature`, at most `keep`
    (C) distinct correct ones kept per problem."""
    samples: int = 8
    keep: int = 4
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 96  # 0 = the task's own (else 96)
    shard_problems: int = 64  # problems per shard: the unit of work redone after a failure
    workers: int = 2  # Ray workers, each loading the model once; 0 = sample in this process
    batch_size: int = 64  # rows decoded together


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """The M-step: fine-tune the *base* model on the kept samples (loss on the solution tokens
    only), early-stopped on the valid problems' greedy accuracy."""
    lr: float = 3e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    batch_size: int = 32
    steps: int = 300  # at most
    eval_every: int = 50
    patience: int = 2  # evaluations without a better valid accuracy before stopping


@dataclasses.dataclass(frozen=True)
class HeldOutConfig:
    """Held-out evaluation of every policy (base, SFT, each iteration) on the test problems:
    greedy accuracy, pass@k from `samples` completions at `temperature`, gold-solution bpb."""
    samples: int = 8
    pass_k: tuple[int, ...] = (1, 4, 8)
    temperature: float = 0.8


@dataclasses.dataclass(frozen=True)
class RestEmConfig:
    method: str  # "rest_em": what `gx run` dispatches on
    base: str = ""  # the pretrained run: id (a unique prefix) or directory
    task: str = "word_problems"  # word_problems | gsm8k | mbpp | a task in a task file
    task_file: str = ""  # a task file (get_tasks()) declaring `task`, when not shipped
    verifier: str = ""  # "" = the task's own; "package.module:function" or "file.py:function"
    iterations: int = 3
    sft_baseline: bool = True  # fine-tune the base on the human solutions too (same problems)
    seed: int = 0
    name: str = "rest_em"
    problems: ProblemsConfig = ProblemsConfig()
    sample: SampleConfig = SampleConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    held_out: HeldOutConfig = HeldOutConfig()
    tracking: TrackingConfig = TrackingConfig(job_type="rest_em")


def is_rest_em_file(spec: str) -> bool:
    """Whether the experiment file `path.py[:arg]` declares a ReST^EM job."""
    from gemini_core import experiment as experiment_lib
    path, arg = experiment_lib.split_spec(spec)
    cfg = experiment_lib.call_get_config(experiment_lib.load_module(path), path, arg)
    return cfg.get("method") == METHOD


def _at_least(path: str, value: int, low: int) -> None:
    if value < low:
        raise UserError(f"{path}={value!r}: must be >= {low}")


def _check(c: RestEmConfig) -> None:
    if c.method != METHOD:
        raise UserError(f"config.method={c.method!r}: must be {METHOD!r}")
    if not c.base:
        raise UserError("config.base='': name the pretrained run to self-train (a run id or "
                        "directory), e.g. --config.base=rest_em_base-0b8940cb")
    _at_least("config.iterations", c.iterations, 1)
    p, s, f, h = c.problems, c.sample, c.finetune, c.held_out
    for name in ("train", "valid", "test"):
        _at_least(f"config.problems.{name}", getattr(p, name), 1)
    if c.task == "word_problems":
        word_problems.check_ranges("config.problems", p.min_steps, p.max_steps, p.max_operand,
                                   p.ops)
    _at_least("config.sample.samples", s.samples, 1)
    if not 1 <= s.keep <= s.samples:
        raise UserError(f"config.sample.keep={s.keep}: must be in [1, config.sample.samples="
                        f"{s.samples}] (at most that many correct samples kept per problem)")
    if s.temperature <= 0:
        raise UserError(f"config.sample.temperature={s.temperature}: must be > 0 (the E-step "
                        "needs distinct samples)")
    for path, value, low in (("sample.shard_problems", s.shard_problems, 1),
                             ("sample.workers", s.workers, 0),
                             ("sample.batch_size", s.batch_size, 1),
                             ("sample.max_new_tokens", s.max_new_tokens, 0),
                             ("sample.top_k", s.top_k, 0),
                             ("finetune.batch_size", f.batch_size, 1),
                             ("finetune.steps", f.steps, 1),
                             ("finetune.eval_every", f.eval_every, 1),
                             ("finetune.patience", f.patience, 1),
                             ("finetune.warmup_steps", f.warmup_steps, 0),
                             ("held_out.samples", h.samples, 1)):
        _at_least(f"config.{path}", value, low)
    if not 0 < s.top_p <= 1:
        raise UserError(f"config.sample.top_p={s.top_p}: must be in (0, 1]")
    if not f.lr > 0:
        raise UserError(f"config.finetune.lr={f.lr}: must be > 0")
    if h.temperature <= 0:
        raise UserError(f"config.held_out.temperature={h.temperature}: must be > 0 (pass@k "
                        "needs distinct samples; greedy accuracy is reported beside it)")
    bad = [k for k in h.pass_k if not 1 <= k <= h.samples]
    if bad or not h.pass_k:
        raise UserError(f"config.held_out.pass_k={list(h.pass_k)}: each k must be in "
                        f"[1, config.held_out.samples={h.samples}]")


def from_config_dict(cfg: ml_collections.ConfigDict | Mapping) -> RestEmConfig:
    """Validates and converts a ReST^EM job's config; UserError on any mistake."""
    c = to_dataclass(cfg, RestEmConfig, "config")
    _check(c)
    return c
