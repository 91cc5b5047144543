"""`gx sweep` end to end at test scale: real Ray Tune, real proxy runs on ../shared/corpus,
resume after the driver is killed, winner.json driving `gx run`."""

from __future__ import annotations

import json
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


def render_in_chromium(page: Path, scratch: Path) -> tuple[str, list[str]]:
    """The DOM after load, and every console message, of `page` in headless Chromium."""
    chromium = shutil.which("chromium")
    assert chromium, "chromium is not installed (apt-get install chromium; .ci/run does)"
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
         "--v=0", f"--user-data-dir={scratch}", "--dump-dom", page.absolute().as_uri()],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # e.g. [..:INFO:CONSOLE:12] "Uncaught ReferenceError: ...", source: file:///... (12)
    console = [line for line in proc.stderr.splitlines()
               if ":CONSOLE" in line or "Uncaught" in line]
    return proc.stdout, console


def check_report_page(page: Path, scratch: Path, plots: int) -> None:
    """Renders without a console message or a JS error, and its last script ran (it counts the
    plots it saw)."""
    dom, console = render_in_chromium(page, scratch)
    assert console == [], console
    root = re.search(r"<html[^>]*>", dom).group(0)  # the markers are attributes of <html>
    assert "data-js-error" not in root, root
    assert f'data-report-ready="{plots}"' in root, root


def check_html_report(sweep_dir: Path, scratch: Path) -> None:
    from sweeps import report

    page = sweep_dir / "report.html"  # written by the sweep itself, rewritten by gx compare
    text = page.read_text()
    # self-contained: nothing fetched from anywhere
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert not re.search(r"<link\b|@import|url\(\s*['\"]?https?:", text, re.I)
    for section in ("trials", "fit", "winner", "validation", "curves"):
        assert f'<section id="{section}">' in text, section
    figures = re.findall(r'<figure id="plot-(\w+)" class="plot"><svg\b', text)
    assert figures == ["weights", "fit", "schedule", "validation", "curves"], figures
    assert text.count("<tr class=") == TRIALS and "held-out Spearman" in text
    assert re.search(r"<p id='choice'>choice: (fit|trial \d)", text)  # where the winner came from
    check_report_page(page, scratch / "ok", plots=5)

    # a failed trial (no losses) is marked with its reason, and every text is escaped: the
    # sweep with one trial's reason set to markup (the page without its plots: they are above)
    bad = scratch / "copy" / "sweeps" / sweep_dir.name
    shutil.copytree(sweep_dir, bad, ignore=shutil.ignore_patterns("tune", "wandb"))
    rows = (bad / "trials.csv").read_text().splitlines()
    head, cells = rows[0].split(","), rows[1].split(",")
    cells = ["" if h.startswith("loss/") else c for h, c in zip(head, cells)]
    cells[head.index("failed")] = '"<img src=x onerror=""document.title=1""> & non-finite"'
    (bad / "trials.csv").write_text("\n".join([rows[0], ",".join(cells), *rows[2:]]) + "\n")
    text = report.render_html(report.load_sweep(bad), svgs={})
    assert "<img src=x" not in text
    assert ('failed: &lt;img src=x onerror=&quot;document.title=1&quot;&gt; &amp; non-finite'
            in text)
    assert text.count('<tr class="failed">') == 1
    (bad / "report.html").write_text(text)
    check_report_page(bad / "report.html", scratch / "copy-render", plots=0)


