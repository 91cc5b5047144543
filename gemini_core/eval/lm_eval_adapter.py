"""lm-evaluation-harness (lm_eval 0.4) model "gx": a gx run's newest checkpoint as an `lm_eval` LM.

lm_eval 0.4.13 finds models only in its own fixed table, not through package entry points, so
importing this module registers the class under the name "gx" (`@register_model`), and
`gx lm-eval ARGS` (`main`) imports it and then runs lm_eval's own command line with ARGS:

    gx lm-eval --model gx --model_args run=RUN --tasks piqa_local --include_path DIR

From Python, import this module, then `lm_eval.simple_evaluate(model="gx",
model_args="run=RUN", tasks=[...], task_manager=TaskManager(include_path=DIR))`.

model_args: run= a run directory or a run id (a unique prefix, as `gx show` takes), runs_root=
where ids are looked up (else $GX_RUNS_ROOT, else ./runs), batch_size= rows per scoring batch
and prompts per generation batch (lm_eval's --batch_size sets it too; "auto" = gx's defaults).

Every request goes through the scorers and the generator `gx eval` and `gx generate` use, so the
numbers are gx's own: texts are document starts (EOS first, as training packs documents),
context and continuation are tokenized together, contexts longer than the run's seq_len lose
tokens from the left (counted in a log line), and a prompt to generate from keeps its last
seq_len - max_gen_toks tokens. lm_eval's acc_norm divides by the choice's length in characters
without the target delimiter, as gx's shipped tasks do (gemini_core/eval/task_library.py).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gemini_core.errors import UserError

try:
    import lm_eval.models  # lm_eval's own models stay known beside "gx"
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import normalize_gen_kwargs
except ImportError as e:  # an optional extra
    raise UserError(f"lm-evaluation-harness is not installed ({e}): pip install -e '.[lmeval]' "
                    "(lm_eval==0.4.13)") from None

from gemini_core.eval import scoring
from gemini_core.eval.loaded_run import LoadedRun, load_run
from gemini_core.model import generate as gen
from gemini_core.runs.rundir import find_run
from gemini_core.runs.rundir import runs_root as resolve_runs_root

SCORE_BATCH = 32  # scoring.loglikelihood's default
GENERATE_BATCH = 8  # generate.generate's default
SAMPLING_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p", "seed")


def log(message: str) -> None:
    # stderr: lm_eval prints its results table on stdout
    print(message, file=sys.stderr, flush=True)


@register_model("gx")
class GxLM(LM):
    """A gx run for lm_eval: loglikelihood, loglikelihood_rolling and generate_until."""

    def __init__(self, run: str | os.PathLike | None = None,
                 runs_root: str | os.PathLike | None = None,
                 batch_size: int | str | None = None, max_batch_size: int | None = None,
                 device: str | None = None, **unknown: Any):
        # max_batch_size and device: lm_eval passes its flags of those names to every model;
        # gx has no batch size search, and the run's mesh decides where the model lives
        super().__init__()
        if unknown:
            raise UserError(f"--model_args {', '.join(sorted(unknown))}: unknown for model gx "
                            "(known: run, runs_root, batch_size)")
        if not run:
            raise UserError("--model_args run=RUN: model gx needs a run (a run directory or id)")
        root = resolve_runs_root(str(runs_root) if runs_root is not None else None)
        self.loaded: LoadedRun = load_run(find_run(root, str(run)), log=log)
        self.model = self.loaded.model  # merged once: every request reuses it
        self.tokenizer = self.loaded.tokenizer
        chosen = parse_batch_size(batch_size)
        self.score_batch = chosen or SCORE_BATCH
        self.generate_batch = chosen or GENERATE_BATCH
        log(f"lm-eval: {self.loaded.run.run_id} at step {self.loaded.step}, "
            f"seq_len {self.max_length}")

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        # lm_eval passes its --batch_size (default 1) beside model_args; lm_eval's own merge
        # would fail on batch_size given in both, so model_args win
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    @property
    def max_length(self) -> int:
        return self.loaded.seq_len

    def get_model_info(self) -> dict:
        """Recorded in lm_eval's results["config"]."""
        return {"gx_run": self.loaded.run.run_id, "gx_run_dir": str(self.loaded.run.path),
                "gx_step": self.loaded.step, "gx_seq_len": self.max_length}

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        pairs = [(str(r.args[0]), str(r.args[1])) for r in requests]
        if not pairs:
            return []
        scores = scoring.loglikelihood(self.model, self.tokenizer, pairs, seq_len=self.max_length,
                                       batch_size=self.score_batch, layout=self.loaded.layout,
                                       log=log)
        out = [(-s.nll, s.greedy) for s in scores]
        for pair, result in zip(pairs, out):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return out

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        texts = [str(r.args[0]) for r in requests]
        if not texts:
            return []
        scores = scoring.loglikelihood_rolling(self.model, self.tokenizer, texts,
                                               seq_len=self.max_length,
                                               batch_size=self.score_batch,
                                               layout=self.loaded.layout)
        out = [-s.nll for s in scores]
        for text, result in zip(texts, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), result)
        return out

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Requests with equal generation settings are generated together, in batches."""
        groups: dict[gen.SamplingConfig, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(sampling_of(r.args[1]), []).append(i)
        texts: list[str] = [""] * len(requests)
        for sampling, indices in groups.items():
            done = gen.generate(self.model, self.tokenizer,
                                [str(requests[i].args[0]) for i in indices], sampling,
                                batch_size=self.generate_batch, max_len=self.max_length,
                                layout=self.loaded.layout, log=log)
            for i, completion in zip(indices, done):
                texts[i] = completion.text
                self.cache_hook.add_partial("generate_until", requests[i].args, completion.text)
        return texts


def parse_batch_size(value: int | str | None) -> int | None:
    """lm_eval's --batch_size: a positive number, or None / "auto" / "auto:N" for gx's
    defaults (gx batches by length buckets, so there is no batch size to search for)."""
    if value is None or str(value).startswith("auto"):
        return None
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise UserError(f"batch_size={value!r}: must be a positive number or auto")
    return size


def sampling_of(gen_kwargs: dict) -> gen.SamplingConfig:
    """A request's lm_eval generation kwargs as gx sampling: `until` are the stop strings,
    max_gen_toks the new tokens, greedy unless do_sample with a temperature."""
    kwargs = normalize_gen_kwargs(dict(gen_kwargs or {}))
    unknown = sorted(k for k in kwargs if k not in SAMPLING_KEYS)
    if unknown:
        raise UserError(f"generation kwargs {', '.join(unknown)}: not supported by model gx "
                        f"(supported: {', '.join(SAMPLING_KEYS)})")
    until = kwargs["until"]
    stop = tuple(s for s in ([until] if isinstance(until, str) else until or []) if s)
    temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
    return gen.SamplingConfig(max_new_tokens=int(kwargs["max_gen_toks"]), temperature=temperature,
                              top_k=int(kwargs.get("top_k") or 0),
                              top_p=float(kwargs.get("top_p") or 1.0),
                              seed=int(kwargs.get("seed") or 0), stop=stop
                              ).validate("generation kwargs")


def with_default_batch(argv: list[str]) -> list[str]:
    """argv with `--batch_size auto` added to an evaluation that does not set one: lm_eval's
    default of 1 would score one request at a time."""
    if argv and argv[0] in ("ls", "validate") or {"-h", "--help"} & set(argv):
        return argv
    if any(a == "--batch_size" or a.startswith("--batch_size=") for a in argv):
        return argv
    return [*argv, "--batch_size", "auto"]


def main(argv: Sequence[str], runs_root: str | os.PathLike | None = None) -> int:
    """`gx lm-eval ARGS`: lm_eval's command line with model "gx" known. runs_root (gx's
    --runs-root) is where run ids in --model_args are looked up."""
    from lm_eval.__main__ import cli_evaluate

    saved_argv, saved_root = sys.argv, os.environ.get("GX_RUNS_ROOT")
    sys.argv = ["gx lm-eval", *with_default_batch(list(argv))]  # lm_eval's parser reads sys.argv
    if runs_root is not None:
        os.environ["GX_RUNS_ROOT"] = str(Path(runs_root).absolute())
    try:
        cli_evaluate()
    except SystemExit as e:  # argparse's --help and usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else _say(e.code))
    except ValueError as e:
        if not raised_in_lm_eval(e):
            raise
        hint = (" (lm_eval's own tasks: `gx lm-eval ls tasks`; task YAMLs of your own: "
                "--include_path DIR)") if "task" in str(e).lower() else ""
        raise UserError(f"lm-eval: {e}{hint}") from None
    finally:
        sys.argv = saved_argv
        if runs_root is not None:
            if saved_root is None:
                os.environ.pop("GX_RUNS_ROOT", None)
            else:
                os.environ["GX_RUNS_ROOT"] = saved_root
    return 0


def raised_in_lm_eval(e: BaseException) -> bool:
    """Whether lm_eval itself raised `e`: its ValueErrors judge what it was given (unknown
    tasks, clashing flags, a task YAML's values), while one raised in gx is a bug of gx's."""
    frames = traceback.extract_tb(e.__traceback__)
    package = Path(lm_eval.__file__).parent
    return bool(frames) and Path(frames[-1].filename).is_relative_to(package)


def _say(message: object) -> int:
    print(message, file=sys.stderr)
    return 2
