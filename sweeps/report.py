"""`gx compare RUN RUN ...`: runs side by side — the config fields where they differ, and their
final metrics. `gx compare SWEEP`: the sweep's HTML report (`write_html`). Both read run and sweep
directories only (config.json, summary.json, metrics.jsonl, the sweep's JSON and CSV files), as
sweeps/ always does."""

from __future__ import annotations

import dataclasses
import datetime
import html as html_lib
import io
import json
import math
import os
import re
from pathlib import Path

from gemini_core.runs.rundir import RunDir

SKIP = ("fingerprint", "run_id", "overrides", "paths")  # differ by construction


def _flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def config_differences(runs: list[RunDir]) -> dict[str, list]:
    flat = [_flatten({k: v for k, v in (r.config() or {}).items() if k not in SKIP})
            for r in runs]
    keys = sorted(set().union(*flat))
    return {k: [f.get(k) for f in flat] for k in keys if len({repr(f.get(k)) for f in flat}) > 1}


def format_runs(runs: list[RunDir]) -> str:
    ids = [r.run_id for r in runs]
    width = max(14, *(len(i) for i in ids))
    lines = ["config differences:"]
    diffs = config_differences(runs)
    for key, values in diffs.items():
        lines.append(f"  {key}")
        lines += [f"    {i:<{width}} {_short(v)}" for i, v in zip(ids, values)]
    if not diffs:
        lines.append("  (none)")
    summaries = [r.summary() or {} for r in runs]
    metrics = sorted({k for s in summaries for k in s if k.startswith("eval/") and "/loss" in k},
                     key=lambda k: (k == "eval/mean/loss", k))
    lines += ["", f"{'metric':<24}" + "".join(f"{i[-width:]:>{width + 2}}" for i in ids)]
    for m in metrics + ["eval/mean/bpb"]:
        row = [s.get(m) for s in summaries]
        lines.append(f"{m:<24}" + "".join(f"{v:>{width + 2}.4f}" if isinstance(v, float)
                                          else f"{'-':>{width + 2}}" for v in row))
    states = [(r.status() or {}).get("state", "?") for r in runs]
    lines.append(f"{'state':<24}" + "".join(f"{s:>{width + 2}}" for s in states))
    return "\n".join(lines)


def _short(value, limit: int = 100) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# `gx compare SWEEP`: one self-contained HTML file, <sweep dir>/report.html
#
# Self-contained: no URL is fetched (no CDN script, no web font, no image file): the plots are
# inline SVG drawn by matplotlib with text kept as <text> (svg.fonttype none: the browser's own
# sans-serif), and the little script (sorting, the error marker tests read) is inline too. So the
# file can be mailed, attached to W&B, or opened on a machine without network.

WEIGHT, LOSS = "weight/", "loss/"
CANDIDATES = {"winner": "#d62728", "natural": "#7f7f7f", "uniform": "#bcbd22",
              "best_trial": "#1f77b4", "winner_no_anneal": "#ff9896",
              "winner_boost": "#9467bd"}
ROLE_COLORS = {"fit": "#1f77b4", "held out": "#ff7f0e", "failed": "#d62728", "ok": "#1f77b4"}


@dataclasses.dataclass(frozen=True)
class SweepData:
    dir: Path
    meta: dict  # sweep.json
    domains: list[str]
    table: "object"  # pandas DataFrame: trials.csv with numbers parsed, failed as str
    fit: dict
    winner: dict
    validate: dict | None
    runs_root: Path

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def doremi(self) -> bool:
        return self.fit.get("method") == "doremi"

    def role(self, trial: int) -> str:
        """fit | held out | failed | ok (an older fit.json that does not say which)."""
        row = self.table[self.table["trial"] == trial].iloc[0]
        if row["failed"]:
            return "failed"
        for p in self.fit.get("per_trial_predicted") or []:
            if p["trial"] == trial:
                return "held out" if p["held_out"] else "fit"
        return "ok"

    def predicted_mean(self, trial: int) -> float | None:
        for p in self.fit.get("per_trial_predicted") or []:
            if p["trial"] == trial:
                return float(sum(p["predicted"].values()) / len(p["predicted"]))
        return None

    def n_stages(self) -> int:
        return len([c for c in self.table.columns if c.startswith("start/s")])

    def run_dir(self, run_id: str) -> Path | None:
        """<runs root>/<experiment>/<run id>; run id = <experiment>-<fingerprint[:8]>."""
        if not run_id:
            return None
        for root in (self.dir.parent.parent, self.runs_root):  # the sweep dir may have moved
            path = Path(root) / run_id.rsplit("-", 1)[0] / run_id
            if path.is_dir():
                return path
        return None


