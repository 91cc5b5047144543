"""Zero-shot classification of media by caption ranking (the `media_choice` task kind).

Each held-out item of a modality domain (gemini_core.data.modality) is given as a document
start holding its media (markers and references into the model's media table), followed in
turn by the domain's evaluation caption of every label ("a photo of a sneaker."); the item is
classified as the label whose caption has the lowest summed NLL. acc is the share classified
right; bpb is the gold caption's bits per UTF-8 byte. The same windows, batches and compiled
shapes as every other scored request (gemini_core.eval.scoring).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from gemini_core.data.media_data import MediaData, prompt_ids
from gemini_core.errors import UserError
from gemini_core.eval import metrics, scoring
from gemini_core.eval.task_examples import select_positions, split_positions
from gemini_core.eval.tasks import TaskSpec

Log = Callable[[str], None]


def items(spec: TaskSpec, media: MediaData | None, limit: int | None) -> np.ndarray:
    """Positions of the held-out items scored: the task's split half, then `limit` of them."""
    if media is None or spec.domain not in media.valid_labels:
        have = ", ".join(media.valid_labels) if media is not None else "none"
        raise UserError(f"task {spec.name}: the model has no modality domain {spec.domain!r} "
                        f"(its modality domains: {have}); train it with "
                        f"config.data.modalities.{spec.domain}")
    pool = split_positions(spec, len(media.valid_labels[spec.domain]))
    chosen = select_positions(spec, len(pool), spec.limit if limit is None else limit)
    return np.array([pool[j] for j in chosen], np.int64)


def evaluate(model: Any, tokenizer, seq_len: int, media: MediaData | None, spec: TaskSpec,
             limit: int | None, batch_size: int, layout=None, log: Log | None = None
             ) -> tuple[dict[str, metrics.Estimate], int]:
    """({"acc", "bpb"}, examples) of one media_choice task."""
    chosen = items(spec, media, limit)
    table = next(t for t in media.tables if t.domain == spec.domain)
    captions = media.captions[spec.domain]
    caption_ids = tokenizer.encode_batch(captions, 1)
    labels, used = media.valid_labels[spec.domain], media.valid_used[spec.domain]
    first = media.valid_first_item[spec.domain]
    V, eos = tokenizer.vocab_size, tokenizer.eos_id
    per_request = []
    for i in chosen.tolist():
        prompt = prompt_ids(table, first + i, int(used[i]), V, eos)
        for ids in caption_ids:
            per_request.append(scoring.window_rows(prompt + list(ids), len(ids), seq_len))
    nll_I, _, _ = scoring.score_requests(model, per_request, seq_len=seq_len,
                                         batch_size=batch_size, layout=layout, progress=log)
    nll_NxC = nll_I.reshape(len(chosen), len(captions))
    gold_N = labels[chosen].astype(np.int64)
    correct = (np.argmin(nll_NxC, axis=1) == gold_N).astype(np.float64)
    caption_bytes = np.array([len(c.encode("utf-8")) for c in captions])
    bpb = nll_NxC[np.arange(len(chosen)), gold_N] / math.log(2) / caption_bytes[gold_N]
    return ({"acc": metrics.mean_stderr(correct.tolist()),
             "bpb": metrics.mean_stderr(bpb.tolist())}, len(chosen))
