"""Log-likelihood of text under one model: continuations given a context, and whole texts.

Every text is scored as a document start: `document_ids` puts EOS (what training packs after
each document, so the model's "start of document") before the text's tokens. Generation uses
the same function for its prompts.

Continuations (`loglikelihood`). The context and the continuation are tokenized together, as
the model saw such text in training: a continuation " Paris" after "Answer:" is the token
"▁Paris", not "▁" + "Paris". The continuation's tokens are those that cover any character at or
after len(context), by the tokens' character offsets: a token that straddles the boundary (the
context ends inside it, e.g. a context ending in a space that the next word's piece takes)
counts to the continuation, so it is scored and the context is one token shorter. `bytes`
stays the UTF-8 length of the continuation string itself (acc_norm and bits per byte divide by
it). A character spelled by several byte-fallback pieces falls wholly on one side.

Windows. A row holds at most seq_len + 1 tokens (seq_len predictions). The targets of a request
(the continuation's tokens, or all of a text's after its EOS) are split into disjoint chunks of
at most seq_len tokens, from the first; each chunk is predicted by one row: the seq_len + 1
tokens that end at the chunk's last target, so each chunk sees as much preceding text as fits.
This is lm-evaluation-harness's rolling scheme (its default context_len=1). For a continuation
of at most seq_len tokens it is one row: a longer document loses tokens from the left of its
context (the leading EOS first) and the continuation is scored whole. A longer continuation
(PIQA's longest solutions, reference code, at a short seq_len) takes several rows, the first
of which sees only the context's last token. `LogLik.truncated` counts the tokens no row of the
request saw; `log` gets one line with how many requests were cut, and how many took several rows.

Whole texts (`loglikelihood_rolling`): every token predicted exactly once by the same scheme;
the sum is the text's NLL (perplexity, bits per byte). A full chunk sees only its own tokens
and the one before it; a short last chunk sees as much earlier text as fits.

Batching. Rows are sorted by length into buckets whose padded length is a power of two (at
least MIN_BUCKET, at most seq_len), and inside a bucket by the number of targets. A bucket of
length L takes batch_size·seq_len // L rows per batch (the same tokens per batch whatever the
length); its last batch is padded with empty rows to a power of two, at least an eighth of a
full batch. Padding goes on the right of a row, where causal attention keeps it from the real
tokens. The vocabulary projection (a third of the quickstart model's forward FLOPs, and all of
the (N, V) softmax traffic) runs only at target positions: C per row, MIN_TARGETS times the
power of four that holds the batch's largest chunk. Coarse steps on purpose: every (length,
targets, rows) shape is a compile of its own (~1-2 s each on 2 cores), and an evaluation inside
training pays them at its first call; the few wasted rows and targets cost far less. Results
come back in the requests' order.
With a `Layout` the batch is split over the mesh's batch axes (rows padded to a multiple of
them) and the outputs are replicated.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemini_core.data.tokenizer import PAD_ID, Tokenizer, document_ids
from gemini_core.errors import UserError
from gemini_core.model.transformer import Transformer, cross_entropy
from gemini_core.scale.sharding import Layout, constrain

MIN_BUCKET = 16
MIN_TARGETS = 8
Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class LogLik:
    nll: float  # nats, summed over the continuation's tokens
    tokens: int  # continuation tokens scored
    bytes: int  # UTF-8 bytes of the continuation string
    greedy: bool  # every continuation token is the model's argmax
    truncated: int = 0  # tokens before the continuation (EOS included) that no prediction saw


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of a forward pass: predict the last `n` of `ids` from the tokens before them."""
    ids: tuple[int, ...]
    n: int


def continuation_split(tokenizer: Tokenizer, context: str, continuation: str
                       ) -> tuple[list[int], int]:
    """document_ids(context + continuation) and how many of its last tokens are the
    continuation's (the rule in the module doc)."""
    ids, starts, ends = tokenizer.encode_with_offsets(context + continuation)
    boundary = len(context)
    first = next((i for i, (s, e) in enumerate(zip(starts, ends))
                  if e > boundary or s >= boundary), len(ids))
    return [tokenizer.eos_id] + ids, len(ids) - first


