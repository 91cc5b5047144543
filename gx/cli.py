"""`gx`: the command line. Thin: parse, call the library, print; exit 0 ok, 2 user error, 1 bug."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from gemini_core.errors import TrainingStopped, UserError
from gx import sweep_cli

EPILOG = """examples:
  gx run experiments/quickstart.py --config.data.root=../shared/corpus
  gx run experiments/pretrain.py:size=nano --dry-run
  gx run experiments/gemini_recipe.py:size=tiny --config.params.corpus=../shared/corpus [--dry-run] [--force STEP]
  gx ls
  gx show quickstart-1a2b3c4d
  gx eval quickstart-1a2b3c4d --data ../shared/corpus --split valid.jsonl.gz
  gx eval quickstart-1a2b3c4d --tasks arc_easy,piqa,gsm8k --limit 200
  gx eval quickstart-1a2b3c4d --tasks arc_easy,gsm8k --split heldout
  gx generate quickstart-1a2b3c4d --prompt "Question: What is 2 + 3?\nAnswer:" --max-new-tokens 32
  gx lm-eval --model gx --model_args run=quickstart-1a2b3c4d --tasks my_task --include_path DIR
  gx data prepare experiments/data_prep.py --config.data.root=../shared/corpus
  gx data report runs/data/data_prep-1a2b3c4d
  gx data contamination --tasks gsm8k,arc_easy --data-root ../shared/corpus
  gx sweep experiments/mixture_sweep.py:size=tiny --config.proxy.data.root=../shared/corpus
  gx compare mixture_sweep_tiny
  gx fit results.csv --holdout heldout.csv
  gx scaling run experiments/scaling_ladder.py:size=tiny --config.base.data.root=../shared/corpus
  gx scaling fit scaling_ladder_tiny --holdout-largest 1
  gx run experiments/distill_nano.py --config.data.root=../shared/corpus --config.distill.teacher=RUN_ID
  gx plan --compute 1e21 --inference-tokens 1e12
