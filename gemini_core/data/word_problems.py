"""Procedural math word problems: multi-step integer arithmetic told in words, with a worked,
human-style solution and the final answer — the task a small CPU model can learn and that
self-training (gemini_core.selftrain, ReST^EM) can amplify.

    Question: Mia has 7 marbles. She buys 5 more marbles. Then she gives 3 marbles to Sam.
    How many marbles does Mia have now?
    Answer: Mia starts with 7 marbles. She buys 5 more, so 7 + 5 = 12. She gives 3 away, so
    12 - 3 = 9. The answer is 9.

(one line each in the real text: a solution never holds a newline, so generation stops at "\n").
A problem is a pure function of (seed, index, steps range, operand range): `problem(...)`.
Difficulty is the number of steps (each one + / - / x) and the size of the numbers; every
intermediate value stays in [0, MAX_VALUE], so answers are at most two digits. No jax here:
the config boundary imports this module through gemini_core.data.synthetic.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator, Mapping

import numpy as np

from gemini_core.errors import UserError

MAX_VALUE = 99
ANSWER_PATTERN = r"The answer is (-?\d+)"  # the verifier's regex over a completion
EQUATION = re.compile(r"(\d+) ([+\-x]) (\d+) = (\d+)")
PROMPT = "Question: {question}\nAnswer:"
NAMES = (("Mia", "She"), ("Sam", "He"), ("Ava", "She"), ("Leo", "He"), ("Zoe", "She"),
         ("Max", "He"), ("Ivy", "She"), ("Ben", "He"), ("Lily", "She"), ("Omar", "He"),
         ("Nina", "She"), ("Ravi", "He"))
ITEMS = ("marbles", "apples", "stickers", "coins", "books", "pencils", "cookies", "shells",
         "cards", "stamps")
# one operation per step: (question sentence, solution sentence, sign); {b} the operand
GAIN = (("{p} buys {b} more {item}.", "{p} buys {b} more, so {x} + {b} = {y}."),
        ("{p} finds {b} more {item}.", "{p} finds {b} more, so {x} + {b} = {y}."),
        ("{friend} gives {n} {b} {item}.", "{friend} gives {b}, so {x} + {b} = {y}."))
LOSE = (("{p} gives {b} {item} to {friend}.", "{p} gives {b} away, so {x} - {b} = {y}."),
        ("{p} loses {b} {item}.", "{p} loses {b}, so {x} - {b} = {y}."),
        ("{p} uses {b} of the {item}.", "{p} uses {b}, so {x} - {b} = {y}."))
TIMES = (("The number of {item} grows {b} times.", "It grows {b} times, so {x} x {b} = {y}."),)


@dataclasses.dataclass(frozen=True)
class WordProblem:
    question: str
    solution: str  # the worked solution, ending "The answer is N."
    answer: str  # N, as text
    steps: int

    @property
    def prompt(self) -> str:
        return PROMPT.format(question=self.question)

    def record(self, index: int) -> dict:
        return {"id": index, "question": self.question, "solution": self.solution,
                "answer": self.answer, "steps": self.steps}


def _operation(rng: np.random.Generator, x: int, max_operand: int, ops: str
               ) -> tuple[str, int, int]:
    """(kind, operand, result) of one step from value x, staying within [0, MAX_VALUE]."""
    kinds = (["gain"] * ("+" in ops and x + 1 <= MAX_VALUE) + ["lose"] * ("-" in ops and x >= 1)
             + ["times"] * ("x" in ops and 2 <= x * 2 <= MAX_VALUE))
    kind = kinds[rng.integers(len(kinds))]
    if kind == "gain":
        b = int(rng.integers(1, min(max_operand, MAX_VALUE - x) + 1))
        return kind, b, x + b
    if kind == "lose":
        b = int(rng.integers(1, min(max_operand, x) + 1))
        return kind, b, x - b
    b = int(rng.integers(2, min(3, MAX_VALUE // x) + 1))
    return kind, b, x * b


def problem(seed: int, index: int, *, min_steps: int = 1, max_steps: int = 3,
            max_operand: int = 20, ops: str = "+-x") -> WordProblem:
    """Problem `index` of the stream `seed`: the same text on every machine and call. `ops`:
    the operations drawn from, of "+", "-", "x" (times 2 or 3)."""
    rng = np.random.default_rng([seed, index])
    steps = int(rng.integers(min_steps, max_steps + 1))
    name, pronoun = NAMES[rng.integers(len(NAMES))]
    friend = NAMES[rng.integers(len(NAMES))][0]
    if friend == name:
        friend = "a friend"
    item = ITEMS[rng.integers(len(ITEMS))]
    x = int(rng.integers(2, max_operand + 1))
    asked, worked = [f"{name} has {x} {item}."], [f"{name} starts with {x} {item}."]
    for i in range(steps):
        kind, b, y = _operation(rng, x, max_operand, ops)
        templates = {"gain": GAIN, "lose": LOSE, "times": TIMES}[kind]
        ask, work = templates[rng.integers(len(templates))]
        who = name if i == 0 else pronoun
        fields = dict(p=who, n=name, b=b, x=x, y=y, item=item, friend=friend)
        asked.append(("Then " if i else "") + _lower_first(ask.format(**fields), i > 0))
        worked.append(work.format(**fields))
        x = y
    asked.append(f"How many {item} does {name} have now?")
    worked.append(f"The answer is {x}.")
    return WordProblem(" ".join(asked), " ".join(worked), str(x), steps)


def _lower_first(text: str, lower: bool) -> str:
    if not lower or text.startswith(tuple(n for n, _ in NAMES)):
        return text
    return text[0].lower() + text[1:]


def problems(seed: int, n: int, **ranges) -> Iterator[WordProblem]:
    for i in range(n):
        yield problem(seed, i, **ranges)


def check_ranges(where: str, min_steps: int, max_steps: int, max_operand: int, ops: str) -> None:
    """One line naming the field (`where`.<field>) of a range no problem can be drawn from."""
    if not 1 <= min_steps <= max_steps:
        raise UserError(f"{where}.min_steps={min_steps}, max_steps={max_steps}: need "
                        "1 <= min_steps <= max_steps")
    if not 2 <= max_operand <= MAX_VALUE // 2:
        raise UserError(f"{where}.max_operand={max_operand}: must be in [2, {MAX_VALUE // 2}]")
    if not ops or set(ops) - set("+-x"):
        raise UserError(f"{where}.ops={ops!r}: a non-empty string of the operations +, -, x")


def check_work(record: Mapping, completion: str) -> bool:
    """A verifier that checks the work, not only the answer: the final answer is right, the
    completion computes one equation per step, and every one of them is true.

    Final-answer match alone accepts lucky guesses: of the samples a weak base model got
    "right" this way, most had a false equation on the way (`8 - 2 = 1`, answer 1), and
    fine-tuning on them teaches the errors (docs/self-training.md). Use it as
    `config.verifier="gemini_core.data.word_problems:check_work"`.
    """
    answer = re.search(ANSWER_PATTERN, completion)
    if answer is None or answer.group(1) != str(record["answer"]):
        return False
    steps = EQUATION.findall(completion)
    return len(steps) == int(record["steps"]) and all(
        _apply(int(a), op, int(b)) == int(c) for a, op, b, c in steps)


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def document(p: WordProblem) -> str:
    """A pretraining document: the prompt and its worked solution, as a task shows them."""
    return f"{p.prompt} {p.solution}"
