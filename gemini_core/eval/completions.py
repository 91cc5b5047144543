"""`gx generate RUN`: completions of a run's checkpoint for one prompt (streamed) or a file,
or a description of an image or a recording (`--image`/`--audio`, a multimodal run).

A prompts file is JSON lines, one object per prompt with the text under `field` (default
"prompt"); the completions go to JSON lines in the same order, each with the prompt's other
fields kept, the completion, why it ended and its token counts. The file is written once at the
end (a stopped run leaves none half-written). Generation itself is gemini_core.model.generate.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

from gemini_core.config import model_from_json
from gemini_core.data import media_data
from gemini_core.errors import UserError
from gemini_core.eval.loaded_run import LoadedRun
from gemini_core.eval.task_examples import read_records
from gemini_core.model.generate import (
    Completion,
    Decoder,
    SamplingConfig,
    TextStream,
    fit_prompts,
    generate,
)

Log = Callable[[str], None]


def read_prompts(path: Path, field: str) -> tuple[list[str], list[dict]]:
    """(prompt texts, the records) of a JSON-lines file; a record without a string `field` is
    named by file:line."""
    records = read_records(path)
    prompts = []
    for rec in records:
        value = rec.data.get(field) if isinstance(rec.data, dict) else None
        if not isinstance(value, str):
            raise UserError(f"{path}:{rec.line}: no string field {field!r} (--field names the "
                            "prompt's field)")
        prompts.append(value)
    if not prompts:
        raise UserError(f"{path}: no prompts (expected one JSON object per line)")
    return prompts, [dict(rec.data) for rec in records]


def stream_one(loaded: LoadedRun, prompt: str, sampling: SamplingConfig,
               out: TextIO = sys.stdout, log: Log = print) -> Completion:
    """The completion of one prompt, written to `out` piece by piece as it is decoded."""
    def show(_: int, piece: str) -> None:
        out.write(piece)
        out.flush()

    [done] = generate(loaded.model, loaded.tokenizer, [prompt], sampling, batch_size=1,
                      max_len=loaded.seq_len, layout=loaded.layout, on_text=show, log=log)
    out.write("\n")
    log(f"[{done.finish_reason}: {len(done.tokens)} new tokens, prompt {done.prompt_tokens}]")
    return done


def complete_file(loaded: LoadedRun, path: Path, out: Path, sampling: SamplingConfig, *,
                  field: str = "prompt", batch_size: int = 8, log: Log = print) -> int:
    """Completions of every prompt in `path` into `out` (JSON lines); returns the count."""
    prompts, records = read_prompts(path, field)
    log(f"{len(prompts)} prompts from {path}, batches of {batch_size}")
    t0 = time.perf_counter()
    done = generate(loaded.model, loaded.tokenizer, prompts, sampling, batch_size=batch_size,
                    max_len=loaded.seq_len, layout=loaded.layout, log=log)
    seconds = time.perf_counter() - t0
    new_tokens = sum(len(c.tokens) for c in done)
    rows = [{**rec, "completion": c.text, "finish_reason": c.finish_reason,
             "prompt_tokens": c.prompt_tokens, "new_tokens": len(c.tokens),
             "truncated": c.truncated} for rec, c in zip(records, done)]
    tmp = out.with_name(f".{out.name}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(out)
    log(f"{len(rows)} completions, {new_tokens:,} new tokens in {seconds:.1f} s "
        f"({new_tokens / max(seconds, 1e-9):,.0f} tokens/s) -> {out}")
    return len(rows)




def describe_media(loaded: LoadedRun, modality_name: str, path: Path, prompt: str,
                   sampling: SamplingConfig, out: TextIO = sys.stdout, log: Log = print
                   ) -> Completion:
    """The completion (streamed to `out`) of a document that starts with the image or
    recording at `path` (in the scratch row of the run's first table of that modality), then
    `prompt`."""
    model_cfg = model_from_json(loaded.cfg["model"])
    tables = [t for t in model_cfg.media if t.modality == modality_name]
    if not tables:
        have = ", ".join(sorted({t.modality for t in model_cfg.media})) or "none"
        raise UserError(f"--{modality_name}: {loaded.run.run_id} has no {modality_name} "
                        f"encoder (its media: {have})")
    table = tables[0]
    features, used = media_data.file_features(table, model_cfg.encoders[table.encoder], path)
    model = loaded.model
    index = list(model_cfg.media).index(table)
    var = model.media.tables[index]
    scratch = table.items - 1
    var[...] = var[...].at[scratch].set(features.astype(var[...].dtype))
    tok = loaded.tokenizer
    ids = (media_data.prompt_ids(table, scratch, used, tok.vocab_size, tok.eos_id)
           + (tok.encode(prompt) if prompt else []))
    [(ids, _)] = fit_prompts([ids], loaded.seq_len, sampling.max_new_tokens, log)

    def show(piece: str) -> None:
        out.write(piece)
        out.flush()

    stream = TextStream(tok, sampling.stop, show)
    [row] = Decoder(model, loaded.layout).generate_ids(
        [ids], sampling, eos_id=tok.eos_id, batch_size=1,
        on_token=lambda _, token: stream.push(token))
    done = Completion(text=stream.finish(), tokens=tuple(row.tokens),
                      finish_reason=row.finish_reason, prompt_tokens=len(ids), truncated=0)
    out.write("\n")
    log(f"[{done.finish_reason}: {len(done.tokens)} new tokens after {used} {modality_name} "
        f"tokens from {path}]")
    return done
