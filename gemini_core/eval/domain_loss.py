"""Held-out evaluation: loss and bits per UTF-8 byte per domain, on fixed batches.

bpb = summed next-token NLL (nats) / ln 2 / UTF-8 bytes of the predicted tokens. The tokenizer is
lossless (identity normalisation, byte fallback), so the bytes of a token window are exactly
the sum of its pieces' byte lengths, and bpb compares models across tokenizers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Sequence

import numpy as np

from gemini_core.errors import UserError

EvalFn = Callable  # (state, tokens_Bx(T+1)) -> nll_sum_B (nats summed over T targets)


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """Fixed windows of each domain's valid split: the same batches at every evaluation."""

    windows: Mapping[str, np.ndarray]  # domain -> tokens_Nx(T+1) int32
    target_bytes: Mapping[str, int]  # domain -> UTF-8 bytes of all predicted tokens
    # domain -> targets the loss counts: all, or a modality domain's text tokens (ids at or
    # above the text vocabulary are markers and media references, never predicted)
    target_tokens: Mapping[str, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def build(cls, valid: Mapping[str, np.ndarray], token_bytes_V: np.ndarray, *, seq_len: int,
              batch_size: int, batches: int) -> "EvalSet":
        windows, target_bytes, target_tokens = {}, {}, {}
        V = len(token_bytes_V)
        for domain, tokens in valid.items():
            n = min(batches * batch_size, len(tokens) // (seq_len + 1))
            if n == 0:
                raise UserError(f"data: domain {domain!r} has {len(tokens)} valid tokens, fewer "
                                f"than one evaluation window of seq_len+1={seq_len + 1}")
            w_NxT1 = np.asarray(tokens[: n * (seq_len + 1)], dtype=np.int32).reshape(n, seq_len + 1)
            windows[domain] = w_NxT1
            text_NxT = w_NxT1[:, 1:] < V
            target_bytes[domain] = int(np.where(
                text_NxT, token_bytes_V[np.minimum(w_NxT1[:, 1:], V - 1)], 0).sum())
            target_tokens[domain] = int(text_NxT.sum())
        return cls(windows, target_bytes, target_tokens)

    @property
    def tokens(self) -> int:
        return sum(w.shape[0] * (w.shape[1] - 1) for w in self.windows.values())


def evaluate(eval_fn: EvalFn, state, evalset: EvalSet, batch_size: int) -> dict[str, float]:
    """eval/<domain>/{loss,bpb} and their unweighted means over domains."""
    metrics = {}
    for domain, w_NxT1 in evalset.windows.items():
        nll = 0.0
        for i in range(0, len(w_NxT1), batch_size):
            nll += float(np.asarray(eval_fn(state, w_NxT1[i:i + batch_size]), np.float64).sum())
        targets = evalset.target_tokens.get(domain) or w_NxT1.shape[0] * (w_NxT1.shape[1] - 1)
        metrics[f"eval/{domain}/loss"] = nll / targets
        metrics[f"eval/{domain}/bpb"] = nll / math.log(2) / evalset.target_bytes[domain]
    domains = list(evalset.windows)
    metrics["eval/mean/loss"] = float(np.mean([metrics[f"eval/{d}/loss"] for d in domains]))
    metrics["eval/mean/bpb"] = float(np.mean([metrics[f"eval/{d}/bpb"] for d in domains]))
    return metrics


def format_table(metrics: Mapping[str, float], epochs: Mapping[str, float] | None = None,
                 domains: Sequence[str] | None = None) -> str:
    """The per-domain table printed at the end of a run, domains in config order if given."""
    if domains is None:
        domains = [k.split("/")[1] for k in metrics
                   if k.startswith("eval/") and k.endswith("/loss")]
    domains = [d for d in domains if d != "mean"] + ["mean"]
    w = max(14, max(map(len, domains)) + 2)
    head = f"{'domain':<{w}}{'loss':>9}{'bpb':>9}" + (f"{'epochs':>9}" if epochs else "")
    rows = [head, "-" * len(head)]
    for d in domains:
        row = f"{d:<{w}}{metrics[f'eval/{d}/loss']:>9.4f}{metrics[f'eval/{d}/bpb']:>9.4f}"
        if epochs:
            row += f"{epochs[d]:>9.2f}" if d in epochs else f"{'':>9}"
        rows.append(row)
    return "\n".join(rows)
