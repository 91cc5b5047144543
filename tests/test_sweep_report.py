"""The sweep's reports (report.html, report.txt) on a synthetic sweep dir: every string that
comes from the user or the data is escaped, a failed trial is shown with its reason, and the
page renders in headless Chromium without a script error. No training: the fit, the choice
and the validation's figures are the real code's, on made-up losses. The names are ones the
config boundary refuses (gemini_core.names): the page must not rely on that, and a failure
reason is free text anyway.

Also the browser helpers test_sweep.py uses on a real sweep's page."""

from __future__ import annotations

import json
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from sweeps.fit import Objective


def evil(label: str) -> str:
    """Markup that runs a script if a page puts it in unescaped: in an attribute's value (the
    quote ends it and a handler follows) or in text (an element); and an entity that shows
    whether it was escaped once (shown as written) or not at all."""
    return (f"\" onmouseover=\"document.title='{label}'\" "
            f"<img src=x onerror=document.title='{label}'>&amp;")


DOMAINS = ("web", evil("domain"), "co'de", "m&th")
SWEEP_NAME = evil("sweep")
EXPERIMENT = evil("experiment")  # the trials' run ids are <experiment>-<fingerprint[:8]>
REASON = evil("failure") + " non-finite loss"
TRIALS = 12
# names of 80 characters leave the plots' legends no room: matplotlib says so, and the page
# is still whole (what these tests check)
pytestmark = pytest.mark.filterwarnings("ignore:constrained_layout not applied:UserWarning")


# ---------------------------------------------------------------------------------------------
# rendering in Chromium (test_sweep.py uses these on a real sweep's page)


def render_in_chromium(chromium: str, page: Path, scratch: Path) -> tuple[str, list[str]]:
    """The DOM after load, and every console message, of `page` in headless Chromium."""
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
         "--v=0", f"--user-data-dir={scratch}", "--dump-dom", page.absolute().as_uri()],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # e.g. [..:INFO:CONSOLE:12] "Uncaught ReferenceError: ...", source: file:///... (12)
    console = [line for line in proc.stderr.splitlines()
               if ":CONSOLE" in line or "Uncaught" in line]
    return proc.stdout, console


def check_report_page(chromium: str, page: Path, scratch: Path, plots: int) -> str:
    """Renders without a console message or a JS error, and its last script ran (it counts the
    plots it saw); returns the DOM."""
    dom, console = render_in_chromium(chromium, page, scratch)
    assert console == [], console
    root = re.search(r"<html[^>]*>", dom).group(0)  # the markers are attributes of <html>
    assert "data-js-error" not in root, root
    assert f'data-report-ready="{plots}"' in root, root
    return dom


def test_report_check_catches_a_js_error(chromium, tmp_path):
    """The Chromium check above can fail: a page whose script throws."""
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"><title>x</title></head>'
                    "<body><script>notDefined();</script></body></html>")
    dom, console = render_in_chromium(chromium, page, tmp_path / "profile")
    assert any("Uncaught ReferenceError: notDefined is not defined" in c for c in console)


# ---------------------------------------------------------------------------------------------
# a synthetic sweep dir


