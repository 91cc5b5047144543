"""The ReST^EM job's report: one row per policy (base, SFT, each iteration) with its held-out
greedy accuracy, pass@k and gold bpb (each with its standard error over problems), the E-step's
counts and the M-step's best step; as report.json, report.md, a plot (pass@k by iteration
against the baselines) and W&B (the job's own run: a row per iteration, the table in its
summary, the plot on its page; every M-step run is in the same W&B group)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

from gemini_core.config import to_json_dict
from gemini_core.runs.rundir import RunDir, read_json, write_json_atomic

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Row:
    policy: str  # base | sft | rest_em <i>
    run_id: str
    held_out: dict  # metric -> {"value", "stderr"}
    finetune: dict | None = None  # the M-step's summary
    estep: dict | None = None  # the E-step's counts

    def value(self, metric: str) -> float:
        return self.held_out[metric]["value"]

    def flat(self) -> dict[str, float]:
        out = {f"held_out/{m}": v["value"] for m, v in self.held_out.items()}
        if self.estep:
            out.update({f"estep/{k}": float(v) for k, v in self.estep.items()
                        if isinstance(v, (int, float))})
        if self.finetune:
            out["mstep/best_step"] = float(self.finetune.get("best_step", 0))
            out["mstep/valid_accuracy"] = float(self.finetune.get("valid/accuracy", 0))
        return out


def _pm(cell: dict, percent: bool) -> str:
    value, err = cell["value"], cell["stderr"]
    if percent:
        return f"{100 * value:.1f} ± {100 * err:.1f}"
    return f"{value:.3f} ± {err:.3f}"


def metrics_of(rows: Sequence[Row]) -> list[str]:
    """greedy, pass@k by k, then bpb (a result read back from JSON has its keys sorted)."""
    names = list(rows[0].held_out)
    order = lambda m: (m == "bpb", m != "greedy", int(m[5:]) if m.startswith("pass@") else 0)  # noqa: E731
    return sorted(names, key=order)


def line(row: Row) -> str:
    cells = ", ".join(f"{m} {_pm(row.held_out[m], m != 'bpb')}" for m in metrics_of([row]))
    return f"{row.policy:<10} {row.run_id}: {cells}"


def table(rows: Sequence[Row]) -> str:
    """A markdown table: accuracies in percent (± standard error over test problems)."""
    names = metrics_of(rows)
    head = ["policy", *[f"{m} %" if m != "bpb" else "gold bpb" for m in names],
            "kept / samples", "solved (train)", "M-step best step", "run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        e = r.estep or {}
        kept = f"{e['kept']:,} / {e['samples']:,}" if e else ""
        solved = f"{100 * e['solved']:.1f}%" if e else ""
        best = str((r.finetune or {}).get("best_step", ""))
        cells = [_pm(r.held_out[m], m != "bpb") for m in names]
        lines.append("| " + " | ".join([r.policy, *cells, kept, solved, best, r.run_id]) + " |")
    return "\n".join(lines)


def plot(rows: Sequence[Row], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m for m in metrics_of(rows) if m != "bpb"]
    iters = [r for r in rows if r.policy.startswith("rest_em")]
    base = next(r for r in rows if r.policy == "base")
    sft = next((r for r in rows if r.policy == "sft"), None)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs = [0] + [int(r.policy.split()[-1]) for r in iters]
    for i, m in enumerate(names):
        color = f"C{i}"
        ys = [100 * base.value(m)] + [100 * r.value(m) for r in iters]
        errs = [100 * base.held_out[m]["stderr"]] + [100 * r.held_out[m]["stderr"] for r in iters]
        ax.errorbar(xs, ys, yerr=errs, marker="o", color=color, capsize=3,
                    label=f"ReST^EM {m}")
        if sft is not None:
            ax.axhline(100 * sft.value(m), color=color, linestyle="--", linewidth=1,
                       label=f"SFT on human solutions {m}")
    ax.set_xticks(xs, ["base"] + [str(x) for x in xs[1:]])
    ax.set_xlabel("ReST^EM iteration")
    ax.set_ylabel("held-out test problems solved (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read(job_dir: RunDir) -> list[Row] | None:
    """The rows of a finished job's report; None when it has none."""
    done = read_json(job_dir.path / "report.json")
    return None if done is None else [Row(**r) for r in done["rows"]]


def write(job_dir: RunDir, rows: Sequence[Row], cfg, log: Log) -> dict:
    """report.json, report.md and the plot in the job's directory; its W&B run."""
    from gemini_core.runs.tracking import Tracker
    from gemini_core.runs.wandb_run import add_to_summary

    result = {"rows": [dataclasses.asdict(r) for r in rows]}
    write_json_atomic(job_dir.path / "report.json", result)
    text = table(rows)
    (job_dir.path / "report.md").write_text(f"# {job_dir.run_id}\n\n{text}\n")
    png = plot(rows, job_dir.path / "pass_at_k.png")
    summary = {f"{r.policy.replace(' ', '_')}/{k}": v for r in rows for k, v in r.flat().items()}
    config = to_json_dict(cfg)
    (job_dir.path / "metrics.jsonl").unlink(missing_ok=True)  # written whole, from the rows
    with Tracker(job_dir.path, run_id=job_dir.run_id, group=cfg.name, config=config,
                 tracking=cfg.tracking, log=log) as tracker:
        for i, r in enumerate(r for r in rows if r.policy != "sft"):
            tracker.log(i, r.flat())
        tracker.summary(summary)
    add_to_summary(job_dir.path, run_id=job_dir.run_id, group=cfg.name, config=config,
                   tracking=cfg.tracking, values={}, images={"pass_at_k": png})
    job_dir.write_summary(summary)
    log(text)
    log(f"report: {job_dir.path / 'report.md'}, plot: {png}")
    return result
