"""`gx sweep`, `gx fit`, `gx compare`, `gx scaling`: the sweep commands of the gx CLI."""

from __future__ import annotations

import argparse
from pathlib import Path

from gemini_core.errors import UserError
from sweeps import fit as fit_lib


def add_commands(sub: argparse._SubParsersAction) -> dict:
    sw = sub.add_parser("sweep", help="mixture sweep: proxy runs on Ray Tune, fit, winner.json",
                        description="Run the mixture sweep declared in EXPERIMENT (see "
                        "experiments/mixture_sweep.py). Override any field with "
                        "--config.a.b=value. The natural and uniform mixtures are trials too "
                        "(space.anchors); the winner is the fit's mixture unless a measured trial "
                        "is as good within the fit's error (fit.prefer_measured). Running it "
                        "again resumes it: finished trials are not rerun.")
    sw.add_argument("experiment", help="e.g. experiments/mixture_sweep.py:size=tiny")
    sw.add_argument("--no-validate", action="store_true",
                    help="skip training the winner and the baselines with seeds at proxy and target scale")
    ft = sub.add_parser("fit", help="fit and choose a mixture from any table of runs (CSV or parquet)",
                        description="A regressor per domain (linear, linear in log token shares, "
                        "Data Mixing Laws log-linear or LightGBM: one form for all domains, the one "
                        "K-fold CV on TABLE finds best on the objective), then the mixture they predict "
                        "best, unless a measured row is as good within the fit's error "
                        "(--no-prefer-measured: the fit's mixture always). Columns: "
                        "<weight-prefix><stage>/<domain> (or "
                        "<weight-prefix><domain>), <loss-prefix><domain> for the domains "
                        "evaluated, and any metric column --objective names.")
    ft.add_argument("table", help="CSV or parquet, one row per run")
    ft.add_argument("--holdout", default=None, help="a second table of rows never used in fitting: Spearman and regret")
    ft.add_argument("--weight-prefix", default="weight/")
    ft.add_argument("--loss-prefix", default="loss/")
    ft.add_argument("--objective", default="", metavar="METRICS",
                    help="what the mixture is chosen for (lower is better; acc, exact_match "
                    "and pass@k count with their sign flipped): a column or glob, or weighted "
                    "ones, e.g. downstream/gsm8k/bpb or 'downstream/*/bpb=1,loss/math=0.5' "
                    "(a domain's name is its loss column); default: the mean domain loss")
    ft.add_argument("--constraint", action="append", default=[], metavar="METRIC=X",
                    help="no predicted METRIC (a column or glob) worse than the baseline row's "
                    "by more than the fraction X, e.g. 'loss/*=0.02'; repeatable; needs "
                    "--baseline")
    ft.add_argument("--penalty", type=float, default=0.0, metavar="P",
                    help="0 (default): the constraints are hard limits; P > 0: a cost of P x "
                    "the worst relative excess added to the objective instead")
    ft.add_argument("--baseline", type=int, default=None, metavar="ROW",
                    help="the row (1-based, as errors number rows) the constraints are relative "
                    "to, e.g. the natural mixture's run")
    ft.add_argument("--folds", type=int, default=5)
    ft.add_argument("--regressors", default=",".join(fit_lib.REGRESSORS),
                    help="comma-separated, the ones K-fold CV chooses among (default: %(default)s)")
    ft.add_argument("--prefer-measured", action=argparse.BooleanOptionalAction, default=True,
                    help="keep the best measured row (of TABLE and --holdout) when the fit's "
                    "mixture is predicted better by less than the fit's error there (its "
                    "cross-validated error on the objective with its CV folds' spread at that "
                    "mixture; default: on, as a sweep's fit.prefer_measured)")
    ft.add_argument("--out", default=None, help="write the chosen mixture here as winner.json")
    cmp_ = sub.add_parser("compare", help="a sweep's trials, fit, winner and validation; or runs side by side",
                          description="gx compare SWEEP: the sweep's report, printed and written as "
                          "<sweep dir>/report.html (self-contained, with plots). gx compare JOB: a ReST^EM job's "
                          "report (each iteration and the baselines). gx compare RUN RUN ...: "
                          "the config fields where the runs differ, and their final metrics.")
    cmp_.add_argument("targets", nargs="+", metavar="SWEEP_OR_RUN",
                      help="a sweep dir or name (prefix), or two or more run ids (prefixes) or run dirs")
    _add_scaling(sub)
    return {"sweep": cmd_sweep, "fit": cmd_fit, "compare": cmd_compare, "scaling": cmd_scaling}