def _losses(share_D: np.ndarray, rng) -> np.ndarray:
    return 3 - 0.1 * np.log(share_D) + 0.01 * rng.standard_normal(len(share_D))


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """sweep.json, trials.csv (one trial failed), fit.json and winner.json from the sweep's own
    fit and choice, and validate.json from the validation's own figures, under hostile names."""
    from gemini_core.data.mixture import MixtureSchedule
    from gemini_core.runs.rundir import write_json_atomic
    from sweeps import fit as fit_lib
    from sweeps import optimize, runner, validation
    from sweeps.config import FitConfig, ObjectiveConfig, SweepConfig
    from sweeps.regressors import token_shares
    from sweeps.space import SpaceConfig, sample_space
    from sweeps.sweep_setup import SweepSetup, baselines

    runs_root = tmp_path_factory.mktemp("runs")
    out = runs_root / "sweeps" / f"{SWEEP_NAME}-0123abcd"
    out.mkdir(parents=True)
    tokens = {d: (i + 1) * 10**8 for i, d in enumerate(DOMAINS)}
    sweep = SweepConfig(name=SWEEP_NAME, proxy=None,
                        space=SpaceConfig(trials=TRIALS, min_weight=0.02),
                        objective=ObjectiveConfig(targets={DOMAINS[1]: 2.0, "web": 1.0}),
                        fit=FitConfig(folds=3, regressors=("logweight",), samples=500))
    schedules, fixed = sample_space(sweep.space, DOMAINS, tokens, 10**8)
    setup = SweepSetup(sweep, None, None, DOMAINS, tokens, 10**8, schedules, out, runs_root,
                       fixed)
    rng = np.random.default_rng(0)
    rows = []
    for i, s in enumerate(schedules):
        share_D = token_shares(fit_lib.features(s, DOMAINS)[None], len(DOMAINS))[0]
        loss_D = _losses(share_D, rng)
        rows.append({"trial": i, "run_id": f"{EXPERIMENT}-{i:08x}", "failed": "",
                     **{f"loss/{d}": v for d, v in zip(DOMAINS, loss_D)},
                     "loss/mean": float(loss_D.mean()),
                     # a proxy that scores a downstream task (config.eval.downstream)
                     "downstream/piqa/bpb": 1.5 + i / 1000})
    rows[-1] = {"trial": TRIALS - 1, "run_id": f"{EXPERIMENT}-{TRIALS - 1:08x}", "failed": REASON}
    table = runner.trials_table(setup, rows)
    table.to_csv(out / "trials.csv", index=False)
    result = runner.fit_and_choose(setup, table, lambda _: None)
    result["seconds"] = {"trials": 1.0, "total": 2.0}
    write_json_atomic(out / "fit.json", result)
    optimize.write_winner(out / "winner.json",
                          MixtureSchedule.from_dict(result["winner"]),
                          result["predicted"], {"sweep": out.name})
    write_json_atomic(out / "sweep.json", {
        "sweep": {"name": SWEEP_NAME, "objective": {"targets": dict(sweep.objective.targets)}},
        "proxy": {"tracking": {"wandb": False}}, "domains": list(DOMAINS), "tokens": tokens,
        "target_tokens": 10**8, "runs_root": str(runs_root)})

    cands = validation.candidates(setup, result)
    assert set(baselines(setup)) <= set(cands)
    per = {}
    for name, s in cands.items():
        share_D = token_shares(fit_lib.features(s, DOMAINS)[None], len(DOMAINS))[0]
        seeds = []
        for k in range(2):
            loss_D = _losses(share_D, rng)
            seeds.append({"run_id": f"{EXPERIMENT}-{name}{k}", "failed": "",
                          **{f"loss/{d}": v for d, v in zip(DOMAINS, loss_D)},
                          "loss/mean": float(loss_D.mean()),
                          # held-out task metrics, better with the second domain's share
                          "downstream/piqa/bpb": 2.0 - share_D[1] + 0.01 * k,
                          "downstream/piqa/acc": 0.5 + share_D[1] / 4})
        per[name] = validation.seed_stats(seeds, DOMAINS, (OBJECTIVE, METRICS))
    write_json_atomic(out / "validate.json", {
        "seconds": 3.0, "objective": OBJECTIVE.describe(), "scales": {"proxy": {
            "candidates": per, "winner_vs": validation.comparisons(per),
            "objective_vs": validation.comparisons(per, "objective"),
            "tasks_vs_natural": {k: validation.comparisons(per, k, ("natural",))["natural"]
                                 for k in ("downstream/piqa/acc", "downstream/piqa/bpb")},
            "constraints": validation.constraints_met(per, OBJECTIVE, METRICS),
            "upweighting": validation.upweighting(per, "winner", cands, DOMAINS)}},
        "decision": {"trials": [0, 1, 2], "proxy": [1.0, 1.2, 1.1], "target": [0.9, 1.0, 1.05],
                     "seeds": 1, "pairs": 3, "pair_agreement": 2 / 3, "spearman": 0.5}})
    return out


OBJECTIVE = Objective({"downstream/piqa/bpb": 1.0}, constraints={"loss/mean": 0.01})
METRICS = [*DOMAINS, "loss/mean", "downstream/piqa/bpb"]