def check_wandb_summary(sweep_dir: Path, runs: Path) -> None:
    """The sweep's own W&B run, tracking on (the sweep itself ran with tracking.wandb=false),
    read back from disk."""
    from gemini_core.runs import tracking
    from sweeps import wandb_summary

    assert not (sweep_dir / "wandb").exists()  # tracking.wandb=false: the sweep logged none
    assert wandb_summary.log_sweep(sweep_dir, mode="offline", log=lambda _: None) is None
    assert wandb_summary.log_sweep(sweep_dir, mode="offline", force=True, log=lambda _: None)
    run = tracking.read_offline_run(sweep_dir)
    trial = next((runs / "mixture_sweep_tiny").glob("*/config.json"))
    assert run["id"] == sweep_dir.name and run["job_type"] == "sweep"
    assert run["group"] == json.loads(trial.read_text())["name"]  # the trials' W&B group
    s = run["summary"]
    assert s["trials._type"] == "table-file" and s["trials.nrows"] == TRIALS
    assert s["report._type"] == "html-file" and s["plots/fit._type"] == "html-file"
    fit = json.loads((sweep_dir / "fit.json").read_text())
    assert s["trials/n_fit"] == fit["n_fit"] and "validate/target/winner/loss_mean" in s
    assert s["fit/choice/from_fit"] == float(fit["choice"]["from"] == "fit")
    assert s["fit/choice/fold_spread"] == fit["choice"]["fold_spread"] > 0
    assert s["fit/objective_predicted/uniform"] == fit["objective_predicted"]["uniform"]
    records = tracking._inspect_records(tracking._session_logs(sweep_dir)[0])
    (art,) = [r["artifact"] for r in records
              if r.get("type") == "artifact" and r["artifact"]["type"] == "mixture-schedule"]
    (entry,) = art["manifest"]["contents"]
    assert entry["path"] == "winner.json"
    staged = Path(entry["local_path"])
    assert staged.is_relative_to(sweep_dir / "wandb")
    assert staged.read_text() == (sweep_dir / "winner.json").read_text()


def test_report_check_catches_a_js_error(tmp_path):
    """The Chromium check above can fail: a page whose script throws."""
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"><title>x</title></head>'
                    "<body><script>notDefined();</script></body></html>")
    dom, console = render_in_chromium(page, tmp_path / "profile")
    assert any("Uncaught ReferenceError: notDefined is not defined" in c for c in console)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    ray_tmp = tmp_path_factory.mktemp("r")  # a Ray cluster of this test's own, killable
    return {**os.environ, "GX_RAY_TEMP_DIR": str(ray_tmp), "RAY_AUTH_MODE": "disabled"}