def window_rows(ids: Sequence[int], n: int, seq_len: int) -> list[Row]:
    """Rows that predict the last n tokens of `ids` once each (the module doc's windows)."""
    last = len(ids) - 1
    rows = []
    for start in range(last - n + 1, last + 1, seq_len):  # chunk = targets ids[start..end]
        end = min(start + seq_len - 1, last)
        rows.append(Row(tuple(ids[max(0, end - seq_len): end + 1]), end - start + 1))
    return rows


def loglikelihood(model: Transformer, tokenizer: Tokenizer,
                  requests: Sequence[tuple[str, str]], *, seq_len: int, batch_size: int = 32,
                  layout: Layout | None = None, log: Log | None = None) -> list[LogLik]:
    """log p(continuation | context) for each (context, continuation), in the requests' order."""
    per_request, truncated = [], []
    for i, (context, continuation) in enumerate(requests):
        ids, n = continuation_split(tokenizer, context, continuation)
        if n == 0:
            raise UserError(f"scoring request {i}: empty continuation after context "
                            f"{_clip(context)}: nothing to score")
        rows = window_rows(ids, n, seq_len)
        per_request.append(rows)
        # the tokens before the continuation, less those the first row holds
        truncated.append((len(ids) - n) - (len(rows[0].ids) - rows[0].n))
    if log is not None:
        log_windows(log, truncated, [len(rows) for rows in per_request], seq_len)
    nll_I, greedy_I, tokens_I = score_requests(model, per_request, seq_len=seq_len,
                                               batch_size=batch_size, layout=layout,
                                               progress=log)
    return [LogLik(float(nll_I[i]), int(tokens_I[i]), len(cont.encode("utf-8")),
                   bool(greedy_I[i]), truncated[i]) for i, (_, cont) in enumerate(requests)]


def log_windows(log: Log, truncated: Sequence[int], rows: Sequence[int], seq_len: int) -> None:
    """One line when requests did not fit one window: contexts cut, continuations split."""
    cut = sum(1 for t in truncated if t)
    several = sum(1 for r in rows if r > 1)
    parts = []
    if cut:
        parts.append(f"{cut} of {len(rows)} requests are longer than seq_len+1={seq_len + 1} "
                     "tokens: their contexts were cut from the left")
    if several:
        parts.append(f"{several} continuations of more than seq_len={seq_len} tokens were "
                     "scored in several windows")
    if parts:
        log("scoring: " + "; ".join(parts))


def loglikelihood_rolling(model: Transformer, tokenizer: Tokenizer, texts: Sequence[str], *,
                          seq_len: int, batch_size: int = 32,
                          layout: Layout | None = None) -> list[LogLik]:
    """Each whole text's NLL (every token, from the start of a document), in order."""
    per_text = []
    for text in texts:
        ids = document_ids(tokenizer, text)
        per_text.append(window_rows(ids, len(ids) - 1, seq_len))
    nll_I, greedy_I, tokens_I = score_requests(model, per_text, seq_len=seq_len,
                                               batch_size=batch_size, layout=layout)
    return [LogLik(float(nll_I[i]), int(tokens_I[i]), len(t.encode("utf-8")), bool(greedy_I[i]))
            for i, t in enumerate(texts)]


