"""`gx sweep` end to end at test scale: real Ray Tune, real proxy runs on ../shared/corpus,
resume after the driver is killed, validation, the reports, winner.json driving `gx run`.

The sweep runs once (the module fixture `swept`: started, killed once two trials are done,
run again to the end); each test then reads what it left. No test writes into its sweep dir:
the ones that write (the W&B summary, the report page) work on copies."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gemini_core.data.mixture import MixtureSchedule
from gemini_core.runs.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
TRIALS = 6
DOMAINS = ("books", "wiki", "math", "code", "web", "multilingual")


def gx(*args: str, runs: Path, env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gx", "--runs-root", str(runs),
                           *args], cwd=REPO, env=env, capture_output=True, text=True, **kw)


def sweep_args(corpus: Path, cache: Path) -> list[str]:
    return ["sweep", "experiments/mixture_sweep.py:size=tiny",
            f"--config.proxy.data.root={corpus}", f"--config.proxy.data.cache_dir={cache}",
            f"--config.space.trials={TRIALS}", "--config.fit.folds=2",
            "--config.fit.samples=2000", "--config.proxy.tracking.wandb=false",
            "--config.validate.scales=target",  # proxy scale too by default: the same code
            "--config.validate.boost=('code',)",
            # a capability objective: proxies score gsm8k and piqa on their search half, the
            # validation on the held-out half, and two trials are trained at target scale too
            "--config.proxy.eval.downstream.tasks=('gsm8k','piqa')",
            "--config.objective.targets={'downstream/gsm8k/bpb': 1.0}",
            "--config.objective.constraints={'loss/mean': 0.05}",
            "--config.validate.rank_trials=2",
            "--config.validate.doremi=true",  # DoReMi's mixture as one more baseline
            # every progress line of a running trial reaches the driver's output
            "--config.resources.progress_every_s=0.001"]


def done_runs(runs: Path) -> dict[str, str]:
    """run id -> the `end` time of each done proxy trial (validation runs left out)."""
    out = {}
    for status in runs.glob("mixture_sweep_tiny/*/status.json"):
        st = json.loads(status.read_text())
        cfg = json.loads((status.parent / "config.json").read_text())
        if st.get("state") == "done" and cfg["tracking"]["job_type"] == "proxy":
            out[status.parent.name] = st["end"]
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    ray_tmp = tmp_path_factory.mktemp("r")  # a Ray cluster of this module's own, killable
    return {**os.environ, "GX_RAY_TEMP_DIR": str(ray_tmp), "RAY_AUTH_MODE": "disabled"}


@dataclasses.dataclass(frozen=True)
class Swept:
    runs: Path
    dir: Path  # the sweep dir
    finished: dict[str, str]  # trials done before the kill: run id -> end time
    stdout: str  # the resumed sweep's output
    report_html: str  # report.html as the sweep wrote it (gx compare rewrites it)
    cache: Path


@pytest.fixture(scope="module")
def swept(tmp_path_factory, corpus_root, env, data_cache) -> Swept:
    runs = tmp_path_factory.mktemp("sweep") / "runs"
    cmd = [sys.executable, "-m", "gx", "--runs-root", str(runs),
           *sweep_args(corpus_root, data_cache)]
    log = runs.parent / "driver.log"  # read back only when the kill came too early
    with log.open("wb") as sink:
        driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        # generous: beside the other xdist worker's training, two trials can take minutes
        deadline = time.time() + 600
        while time.time() < deadline and driver.poll() is None and len(done_runs(runs)) < 2:
            time.sleep(0.2)
        finished = done_runs(runs)
        exited = driver.poll()
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and what it started in its session
        driver.wait()
    # what the killed driver's Ray left: its processes name this module's own Ray folder
    subprocess.run(["pkill", "-9", "-f", env["GX_RAY_TEMP_DIR"]], check=False)
    assert len(finished) >= 2, (f"{len(finished)} trials done before the kill (driver exit "
                                f"code {exited}); its output ends:\n{log.read_text()[-3000:]}")

    proc = gx(*sweep_args(corpus_root, data_cache), runs=runs, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep_dir = next((runs / "sweeps").glob("mixture_sweep_tiny-*"))
    return Swept(runs, sweep_dir, finished, proc.stdout,
                 (sweep_dir / "report.html").read_text(), data_cache)


def test_resumed_sweep_trains_no_finished_trial_again(swept):
    after = done_runs(swept.runs)
    assert len(after) == TRIALS
    for run_id, end in swept.finished.items():  # finished before the kill: not trained again
        assert after[run_id] == end, run_id


def test_sweep_dir_holds_the_table_the_fit_and_a_valid_winner(swept):
    for name in ("sweep.json", "trials.csv", "fit.json", "winner.json", "report.txt",
                 "report.html", "validate.json"):
        assert (swept.dir / name).is_file(), name
    MixtureSchedule.load(swept.dir / "winner.json").validate(DOMAINS)
    fit = json.loads((swept.dir / "fit.json").read_text())
    assert fit["n_fit"] + fit["n_holdout"] + fit["n_failed"] == TRIALS
    assert fit["n_holdout"] >= 1 and fit["holdout"]["n"] == fit["n_holdout"]


def _winner_and_validation(swept) -> tuple[MixtureSchedule, dict, str]:
    winner = MixtureSchedule.load(swept.dir / "winner.json")
    val = json.loads((swept.dir / "validate.json").read_text())
    # a winner with an end stage of its own is also run without it (a stage-blind fit, e.g.
    # logweight, gives both stages one mixture: then the winner is its own base)
    own_end = winner.stages[1].weights != winner.stages[0].weights
    return winner, val, "winner_no_anneal" if own_end else "winner"


def test_validation_runs_each_candidate_with_two_seeds_at_the_scale_asked(swept):
    winner, val, base_run = _winner_and_validation(swept)
    assert list(val["scales"]) == ["target"]
    cands = val["scales"]["target"]["candidates"]
    assert set(cands) == {"winner", "natural", "uniform", "best_trial", "doremi",
                          "winner_boost", base_run}
    assert all(c["n"] == 2 and c["std"]["loss/mean"] > 0 for c in cands.values())
    assert set(val["scales"]["target"]["winner_vs"]) == {"natural", "uniform", "doremi",
                                                         "best_trial"}
    fit = json.loads((swept.dir / "fit.json").read_text())  # DoReMi ran beside the swarm
    assert MixtureSchedule.load(swept.dir / "schedules" / "validate-doremi.json").to_dict() \
        == fit["doremi"]["winner"]
    target_runs = [json.loads(p.read_text()) for p in
                   (swept.runs / "mixture_sweep_tiny").glob("*/config.json")]
    target_runs = [c for c in target_runs if c["tracking"]["job_type"] == "validate"]
    assert target_runs and all(c["train"]["steps"] == 96 for c in target_runs)
    assert all(c["model"]["d_model"] == 64 for c in target_runs)  # 2x the proxy's width


def test_a_task_objective_is_fitted_on_the_search_half_and_validated_on_the_held_out_one(
        swept):
    import pandas as pd
    table = pd.read_csv(swept.dir / "trials.csv")
    assert {"downstream/gsm8k/bpb", "downstream/piqa/acc", "downstream/piqa/bpb"} \
        <= set(table.columns)
    assert not [c for c in table.columns if "@" in c]  # the sweep's columns name the task
    fit = json.loads((swept.dir / "fit.json").read_text())
    assert fit["metrics"] == [*DOMAINS, "loss/mean", "downstream/gsm8k/bpb"]
    assert fit["objective"] == ("downstream/gsm8k/bpb; subject to loss/mean no more than 5.0% "
                                "worse than the baseline")
    assert "downstream/gsm8k/bpb" in fit["predicted"]
    target = json.loads((swept.dir / "validate.json").read_text())["scales"]["target"]
    for c in target["candidates"].values():  # the objective per seed: gsm8k's bpb itself
        assert c["mean"]["objective"] == pytest.approx(c["mean"]["downstream/gsm8k/bpb"])
    assert set(target["objective_vs"]) == {"natural", "uniform", "doremi", "best_trial"}
    assert {"downstream/gsm8k/bpb", "downstream/piqa/acc"} <= set(target["tasks_vs_natural"])
    assert set(target["constraints"]) == {"loss/mean"}
    assert target["constraints"]["loss/mean"]["bound"] == 0.05
    # a proxy scored its search half, a validation run the held-out half: other examples
    trial = swept.runs / "mixture_sweep_tiny" / table["run_id"][0]
    scored = json.loads((trial / "downstream.json").read_text())
    assert "gsm8k@search" in json.dumps(scored) and "gsm8k@heldout" not in json.dumps(scored)
    val_runs = [p.parent for p in (swept.runs / "mixture_sweep_tiny").glob("*/config.json")
                if json.loads(p.read_text())["tracking"]["job_type"] == "validate"]
    held = [json.loads((r / "summary.json").read_text()) for r in val_runs]
    assert held and all("downstream/gsm8k@heldout/bpb" in h for h in held)
    # decision accuracy: trials 0 and 1 at target scale too; trial 1, the natural anchor, is
    # the natural candidate's run (trained once), so its target figure is that candidate's
    decision = json.loads((swept.dir / "validate.json").read_text())["decision"]
    assert decision["trials"] == [0, 1] and decision["pairs"] == 1
    assert decision["proxy"] == pytest.approx(list(table["downstream/gsm8k/bpb"][:2]))
    trained = {json.loads(p.read_text())["tracking"]["tags"][0]
               for p in (swept.runs / "mixture_sweep_tiny").glob("*/config.json")}
    assert "target/trial-000/seed0" in trained and "target/natural/seed0" in trained
    assert "target/trial-001/seed0" not in trained
    assert decision["pair_agreement"] in (0.0, 1.0)
    text = (swept.dir / "report.txt").read_text()
    assert "objective: downstream/gsm8k/bpb; subject to loss/mean" in text
    assert "winner vs natural: objective " in text
    assert "decision accuracy across scales (2 trials" in text
    assert "winner vs natural per task (held-out examples; + = better): gsm8k/bpb" in text


def test_the_declared_boost_is_the_winners_base_then_code_raised(swept):
    winner, val, base_run = _winner_and_validation(swept)
    boosted = MixtureSchedule.load(swept.dir / "schedules" / "validate-winner_boost.json")
    assert boosted.stages[0].weights == pytest.approx(winner.stages[0].weights)
    assert boosted.stages[1].start == winner.stages[1].start
    assert boosted.stages[1].weights["code"] > winner.stages[0].weights["code"]
    boost = val["scales"]["target"]["boost"]
    cands = val["scales"]["target"]["candidates"]
    assert boost["boosted"] == ["code"] and set(boost["domains"]) == {"code"}
    assert boost["mean"] == pytest.approx(
        cands["winner_boost"]["mean"]["loss/mean"] / cands[base_run]["mean"]["loss/mean"] - 1)


def test_the_driver_prints_the_fit_warning_progress_and_the_winner(swept):
    out = swept.stdout
    assert "winner" in out and "trial" in out
    assert re.search(r"^sweep: \d fitted trials for 13 features", out, re.M)
    # the runs' progress on the way, not only a line when each has finished
    assert re.search(r"^validate \S+: step \d+/96 +loss \d+\.\d+.* eta \d+m\d\ds$", out,
                     re.M), out[-3000:]
    assert f"winner: {swept.dir / 'winner.json'}" in out


def test_gx_compare_prints_the_sweep_and_writes_its_report(swept, env):
    compare = gx("compare", "mixture_sweep_tiny", runs=swept.runs, env=env)
    assert compare.returncode == 0, compare.stderr
    assert "held-out" in compare.stdout
    assert "objective predicted: winner" in compare.stdout  # against the fit's own error
    assert "choice: " in compare.stdout and "the fit's error" in compare.stdout
    assert "validation (" in compare.stdout and "winner vs natural" in compare.stdout
    assert f"report: {swept.dir / 'report.html'}" in compare.stdout
    assert compare.stdout.startswith((swept.dir / "report.txt").read_text().strip())


def test_the_winner_drives_gx_run_and_gx_compare_sets_runs_side_by_side(
        swept, env, corpus_root, tmp_path):
    from test_run import TINY  # pytest puts tests/ on sys.path (rootdir conftest)

    winner = MixtureSchedule.load(swept.dir / "winner.json")
    runs = tmp_path / "runs"
    run = gx("run", "experiments/quickstart.py", *TINY, f"--config.data.root={corpus_root}",
             f"--config.data.cache_dir={swept.cache}",
             f"--config.data.schedule={swept.dir / 'winner.json'}",
             "--config.train.steps=6", "--config.tracking.wandb=false", runs=runs, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    trained = RunDir(runs, "quickstart", next((runs / "quickstart").iterdir()).name)
    assert trained.config()["mixture"] == winner.to_dict()

    trial = swept.runs / "mixture_sweep_tiny" / next(iter(swept.finished))
    both = gx("compare", str(trial), str(trained.path), runs=runs, env=env)
    assert both.returncode == 0, both.stderr
    assert "mixture.stages" in both.stdout and "train.steps" in both.stdout
    assert "eval/mean/loss" in both.stdout and both.stdout.count("done") >= 2


def test_the_report_page_is_self_contained_with_every_section_and_plot(swept):
    text = swept.report_html
    # self-contained: nothing fetched from anywhere
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert not re.search(r"<link\b|@import|url\(\s*['\"]?https?:", text, re.I)
    for section in ("trials", "fit", "winner", "validation", "curves"):
        assert f'<section id="{section}">' in text, section
    figures = re.findall(r'<figure id="plot-(\w+)" class="plot"><svg\b', text)
    # its objective is a task's bpb: the trade-off against the mean loss is drawn too
    assert figures == ["weights", "fit", "tradeoff", "schedule", "validation", "decision",
                       "curves"], figures
    assert text.count("<tr class=") == TRIALS and "held-out Spearman" in text
    assert re.search(r"<p id='choice'>choice: (fit|trial \d)", text)  # where the winner came from


def test_the_report_page_renders_in_chromium(swept, chromium, tmp_path):
    from test_sweep_report import check_report_page

    page = tmp_path / "report.html"
    page.write_text(swept.report_html, encoding="utf-8")
    # the decision plot and the trade-off plot of its task objective too
    check_report_page(chromium, page, tmp_path / "profile", plots=7)


def test_the_sweeps_wandb_summary_read_back_from_disk(swept, tmp_path):
    """The sweep's own W&B run, tracking on (the sweep itself ran with tracking.wandb=false),
    written for a copy of the sweep dir and read back from disk."""
    from gemini_core.runs import wandb_offline
    from sweeps import wandb_summary

    assert not (swept.dir / "wandb").exists()  # tracking.wandb=false: the sweep logged none
    copy = tmp_path / "sweeps" / swept.dir.name
    shutil.copytree(swept.dir, copy, ignore=shutil.ignore_patterns("tune"))
    assert wandb_summary.log_sweep(copy, mode="offline", log=lambda _: None) is None
    assert wandb_summary.log_sweep(copy, mode="offline", force=True, log=lambda _: None)
    run = wandb_offline.read_offline_run(copy)
    trial = next((swept.runs / "mixture_sweep_tiny").glob("*/config.json"))
    assert run["id"] == copy.name and run["job_type"] == "sweep"
    assert run["group"] == json.loads(trial.read_text())["name"]  # the trials' W&B group
    s = run["summary"]
    assert s["trials._type"] == "table-file" and s["trials.nrows"] == TRIALS
    assert s["report._type"] == "html-file" and s["plots/fit._type"] == "html-file"
    fit = json.loads((copy / "fit.json").read_text())
    assert s["trials/n_fit"] == fit["n_fit"] and "validate/target/winner/loss_mean" in s
    assert s["fit/choice/from_fit"] == float(fit["choice"]["from"] == "fit")
    assert s["fit/choice/fold_spread"] == fit["choice"]["fold_spread"] > 0
    assert s["fit/objective_predicted/uniform"] == fit["objective_predicted"]["uniform"]
    records = wandb_offline.inspect_records(wandb_offline.session_logs(copy)[0])
    (art,) = [r["artifact"] for r in records
              if r.get("type") == "artifact" and r["artifact"]["type"] == "mixture-schedule"]
    (entry,) = art["manifest"]["contents"]
    assert entry["path"] == "winner.json"
    staged = Path(entry["local_path"])
    assert staged.is_relative_to(copy / "wandb")
    assert staged.read_text() == (copy / "winner.json").read_text()


def test_sweep_config_errors_before_ray(tmp_path, corpus_root, env):
    bad = gx("sweep", "experiments/mixture_sweep.py:size=tiny",
             f"--config.proxy.data.root={corpus_root}", "--config.space.max_epochs=0.0000001",
             runs=tmp_path / "runs", env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert "config.space" in bad.stderr
    assert not (tmp_path / "runs" / "sweeps").exists()
    # fewer trials than the fit needs once a quarter of the drawn ones are held out
    few = gx("sweep", "experiments/mixture_sweep.py:size=tiny",
             f"--config.proxy.data.root={corpus_root}", "--config.space.trials=4",
             runs=tmp_path / "runs", env=env)
    assert few.returncode == 2 and "Traceback" not in few.stderr, few.stderr
    assert "config.space.trials=4: the fit needs at least 5" in few.stderr
    assert not (tmp_path / "runs" / "sweeps").exists()

    from gemini_core.errors import UserError
    from gemini_core.experiment import load_experiment
    from sweeps import config as sweep_config
    for override, error in [
            ("validate.scales=target,target", r"validate\.scales=.*'proxy', 'target'"),
            ("validate.scales=tagret", r"validate\.scales=.*'proxy', 'target'"),
            ("validate.boost=('cod',)", r"validate\.boost=.*unknown domain\(s\) cod "),
            ("validate.boost_factor=1.0", r"validate\.boost_factor=1.0: expected a finite number > 1"),
            ("resources.progress_every_s=-1",
                 r"resources\.progress_every_s=-1.0: must be a finite number >= 0")]:
        with pytest.raises(UserError, match=rf"config\.{error}"):
            load_experiment("experiments/mixture_sweep.py:size=tiny",
                            [f"--config.proxy.data.root={corpus_root}", f"--config.{override}"],
                            schema=sweep_config.SweepConfig,
                            convert=sweep_config.from_config_dict)


def test_an_objective_names_recorded_metrics_and_errors_list_those_there_are(corpus_root):
    from gemini_core.errors import UserError
    from gemini_core.experiment import load_experiment
    from sweeps import config as sweep_config

    def load(arg: str, *overrides: str):
        return load_experiment(f"experiments/mixture_sweep.py:{arg}",
                               [f"--config.proxy.data.root={corpus_root}", *overrides],
                               schema=sweep_config.SweepConfig,
                               convert=sweep_config.from_config_dict).config
    sweep = load("size=tiny,objective=gsm8k")
    names = sweep_config.available_metrics(sweep)
    assert names[:7] == [*DOMAINS, "loss/mean"]
    assert "downstream/gsm8k/bpb" in names and "downstream/piqa/acc" in names
    assert "downstream/gsm8k/exact_match" not in names  # the proxies do not sample
    with pytest.raises(UserError, match=r"config\.objective\.targets\.downstream/gsm8k/"
                       r"exact_match: no such metric \(available: loss/books, .*downstream/"
                       r"gsm8k/bpb"):
        load("size=tiny,objective=gsm8k",
             "--config.objective.targets={'downstream/gsm8k/exact_match': 1.0}")
    with pytest.raises(UserError, match=r"config\.objective\.constraints\.loss/mean=-0\.1: "
                       "expected a non-negative number"):
        load("size=tiny,objective=gsm8k", "--config.objective.constraints={'loss/mean': -0.1}")
    with pytest.raises(UserError, match=r"no such metric .*; a task's metrics need the task in "
                       r"config\.proxy\.eval\.downstream\.tasks"):
        load("size=tiny", "--config.objective.targets={'downstream/gsm8k/bpb': 1.0}")
    with pytest.raises(UserError, match=r"config\.validate\.rank_trials=1"):
        load("size=tiny", "--config.validate.rank_trials=1")


def test_a_runs_task_metrics_come_back_for_the_split_it_was_asked_for():
    from sweeps.fanout import downstream_values, job_split
    summary = {"downstream/gsm8k@search/bpb": 1.0, "downstream/gsm8k@search/bpb_stderr": 0.1,
               "downstream/gsm8k@heldout/bpb": 2.0, "downstream/piqa@search/acc": 0.5,
               "downstream/piqa@search/bpb": 3.0, "downstream/mean/bpb": 9.0, "loss/x": 1.0}
    assert downstream_values(summary, "search") == {
        "downstream/gsm8k/bpb": 1.0, "downstream/piqa/acc": 0.5, "downstream/piqa/bpb": 3.0,
        "downstream/mean/bpb": 2.0}  # the mean of this half's tasks, not the summary's
    assert downstream_values(summary, "heldout") == {"downstream/gsm8k/bpb": 2.0,
                                                     "downstream/mean/bpb": 2.0}
    assert [job_split({"name": n}) for n in ("trial-003", "target/winner/seed0",
            "proxy/natural/seed1", "target/trial-002/seed0", "doremi/proxy")] == \
        ["search", "heldout", "heldout", "heldout", "search"]


def test_validation_says_when_the_winner_is_worse_beyond_seed_noise():
    from sweeps.validation import comparisons, verdict

    def cand(mean, std):
        return {"mean": {"loss/mean": mean}, "std": {"loss/mean": std}, "n": 3}

    got = comparisons({"winner": cand(4.0, 0.02), "natural": cand(3.9, 0.02),
                       "uniform": cand(4.01, 0.03), "best_trial": cand(4.2, 0.02)})
    assert verdict(got["natural"]) == "worse, beyond seed noise"  # 0.1 > 2 sigma = 0.033
    assert verdict(got["uniform"]) == "within seed noise"
    assert verdict(got["best_trial"]) == "beats it"
    # an accuracy at 0 for the baseline (LAMBADA at small scale): a gap, no relative one
    acc = comparisons({"winner": cand(0.01, 0.01), "natural": cand(0.0, 0.0)}, "loss/mean",
                      ("natural",))["natural"]
    assert acc["gap"] == pytest.approx(-0.01) and math.isnan(acc["relative"])