Runs live in ./runs (or $GX_RUNS_ROOT, or --runs-root)."""


handlers: dict = {}  # command -> fn(args, overrides) -> exit code: sweep, fit, compare, scaling


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (the usage is one `--help` away) and exit 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="gx", description="Declarative LLM pretraining experiments on JAX.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs-root", default=None, help="where runs live (default: $GX_RUNS_ROOT or ./runs)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="train an experiment (reuses a done run, resumes an interrupted one)",
                         description="Train EXPERIMENT, a file path.py[:arg] defining get_config(arg). "
                         "Override any field with --config.a.b=value (ml_collections syntax).")
    run.add_argument("experiment", nargs="?", help="experiment file, e.g. experiments/quickstart.py or experiments/pretrain.py:size=nano")
    run.add_argument("--force", nargs="?", const=True, default=False, metavar="STEP",
                     help="rerun even if a done run with this fingerprint exists; for a recipe "
                     "(experiments/gemini_recipe.py), the step to rerun")
    run.add_argument("--dry-run", action="store_true", help="validate and print the plan; read no data, compile nothing")

    ls = sub.add_parser("ls", help="list runs with state, step and final eval/mean/loss")
    ls.add_argument("experiment", nargs="?", help="only this experiment's runs")

    show = sub.add_parser("show", help="a run's config differences from its experiment's defaults, and its summary")
    show.add_argument("run", help="run id (a unique prefix is enough) or run directory")

    ev = sub.add_parser("eval", help="a run's final checkpoint: per-domain loss and bpb on a data folder (--data), or downstream tasks (--tasks)")
    ev.add_argument("run", help="run id (a unique prefix is enough) or run directory")
    what = ev.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", help="folder with the same <domain>/ layout as the training data")
    what.add_argument("--tasks", help="comma-separated downstream tasks: shipped names "
                      "(arc_easy, arc_challenge, piqa, lambada, xcopa, gsm8k, humaneval, mbpp) "
                      "and task files (my_tasks.py defining get_tasks()), mixed as you like; "
                      "`needle`: the passkey grid over lengths x depths and NLL by position "
                      "(needle.json and two plots in the run directory)")
    ev.add_argument("--limit", type=int, default=None, help="--tasks: examples per task, a fixed seeded subset (default: each task's own; 0 = all); for needle: prompts per cell (default 10)")
    ev.add_argument("--shots", type=int, default=-1, help="--tasks: few-shot examples (default: each task's own)")
    ev.add_argument("--batch-size", type=int, default=None, help="--tasks: scoring and generation batch (default 32; needle: 8)")
    ev.add_argument("--needle-lengths", default=None, metavar="N,N,...", help="needle: context lengths in tokens (default: 0.5, 1, 2 and 4 x the run's training length)")
    ev.add_argument("--needle-depths", default=None, metavar="D,D,...", help="needle: where the needle sits, fractions in [0, 1] (default: 0,0.25,0.5,0.75,1)")
    ev.add_argument("--split", default=None, help="--data: file name inside each domain folder (default: the run's valid file); "
                    "--tasks: all (default), search or heldout: one fixed half of each task's examples "
                    "(a mixture sweep's proxies score search, its validation heldout), reported as <task>@<split>")
    ev.add_argument("--batches", type=int, default=None, help="batches per domain (default: the run's eval_batches)")

    ge = sub.add_parser("generate", help="complete a prompt (streamed) or a file of prompts with a run's checkpoint",
                        description="Sample from RUN's newest checkpoint: greedy by default; "
                        "--temperature, --top-k and --top-p sample, seeded by --seed.")
    ge.add_argument("run", help="run id (a unique prefix is enough) or run directory")
    src = ge.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="one prompt; its completion streams to stdout (after "
                     "--image/--audio when given)")
    src.add_argument("--prompts", help="a JSON-lines file, one object per prompt (see --field)")
    media = ge.add_mutually_exclusive_group()
    media.add_argument("--image", help="a multimodal run: describe this image (.png, .pgm, .npy, "
                       "IDX), optionally continuing --prompt")
    media.add_argument("--audio", help="a multimodal run: describe this recording (mono PCM WAV "
                       "at the training rate), optionally continuing --prompt")
    ge.add_argument("--field", default="prompt", help="--prompts: the prompt's field (default: prompt)")
    ge.add_argument("--out", default=None, help="--prompts: where the completions go (default: FILE.completions.jsonl beside it)")
    ge.add_argument("--max-new-tokens", type=int, default=128)
    ge.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ge.add_argument("--top-k", type=int, default=0, help="0 = off (default)")
    ge.add_argument("--top-p", type=float, default=1.0, help="1 = off (default)")
    ge.add_argument("--seed", type=int, default=0)
    ge.add_argument("--stop", action="append", default=[], metavar="TEXT",
                    help="a stop string (repeatable; \\n and \\t are a newline and a tab); the stop string is not returned")
    ge.add_argument("--batch-size", type=int, default=8, help="--prompts: prompts per batch (default 8)")

    lm = sub.add_parser("lm-eval", help="lm-evaluation-harness on a gx run (pip install -e '.[lmeval]')",
                        description="lm_eval's own command line with the `gx` model registered: "
                        "--model gx --model_args run=RUN_ID_OR_DIR[,runs_root=DIR,batch_size=N].")
    lm.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="arguments for lm_eval")

    data = sub.add_parser("data", help="data curation: prepare a cleaned data root, reports",
                          description="Data curation (gemini_core/curation).")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    prep = dsub.add_parser("prepare", help="filter, dedup and write a cleaned data root + report",
                           description="Run the curation pipeline declared in EXPERIMENT "
                           "(get_config -> a CurationConfig; see experiments/data_prep.py). "
                           "Override any field with --config.a.b=value.")
    prep.add_argument("experiment", help="e.g. experiments/data_prep.py")
    prep.add_argument("--workers", type=int, default=0, help="Ray workers (default: config.workers, 0 = all cores)")
    prep.add_argument("--strict", action="store_true", help="any bad record is an error (exit 2); nothing is written")
    prep.add_argument("--force", action="store_true", help="redo even if this output is already prepared")
    rep = dsub.add_parser("report", help="print the report of a prepared data root")
    rep.add_argument("dir", help="the output dir printed by `gx data prepare`")
    tc = dsub.add_parser("train-classifier", help="train (or reuse) the quality classifier and print its held-out metrics")
    tc.add_argument("experiment", help="e.g. experiments/data_prep.py")
    tr = dsub.add_parser("tokenizer-report", help="bytes/token per domain: tokenizer on the mix vs one domain vs raw bytes",
                         description="Uses EXPERIMENT's data and tokenizer settings (a training experiment, "
                         "e.g. experiments/quickstart.py).")
    tr.add_argument("experiment", help="e.g. experiments/quickstart.py")
    tr.add_argument("--single-domain", default="web", help="the one-domain tokenizer's domain (default: web)")
    co = dsub.add_parser("contamination", help="share of benchmark examples sharing a 13-word n-gram with a data root",
                         description="Per task: examples whose prompt or answer shares a word n-gram with a "
                         "document of DATA_ROOT (gemini_core/data/curation/contamination.py); a table, and JSON.")
    co.add_argument("--tasks", required=True, help="comma-separated task names, e.g. gsm8k,arc_easy")
    co.add_argument("--data-root", required=True, help="folder with one folder per domain, e.g. ../shared/corpus")
    co.add_argument("--benchmarks", default=None, help="folder of <task>/data.jsonl.gz (default: benchmarks/ beside the data root)")
    co.add_argument("--domains", default=None, help="comma-separated domains (default: every domain folder)")
    co.add_argument("--files", default=None, help="comma-separated file names in each domain folder (default: all .jsonl[.gz]/.parquet)")
    co.add_argument("--ngram", type=int, default=13, help="words per n-gram (default 13)")
    co.add_argument("--out", default=None, help="JSON report path (default: <runs root>/data/contamination-<data root name>.json)")

    pl = sub.add_parser("plan", help="model size and tokens for a compute budget (Chinchilla, inference-aware)",
                        description="Chinchilla-optimal model size N and tokens D for a training "
                        "budget C = 6·N·D (D = 20·N), the loss Chinchilla's published fit predicts "
                        "(a relative guide), and with --inference-tokens the smaller model on more "
                        "tokens that reaches the same loss for less total compute (training + "
                        "2·N per inference token). Prints the experiments/pretrain.py arguments "
                        "whose model is closest to each N, as a `gx run ... --dry-run` command.")
    pl.add_argument("--compute", required=True, metavar="FLOPS", help="training compute budget in FLOPs, e.g. 1e21 or 3.5e20")
    pl.add_argument("--inference-tokens", default=None, metavar="N",
                    help="tokens the model will serve over its life, e.g. 1e12 (adds the inference-aware row)")
    pl.add_argument("--size", default="auto", help="pretrain.py family: nano, pro or ultra (default auto: the one nearest N in full size)")
    pl.add_argument("--experiment", default=None, help="experiment file with pretrain.py's arguments (default experiments/pretrain.py)")
    pl.add_argument("--vocab", type=int, default=0, help="vocabulary size (default: the family's for N >= 1e9, else pretrain.py's CPU default)")
    pl.add_argument("--seq", type=int, default=0, help="sequence length (default: as --vocab)")
    pl.add_argument("--batch", type=int, default=0, help="sequences per step (default: as --vocab)")

    handlers.update(sweep_cli.add_commands(sub))
    return p


def _quiet_libraries() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)


def cmd_run(args, overrides: list[str]) -> int:
    from gemini_core.experiment import load_experiment
    from gemini_core.runs.rundir import runs_root
    from gemini_core.scale import dry_run
    from gemini_core.train import step_fns, trainer

    root = runs_root(args.runs_root)  # a bad runs root is an error in a dry run too
    if args.experiment is None and isinstance(args.force, str):  # gx run --force EXPERIMENT
        args.experiment, args.force = args.force, True
    if args.experiment is None:
        raise UserError("gx run: name the EXPERIMENT file, e.g. experiments/quickstart.py")
    from gx import recipe
    if recipe.is_recipe(args.experiment):  # a pipeline of steps (gx/recipe/)
        if not args.dry_run:
            step_fns.tune_host_malloc()
        return recipe.main(args.experiment, overrides, runs_root(args.runs_root),
                           force=args.force, dry_run_only=args.dry_run)
    from gemini_core.selftrain import config as selftrain_config
    if selftrain_config.is_rest_em_file(args.experiment):  # self-training (gemini_core.selftrain)
        from gemini_core.selftrain import loop
        if not args.dry_run:
            step_fns.tune_host_malloc()
        return loop.main(args.experiment, overrides, root, force=bool(args.force),
                         dry_run=args.dry_run)
    if isinstance(args.force, str):
        raise UserError(f"--force {args.force}: only a recipe has steps to name; "
                        f"{args.experiment} is one run (--force alone reruns it)")
    exp = load_experiment(args.experiment, overrides)
    from gemini_core.config import check_paths
    check_paths(exp.config.data)  # a mistyped path fails now, in a dry run too
    if args.dry_run:
        print(dry_run.render(exp.config, trainer.declared_schedule(exp.config)))
        return 0
    step_fns.tune_host_malloc()  # before JAX's first computation; see its docstring
    from gemini_core.scale import distributed
    distributed.initialize(exp.config.distributed)  # multi-host: before JAX sees any device
    trainer.run_experiment(exp.config, root, force=args.force,
                         overrides=exp.overrides)
    return 0


def _last_step(run) -> int | None:
    try:
        with open(run.metrics_path, "rb") as f:
            lines = f.read().splitlines()
        for line in reversed(lines):
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):  # a line cut short by a kill, or damage
                continue
            if isinstance(step, int):
                return step
    except OSError:  # none yet (or something else in its place: ls lists, never fails)
        return None
    return None


def cmd_ls(args) -> int:
    from gemini_core.runs.rundir import iter_runs, runs_root

    root = runs_root(args.runs_root)
    rows = [_ls_row(run) for run in iter_runs(root, args.experiment)]
    from gx.recipe import format_states
    recipes = format_states(root, args.experiment)
    if not rows:
        print(recipes or f"no runs under {root}")
        return 0
    head = ("run", "state", "step", "eval/mean/loss", "time")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    for row in [head] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    for row in rows:  # a damaged run's sixth column: what is damaged, and what to do
        if len(row) > len(head):
            print(f"{row[0]}: {row[-1]}")
    if recipes:
        print(f"\n{recipes}")
    return 0


def _ls_row(run) -> tuple[str, ...]:
    """One run's line; a damaged record shows as the run's state, and the others still list."""
    from gemini_core.errors import DamagedFile
    try:
        st, summary, cfg = run.status() or {}, run.summary() or {}, run.config() or {}
        loss = summary.get("eval/mean/loss")
        train = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
        return (run.run_id, run.shown_state(),
                f"{_last_step(run) or 0}/{train.get('steps', '?')}",
                f"{loss:.4f}" if isinstance(loss, (int, float)) else "-",
                str(st.get("end") or st.get("start", "")))
    except DamagedFile as e:
        return (run.run_id, f"damaged ({Path(e.path).name})", "-", "-", "", str(e))


def cmd_show(args) -> int:
    from gemini_core.errors import DamagedFile
    from gemini_core.eval.domain_loss import format_table
    from gemini_core.runs.rundir import find_run, runs_root

    run = find_run(runs_root(args.runs_root), args.run)
    cfg, st, summary = run.config() or {}, run.status() or {}, run.summary()
    if not isinstance(cfg.get("overrides") or {}, dict):
        raise DamagedFile(run.path / "config.json", "overrides is not an object",
                          "run the same `gx run` command to rewrite it")
    try:  # a training run's per-domain table; other runs (ReST^EM's) list their summary
        table = (format_table(summary, summary.get("epochs"),
                              (cfg.get("data") or {}).get("domains"))
                 if summary and "eval/mean/loss" in summary else "")
    except (TypeError, ValueError, AttributeError) as e:
        raise DamagedFile(run.path / "summary.json", f"a value is not what gx wrote: {e}",
                          "rerun the experiment with `gx run --force` to rebuild it") from None
    print(f"run       {run.run_id}   ({st.get('state', '?')})")
    print(f"dir       {run.path}")
    print(f"fingerprint {cfg.get('fingerprint')}")
    overrides = cfg.get("overrides") or {}
    print("config differences from the experiment's defaults:")
    for key, value in sorted(overrides.items()):
        print(f"  {key} = {value!r}")
    if not overrides:
        print("  (none)")
    if st.get("error"):
        print(f"error     {st['error']}")
    report = run.path / "report.md"  # a ReST^EM job's report (gemini_core/selftrain)
    if table:
        print(table)
    elif report.is_file():
        print(report.read_text().rstrip())
    elif summary:
        print("summary:")
        for key, value in sorted(summary.items()):
            print(f"  {key} = {value!r}")
    return 0


def cmd_eval(args) -> int:
    from gemini_core.runs.rundir import find_run, runs_root

    if args.batches is not None and args.batches <= 0:
        raise UserError(f"--batches={args.batches}: must be a positive number of batches per domain")
    items = [] if args.tasks is None else [t.strip() for t in args.tasks.split(",")]
    if "needle" not in items and (args.needle_lengths is not None or
                                  args.needle_depths is not None):
        raise UserError("--needle-lengths and --needle-depths need `--tasks needle`")
    if args.tasks is not None:
        from gemini_core.eval import downstream, needle
        from gemini_core.eval.tasks import check_split
        if args.batch_size is not None and args.batch_size <= 0:
            raise UserError(f"--batch-size={args.batch_size}: must be positive")
        others = [t for t in items if t != "needle"]
        # --tasks reuses --data's flag name: a half of each task's examples, not a file
        split = "all" if args.split is None else args.split
        if args.split is not None and not others:
            raise UserError("--split picks a half of the downstream tasks' examples; needle has "
                            "none (drop --split)")
        check_split("--split", split)  # before the run is looked up, as the other flags
        lengths = depths = None
        if "needle" in items:  # every mistake in the flags before any checkpoint loads
            if args.needle_lengths is not None:
                lengths = needle.parse_lengths(args.needle_lengths)
            if args.needle_depths is not None:
                depths = needle.parse_depths(args.needle_depths)
            if others:
                downstream.task_specs(others, shots=args.shots, split=split, split_key="--split")
        run = find_run(runs_root(args.runs_root), args.run)
        if "needle" in items:
            needle.evaluate_needle(run, lengths=lengths, depths=depths,
                                   per_cell=10 if args.limit is None else args.limit,
                                   batch_size=args.batch_size or 8)
        if others:
            settings = downstream.Settings(limit=args.limit, shots=args.shots,
                                           batch_size=args.batch_size or 32)
            downstream.evaluate_run_tasks(run, others, settings, split=split)
        return 0
    from gemini_core.eval import run_eval
    run = find_run(runs_root(args.runs_root), args.run)
    run_eval.evaluate_run(run, Path(args.data), split=args.split, batches=args.batches)
    return 0


def cmd_generate(args) -> int:
    from gemini_core.eval import completions
    from gemini_core.eval.loaded_run import load_run
    from gemini_core.model.generate import SamplingConfig
    from gemini_core.runs.rundir import find_run, runs_root

    if args.batch_size <= 0:
        raise UserError(f"--batch-size={args.batch_size}: must be positive")
    stop = tuple(s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              stop=stop).validate("gx generate")
    prompts = Path(args.prompts) if args.prompts else None
    media = ("image", args.image) if args.image else ("audio", args.audio) if args.audio else None
    if media is None and args.prompt is None and prompts is None:
        raise UserError("gx generate: give --prompt, --prompts, --image or --audio")
    if media is not None and prompts is not None:
        raise UserError(f"--{media[0]} with --prompts: one item at a time (--prompt continues it)")
    if media is not None and not Path(media[1]).is_file():
        raise UserError(f"--{media[0]}={media[1]}: no such file")
    if prompts is not None:
        completions.read_prompts(prompts, args.field)  # its mistakes before the checkpoint loads
    run = find_run(runs_root(args.runs_root), args.run)
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731 - stdout is the completion's
    loaded = load_run(run, log=log)
    if media is not None:
        completions.describe_media(loaded, media[0], Path(media[1]), args.prompt or "", sampling,
                                   log=log)
    elif prompts is None:
        completions.stream_one(loaded, args.prompt, sampling, log=log)
    else:
        out = Path(args.out) if args.out else prompts.with_name(
            prompts.name.split(".")[0] + ".completions.jsonl")
        completions.complete_file(loaded, prompts, out, sampling, field=args.field,
                                  batch_size=args.batch_size, log=log)
    return 0


def cmd_lm_eval(args) -> int:
    from gemini_core.eval import lm_eval_adapter
    return lm_eval_adapter.main(args.lm_eval_args, runs_root=args.runs_root)


def _load_curation(spec: str, overrides: list[str]):
    from gemini_core.data.curation import config as curation_config
    from gemini_core.experiment import load_experiment
    return load_experiment(spec, overrides, schema=curation_config.CurationConfig,
                           convert=curation_config.from_config_dict)


def cmd_data(args, overrides: list[str]) -> int:
    from gemini_core.runs.rundir import runs_root

    if args.data_command == "prepare":
        from gemini_core.data.curation import pipeline
        exp = _load_curation(args.experiment, overrides)
        pipeline.prepare(exp.config, runs_root(args.runs_root), workers=args.workers,
                         strict=args.strict, force=args.force)
    elif args.data_command == "report":
        from gemini_core.data.curation import pipeline
        report = pipeline.read_report(Path(args.dir))
        print(pipeline.format_report(report))
    elif args.data_command == "contamination":
        return cmd_data_contamination(args)
    elif args.data_command == "train-classifier":
        from gemini_core.data.curation import classifier_train
        exp = _load_curation(args.experiment, overrides)
        classifier_train.train_classifier(exp.config, runs_root(args.runs_root))
    else:
        from gemini_core.data.curation.tokenizer_report import format_report, tokenizer_report
        from gemini_core.experiment import load_experiment
        from gemini_core.train import trainer
        cfg = load_experiment(args.experiment, overrides).config
        from gemini_core.config import require_data_root
        require_data_root(cfg.data)
        report = tokenizer_report(cfg.data, single_domain=args.single_domain,
                                  cache_root=trainer.cache_root(cfg, runs_root(args.runs_root)))
        print(format_report(report))
    return 0


def cmd_data_contamination(args) -> int:
    from gemini_core.data.curation import contamination
    from gemini_core.runs.rundir import runs_root, write_json_atomic

    if args.ngram < 1:
        raise UserError(f"--ngram={args.ngram}: must be >= 1 (words per n-gram)")
    tasks = contamination.parse_tasks(args.tasks)
    benchmarks = args.benchmarks or contamination.default_benchmarks(args.data_root)
    texts = contamination.load_task_texts(benchmarks, tasks)
    report = contamination.contamination_report(
        texts, args.data_root, domains=args.domains and args.domains.split(","),
        files=args.files and args.files.split(","), n=args.ngram)
    out = Path(args.out or runs_root(args.runs_root) / "data" /
               f"contamination-{Path(args.data_root).absolute().name}.json")
    write_json_atomic(out, report)
    print(contamination.format_table(report))
    print(f"contamination: report {out}")
    return 0


def cmd_plan(args) -> int:
    from gemini_core.scale import compute_plan

    plan = compute_plan.make_plan(args.compute, args.inference_tokens, size=args.size,
                                  experiment=args.experiment, vocab=args.vocab, seq=args.seq,
                                  batch=args.batch)
    print(compute_plan.render(plan))
    return 0


def _one_line(e: BaseException) -> str:
    """The message on one line, whatever user text (a name with a newline) it quotes."""
    return str(e).strip().replace("\r", "\\r").replace("\n", "\\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from gemini_core.experiment import config_overrides

    overrides, rest = config_overrides(argv)
    if "lm-eval" in rest:  # everything after it is lm_eval's, `--model` and all
        i = rest.index("lm-eval")
        args = build_parser().parse_args(rest[:i + 1])
        args.lm_eval_args = rest[i + 1:]
    else:
        args = build_parser().parse_args(rest)
    takes_config = args.command in ("run", *handlers) or getattr(args, "data_command", "") in (
        "prepare", "train-classifier", "tokenizer-report")
    if overrides and not takes_config:
        print(f"gx: error: {overrides[0]}: --config.* overrides only apply to commands that "
              "take an EXPERIMENT", file=sys.stderr)
        return 2
    _quiet_libraries()
    try:
        if args.command == "run":
            return cmd_run(args, overrides)
        if args.command == "data":
            return cmd_data(args, overrides)
        if args.command in handlers:
            return handlers[args.command](args, overrides)
        return {"ls": cmd_ls, "show": cmd_show, "eval": cmd_eval, "generate": cmd_generate,
                "lm-eval": cmd_lm_eval, "plan": cmd_plan}[args.command](args)
    except UserError as e:
        print(f"gx: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except TrainingStopped as e:  # an unrecoverable fault or a preemption: the message says why
        print(f"gx: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("gx: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `gx ... | head` closed the pipe: what was read is all that's wanted
        sys.stdout = open(os.devnull, "w")  # so the interpreter's final flush cannot fail again
        return 0
    except Exception:
        traceback.print_exc()
        print("gx: internal error (a bug in gx, not in your config): the traceback is above",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