def load_sweep(sweep_dir: Path) -> SweepData:
    import pandas as pd

    sweep_dir = Path(sweep_dir)
    meta = json.loads((sweep_dir / "sweep.json").read_text())
    trials = sweep_dir / "trials.csv"  # a DoReMi sweep has none: no trials, one DRO proxy
    table = (pd.read_csv(trials, keep_default_na=False) if trials.is_file() else
             pd.DataFrame({"trial": [], "run_id": [], "failed": []}))
    for col in table.columns:
        if col.startswith((WEIGHT, LOSS, "start/")):
            table[col] = pd.to_numeric(table[col], errors="coerce")
    table["failed"] = table["failed"].astype(str)
    table["run_id"] = table["run_id"].astype(str)
    val = sweep_dir / "validate.json"
    return SweepData(sweep_dir, meta, list(meta["domains"]), table,
                     json.loads((sweep_dir / "fit.json").read_text()),
                     json.loads((sweep_dir / "winner.json").read_text()),
                     json.loads(val.read_text()) if val.is_file() else None,
                     Path(meta.get("runs_root") or sweep_dir.parent.parent))


# -- plots: each returns inline <svg> markup


def _svg(fig, salt: str) -> str:
    import matplotlib

    # the salt makes the SVG's generated ids (clip paths, markers) unique per plot in one page
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    text = re.sub(r"<\?xml[^>]*\?>\s*|<!DOCTYPE[^>]*>\s*", "", text)
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)  # RDF: namespace URLs
    return text.strip()


def _figure(width: float, height: float, rows: int = 1, cols: int = 1, **kw):
    from matplotlib.figure import Figure  # no pyplot: no global backend, no GUI

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, **kw)
    return fig, [ax for row in axes for ax in row]


def _domain_colors(domains: list[str]) -> dict[str, str]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {d: cmap(i % 10) for i, d in enumerate(domains)}


