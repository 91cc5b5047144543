"""A self-training task: its train / valid / test problems and the verifier that accepts or
rejects a completion.

Problems are the downstream tasks' `Example`s (gemini_core.eval.tasks), so a prompt, its gold
solution and its checking are declared once for evaluation and self-training alike:

- `word_problems`: procedural arithmetic word problems (gemini_core.data.word_problems), each
  split drawn from its own seed and written once as a task file into the data cache. Problems
  the base model was pretrained on (its config's `data.synthetic` word-problem domains) and
  problems of another split are left out, counted (`Splits.dropped`).
- any other task (shipped, e.g. gsm8k and mbpp, or declared in `task_file`): its records split by
  a seeded permutation, test first, then valid, then train.

Verifiers: a `generate` task's exact match of the extracted final answer (numbers normalised),
a `code` task's tests in the sandbox, or a user's callable `verify(record, completion) -> bool`
named `package.module:function` or `path/file.py:function`. A verifier that raises rejects that
sample (its error is kept with it); it never stops the iteration.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import random
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from gemini_core.data import word_problems
from gemini_core.errors import UserError
from gemini_core.eval import sandbox
from gemini_core.eval.task_examples import load_examples
from gemini_core.eval.tasks import Example, TaskSpec, exact_match, load_tasks
from gemini_core.runs.rundir import fingerprint
from gemini_core.selftrain.config import ProblemsConfig, RestEmConfig

SPLITS = ("train", "valid", "test")
DEFAULT_NEW_TOKENS = 96


@dataclasses.dataclass(frozen=True)
class Splits:
    spec: TaskSpec
    train: tuple[Example, ...]
    valid: tuple[Example, ...]
    test: tuple[Example, ...]
    dropped: Mapping[str, int]  # why -> problems left out (seen in pretraining, in another split)

    def identity(self) -> dict:
        """What the problems are, for the fingerprints of the work done on them."""
        return {"task": self.spec.name, "problems": fingerprint(
            {s: [ex.context + "\x00" + ex.gold for ex in getattr(self, s)] for s in SPLITS})}


# ---------------------------------------------------------------------------------------------
# word problems


def _word_problem_task(path: Path, max_new_tokens: int) -> dict:
    return dict(path=str(path), kind="generate", id_field="id",
                prompt=word_problems.PROMPT, gold="{solution}", target="{answer}",
                answer_pattern=word_problems.ANSWER_PATTERN, stop=("\n",),
                max_new_tokens=max_new_tokens or DEFAULT_NEW_TOKENS)


def pretraining_questions(base_cfg: Mapping) -> set[str]:
    """The questions of every word-problem domain the base run was pretrained on."""
    from gemini_core.data.synthetic import SyntheticDomain
    seen: set[str] = set()
    for spec in (base_cfg.get("data", {}).get("synthetic") or {}).values():
        domain = SyntheticDomain(**spec)
        if domain.kind != "word_problems":
            continue
        for seed, n in ((domain.seed, domain.train_documents),
                        (domain.seed + 1, domain.valid_documents)):
            seen.update(p.question for p in word_problems.problems(
                seed, n, **domain.problem_ranges()))
    return seen


def _draw(seed: int, n: int, ranges: dict, taken: set[str], dropped: dict[str, int]
          ) -> list[word_problems.WordProblem]:
    """n problems of stream `seed` whose questions are not in `taken` (which grows)."""
    out, index, budget = [], 0, 50 * n + 1000
    while len(out) < n:
        if index >= budget:
            raise UserError(f"config.problems: found only {len(out)} of {n} new problems in "
                            f"{budget} draws (the base's pretraining holds the rest of this "
                            "difficulty range): widen config.problems.max_operand or max_steps")
        p = word_problems.problem(seed, index, **ranges)
        index += 1
        if p.question in taken:
            dropped["seen in pretraining or another split"] += 1
            continue
        taken.add(p.question)
        out.append(p)
    return out


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def word_problem_splits(p: ProblemsConfig, base_cfg: Mapping, cache: Path,
                        max_new_tokens: int) -> Splits:
    ranges = dict(min_steps=p.min_steps, max_steps=p.max_steps, max_operand=p.max_operand,
                  ops=p.ops)
    taken = pretraining_questions(base_cfg)
    dropped = {"seen in pretraining or another split": 0}
    # test first: a problem that is in test is never trained on, whatever the counts
    drawn = {s: _draw(p.seed + i, getattr(p, s), ranges, taken, dropped)
             for i, s in sorted(enumerate(SPLITS), key=lambda x: -x[0])}
    folder = cache / "word_problems" / fingerprint(
        {s: [q.question for q in drawn[s]] for s in SPLITS})[:16]
    examples = {}
    for split in SPLITS:
        path = folder / f"{split}.jsonl"
        if not path.is_file():
            write_jsonl(path, [q.record(i) for i, q in enumerate(drawn[split])])
        (spec,) = load_tasks(["word_problems"], declared={
            "word_problems": _word_problem_task(path, max_new_tokens)},
            declared_where="config.task")
        examples[split] = tuple(load_examples(spec, 0))
    spec = dataclasses.replace(spec, path=str(folder))
    return Splits(spec, examples["train"], examples["valid"], examples["test"], dropped)


# ---------------------------------------------------------------------------------------------
# benchmark tasks


def task_splits(c: RestEmConfig) -> Splits:
    items = [c.task_file] if c.task_file else [c.task]
    specs = [s for s in load_tasks(items) if s.name == c.task]
    if not specs:
        raise UserError(f"config.task={c.task!r}: not declared in config.task_file="
                        f"{c.task_file!r}")
    spec = specs[0]
    examples = load_examples(spec, 0)
    order = list(range(len(examples)))
    random.Random(f"rest_em/{c.problems.seed}").shuffle(order)
    p = c.problems
    need = p.test + p.valid + p.train
    if need > len(examples):
        raise UserError(f"config.problems: train={p.train} + valid={p.valid} + test={p.test} = "
                        f"{need} problems, but task {c.task!r} has {len(examples)}")
    pick = lambda a, b: tuple(examples[i] for i in sorted(order[a:b]))  # noqa: E731
    return Splits(spec, train=pick(p.test + p.valid, need), valid=pick(p.test, p.test + p.valid),
                  test=pick(0, p.test), dropped={})


def splits_for(c: RestEmConfig, base_cfg: Mapping, cache: Path) -> Splits:
    if c.task == "word_problems" and not c.task_file:
        return word_problem_splits(c.problems, base_cfg, cache, c.sample.max_new_tokens)
    return task_splits(c)


# ---------------------------------------------------------------------------------------------
# verifiers

Verify = Callable[[Example, str], bool]


def _user_callable(name: str) -> Callable[[Mapping[str, Any], str], Any]:
    module_name, sep, fn_name = name.rpartition(":")
    if not sep or not module_name or not fn_name:
        raise UserError(f"config.verifier={name!r}: expected package.module:function or "
                        "path/file.py:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UserError(f"config.verifier={name!r}: {path} not found")
            spec = importlib.util.spec_from_file_location(f"gx_verifier_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except UserError:
        raise
    except Exception as e:  # the user's module: its own error, on one line
        raise UserError(f"config.verifier={name!r}: importing it failed: "
                        f"{type(e).__name__}: {e}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UserError(f"config.verifier={name!r}: {module_name} defines no function {fn_name}")
    return fn


def verifier(spec: TaskSpec, name: str = "") -> Verify:
    """The check a completion of one of `spec`'s examples must pass; UserError when the task
    has none (multiple choice, last word) and none is named."""
    if name:
        fn = _user_callable(name)
        return lambda ex, completion: bool(fn(dict(ex.record), completion))
    if spec.kind == "generate":
        return lambda ex, completion: exact_match(spec, ex, completion) > 0.5
    if spec.kind == "code":
        return lambda ex, completion: sandbox.run_program(
            ex.program(completion), timeout_s=spec.timeout_s).passed
    raise UserError(f"config.task={spec.name!r}: a {spec.kind} task has no verifier of its own; "
                    "name one with --config.verifier=package.module:function")


def judge(verify: Verify, ex: Example, completion: str) -> tuple[bool, str]:
    """(accepted, error): a verifier that raises rejects the sample, with its error."""
    try:
        return bool(verify(ex, completion)), ""
    except Exception as e:  # noqa: BLE001 - any error of a verifier is a rejected sample
        return False, f"{type(e).__name__}: {e}"[:300]
