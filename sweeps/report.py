"""`gx compare SWEEP`: one self-contained HTML file, <sweep dir>/report.html: the sweep's
trials, fit, winner, validation and loss curves. Reads the sweep dir only (sweeps.sweep_dir).

Self-contained: no URL is fetched (no CDN script, no web font, no image file): the plots are
inline SVG (sweeps.report_plots), and the little script (sorting, the error marker tests read)
is inline too. So the file can be mailed, attached to W&B, or opened on a machine without
network. Every string that comes from the user or the data (sweep and run names, domains,
failure reasons) is escaped.
"""

from __future__ import annotations

import datetime
import html as html_lib
import json
import math
import os
from pathlib import Path

from sweeps.report_plots import num_text, plots
from sweeps.report_text import describe_choice
from sweeps.sweep_dir import DOWNSTREAM, LOSS, WEIGHT, SweepData, load_sweep
from sweeps.validation import describe_decision, notes


def _e(value) -> str:
    return html_lib.escape(str(value), quote=True)


def _cell(value, digits: int = 4, cls: str = "") -> str:
    """A table cell carrying its sort key."""
    key = "" if value is None or (isinstance(value, float) and math.isnan(value)) else value
    c = f' class="{cls}"' if cls else ""
    shown = num_text(value, digits) if isinstance(value, float) or value is None else value
    return f'<td data-v="{_e(key)}"{c}>{_e(shown)}</td>'


