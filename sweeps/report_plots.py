"""The plots of a sweep's HTML report, each drawn by matplotlib as inline <svg> markup.

Text stays <text> (svg.fonttype none: the browser's own sans-serif) and no URL is referenced,
so the page that holds them stays self-contained. matplotlib escapes the text it writes (domain
names, run ids), as the page escapes its own.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

from sweeps.sweep_dir import DOWNSTREAM, LOSS, WEIGHT, SweepData, mean_loss

CANDIDATES = {"winner": "#d62728", "natural": "#7f7f7f", "uniform": "#bcbd22",
              "best_trial": "#1f77b4", "winner_no_anneal": "#ff9896",
              "winner_boost": "#9467bd", "doremi": "#2ca02c"}
ROLE_COLORS = {"fit": "#1f77b4", "held out": "#ff7f0e", "failed": "#d62728", "ok": "#1f77b4"}


def num_text(value, digits: int = 4) -> str:
    """A number as the report shows it; n/a for a missing one or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


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
            pred = mean_loss(s.fit["predicted"], s.domains)
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
    title = (f"held-out Spearman {num_text(h['spearman'], 3)} (n={h['n']}), "
             f"regret {num_text(h['regret'])}" if h else "no trials held out")
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
    tasks = sorted({k for v in s.validate["scales"].values() for c in v["candidates"].values()
                    for k in c["mean"] if k.startswith(DOWNSTREAM) and k.endswith("/bpb")
                    and not k.startswith(f"{DOWNSTREAM}mean/")})
    keys = [f"{LOSS}{d}" for d in s.domains] + [f"{LOSS}mean"] + tasks
    fig, axes = _figure(max(6.5, 0.9 * len(keys) + 2), 3.0 * len(scales), rows=len(scales),
                        sharex=True)
    for ax, scale in zip(axes, scales):
        cands = s.validate["scales"][scale]["candidates"]
        ref = cands.get("natural", {}).get("mean", {})
        relative = all(ref.get(k) for k in keys)
        if not relative:  # absolute values of losses and bpb do not share an axis
            keys = keys[:len(s.domains) + 1]
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
        ax.set_ylabel("vs natural (%)" if relative else "loss")
        ax.set_title(f"{scale} scale: mean ± std over seeds", fontsize=10)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    axes[-1].set_xticks(range(len(keys)), [k.split("/", 1)[1].removesuffix("/bpb") + (
        " bpb" if k.startswith(DOWNSTREAM) else "") for k in keys],
        rotation=30 if tasks else 0, ha="right" if tasks else "center")
    return _svg(fig, "validation")


def plot_decision(s: SweepData) -> str | None:
    """Decision accuracy across scales: each ranked trial's objective at proxy vs target scale."""
    d = (s.validate or {}).get("decision")
    if not d:
        return None
    fig, (ax,) = _figure(5.5, 4.2)
    ax.scatter(d["proxy"], d["target"], color="#1f77b4")
    for t, x, y in zip(d["trials"], d["proxy"], d["target"]):
        ax.annotate(str(t), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=8)
    ax.set_xlabel("objective at proxy scale (the trial)")
    ax.set_ylabel(f"objective at target scale (mean of {d['seeds']} seed(s))")
    ax.set_title(f"{d['pair_agreement']:.0%} of {d['pairs']} pairs ordered alike, Spearman "
                 f"{d['spearman']:.2f}", fontsize=10)
    return _svg(fig, "decision")


def plot_tradeoff(s: SweepData) -> str | None:
    """An objective over task metrics against the text: each trial's objective targets (their
    declared weights' mean, sign as recorded) vs its mean domain loss, coloured by the weight of
    the modality domains where the proxy has any. None for a loss-only objective."""
    targets = (s.meta.get("sweep", {}).get("objective") or {}).get("targets") or {}
    cols = {c: w for c, w in targets.items() if c in s.table.columns and c != f"{LOSS}mean"}
    if not cols:
        return None
    ok = s.table[s.table["failed"] == ""] if "failed" in s.table.columns else s.table
    total = sum(cols.values())
    y = sum(ok[c] * w for c, w in cols.items()) / total
    media = list((s.meta.get("proxy", {}).get("data", {}).get("modalities") or {}))
    weights = [c for c in ok.columns if c.startswith(WEIGHT) and c.split("/")[-1] in media
               and c.split("/")[1] == "s0"]
    fig, (ax,) = _figure(5.5, 4.2)
    if weights:
        dots = ax.scatter(ok[f"{LOSS}mean"], y, c=ok[weights].sum(axis=1), cmap="viridis", s=36,
                          zorder=3)
        fig.colorbar(dots, ax=ax, label="weight of " + " + ".join(media))
    else:
        ax.scatter(ok[f"{LOSS}mean"], y, color=ROLE_COLORS["ok"], s=36, zorder=3)
    for t, px, py in zip(ok["trial"].astype(int), ok[f"{LOSS}mean"], y):
        ax.annotate(str(t), (px, py), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xlabel("mean domain loss (text and captions)")
    ax.set_ylabel(" + ".join(f"{w / total:g}·{c.removeprefix(DOWNSTREAM)}"
                             for c, w in cols.items()), fontsize=8)
    ax.set_title("trials: the objective against the mean loss", fontsize=10)
    return _svg(fig, "tradeoff")


def _curve(run_dir: Path | None) -> tuple[list[int], list[float]]:
    from gemini_core.runs.metrics import read_metrics

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
    out = {"weights": plot_trial_weights(s), "fit": plot_predicted_vs_actual(s),
           "validation": plot_validation(s), "decision": plot_decision(s),
           "curves": plot_loss_curves(s), "schedule": plot_winner_schedule(s)}
    tradeoff = plot_tradeoff(s)  # only for an objective over task metrics: else no section
    if tradeoff is not None:
        out["tradeoff"] = tradeoff
    return out

