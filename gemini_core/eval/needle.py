"""`gx eval RUN --tasks needle`: passkey retrieval over context lengths × needle depths, and the
NLL by token position on long documents, written with their plots to the run directory.

Passkey (Mohtashami & Jaggi 2023, "Landmark attention"): an intro, filler sentences repeated,
the needle "The pass key is 12345. Remember it. 12345 is the pass key." between two filler
sentences at a fraction `depth` of them (0: right after the intro, 1: right before the question),
and the question "What is the pass key? The pass key is"; the answer scored is " 12345". A
cell (length L, depth d) holds `per_cell` prompts with 5-digit keys drawn from a numpy Generator
seeded by (seed, L, d): the same keys every time, other keys in every other cell. L counts the
whole scored row, the leading EOS and the answer included: it is at most L tokens, and one more
filler sentence would take it over. A prompt counts as retrieved when greedy decoding would emit
the key (every answer token is the model's argmax: `scoring.LogLik.greedy`); the key's bits per
byte moves long before accuracy does. Nothing is cut: every cell is scored with a window of its
own length, at positions beyond the training length too (RoPE, scaled if the run says so).

Position curve (the Gemini 1.5 report's cumulative average NLL against token position): the
first L+1 tokens (EOS first, as every document starts in training) of the first documents of
the run's valid file of a domain (books by default) that hold that many, each one row; the mean
NLL at each position over the documents and its running mean.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx

from gemini_core.config import TrackingConfig
from gemini_core.data.sources import BadRecords, domain_file, iter_documents
from gemini_core.data.synthetic import FILLER, answer, assemble
from gemini_core.data.tokenizer import Tokenizer, document_ids
from gemini_core.errors import UserError
from gemini_core.eval import metrics, scoring
from gemini_core.eval.loaded_run import load_run, run_config, run_tokenizer
from gemini_core.model.transformer import Transformer
from gemini_core.runs.rundir import RunDir, write_json_atomic
from gemini_core.runs.wandb_run import add_to_summary
from gemini_core.scale.sharding import Layout
from gemini_core.train.step_fns import jit_sharded

Log = Callable[[str], None]

FILE = "needle.json"
HEATMAP = "needle_heatmap.png"
POSITION_PLOT = "needle_position_nll.png"
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
LENGTH_FACTORS = (0.5, 1, 2, 4)  # of the run's training length

def row_tokens(tokenizer: Tokenizer, prompt: str, key: int) -> int:
    """Tokens of the row the scorer builds: EOS, the prompt and the answer."""
    return len(document_ids(tokenizer, prompt + answer(key)))


def filler_count(tokenizer: Tokenizer, n_tokens: int, depth: float, key: int,
                 guess: int | None = None) -> int:
    """The most filler sentences whose row fits n_tokens (the row grows with every sentence:
    SentencePiece pieces never cross the spaces between them, so a bracketing search holds)."""
    def fits(k: int) -> bool:
        return row_tokens(tokenizer, assemble(k, depth, key), key) <= n_tokens

    base = row_tokens(tokenizer, assemble(0, depth, key), key)
    if base > n_tokens:
        raise UserError(f"a passkey prompt needs at least {base} tokens (intro, needle, question "
                        f"and answer); {n_tokens} is too short")
    if guess is None:
        per = (row_tokens(tokenizer, assemble(len(FILLER), depth, key), key) - base) / len(FILLER)
        guess = int((n_tokens - base) / max(per, 1.0))
    lo, hi, step = 0, None, max(1, guess // 64)  # fits(lo); not fits(hi)
    k = max(guess, 0)
    if fits(k):
        lo = k
        while fits(lo + step):
            lo, step = lo + step, step * 2
        hi = lo + step
    else:
        hi = k
        while hi - step > 0 and not fits(hi - step):
            hi, step = hi - step, step * 2
        lo = max(hi - step, 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def passkey_prompt(tokenizer: Tokenizer, n_tokens: int, depth: float, key: int) -> str:
    """The passkey prompt whose scored row (EOS + prompt + " {key}") is at most n_tokens long,
    within one filler sentence of it, the needle at `depth` (module doc)."""
    return assemble(filler_count(tokenizer, n_tokens, depth, key), depth, key)


def cell_keys(seed: int, length: int, depth: float, n: int) -> list[int]:
    """The cell's 5-digit keys: seeded by the cell itself, so a cell keeps its keys whatever
    else the grid holds."""
    rng = np.random.default_rng([seed, length, round(depth * 10_000)])
    return [int(k) for k in rng.integers(10_000, 100_000, size=n)]


def cell_requests(tokenizer: Tokenizer, length: int, depth: float, keys: Sequence[int]
                  ) -> list[tuple[str, str]]:
    """(prompt, answer) for each key of a cell."""
    out, guess = [], None
    for key in keys:
        guess = filler_count(tokenizer, length, depth, key, guess)
        out.append((assemble(guess, depth, key), answer(key)))
    return out


# ---------------------------------------------------------------------------------------------
# the grid


def needle_grid(model: Transformer, tokenizer: Tokenizer, *, lengths: Sequence[int],
                depths: Sequence[float], per_cell: int = 10, seed: int = 0,
                batch_size: int = 8, layout: Layout | None = None, log: Log = print) -> dict:
    """{"cells": [{length, depth, accuracy, accuracy_stderr, bpb, n, keys, greedy}, ...]}, in
    (length, depth) order; each length scored in one pass with a window of that length."""
    cells = []
    t0 = time.perf_counter()
    for length in lengths:
        keys = {d: cell_keys(seed, length, d, per_cell) for d in depths}
        requests = [r for d in depths for r in cell_requests(tokenizer, length, d, keys[d])]
        liks = scoring.loglikelihood(model, tokenizer, requests, seq_len=length,
                                     batch_size=batch_size, layout=layout, log=log)
        cut = [i for i, x in enumerate(liks) if x.truncated]
        if cut:  # the rows are built to fit their window: a cut one is a bug, not a result
            raise RuntimeError(f"needle: {len(cut)} prompts of length {length} were truncated "
                               f"({liks[cut[0]].truncated} tokens of the first)")
        for j, depth in enumerate(depths):
            part = liks[j * per_cell:(j + 1) * per_cell]
            cells.append(cell_record(length, depth, keys[depth], part))
        log(f"needle: {length:,} tokens: {len(cells)}/{len(lengths) * len(depths)} cells, "
            f"{time.perf_counter() - t0:.1f} s")
    return {"cells": cells}


def cell_record(length: int, depth: float, keys: Sequence[int],
                liks: Sequence[scoring.LogLik]) -> dict:
    acc = metrics.mean_stderr([float(x.greedy) for x in liks])
    bpb = metrics.mean_stderr([metrics.bits_per_byte(x.nll, x.bytes) for x in liks])
    return {"length": int(length), "depth": float(depth), "accuracy": acc.value,
            "accuracy_stderr": _finite(acc.stderr), "bpb": bpb.value,
            "bpb_stderr": _finite(bpb.stderr), "n": acc.n, "keys": list(keys),
            "greedy": [bool(x.greedy) for x in liks]}


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x  # JSON has no NaN


# ---------------------------------------------------------------------------------------------
# NLL by position


def long_rows(tokenizer: Tokenizer, texts: Iterable[str], length: int, documents: int
              ) -> np.ndarray:
    """tokens_Nx(L+1): the first L+1 document ids of each text that has them, N <= documents."""
    rows = []
    for text in texts:
        ids = document_ids(tokenizer, text)
        if len(ids) > length:
            rows.append(ids[:length + 1])
            if len(rows) == documents:
                break
    return np.asarray(rows, np.int32).reshape(len(rows), length + 1)


def position_nll(model: Transformer, tokenizer: Tokenizer, texts: Iterable[str], length: int,
                 *, documents: int = 8, batch_size: int = 8, layout: Layout | None = None
                 ) -> dict | None:
    """{length, documents, mean_nll (L,), cumulative (L,)} over the first `documents` texts of
    at least `length` predictions; None when no text is that long."""
    tokens_NxL1 = long_rows(tokenizer, texts, length, documents)
    if not len(tokens_NxL1):
        return None
    nll_NxL = token_nll_rows(model, tokens_NxL1, batch_size, layout)
    mean_L = nll_NxL.mean(axis=0)
    cumulative_L = np.cumsum(mean_L) / np.arange(1, length + 1)
    return {"length": length, "documents": len(tokens_NxL1), "mean_nll": mean_L,
            "cumulative": cumulative_L}


def token_nll_rows(model: Transformer, tokens_NxL1: np.ndarray, batch_size: int,
                   layout: Layout | None) -> np.ndarray:
    """Next-token NLL (nats) of every row, (N, L) float64, in batches of one padded shape."""
    graphdef, state = nnx.split(model)

    def nll(state, tokens_BxL1):
        return nnx.merge(graphdef, state).token_nll(tokens_BxL1[:, :-1], tokens_BxL1[:, 1:])

    shards = 1 if layout is None else layout.batch_shards
    fn = jax.jit(nll) if layout is None else jit_sharded(nll, layout, donate=False)
    rows = -(-max(1, min(batch_size, len(tokens_NxL1))) // shards) * shards
    out = []
    for start in range(0, len(tokens_NxL1), rows):
        part = tokens_NxL1[start:start + rows]
        padded = np.zeros((rows, part.shape[1]), np.int32)  # empty rows: a single shape
        padded[:len(part)] = part
        out.append(np.asarray(fn(state, padded), np.float64)[:len(part)])
    return np.concatenate(out)


def corpus_texts(cfg: dict, domain: str, log: Log) -> Iterator[str]:
    """The run's valid documents of a domain; a missing folder or file is one line, not an
    error (the curve is an extra: the grid is the result)."""
    try:
        path = domain_file(Path(cfg.get("paths", {}).get("data_root", "")), domain,
                           cfg["data"]["valid_file"])
        yield from iter_documents(path, cfg["data"]["text_field"], "skip", BadRecords())
    except UserError as e:
        log(f"needle: no {domain} documents for the position curve: {e}")


def quarters(mean_L: np.ndarray) -> list[float]:
    """The mean NLL over each quarter of the positions."""
    return [float(q.mean()) for q in np.array_split(mean_L, 4)]


# ---------------------------------------------------------------------------------------------
# gx eval RUN --tasks needle


def parse_lengths(text: str, flag: str = "--needle-lengths") -> tuple[int, ...]:
    values = _parse_list(text, flag, int, "a whole number of tokens")
    check_lengths(values, flag)
    return values


def parse_depths(text: str, flag: str = "--needle-depths") -> tuple[float, ...]:
    values = _parse_list(text, flag, float, "a number")
    check_depths(values, flag)
    return values


def _parse_list(text: str, flag: str, kind: type, what: str) -> tuple:
    values = []
    for item in text.split(","):
        try:
            values.append(kind(item.strip()))
        except ValueError:
            raise UserError(f"{flag}={text}: {item.strip()!r} is not {what}") from None
    return tuple(values)


def check_lengths(lengths: Sequence[int], flag: str = "--needle-lengths") -> None:
    given = ",".join(map(str, lengths))
    bad = [x for x in lengths if x <= 0]
    if bad or not lengths:
        raise UserError(f"{flag}={given}: every length must be a positive number of tokens")
    _no_repeats(lengths, flag, given)


def check_depths(depths: Sequence[float], flag: str = "--needle-depths") -> None:
    given = ",".join(f"{d:g}" for d in depths)
    bad = [x for x in depths if not 0.0 <= x <= 1.0]  # NaN too
    if bad or not depths:
        raise UserError(f"{flag}={given}: every depth must be a fraction in [0, 1] (0: right "
                        "after the intro, 1: right before the question)")
    _no_repeats(depths, flag, given)


def _no_repeats(values: Sequence[float], flag: str, given: str) -> None:
    twice = next((x for i, x in enumerate(values) if x in values[:i]), None)
    if twice is not None:
        raise UserError(f"{flag}={given}: {twice:g} is given twice")


def shortest_row(tokenizer: Tokenizer, length: int, depths: Sequence[float], per_cell: int,
                 seed: int) -> int:
    """Tokens of the longest of a length's cells' prompts without any filler: the intro, the
    needle, the question and the answer (tokenizer work only)."""
    return max(row_tokens(tokenizer, assemble(0, d, k), k)
               for d in depths for k in cell_keys(seed, length, d, per_cell))


def checked_grid(tokenizer: Tokenizer, seq_len: int, lengths: Sequence[int] | None,
                 depths: Sequence[float] | None, per_cell: int, seed: int, log: Log
                 ) -> tuple[list[int], list[float]]:
    """The grid's lengths and depths, sorted, every value checked (before any checkpoint loads).
    Default lengths too short for the prompt are left out with a line; given ones are an
    error."""
    depths = [float(d) for d in (DEPTHS if depths is None else depths)]
    check_depths(depths)
    if per_cell < 1:
        raise UserError(f"--limit={per_cell}: needle needs at least 1 prompt per cell")
    default = lengths is None
    lengths = sorted({max(1, int(seq_len * f)) for f in LENGTH_FACTORS} if default
                     else [int(x) for x in lengths])
    check_lengths(lengths)
    need = {n: shortest_row(tokenizer, n, depths, per_cell, seed) for n in lengths}
    short = [n for n in lengths if need[n] > n]
    if short and not default:
        raise UserError(f"--needle-lengths={','.join(map(str, lengths))}: {short[0]} tokens is "
                        f"shorter than the passkey prompt's intro, needle, question and answer "
                        f"({need[short[0]]} tokens with this run's tokenizer)")
    if short:
        fit = [n for n in lengths if n not in short]
        if not fit:
            raise UserError(f"needle: the default lengths {', '.join(map(str, lengths))} (0.5 to "
                            f"4 × the run's {seq_len}-token training length) are all shorter "
                            f"than the passkey prompt ({max(need.values())} tokens): give "
                            "--needle-lengths")
        log(f"needle: lengths {', '.join(map(str, short))} left out: shorter than the passkey "
            f"prompt ({max(need[n] for n in short)} tokens)")
        lengths = fit
    return lengths, sorted(depths)


def evaluate_needle(run: RunDir, *, lengths: Sequence[int] | None = None,
                    depths: Sequence[float] | None = None, per_cell: int = 10, seed: int = 0,
                    batch_size: int = 8, domain: str = "books", documents: int = 8,
                    wandb: bool | None = None, log: Log = print) -> dict:
    """The grid and the position curve of a run's newest checkpoint, into needle.json and two
    PNGs in its directory (every value checked before the checkpoint loads), and into its W&B
    summary (`wandb`: None = as the run tracks, tracking.wandb); returns the JSON."""
    cfg = run_config(run)
    tokenizer = run_tokenizer(run, cfg)
    seq_len = int(cfg["data"]["seq_len"])
    lengths, depths = checked_grid(tokenizer, seq_len, lengths, depths, per_cell, seed, log)
    if batch_size < 1:
        raise UserError(f"--batch-size={batch_size}: must be positive")

    loaded = load_run(run, log=lambda msg: log(f"eval: {msg}"))
    log(f"{run.run_id} at step {loaded.step}: needle, {len(lengths)} lengths × {len(depths)} "
        f"depths × {per_cell} prompts (trained at {seq_len:,} tokens)")
    grid = needle_grid(loaded.model, tokenizer, lengths=lengths, depths=depths,
                       per_cell=per_cell, seed=seed, batch_size=batch_size,
                       layout=loaded.layout, log=log)
    longest = max(lengths)
    curve = position_nll(loaded.model, tokenizer, corpus_texts(cfg, domain, log), longest,
                         documents=documents,
                         batch_size=max(1, batch_size * seq_len // longest),
                         layout=loaded.layout)
    heatmap, position_png = run.path / HEATMAP, run.path / POSITION_PLOT
    write_heatmap(heatmap, grid["cells"], run_id=run.run_id, seq_len=seq_len, step=loaded.step)
    saved = [heatmap]
    if curve is None:
        log(f"needle: no {domain} document has {longest + 1:,} tokens: the position plot is "
            "skipped")
        position_png.unlink(missing_ok=True)  # a stale one would describe another evaluation
    else:
        write_position(position_png, curve, run_id=run.run_id, seq_len=seq_len, domain=domain)
        saved.append(position_png)
    content = {
        "run_id": run.run_id, "step": loaded.step, "seq_len": seq_len,
        "settings": {"lengths": list(lengths), "depths": list(depths), "per_cell": per_cell,
                     "seed": seed, "domain": domain, "documents": documents},
        "cells": grid["cells"],
        "position_nll": None if curve is None else {
            "length": curve["length"], "documents": curve["documents"], "domain": domain,
            "quarters": quarters(curve["mean_nll"]),
            "cumulative_final": float(curve["cumulative"][-1])},
    }
    write_json_atomic(run.path / FILE, content)
    saved.append(run.path / FILE)
    log(format_table(content))
    log("saved " + ", ".join(os.fspath(p) for p in saved))
    said = publish(run, cfg, content, [p for p in saved if p.suffix == ".png"], wandb)
    if said:
        log(said)
    return content


def publish(run: RunDir, cfg: dict, content: dict, images: Sequence[Path],
            wandb: bool | None) -> str | None:
    """needle/acc (all cells), needle/acc/<length> (over depths) and the plots into the run's
    W&B summary, beside its training curves."""
    tracking = TrackingConfig(**{**cfg.get("tracking", {}),
                                 **({} if wandb is None else {"wandb": wandb})})
    values = {"needle/acc": float(np.mean([c["accuracy"] for c in content["cells"]]))}
    for length in content["settings"]["lengths"]:
        values[f"needle/acc/{length}"] = float(np.mean(
            [c["accuracy"] for c in content["cells"] if c["length"] == length]))
    names = {HEATMAP: "needle/heatmap", POSITION_PLOT: "needle/position_nll"}
    return add_to_summary(run.path, run_id=run.run_id, group=cfg.get("name", ""),
                          config=run.config(), tracking=tracking, values=values,
                          images={names[p.name]: p for p in images})


def format_table(content: dict) -> str:
    """Accuracy (and the key's bpb) by depth (rows) and length (columns)."""
    cells = content["cells"]
    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    by = {(c["length"], c["depth"]): c for c in cells}
    lines = [(f"passkey accuracy (greedy) of {content['run_id']} at step {content['step']}, "
              f"trained at {content['seq_len']:,} tokens; key bpb below")]
    head = "depth \\ length" + "".join(f"{n:>10,}" for n in lengths)
    for metric, fmt in (("accuracy", "{:>10.0%}"), ("bpb", "{:>10.3f}")):
        lines += ["", head]
        for d in depths:
            lines.append(f"{d:<14.2f}" + "".join(fmt.format(by[(n, d)][metric])
                                                  for n in lengths))
        lines.append(f"{'mean':<14}" + "".join(
            fmt.format(np.mean([by[(n, d)][metric] for d in depths])) for n in lengths))
    curve = content.get("position_nll")
    if curve:
        lines += ["", f"NLL by position, {curve['documents']} {curve['domain']} documents of "
                  f"{curve['length']:,} tokens, mean per quarter: "
                  + ", ".join(f"{q:.3f}" for q in curve["quarters"])]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# plots (matplotlib's Figure without pyplot: no global backend, nothing needs a display)


def _save_png(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, path)


def write_heatmap(path: Path, cells: Sequence[dict], *, run_id: str, seq_len: int,
                  step: int) -> None:
    """Accuracy by length (x) and depth (y, 0 at the top), each cell annotated, as the Gemini
    1.5 report draws its needle grids; a dashed line where the training length is passed."""
    from matplotlib.figure import Figure

    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    by = {(c["length"], c["depth"]): c["accuracy"] for c in cells}
    acc_DxN = np.array([[by[(n, d)] for n in lengths] for d in depths])
    # wide enough for the two-line title with few lengths
    fig = Figure(figsize=(max(5.0, 1.2 + 1.1 * len(lengths)), 1.8 + 0.55 * len(depths)),
                 layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(acc_DxN, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{acc_DxN[i, j]:.0%}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(lengths)), [f"{n:,}\n({n / seq_len:g}×)" for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    beyond = [j for j, n in enumerate(lengths) if n > seq_len]
    if beyond and beyond[0] > 0:
        ax.axvline(beyond[0] - 0.5, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel("context length (tokens; × the training length)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{run_id} (step {step})\npasskey retrieval, trained at {seq_len:,} tokens",
                 fontsize=10)
    fig.colorbar(image, ax=ax, label="accuracy (greedy)")
    _save_png(fig, path)


def write_position(path: Path, curve: dict, *, run_id: str, seq_len: int, domain: str) -> None:
    """Cumulative average NLL against token position (log x), each position's mean faint."""
    from matplotlib.figure import Figure

    positions = np.arange(1, curve["length"] + 1)
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    ax.plot(positions, curve["mean_nll"], color="#1f77b4", alpha=0.25, linewidth=0.6,
            label="mean NLL at the position")
    ax.plot(positions, curve["cumulative"], color="#d62728", linewidth=1.8,
            label="cumulative average NLL")
    if seq_len < curve["length"]:
        ax.axvline(seq_len, color="black", linestyle="--", linewidth=1,
                   label=f"training length ({seq_len:,})")
    ax.set_xscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel("NLL (nats)")
    ax.set_title(f"{run_id}: NLL by position, {curve['documents']} {domain} documents",
                 fontsize=10)
    ax.legend(fontsize=8)
    _save_png(fig, path)