def _doremi_table(s: SweepData) -> str:
    head = "".join(f"<th>{_e(d)}</th>" for d in s.domains)
    rows = []
    for key in ("reference", "proxy"):
        r = s.fit[key]
        weights = r.get("weights") or s.fit["doremi_weights"]
        rows.append(f"<tr><td>{_e(key)}</td><td class='run'>{_e(r['run_id'])}</td>"
                    f"<td>{_e(num_text(r.get(LOSS + 'mean')))}</td>"
                    + "".join(f"<td>{weights.get(d, 0.0):.3f}</td>" for d in s.domains) + "</tr>")
    return (f"<table id='doremi-table'><thead><tr><th>run</th><th>id</th><th>mean loss</th>{head}"
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _choice_note(s: SweepData) -> str:
    """Where the winner came from: the fit's mixture, or a measured trial (fit.prefer_measured)."""
    return f"<p id='choice'>{_e(describe_choice(s.fit))}.</p>" if s.fit.get("choice") else ""


def _trials_table(s: SweepData) -> str:
    if s.doremi:
        return _doremi_table(s)
    stages = s.n_stages()
    head = ["trial", "role", "mean loss", "predicted"] + [f"loss {d}" for d in s.domains]
    # the proxies' downstream task metrics (config.eval.downstream), beside the losses
    tasks = [c for c in s.table.columns if c.startswith(DOWNSTREAM)]
    head += [c[len(DOWNSTREAM):] for c in tasks]
    for k in range(stages):
        if k:
            head.append(f"s{k} start")
        head += [f"s{k} {d}" for d in s.domains]
    head.append("run")
    rows = []
    for _, r in s.table.sort_values("trial").iterrows():
        trial = int(r["trial"])
        role = s.role(trial)
        role_text = f"failed: {r['failed']}" if role == "failed" else role
        cells = [_cell(trial), _cell(role_text, cls="role"), _cell(float(r[f"{LOSS}mean"])),
                 _cell(s.predicted_mean(trial))]
        cells += [_cell(float(r[f"{LOSS}{d}"]), 3) for d in s.domains]
        cells += [_cell(float(r[c]), 3) for c in tasks]
        for k in range(stages):
            if k:
                cells.append(_cell(float(r[f"start/s{k}"]), 2))
            cells += [_cell(float(r[f"{WEIGHT}s{k}/{d}"]), 3) for d in s.domains]
        cells.append(_cell(r["run_id"], cls="run"))
        cls = {"failed": "failed", "held out": "held"}.get(role, "")
        rows.append(f'<tr class="{cls}">' + "".join(cells) + "</tr>")
    left = ' class="role"'
    ths = "".join(f'<th title="click to sort"{left if h == "role" else ""}>{_e(h)}</th>'
                  for h in head)
    return (f'<table id="trials-table" class="sortable"><thead><tr>{ths}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _fit_table(s: SweepData) -> str:
    if "chosen" not in s.fit:
        return ""
    rows = "".join(
        f"<tr><td>{_e(d)}</td><td>{_e(m)}</td>"
        + "".join(f"<td>{_e(num_text(v, 5))}</td>" for v in s.fit["cv_mse"].get(d, {}).values())
        + f"<td>{_e(num_text(s.fit['predicted'].get(d)))}</td>"
          f"<td>{_e(num_text(s.fit['natural_predicted'].get(d)))}</td></tr>"
        for d, m in s.fit["chosen"].items())
    if "objective" in s.fit["cv_mse"]:  # what chose the one regressor for every domain
        rows += ("<tr><td>objective</td><td></td>" + "".join(
            f"<td>{_e(num_text(v, 5))}</td>" for v in s.fit["cv_mse"]["objective"].values())
            + "<td></td><td></td></tr>")
    names = list(next(iter(s.fit["cv_mse"].values()), {}))
    head = "".join(f"<th>CV MSE {_e(n)}</th>" for n in names)
    return (f"<table><thead><tr><th>domain</th><th>chosen</th>{head}<th>winner predicted</th>"
            f"<th>natural predicted</th></tr></thead><tbody>{rows}</tbody></table>")


def _winner_table(s: SweepData) -> str:
    head = "".join(f"<th>{_e(d)}</th>" for d in s.domains)
    rows = "".join(f"<tr><td>{k}</td><td>{st['start']:.2f}</td>" + "".join(
        f"<td>{st['weights'].get(d, 0.0):.3f}</td>" for d in s.domains) + "</tr>"
        for k, st in enumerate(s.winner["stages"]))
    return (f"<table><thead><tr><th>stage</th><th>start</th>{head}</tr></thead>"
            f"<tbody>{rows}</tbody></table>")


def _validation_tables(s: SweepData) -> str:
    keys = [f"{LOSS}{d}" for d in s.domains] + [f"{LOSS}mean"]
    out = []
    for scale, v in s.validate["scales"].items():
        head = "".join(f"<th>{_e(k[len(LOSS):])}</th>" for k in keys)
        rows = []
        for name, c in v["candidates"].items():
            if c["mean"][f"{LOSS}mean"] is None:
                rows.append(f"<tr><td>{_e(name)}</td><td colspan='{len(keys) + 1}'>all "
                            f"{c['failed']} runs failed</td></tr>")
                continue
            rows.append(f"<tr><td>{_e(name)}</td><td>{c['n']}</td>" + "".join(
                f"<td>{c['mean'][k]:.4f} ± {c['std'][k]:.4f}</td>" for k in keys) + "</tr>")
        out.append(f"<h3>{_e(scale)} scale</h3><table><thead><tr><th>candidate</th><th>seeds</th>"
                   f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
                   + _task_table(v["candidates"]) + "<ul>"
                   + "".join(f"<li>{_e(n)}</li>" for n in notes(s.validate, v)) + "</ul>")
    if s.validate.get("decision"):
        out.append(f"<p>{_e(describe_decision(s.validate['decision']))}</p>")
    return "".join(out)


def _task_table(per: dict) -> str:
    """Each candidate's task metrics on held-out examples, mean ± std over seeds."""
    keys = sorted({k for c in per.values() for k in c["mean"]
                   if k.startswith(DOWNSTREAM) and not k.startswith(f"{DOWNSTREAM}mean/")})
    if not keys:
        return ""
    head = "".join(f"<th>{_e(k[len(DOWNSTREAM):])}</th>" for k in keys)
    rows = "".join(
        f"<tr><td>{_e(name)}</td>" + "".join(
            f"<td>{c['mean'][k]:.4f} ± {c['std'][k]:.4f}</td>" if c["mean"].get(k) is not None
            else "<td></td>" for k in keys) + "</tr>"
        for name, c in per.items() if c["mean"].get(f"{LOSS}mean") is not None)
    return (f'<p>Tasks, held-out examples:</p><div class="scroll"><table><thead><tr>'
            f"<th>candidate</th>{head}</tr></thead><tbody>{rows}</tbody></table></div>")


def _figure_html(name: str, svgs: dict[str, str | None], caption: str, missing: str) -> str:
    if name not in svgs:  # not drawn
        return ""
    svg = svgs[name]
    if svg is None:  # nothing to draw
        return f'<p class="missing" id="plot-{name}-missing">{_e(missing)}</p>'
    return (f'<figure id="plot-{name}" class="plot">{svg}'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;max-width:1200px;
padding:0 1em;color:#222}
h1{font-size:1.5em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.6em}
table{border-collapse:collapse;font-size:.82em;margin:.5em 0}
td,th{border:1px solid #ddd;padding:2px 6px;text-align:right;white-space:nowrap}
th{background:#f4f4f4;position:sticky;top:0}
table.sortable th{cursor:pointer}
td:first-child,th:first-child,td.role,th.role,td.run{text-align:left}
tr.failed td{background:#fde8e8}tr.failed td.role{color:#b00;white-space:normal;min-width:14em}
tr.held td.role{color:#c60}
.scroll{overflow-x:auto}
figure.plot{margin:1em 0}figure.plot svg{max-width:100%;height:auto}
figcaption{font-size:.85em;color:#555}
.meta{color:#555}.missing{color:#777;font-style:italic}
"""

# In <head>, before anything else runs: a JS error anywhere marks the page (tests read it).
HEAD_JS = """
window.addEventListener("error", function (ev) {
  document.documentElement.setAttribute("data-js-error", String(ev.message || ev));
});
"""

# Last in <body>: sortable tables, then the marker that the page's scripts all ran.
BODY_JS = """
(function () {
  function key(td) {
    var v = td.getAttribute("data-v"); var n = parseFloat(v);
    return (v !== "" && !isNaN(n) && isFinite(v)) ? n : v;
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    table.querySelectorAll("th").forEach(function (th, col) {
      th.addEventListener("click", function () {
        var asc = th.getAttribute("data-sort") !== "asc";
        table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("data-sort"); });
        th.setAttribute("data-sort", asc ? "asc" : "desc");
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = key(a.cells[col]), y = key(b.cells[col]);
          if (x === "" || y === "") { return (x === "") - (y === ""); }  // blanks last
          var c = (typeof x === typeof y) ? (x < y ? -1 : x > y ? 1 : 0)
                                          : (typeof x === "number" ? -1 : 1);
          return asc ? c : -c;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
  document.documentElement.setAttribute(
    "data-report-ready", String(document.querySelectorAll("figure.plot svg").length));
})();
"""


def _header(s: SweepData) -> str:
    f = s.fit
    labels = {"trials": "trials", "total": "trials and fit"}
    secs = {labels.get(k, k): v for k, v in (f.get("seconds") or {}).items()}
    if s.validate and s.validate.get("seconds") is not None:
        secs["validation"] = s.validate["seconds"]
    times = ", ".join(f"{k} {v:.0f} s" for k, v in secs.items())
    made = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    sweep = s.meta.get("sweep", {})
    counts = ("DoReMi: a reference run and a Group-DRO proxy" if s.doremi else
              f'{len(s.table)} trials: {f["n_fit"]} fitted, {f["n_holdout"]} held out, '
              f'{f["n_failed"]} failed')
    return (f"<header><h1>sweep {_e(s.name)}</h1>"
            f'<p class="meta" id="counts">{_e(counts)} · domains: {_e(", ".join(s.domains))}</p>'
            f'<p class="meta">time: {_e(times or "not recorded")} · report made {_e(made)} '
            f"· objective: {_e(json.dumps(sweep.get('objective', {})))} · "
            f"directory: <code>{_e(s.dir.absolute())}</code></p></header>")


def render_html(s: SweepData, svgs: dict[str, str | None] | None = None) -> str:
    """The page; `svgs` as `plots(s)` returns them (drawn here when not given; a plot missing
    from it is left out)."""
    svgs = plots(s) if svgs is None else svgs
    n_failed = int((s.table["failed"] != "").sum())
    nan_note = (f"{n_failed} failed trial(s), marked red with the reason, left out of the fit."
                if n_failed else "No trial failed.") + " Click a column to sort."
    weights_caption = ("Sampled mixture weights per trial: the base stage, and the "
                       "end-of-training stage where the schedule has one.")
    if s.doremi:
        nan_note = "DoReMi: no trials; a reference run, then the Group-DRO proxy."
        weights_caption = ("The reference mixture, the Group-DRO weights averaged over steps, "
                           "and the winner (those under the caps and minimum weight).")
    parts = [
        _header(s),
        '<section id="trials"><h2>Trials</h2>'
        f"<p>{_e(nan_note)}</p>"
        f'<div class="scroll">{_trials_table(s)}</div>'
        + _figure_html("weights", svgs, weights_caption, "")
        + "</section>",
        '<section id="fit"><h2>Fit</h2>'
        + _figure_html("fit", svgs, "Predicted (by the chosen per-domain regressors) vs "
                       "actual mean of domain losses; held-out trials were never seen by the fit.",
                       "DoReMi sweep: no regression, nothing predicted." if s.doremi else
                       "fit.json has no per-trial predictions (a sweep fitted before they were "
                       "recorded): no predicted-vs-actual plot.")
        + f'<div class="scroll">{_fit_table(s)}</div>'
        + _figure_html("tradeoff", svgs, "The trade-off the objective makes: each trial's "
                       "objective (its task metrics, as weighted) against its mean domain loss.",
                       "") + "</section>",
        '<section id="winner"><h2>Winner</h2>' + _choice_note(s)
        + f'<div class="scroll">{_winner_table(s)}</div>'
        + _figure_html("schedule", svgs, "The winner's weights over training "
                       "(winner.json, a MixtureSchedule).", "")
        + "</section>",
        '<section id="validation"><h2>Validation</h2>'
        + (_figure_html("validation", svgs, "Each candidate's loss per domain (and each "
                        "task's gold bpb on held-out examples) relative to the natural "
                        "(token-proportional) mixture's, mean ± std over seeds, at each "
                        "validated scale.", "")
           + _figure_html("decision", svgs, "Decision accuracy across scales: each ranked "
                          "trial's objective at proxy scale against its mean at target scale; "
                          "pairs ordered alike at both scales are the ones the proxies decide "
                          "right.", "")
           + f'<div class="scroll">{_validation_tables(s)}</div>'
           if s.validate else '<p class="missing">Not validated (gx sweep --no-validate, or '
           "validate.enabled=false).</p>")
        + "</section>",
        '<section id="curves"><h2>Loss curves</h2>'
        + _figure_html("curves", svgs, "train/loss per step, read from each run's "
                       "metrics.jsonl.", "")
        + "</section>",
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>sweep {_e(s.name)}</title><style>{CSS}</style>"
            f"<script>{HEAD_JS}</script></head>\n<body>\n" + "\n".join(parts)
            + f"\n<script>{BODY_JS}</script>\n</body></html>\n")


def write_html(sweep_dir: Path) -> Path:
    """<sweep dir>/report.html: the sweep's trials, fit, winner, validation and loss curves."""
    s = load_sweep(Path(sweep_dir))
    path = s.dir / "report.html"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(render_html(s), encoding="utf-8")
    os.replace(tmp, path)
    return path