def score_requests(model: Transformer, per_request: Sequence[Sequence[Row]], *, seq_len: int,
                   batch_size: int = 32, layout: Layout | None = None,
                   progress: Log | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(nll_I, greedy_I, tokens_I) per request, summed over its rows."""
    rows = [row for rs in per_request for row in rs]
    owner_R = np.repeat(np.arange(len(per_request)), [len(rs) for rs in per_request])
    nll_R, greedy_R = score_rows(model, rows, seq_len=seq_len, batch_size=batch_size,
                                 layout=layout, progress=progress)
    count = len(per_request)
    nll_I = np.bincount(owner_R, weights=nll_R, minlength=count)
    missed_I = np.bincount(owner_R, weights=(~greedy_R).astype(np.float64), minlength=count)
    tokens_I = np.bincount(owner_R, weights=[r.n for r in rows], minlength=count)
    return nll_I, missed_I == 0, tokens_I.astype(np.int64)


def _clip(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


# ---------------------------------------------------------------------------------------------
# the batched core


@dataclasses.dataclass(frozen=True)
class Batch:
    length: int  # L: padded input tokens per row
    targets: int  # C: scored positions per row
    rows: int  # B: rows, empty ones included
    index: np.ndarray  # the rows it holds, (<= B,)


def score_rows(model: Transformer, rows: Sequence[Row], *, seq_len: int, batch_size: int = 32,
               layout: Layout | None = None, progress: Log | None = None,
               every_s: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """(nll_R float64: nats summed over each row's last n tokens, greedy_R bool), rows' order.

    Every row must fit the window: len(ids) <= seq_len + 1 and 1 <= n < len(ids). `progress`
    gets a line about every `every_s` seconds of a long pass (rows, tokens/s, ETA).
    """
    for i, row in enumerate(rows):
        if not (len(row.ids) <= seq_len + 1 and 1 <= row.n < len(row.ids)):
            raise ValueError(f"row {i}: {len(row.ids)} tokens, n={row.n}: does not fit "
                             f"seq_len={seq_len}")
    nll_R = np.zeros(len(rows), np.float64)
    greedy_R = np.zeros(len(rows), np.bool_)
    if not rows:
        return nll_R, greedy_R
    graphdef, state = nnx.split(model)
    if layout is not None:  # a no-op for a state already on the layout (a loaded run's)
        state = jax.device_put(state, layout.state_shardings(state))
    forward = scorer(graphdef, layout)
    shards = 1 if layout is None else layout.batch_shards
    pending = []  # all dispatched before any is read: packing overlaps the device's work
    for batch in batches(rows, seq_len, batch_size, shards):
        tokens_BxL, positions_BxC, targets_BxC, score_BxC = pack([rows[i] for i in batch.index],
                                                                 batch)
        pending.append((batch, score_BxC,
                        forward(state, tokens_BxL, positions_BxC, targets_BxC)))
    t0 = last = time.perf_counter()
    done_rows = done_tokens = 0
    for batch, score_BxC, (nll_BxC, hit_BxC) in pending:
        nll_BxC, hit_BxC = np.asarray(nll_BxC, np.float64), np.asarray(hit_BxC)
        real = len(batch.index)
        nll_R[batch.index] = np.where(score_BxC, nll_BxC, 0.0).sum(axis=1)[:real]
        greedy_R[batch.index] = (hit_BxC | ~score_BxC).all(axis=1)[:real]
        done_rows, done_tokens = done_rows + real, done_tokens + batch.rows * batch.length
        now = time.perf_counter()
        if progress is not None and now - last >= every_s and done_rows < len(rows):
            last, rate = now, done_rows / (now - t0)
            progress(f"scoring: {done_rows:,}/{len(rows):,} rows, "
                     f"{done_tokens / (now - t0):,.0f} tokens/s, "
                     f"eta {(len(rows) - done_rows) / rate:.0f} s")
    return nll_R, greedy_R


def bucket_lengths(seq_len: int) -> list[int]:
    """Padded row lengths (model inputs, so seq_len at most): powers of two, then seq_len."""
    out, length = [], min(MIN_BUCKET, seq_len)
    while length < seq_len:
        out.append(length)
        length *= 2
    return out + [seq_len]


def _step_at_least(x: int, start: int, factor: int) -> int:
    """The smallest start·factor**k >= x."""
    out = start
    while out < x:
        out *= factor
    return out


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def batches(rows: Sequence[Row], seq_len: int, batch_size: int, shards: int = 1) -> list[Batch]:
    """The batches of a scoring pass (module doc: buckets, rows per batch, targets per row)."""
    lengths_R = np.array([len(r.ids) - 1 for r in rows])
    n_R = np.array([r.n for r in rows])
    buckets = bucket_lengths(seq_len)
    bucket_R = np.searchsorted(np.array(buckets), lengths_R)  # the first bucket that holds it
    out = []
    for b, length in enumerate(buckets):
        members = np.flatnonzero(bucket_R == b)
        members = members[np.argsort(n_R[members], kind="stable")]
        full = _round_up(max(1, batch_size * seq_len // length), shards)
        for start in range(0, len(members), full):
            index = members[start: start + full]
            targets = min(length, _step_at_least(int(n_R[index].max()), MIN_TARGETS, 4))
            rows = max(full // 8, _step_at_least(len(index), 1, 2))
            padded = min(full, _round_up(rows, shards))
            out.append(Batch(length, targets, padded, index))
    return out


def pack(rows: Sequence[Row], batch: Batch
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """tokens_BxL (right-padded with PAD), positions_BxC (where each target is predicted),
    targets_BxC, score_BxC (bool: a real target, not padding)."""
    B, L, C = batch.rows, batch.length, batch.targets
    tokens_BxL = np.full((B, L), PAD_ID, np.int32)
    positions_BxC = np.zeros((B, C), np.int32)
    targets_BxC = np.full((B, C), PAD_ID, np.int32)
    score_BxC = np.zeros((B, C), np.bool_)
    for b, row in enumerate(rows):
        m = len(row.ids) - 1  # inputs; the last n of them predict the targets
        tokens_BxL[b, :m] = row.ids[:-1]
        positions_BxC[b, :row.n] = np.arange(m - row.n, m)
        targets_BxC[b, :row.n] = row.ids[m - row.n + 1:]
        score_BxC[b, :row.n] = True
    return tokens_BxL, positions_BxC, targets_BxC, score_BxC


def target_nll(model: Transformer, tokens_BxL: jax.Array, positions_BxC: jax.Array,
               targets_BxC: jax.Array) -> tuple[jax.Array, jax.Array]:
    """NLL (nats) of targets_BxC predicted at positions_BxC, and whether each is the argmax."""
    B, L = tokens_BxL.shape
    C = positions_BxC.shape[1]
    h_BxLxD = model.hidden(tokens_BxL).reshape(B, L, -1)
    # a gather within each row: under a mesh every row's positions stay on its batch shard
    h_NxD = jnp.take_along_axis(h_BxLxD, positions_BxC[:, :, None], axis=1).reshape(B * C, -1)
    logits_NxV = model.logits(constrain(h_NxD, ("tokens", None)))
    targets_N = targets_BxC.reshape(-1)
    nll_N = cross_entropy(logits_NxV, targets_N)
    hit_N = jnp.argmax(logits_NxV, axis=-1) == targets_N
    return nll_N.reshape(B, C), hit_N.reshape(B, C)


_SCORERS: dict = {}


def scorer(graphdef: nnx.GraphDef, layout: Layout | None) -> Callable:
    """forward(state, tokens_BxL, positions_BxC, targets_BxC) -> (nll_BxC, hit_BxC), jitted once
    per model graph and mesh and kept for the process (in-loop evaluation calls it again and
    again; each batch shape compiles once)."""
    key = (graphdef, None if layout is None else
           (layout.mesh, tuple(sorted((k, tuple(v)) for k, v in layout.rules.items()))))
    if key in _SCORERS:
        return _SCORERS[key]

    def forward(state, tokens_BxL, positions_BxC, targets_BxC):
        nll_BxC, hit_BxC = target_nll(nnx.merge(graphdef, state), tokens_BxL, positions_BxC,
                                      targets_BxC)
        # every process reads the whole result: replicated, not left split by batch
        return constrain(nll_BxC, (None, None)), constrain(hit_BxC, (None, None))

    jitted = jax.jit(forward)
    if layout is None:
        fn = jitted
    else:
        def fn(state, *arrays_Bx):
            with layout.activate():
                return jitted(state, *(layout.place_batch(a) for a in arrays_Bx))
    _SCORERS[key] = fn
    return fn