class _Page(HTMLParser):
    """Every start tag with its attributes, and the text as a reader sees it."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_every_user_string_is_escaped_in_the_html_report(sweep_dir):
    from sweeps import report
    from sweeps.sweep_dir import load_sweep

    html = report.render_html(load_sweep(sweep_dir))  # with its plots: matplotlib's SVG text
    page = _Page(html)
    assert not [t for t, _ in page.tags if t == "img"]
    handlers = [(tag, name) for tag, attrs in page.tags for name in attrs
                if name.lower().startswith("on")]
    assert handlers == []
    assert [t for t, _ in page.tags].count("script") == 2  # the page's own two
    text = "".join(page.text)
    # shown to the reader as written: escaped once, neither dropped nor escaped twice
    for shown in (SWEEP_NAME, *DOMAINS, EXPERIMENT, REASON):
        assert shown in text, shown
    assert f"failed: {REASON}" in text
    rows = re.findall(r"<tr class=\"(\w*)\">", html)
    assert len(rows) == TRIALS and rows.count("failed") == 1
    assert len(re.findall(r'<figure id="plot-(\w+)" class="plot"><svg\b', html)) == 6  # the decision plot too


def test_downstream_columns_go_into_the_table_and_the_report(sweep_dir):
    from sweeps import report
    from sweeps.sweep_dir import load_sweep

    data = load_sweep(sweep_dir)
    values = data.table.sort_values("trial")["downstream/piqa/bpb"].tolist()
    assert values[:-1] == pytest.approx([1.5 + i / 1000 for i in range(TRIALS - 1)])
    assert np.isnan(values[-1])  # the failed trial has none
    html = report.render_html(data)
    assert "<th>piqa/bpb</th>" in html or ">piqa/bpb<" in html
    assert '<td data-v="1.503">1.503</td>' in html


def test_an_objective_over_tasks_gets_a_tradeoff_plot_of_its_trials(sweep_dir):
    import dataclasses

    from sweeps import report
    from sweeps.sweep_dir import load_sweep

    data = load_sweep(sweep_dir)
    assert 'id="plot-tradeoff"' not in report.render_html(data)  # domain losses: no trade-off
    meta = json.loads(json.dumps(data.meta))
    meta["sweep"]["objective"] = {"targets": {"downstream/piqa/bpb": 1.0}}
    html = report.render_html(dataclasses.replace(data, meta=meta))
    figure = re.search(r'<figure id="plot-tradeoff" class="plot">(.*?)</figure>', html, re.S)
    assert figure, "no trade-off plot"
    svg = figure.group(1)
    assert "piqa/bpb" in svg and "mean domain loss" in svg
    finished = [str(t) for t, f in zip(data.table["trial"], data.table["failed"]) if not f]
    labels = re.findall(r">(\d+)</text>", svg)
    assert set(finished) <= set(labels), (finished, labels)  # every finished trial is a point


def test_the_validation_shows_the_objective_every_task_the_constraints_and_decisions(
        sweep_dir):
    from sweeps import report
    from sweeps.report_text import format_sweep
    from sweeps.sweep_dir import load_sweep

    text = format_sweep(sweep_dir)
    val = json.loads((sweep_dir / "validate.json").read_text())["scales"]["proxy"]
    assert ("objective: downstream/piqa/bpb; subject to loss/mean no more than 1.0% worse "
            "than the baseline") in text
    assert re.search(r"winner vs natural: objective \d+\.\d\d% (better|worse)", text), text
    assert "winner vs natural per task (held-out examples; + = better): piqa/acc " in text
    assert re.search(r"constraints, measured \(winner vs natural\): loss/mean [+-]\d+\.\d\d% "
                     r"worse \(bound 1\.0%: (met|BROKEN)\)", text)
    assert re.search(r"piqa/bpb \d\.\d{3}±\d\.\d{3}", text)  # each candidate, each task
    assert "decision accuracy across scales (3 trials at proxy and target scale, 1 target " \
        "seed(s) each): 67% of 3 pairs ordered alike on the objective, Spearman 0.50" in text
    # the objective per seed is the task's bpb; an accuracy compares with its sign flipped
    for c in val["candidates"].values():
        assert c["mean"]["objective"] == pytest.approx(c["mean"]["downstream/piqa/bpb"])
    acc = val["tasks_vs_natural"]["downstream/piqa/acc"]
    w, n = (val["candidates"][k]["mean"]["downstream/piqa/acc"] for k in ("winner", "natural"))
    assert acc["gap"] == pytest.approx(w - n)
    page = report.render_html(load_sweep(sweep_dir))
    assert 'id="plot-decision"' in page and "Tasks, held-out examples" in page
    assert "piqa/acc" in page and "decision accuracy across scales" in page


def test_the_text_report_shows_a_failed_trial_with_its_reason(sweep_dir):
    from sweeps.report_text import format_sweep

    text = format_sweep(sweep_dir)
    lines = text.splitlines()
    failed = [line for line in lines if "FAILED" in line]
    assert len(failed) == 1 and failed[0].endswith(f"FAILED: {REASON}")
    assert re.match(rf"^ +{TRIALS - 1} +nan ", failed[0]), failed[0]
    # sorted by mean loss, the failed trial last
    trial_lines = [line for line in lines if re.match(r"^ +\d+ +(\d|nan)", line)]
    assert len(trial_lines) == TRIALS and trial_lines[-1] == failed[0]
    fit = json.loads((sweep_dir / "fit.json").read_text())
    assert fit["n_failed"] == 1 and fit["n_fit"] + fit["n_holdout"] == TRIALS - 1
    assert f"({fit['n_fit']} fitted, {fit['n_holdout']} held out, 1 failed)" in lines[0]
    assert "validation (3s)" in text and "winner vs natural" in text


def test_the_synthetic_report_renders_in_chromium(sweep_dir, chromium, tmp_path):
    from sweeps import report

    page = report.write_html(sweep_dir)
    dom = check_report_page(chromium, page, tmp_path / "profile", plots=6)
    assert not [t for t, _ in _Page(dom).tags if t == "img"]  # no payload became an element
    # no payload ran either: each would have set the title to its label
    assert re.search(r"<title>sweep \" onmouseover=", dom), dom[:500]