def test_sweep_resumes_after_kill_and_its_winner_trains(tmp_path, corpus_root, env, data_cache):
    runs, cache = tmp_path / "runs", data_cache
    cmd = [sys.executable, "-m", "gx", "--runs-root", str(runs),
           *sweep_args(corpus_root, cache)]
    driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(done_runs(runs)) < 2:
        time.sleep(0.2)
    finished = done_runs(runs)
    assert len(finished) >= 2, "no trial finished in time"
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and what it started in its session
    driver.wait()
    subprocess.run(["pkill", "-9", "-f", env["GX_RAY_TEMP_DIR"]], check=False)

    proc = gx(*sweep_args(corpus_root, cache), runs=runs, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = done_runs(runs)
    assert len(after) == TRIALS
    for run_id, end in finished.items():  # finished before the kill: not trained again
        assert after[run_id] == end, run_id
    sweep_dir = next((runs / "sweeps").glob("mixture_sweep_tiny-*"))
    for name in ("trials.csv", "fit.json", "winner.json", "report.txt"):
        assert (sweep_dir / name).is_file(), name
    winner = MixtureSchedule.load(sweep_dir / "winner.json")
    winner.validate(("books", "wiki", "math", "code", "web", "multilingual"))
    fit = json.loads((sweep_dir / "fit.json").read_text())
    assert fit["n_fit"] + fit["n_holdout"] + fit["n_failed"] == TRIALS
    # validated against baselines, each with 2 seeds, at the one scale asked for
    val = json.loads((sweep_dir / "validate.json").read_text())
    assert list(val["scales"]) == ["target"]
    cands = val["scales"]["target"]["candidates"]
    # a winner with an end stage of its own is also run without it (a stage-blind fit, e.g.
    # logweight, gives both stages one mixture: then the winner is its own base)
    own_end = winner.stages[1].weights != winner.stages[0].weights
    base_run = "winner_no_anneal" if own_end else "winner"
    assert set(cands) == {"winner", "natural", "uniform", "best_trial", "winner_boost", base_run}
    assert all(c["n"] == 2 and c["std"]["loss/mean"] > 0 for c in cands.values())
    # the declared boost: the winner's base, then code x4 over the winner's end stage
    boosted = MixtureSchedule.load(sweep_dir / "schedules" / "validate-winner_boost.json")
    assert boosted.stages[0].weights == pytest.approx(winner.stages[0].weights)
    assert boosted.stages[1].start == winner.stages[1].start
    assert boosted.stages[1].weights["code"] > winner.stages[0].weights["code"]
    boost = val["scales"]["target"]["boost"]
    assert boost["boosted"] == ["code"] and set(boost["domains"]) == {"code"}
    assert boost["mean"] == pytest.approx(
        cands["winner_boost"]["mean"]["loss/mean"] / cands[base_run]["mean"]["loss/mean"] - 1)
    assert set(val["scales"]["target"]["winner_vs"]) == {"natural", "uniform", "best_trial"}
    target_runs = json.loads(next(
        p for p in (runs / "mixture_sweep_tiny").glob("*/config.json")
        if json.loads(p.read_text())["tracking"]["job_type"] == "validate"
        and json.loads(p.read_text())["train"]["steps"] == 96).read_text())
    assert target_runs["model"]["d_model"] == 64  # 2x the proxy's width
    assert "winner" in proc.stdout and "trial" in proc.stdout
    assert re.search(r"^sweep: \d fitted trials for 13 features", proc.stdout, re.M)
    # the runs' progress on the way, not only a line when each has finished
    assert re.search(r"^validate \S+: step \d+/96 +loss \d+\.\d+.* eta \d+m\d\ds$", proc.stdout,
                     re.M), proc.stdout[-3000:]

    compare = gx("compare", "mixture_sweep_tiny", runs=runs, env=env)
    assert compare.returncode == 0 and "held-out" in compare.stdout, compare.stderr
    assert "objective predicted: winner" in compare.stdout  # against the fit's own error
    assert "choice: " in compare.stdout and "the fit's error" in compare.stdout
    assert f"report: {sweep_dir / 'report.html'}" in compare.stdout

    from test_run import TINY  # pytest puts tests/ on sys.path (rootdir conftest)
    run = gx("run", "experiments/quickstart.py", *TINY, f"--config.data.root={corpus_root}",
             f"--config.data.cache_dir={cache}", f"--config.data.schedule={sweep_dir / 'winner.json'}",
             "--config.train.steps=6", "--config.tracking.wandb=false", runs=runs, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    trained = RunDir(runs, "quickstart", next((runs / "quickstart").iterdir()).name)
    assert trained.config()["mixture"] == winner.to_dict()

    first_trial = next(iter(finished))
    both = gx("compare", first_trial, trained.run_id, runs=runs, env=env)
    assert both.returncode == 0, both.stderr
    assert "mixture.stages" in both.stdout and "train.steps" in both.stdout
    assert "eval/mean/loss" in both.stdout and both.stdout.count("done") >= 2

    check_html_report(sweep_dir, tmp_path / "html")
    check_wandb_summary(sweep_dir, runs)


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
            ("validate.boost_factor=1.0", r"validate\.boost_factor=1.0: expected a number"),
            ("resources.progress_every_s=-1", r"resources=.*'progress_every_s': -1.*>= 0")]:
        with pytest.raises(UserError, match=rf"config\.{error}"):
            load_experiment("experiments/mixture_sweep.py:size=tiny",
                            [f"--config.proxy.data.root={corpus_root}", f"--config.{override}"],
                            schema=sweep_config.SweepConfig,
                            convert=sweep_config.from_config_dict)


def test_validation_says_when_the_winner_is_worse_beyond_seed_noise():
    from sweeps.runner import _comparisons, verdict

    def cand(mean, std):
        return {"mean": {"loss/mean": mean}, "std": {"loss/mean": std}, "n": 3}

    got = _comparisons({"winner": cand(4.0, 0.02), "natural": cand(3.9, 0.02),
                        "uniform": cand(4.01, 0.03), "best_trial": cand(4.2, 0.02)})
    assert verdict(got["natural"]) == "worse, beyond seed noise"  # 0.1 > 2 sigma = 0.033
    assert verdict(got["uniform"]) == "within seed noise"
    assert verdict(got["best_trial"]) == "beats it"
