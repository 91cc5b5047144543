"""`gx eval RUN --data DIR`: a finished run's final checkpoint on another folder of domains.

The folder is tokenized with the run's own tokenizer (from the data cache recorded in the
run's config.json), into a temporary directory, and evaluated exactly as training evaluates:
fixed windows of seq_len+1 tokens from the start of each domain file, loss and bits per byte.
The result is printed and saved as `eval/<name>.json` in the run dir. The run is loaded by
`loaded_run.load_run` (its mesh here, read-only).
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Callable

from gemini_core.data.tokens import encode_split
from gemini_core.errors import UserError
from gemini_core.eval.domain_loss import EvalSet, evaluate, format_table
from gemini_core.eval.loaded_run import load_run
from gemini_core.runs.rundir import RunDir, write_json_atomic
from gemini_core.train import step_fns

Log = Callable[[str], None]


def evaluate_run(run: RunDir, data_dir: Path, *, split: str | None = None,
                 batches: int | None = None, log: Log = print) -> dict[str, float]:
    if batches is not None and batches <= 0:
        raise UserError(f"--batches={batches}: must be a positive number of batches per domain")
    if not data_dir.is_dir():
        what = "not a directory" if data_dir.exists() else "no such directory"
        raise UserError(f"--data={str(data_dir)!r}: {what} (a folder with one folder per domain)")
    loaded = load_run(run, log=lambda m: log(f"eval: {m}"))
    data, train = loaded.cfg["data"], loaded.cfg["train"]
    split = split or data["valid_file"]
    batches = batches or train["eval_batches"]
    tokenizer, layout, state, step = loaded.tokenizer, loaded.layout, loaded.state, loaded.step
    with tempfile.TemporaryDirectory(dir=run.path) as tmp:
        encoded = encode_split(tokenizer, data_dir, data["domains"], split, Path(tmp),
                               split="eval", text_field=data["text_field"],
                               on_bad_record=data["on_bad_record"],
                               num_workers=data["num_workers"], log=log)
        evalset = EvalSet.build({d: e.tokens for d, e in encoded.items()},
                                tokenizer.token_bytes(), seq_len=data["seq_len"],
                                batch_size=train["batch_size"], batches=batches)
        metrics = evaluate(step_fns.make_eval_step(loaded.graphdef, layout), state, evalset,
                           train["batch_size"])
        sources = {d: e.entry["sha256"] for d, e in encoded.items()}
    log(f"{run.run_id} at step {step} on {data_dir} ({split}, {evalset.tokens:,} tokens):")
    log(format_table(metrics))
    name = hashlib.sha256(repr(sorted(sources.items())).encode()).hexdigest()[:12]
    out = run.path / "eval" / f"{split.split('.')[0]}-{name}.json"
    write_json_atomic(out, {"run_id": run.run_id, "step": step, "data": str(data_dir.absolute()),
                            "split": split, "sources": sources, "batches": batches,
                            "metrics": metrics})
    log(f"saved {out}")
    return metrics