def _add_scaling(sub: argparse._SubParsersAction) -> None:
    sc = sub.add_parser("scaling", help="scaling laws: a ladder of sizes x token budgets, L(N, D) fit",
                        description="gx scaling run EXPERIMENT: train the ladder declared in "
                        "EXPERIMENT (see experiments/scaling_ladder.py) on Ray Tune, then fit. "
                        "gx scaling fit SWEEP: fit L(N, D) = E + A/N^alpha + B/D^beta (Chinchilla "
                        "approach 3) to a ladder's runs or to any table with columns params, "
                        "tokens, loss.")
    ssub = sc.add_subparsers(dest="scaling_command", required=True, metavar="SCALING_COMMAND")
    run = ssub.add_parser("run", help="train the ladder (done runs are reused), then fit")
    run.add_argument("experiment", help="e.g. experiments/scaling_ladder.py:size=tiny")
    fit = ssub.add_parser("fit", help="fit a ladder's runs or a table; fit.json and a plot")
    fit.add_argument("sweep", metavar="SWEEP", help="a ladder's sweep dir or name (prefix), or a "
                     "CSV/parquet table with columns params, tokens, loss")
    fit.add_argument("--holdout-largest", type=int, default=None, metavar="K",
                     help="leave the K runs of most compute (6ND) out of the fit and predict them "
                     "(default: the ladder's fit.holdout_largest, else 0)")
    fit.add_argument("--bootstrap", type=int, default=None, metavar="B",
                     help="bootstrap resamples for the 5-95%% intervals (default: the ladder's "
                     "fit.bootstrap, else 200)")


def _no_overrides(overrides: list[str], command: str) -> None:
    if overrides:
        raise UserError(f"{overrides[0]}: `gx {command}` takes no --config overrides")


def cmd_sweep(args, overrides: list[str]) -> int:
    from gemini_core.experiment import load_experiment
    from gemini_core.runs.rundir import runs_root
    from sweeps import config as sweep_config
    from sweeps.runner import run_sweep

    exp = load_experiment(args.experiment, overrides, schema=sweep_config.SweepConfig,
                          convert=sweep_config.from_config_dict)
    run_sweep(exp.config, runs_root(args.runs_root), validate_winner=not args.no_validate)
    return 0


def cmd_fit(args, overrides: list[str]) -> int:
    from gemini_core.data.mixture import MixtureSchedule
    from sweeps import optimize, table

    _no_overrides(overrides, "fit")
    result = table.fit_table(Path(args.table), Path(args.holdout) if args.holdout else None,
                             weight_prefix=args.weight_prefix, loss_prefix=args.loss_prefix,
                             objective=fit_lib.Objective.parse(args.objective,
                                                               args.constraint, args.penalty),
                             baseline_row=args.baseline, folds=args.folds, seed=0,
                             regressors=tuple(r for r in args.regressors.split(",") if r),
                             prefer_measured=args.prefer_measured)
    print(table.format_fit_report(result))
    if args.out:
        optimize.write_winner(Path(args.out), MixtureSchedule.from_dict(result["winner"]),
                              result["predicted"], {"table": str(Path(args.table).absolute()),
                                                    "choice": result["choice"]})
        print(f"wrote {args.out}")
    return 0


def cmd_compare(args, overrides: list[str]) -> int:
    from gemini_core.runs.rundir import find_run, runs_root
    from sweeps.compare_runs import format_runs
    from sweeps.report import write_html
    from sweeps.report_text import format_sweep
    from sweeps.sweep_dir import find_sweep

    _no_overrides(overrides, "compare")
    root = runs_root(args.runs_root)
    if len(args.targets) == 1 and _rest_em_report(root, args.targets[0]):
        return 0
    if len(args.targets) == 1:
        sweep_dir = find_sweep(root, args.targets[0])
        print(format_sweep(sweep_dir))
        print(f"report: {write_html(sweep_dir)}")
    else:
        print(format_runs([find_run(root, t) for t in args.targets]))
    return 0


def _rest_em_report(root, target: str) -> bool:
    """`gx compare JOB` of a ReST^EM job: its report (every policy on the held-out problems)."""
    from gemini_core.errors import UserError
    from gemini_core.runs.rundir import find_run
    try:
        run = find_run(root, target)
    except UserError:
        return False
    if (run.config() or {}).get("method") != "rest_em":
        return False
    report = run.path / "report.md"
    if not report.is_file():
        raise UserError(f"{run.run_id}: the ReST^EM job has no report yet (it is written when the "
                        "last iteration is evaluated): run its `gx run` command")
    print(report.read_text().rstrip())
    print(f"plot: {run.path / 'pass_at_k.png'}")
    return True


def cmd_scaling(args, overrides: list[str]) -> int:
    from gemini_core.runs.rundir import runs_root
    from sweeps import ladder, scaling_table

    root = runs_root(args.runs_root)
    if args.scaling_command == "run":
        from gemini_core.experiment import load_experiment
        exp = load_experiment(args.experiment, overrides, schema=ladder.LadderConfig,
                              convert=ladder.from_config_dict)
        ladder.run_ladder(exp.config, root)
    else:
        _no_overrides(overrides, "scaling fit")
        scaling_table.fit_target(root, args.sweep, holdout_largest=args.holdout_largest,
                                 bootstrap_resamples=args.bootstrap)
    return 0