def plot_doremi_weights(s: SweepData) -> str:
    colors = _domain_colors(s.domains)
    mixtures = {"reference": s.fit["reference"]["weights"], "DoReMi (averaged)":
                s.fit["doremi_weights"], "winner": s.winner["stages"][0]["weights"]}
    fig, (ax,) = _figure(6.0, 3.0)
    bottom = [0.0] * len(mixtures)
    for d in s.domains:
        w = [m.get(d, 0.0) for m in mixtures.values()]
        ax.bar(range(len(mixtures)), w, bottom=bottom, color=colors[d], label=d, width=0.6)
        bottom = [b + v for b, v in zip(bottom, w)]
    ax.set_xticks(range(len(mixtures)), list(mixtures))
    ax.set_ylabel("weight")
    ax.set_ylim(0, 1)
    ax.set_title("DoReMi: reference mixture, Group-DRO weights, the winner", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    return _svg(fig, "weights")


def plot_trial_weights(s: SweepData) -> str:
    if s.doremi:
        return plot_doremi_weights(s)
    t = s.table.sort_values("trial")
    stages = max(1, s.n_stages())
    colors = _domain_colors(s.domains)
    fig, axes = _figure(max(6.0, 0.32 * len(t) + 2.5), 2.6 * stages, rows=stages, sharex=True)
    x = list(range(len(t)))
    for k, ax in enumerate(axes):
        bottom = [0.0] * len(t)
        for d in s.domains:
            w = [0.0 if math.isnan(v) else v for v in t[f"{WEIGHT}s{k}/{d}"]]
            ax.bar(x, w, bottom=bottom, color=colors[d], label=d, width=0.8)
            bottom = [b + v for b, v in zip(bottom, w)]
        starts = t[f"start/s{k}"] if f"start/s{k}" in t else [0.0]
        lo, hi = min(starts), max(starts)
        when = f"from {lo:.2f}" + (f"–{hi:.2f}" if hi > lo else "") + " of training"
        ax.set_title(f"{'base' if k == 0 else 'end'} stage ({when})", fontsize=10)
        ax.set_ylabel("weight")
        ax.set_ylim(0, 1)
    axes[-1].set_xticks(x, [str(int(v)) for v in t["trial"]], fontsize=8)
    for label, trial in zip(axes[-1].get_xticklabels(), t["trial"]):
        label.set_color(ROLE_COLORS[s.role(int(trial))])
    axes[-1].set_xlabel("trial (tick colour: blue fitted, orange held out, red failed)")
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    return _svg(fig, "weights")


def plot_predicted_vs_actual(s: SweepData) -> str | None:
    preds = s.fit.get("per_trial_predicted")
    if not preds:
        return None
    actual = dict(zip(s.table["trial"].astype(int), s.table[f"{LOSS}mean"]))
    fig, (ax,) = _figure(5.2, 4.4)
    groups = (("fit", "o", False), ("held out", "s", True))
    for role, marker, held in groups:
        pts = [(s.predicted_mean(p["trial"]), actual[p["trial"]], p["trial"])
               for p in preds if p["held_out"] == held and p["trial"] in actual]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, s=36,
                       color=ROLE_COLORS[role], label=f"{role} ({len(pts)})", zorder=3)
            for px, py, trial in pts:
                ax.annotate(str(trial), (px, py), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    if s.validate and "proxy" in s.validate["scales"]:
        w = s.validate["scales"]["proxy"]["candidates"]["winner"]
        if w["mean"][f"{LOSS}mean"] is not None:
            pred = sum(s.fit["predicted"].values()) / len(s.fit["predicted"])
            ax.errorbar([pred], [w["mean"][f"{LOSS}mean"]], yerr=[w["std"][f"{LOSS}mean"]],
                        marker="*", markersize=13, color=CANDIDATES["winner"], linestyle="none",
                        label="winner (validated, proxy)", zorder=4)
    lo, hi = ax.get_xlim()
    lo2, hi2 = ax.get_ylim()
    lo, hi = min(lo, lo2), max(hi, hi2)
    ax.plot([lo, hi], [lo, hi], color="#999999", linewidth=0.8, linestyle="--", zorder=1,
            label="y = x")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    h = s.fit.get("holdout")
    # Spearman of a single held-out trial is undefined (nan): shown as such, not as a number
    title = (f"held-out Spearman {_num(h['spearman'], 3)} (n={h['n']}), "
             f"regret {_num(h['regret'])}" if h else "no trials held out")
    ax.set_title(f"predicted vs actual mean loss\n{title}", fontsize=10)
    ax.set_xlabel("predicted mean loss (fit)")
    ax.set_ylabel("actual mean loss (eval)")
    ax.legend(fontsize=8, frameon=False)
    return _svg(fig, "fit")


def plot_validation(s: SweepData) -> str | None:
    """Per domain and scale: each candidate's loss relative to the natural mixture's, so that
    gaps of a percent are visible next to losses of very different size per domain."""
    if not s.validate:
        return None
    scales = list(s.validate["scales"])
    keys = [f"{LOSS}{d}" for d in s.domains] + [f"{LOSS}mean"]
    fig, axes = _figure(max(6.5, 0.9 * len(keys) + 2), 3.0 * len(scales), rows=len(scales),
                        sharex=True)
    for ax, scale in zip(axes, scales):
        cands = s.validate["scales"][scale]["candidates"]
        ref = cands.get("natural", {}).get("mean", {})
        relative = all(ref.get(k) for k in keys)
        names = sorted((n for n in cands if cands[n]["mean"][f"{LOSS}mean"] is not None),
                       key=lambda n: list(CANDIDATES).index(n) if n in CANDIDATES else 99)
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            c = cands[name]
            xs = [j - 0.4 + width * (i + 0.5) for j in range(len(keys))]
            if relative:
                ys = [100 * (c["mean"][k] / ref[k] - 1) for k in keys]
                es = [100 * c["std"][k] / ref[k] for k in keys]
            else:
                ys, es = [c["mean"][k] for k in keys], [c["std"][k] for k in keys]
            ax.errorbar(xs, ys, yerr=es, marker="o", markersize=5, linestyle="none", capsize=3,
                        color=CANDIDATES.get(name, "#000000"), label=f"{name} (n={c['n']})")
        if relative:
            ax.axhline(0, color="#999999", linewidth=0.8)
        ax.set_ylabel("loss vs natural (%)" if relative else "loss")
        ax.set_title(f"{scale} scale: mean ± std over seeds", fontsize=10)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    axes[-1].set_xticks(range(len(keys)), [k[len(LOSS):] for k in keys])
    return _svg(fig, "validation")


def _curve(run_dir: Path | None) -> tuple[list[int], list[float]]:
    from gemini_core.runs.tracking import read_metrics

    if run_dir is None:
        return [], []
    rows = [r for r in read_metrics(run_dir) if "train/loss" in r]
    return [r["step"] for r in rows], [r["train/loss"] for r in rows]


def plot_loss_curves(s: SweepData) -> str:
    scales = list(s.validate["scales"]) if s.validate else []
    fig, axes = _figure(5.0 * (1 + len(scales)), 3.6, cols=1 + len(scales))
    ax = axes[0]
    best = s.fit.get("best_trial", {}).get("trial")
    for _, row in s.table.sort_values("trial").iterrows():
        trial = int(row["trial"])
        steps, loss = _curve(s.run_dir(row["run_id"]))
        if not steps:
            continue
        role = s.role(trial)
        is_best = trial == best
        ax.plot(steps, loss, color="#000000" if is_best else ROLE_COLORS[role],
                linewidth=1.8 if is_best else 0.8, alpha=1.0 if is_best else 0.6,
                linestyle="--" if role == "failed" else "-",
                label=f"best trial ({trial})" if is_best else None)
    ax.set_title("trials (blue fitted, orange held out, red failed)", fontsize=10)
    if s.doremi:
        for key, color in (("reference", "#7f7f7f"), ("proxy", "#d62728")):
            steps, loss = _curve(s.run_dir(s.fit[key]["run_id"]))
            ax.plot(steps, loss, color=color, linewidth=1.2, label=f"DoReMi {key}")
        ax.set_title("DoReMi: reference and Group-DRO proxy", fontsize=10)
    for ax, scale in zip(axes[1:], scales):
        for name, c in s.validate["scales"][scale]["candidates"].items():
            for k, run_id in enumerate(c["run_ids"]):
                steps, loss = _curve(s.run_dir(run_id))
                ax.plot(steps, loss, color=CANDIDATES.get(name, "#000000"), linewidth=1.0,
                        alpha=0.8, label=name if k == 0 and steps else None)
        ax.set_title(f"validation, {scale} scale (one line per seed)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel("train/loss")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, frameon=False)
    return _svg(fig, "curves")


def plot_winner_schedule(s: SweepData) -> str:
    stages = s.winner["stages"]
    colors = _domain_colors(s.domains)
    xs, ys = [], {d: [] for d in s.domains}
    bounds = [st["start"] for st in stages] + [1.0]
    for st, end in zip(stages, bounds[1:]):  # piecewise constant: two points per stage
        xs += [st["start"], end]
        for d in s.domains:
            ys[d] += [st["weights"].get(d, 0.0)] * 2
    fig, (ax,) = _figure(6.5, 3.2)
    ax.stackplot(xs, [ys[d] for d in s.domains], labels=s.domains,
                 colors=[colors[d] for d in s.domains])
    for b in bounds[1:-1]:
        ax.axvline(b, color="#000000", linewidth=0.8, linestyle=":")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("fraction of training")
    ax.set_ylabel("weight")
    ax.set_title("the winner's mixture schedule", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    return _svg(fig, "schedule")


def plots(s: SweepData) -> dict[str, str | None]:
    """name -> inline SVG (None where the sweep has nothing to draw), in page order."""
    return {"weights": plot_trial_weights(s), "fit": plot_predicted_vs_actual(s),
            "validation": plot_validation(s), "curves": plot_loss_curves(s),
            "schedule": plot_winner_schedule(s)}


# -- the page


def _e(value) -> str:
    return html_lib.escape(str(value), quote=True)


def _num(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _cell(value, digits: int = 4, cls: str = "") -> str:
    """A table cell carrying its sort key."""
    key = "" if value is None or (isinstance(value, float) and math.isnan(value)) else value
    c = f' class="{cls}"' if cls else ""
    shown = _num(value, digits) if isinstance(value, float) or value is None else value
    return f'<td data-v="{_e(key)}"{c}>{_e(shown)}</td>'


def _doremi_table(s: SweepData) -> str:
    head = "".join(f"<th>{_e(d)}</th>" for d in s.domains)
    rows = []
    for key in ("reference", "proxy"):
        r = s.fit[key]
        weights = r.get("weights") or s.fit["doremi_weights"]
        rows.append(f"<tr><td>{_e(key)}</td><td class='run'>{_e(r['run_id'])}</td>"
                    f"<td>{_e(_num(r.get(LOSS + 'mean')))}</td>"
                    + "".join(f"<td>{weights.get(d, 0.0):.3f}</td>" for d in s.domains) + "</tr>")
    return (f"<table id='doremi-table'><thead><tr><th>run</th><th>id</th><th>mean loss</th>{head}"
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _choice_note(s: SweepData) -> str:
    """Where the winner came from: the fit's mixture, or a measured trial (fit.prefer_measured)."""
    from sweeps.runner import describe_choice  # runner imports this module
    return f"<p id='choice'>{_e(describe_choice(s.fit))}.</p>" if s.fit.get("choice") else ""


def _trials_table(s: SweepData) -> str:
    if s.doremi:
        return _doremi_table(s)
    stages = s.n_stages()
    head = ["trial", "role", "mean loss", "predicted"] + [f"loss {d}" for d in s.domains]
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
        + "".join(f"<td>{_e(_num(v, 5))}</td>" for v in s.fit["cv_mse"].get(d, {}).values())
        + f"<td>{_e(_num(s.fit['predicted'].get(d)))}</td>"
          f"<td>{_e(_num(s.fit['natural_predicted'].get(d)))}</td></tr>"
        for d, m in s.fit["chosen"].items())
    if "objective" in s.fit["cv_mse"]:  # what chose the one regressor for every domain
        rows += ("<tr><td>objective</td><td></td>" + "".join(
            f"<td>{_e(_num(v, 5))}</td>" for v in s.fit["cv_mse"]["objective"].values())
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
    from sweeps.runner import UPWEIGHTING, describe_upweighting, verdict  # runner imports
    # this module lazily, at a sweep's end
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
        notes = []
        for name, c in v["winner_vs"].items():
            direction = "lower" if c["gap"] > 0 else "higher"
            notes.append(f"winner vs {name}: mean loss {abs(c['relative']):.2%} {direction}, "
                         f"2σ = {2 * c['sigma']:.4f}: {verdict(c)}")
        notes += [describe_upweighting(v[key], label) for key, label in UPWEIGHTING
                  if v.get(key)]
        out.append(f"<h3>{_e(scale)} scale</h3><table><thead><tr><th>candidate</th><th>seeds</th>"
                   f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table><ul>"
                   + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    return "".join(out)


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
        + f'<div class="scroll">{_fit_table(s)}</div></section>',
        '<section id="winner"><h2>Winner</h2>' + _choice_note(s)
        + f'<div class="scroll">{_winner_table(s)}</div>'
        + _figure_html("schedule", svgs, "The winner's weights over training "
                       "(winner.json, a MixtureSchedule).", "")
        + "</section>",
        '<section id="validation"><h2>Validation</h2>'
        + (_figure_html("validation", svgs, "Each candidate's loss per domain "
                        "relative to the natural (token-proportional) mixture's, mean ± std over "
                        "seeds, at each validated scale.", "")
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
