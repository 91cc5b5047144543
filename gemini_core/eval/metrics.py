"""The arithmetic of downstream metrics: pure Python, no model and no task declarations.

Every figure comes with a standard error over examples (problems): the sample standard
deviation (n - 1 in the denominator) over sqrt(n), as lm-evaluation-harness reports it. With a
single example there is no spread to measure and the stderr is NaN.

- acc / acc_norm: the choice with the lowest summed NLL, or with the lowest NLL per unit of
  length (the caller says which length; gemini_core.eval.tasks gives each choice's).
- bpb: bits per UTF-8 byte of one gold continuation; a task's bpb is the mean over examples
  (each question weighs the same, however long its answer).
- ppl (LAMBADA): exp of the mean over examples of the target's summed NLL, as lm-eval's
  `perplexity`; its stderr by the delta method, ppl * stderr(NLL).
- pass@k: the unbiased estimator of Chen et al. 2021 from n samples with c correct,
  1 - C(n-c, k) / C(n, k), as a product (no huge binomials); mean and stderr over problems.
- exact match: an answer pulled from text by a regex, then normalised (patterns removed, case
  folded, whitespace stripped) on both sides before comparing.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class Estimate:
    value: float
    stderr: float  # NaN when n < 2
    n: int


def mean_stderr(scores: Sequence[float]) -> Estimate:
    n = len(scores)
    if n == 0:
        raise ValueError("mean_stderr of no scores")
    mean = math.fsum(scores) / n
    if n < 2:
        return Estimate(mean, math.nan, n)
    var = math.fsum((s - mean) ** 2 for s in scores) / (n - 1)
    return Estimate(mean, math.sqrt(var / n), n)


def argmin_first(values: Sequence[float]) -> int:
    """Index of the smallest value, the first one on a tie (numpy's argmax of -values)."""
    return min(range(len(values)), key=lambda i: (values[i], i))


def mc_predictions(nlls: Sequence[float], lengths: Sequence[int]) -> tuple[int, int]:
    """(choice by summed NLL, choice by NLL per unit length) of one multiple-choice question."""
    if len(nlls) != len(lengths) or not nlls:
        raise ValueError(f"{len(nlls)} NLLs for {len(lengths)} choice lengths")
    if min(lengths) <= 0:
        raise ValueError(f"choice lengths must be positive, got {list(lengths)}")
    return argmin_first(nlls), argmin_first([x / n for x, n in zip(nlls, lengths)])


def mc_scores(nlls: Sequence[float], lengths: Sequence[int], gold: int) -> tuple[float, float]:
    """(acc, acc_norm) of one question: 1.0 where the prediction is the gold choice."""
    pred, pred_norm = mc_predictions(nlls, lengths)
    return float(pred == gold), float(pred_norm == gold)


def bits_per_byte(nll: float, nbytes: int) -> float:
    """Summed NLL in nats of a continuation -> bits per UTF-8 byte of it."""
    if nbytes <= 0:
        raise ValueError(f"bits_per_byte of a continuation of {nbytes} bytes")
    return nll / math.log(2) / nbytes


def perplexity(nlls: Sequence[float]) -> Estimate:
    """exp(mean summed NLL per example); stderr by the delta method."""
    nll = mean_stderr(nlls)
    ppl = math.exp(nll.value)
    return Estimate(ppl, ppl * nll.stderr, nll.n)


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n, c of them correct, is
    correct) = 1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k_estimate(counts: Sequence[tuple[int, int]], k: int) -> Estimate:
    """pass@k over problems from (samples n, correct c) per problem."""
    return mean_stderr([pass_at_k(n, c, k) for n, c in counts])


def extract_answer(text: str, pattern: str, select: str = "first") -> str | None:
    """The answer a regex finds in `text`: its first non-empty group (the whole match when it
    has none), of the first or last match; None when nothing matches. An empty pattern takes
    the text as it is."""
    if not pattern:
        return text
    matches = list(re.finditer(pattern, text))
    if not matches:
        return None
    match = matches[0] if select == "first" else matches[-1]
    groups = [g for g in match.groups() if g]
    return groups[0] if groups else match.group(0)


def normalize_answer(text: str, *, ignore_case: bool = False,
                     ignore_patterns: Sequence[str] = ()) -> str:
    r"""What exact match compares: `ignore_patterns` removed in order, case folded when asked,
    surrounding whitespace stripped (before and after, so `\.$` sees the last character)."""
    text = text.strip()
    for pattern in ignore_patterns:
        text = re.sub(pattern, "", text)
    if ignore_case:
        text = text.lower()
    return text.strip()


def exact_match(output: str, target: str, *, pattern: str = "", select: str = "first",
                ignore_case: bool = False, ignore_patterns: Sequence[str] = ()) -> float:
    """1.0 when the answer extracted from `output` equals `target` after normalisation."""
    answer = extract_answer(output, pattern, select)
    if answer is None:
        return 0.0
    norm = dict(ignore_case=ignore_case, ignore_patterns=ignore_patterns)
    return float(normalize_answer(answer, **norm) == normalize_answer(target, **norm))
