"""The sweep's own W&B run: trials table, report plots, fit metrics, winner.json as an artifact.

Beside the trials' runs (group = the sweep's name, job_type proxy/validate) one run of
job_type "sweep" sums the sweep up: id = the sweep dir's name (so running the sweep again, or
`log_sweep` again, continues the same W&B run), files under <sweep dir>/wandb/. Offline by default
and with the same environment handling as every run (gemini_core.runs.wandb_run): nothing under ~,
online only on WANDB_MODE=online. Skipped when the proxy config says tracking.wandb=false.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from gemini_core.config import TrackingConfig
from gemini_core.runs import wandb_run
from sweeps.report import render_html
from sweeps.report_plots import plots
from sweeps.sweep_dir import SweepData, load_sweep

Log = Callable[[str], None]


def _tracking_config(meta: dict) -> TrackingConfig:
    t = meta["proxy"]["tracking"]
    return TrackingConfig(wandb=bool(t.get("wandb", True)),
                          project=t.get("project", TrackingConfig.project),
                          job_type="sweep", tags=("sweep",))


def summary_metrics(s: SweepData) -> dict[str, float]:
    """Flat numbers for the run summary: counts, the held-out fit quality, predicted losses,
    and, where validated, every candidate's mean loss per scale and the winner's gaps."""
    f = s.fit
    out: dict[str, float] = {"trials/n_fit": f["n_fit"], "trials/n_holdout": f["n_holdout"],
                             "trials/n_failed": f["n_failed"]}
    if f.get("best_trial"):  # a DoReMi sweep has no trials
        out["trials/best_mean_loss"] = f["best_trial"]["loss/mean"]
    if f.get("holdout"):
        out.update({f"fit/holdout/{k}": v for k, v in f["holdout"].items()
                    if isinstance(v, (int, float))})
    out.update({f"fit/predicted/{d}": v for d, v in f["predicted"].items()})
    out.update({f"fit/natural_predicted/{d}": v
                for d, v in (f.get("natural_predicted") or {}).items()})
    out.update({f"fit/objective_predicted/{k}": v
                for k, v in (f.get("objective_predicted") or {}).items()})
    if f.get("choice"):  # 1: the fit's own mixture won; 0: a measured trial did
        out["fit/choice/from_fit"] = float(f["choice"]["from"] == "fit")
        out["fit/choice/predicted_gain"] = f["choice"]["predicted_gain"]
        out.update({f"fit/choice/{k}": f["choice"][k] for k in ("margin", "cv_error", "fold_spread")
                    if k in f["choice"]})
    for d, per in (f.get("cv_mse") or {}).items():
        out.update({f"fit/cv_mse/{d}/{name}": v for name, v in per.items()})
    for k, v in (f.get("seconds") or {}).items():
        out[f"time/{k}_s"] = v
    if s.validate:
        out["time/validation_s"] = s.validate.get("seconds") or 0.0
        for scale, v in s.validate["scales"].items():
            for name, c in v["candidates"].items():
                if c["mean"]["loss/mean"] is not None:
                    out[f"validate/{scale}/{name}/loss_mean"] = c["mean"]["loss/mean"]
                    out[f"validate/{scale}/{name}/loss_mean_std"] = c["std"]["loss/mean"]
            for name, c in v["winner_vs"].items():
                out[f"validate/{scale}/winner_vs_{name}/relative"] = c["relative"]
                out[f"validate/{scale}/winner_vs_{name}/beats_by_2_sigma"] = \
                    float(c["beats_by_2_sigma"])
            for name, c in (v.get("objective_vs") or {}).items():  # a capability's objective
                out[f"validate/{scale}/winner_vs_{name}/objective_relative"] = c["relative"]
                out[f"validate/{scale}/winner_vs_{name}/objective_beats_by_2_sigma"] = \
                    float(c["beats_by_2_sigma"])
        decision = s.validate.get("decision") or {}
        out.update({f"validate/decision/{k}": decision[k] for k in ("pair_agreement", "spearman")
                    if k in decision})
    return {k: float(v) for k, v in out.items() if v is not None}


def _log(run: Any, wandb: Any, s: SweepData) -> None:
    svgs = plots(s)
    table = s.table.copy()
    table["role"] = [s.role(int(t)) for t in table["trial"]]
    table["predicted/mean"] = [s.predicted_mean(int(t)) for t in table["trial"]]
    # inject=False: W&B's injected stylesheet is a link to a URL; the page stays self-contained
    row = {"trials": wandb.Table(dataframe=table),
           "report": wandb.Html(render_html(s, svgs), inject=False),
           **{f"plots/{name}": wandb.Html(svg, inject=False)
              for name, svg in svgs.items() if svg is not None},
           wandb_run.STEP_KEY: 0}
    run.log(row, step=0)
    run.summary.update(summary_metrics(s))
    artifact = wandb.Artifact(f"winner-{s.name}", type="mixture-schedule",
                              metadata={"sweep": s.name, "predicted": s.fit["predicted"]})
    artifact.add_file(str(s.dir / "winner.json"), name="winner.json")
    run.log_artifact(artifact)


def log_sweep(sweep_dir: Path, *, mode: str | None = None, force: bool = False,
              log: Log = print) -> Path | None:
    """Writes (or continues) the sweep's W&B run; returns its wandb dir, or None when skipped.

    `force`: even when the proxy says tracking.wandb=false (a summary after the fact)."""
    s = load_sweep(Path(sweep_dir))
    cfg = _tracking_config(s.meta)
    mode = mode or wandb_run.wandb_mode()
    if not (cfg.wandb or force) or mode == "disabled":
        return None
    env = wandb_run.EnvPatch()
    run = None
    try:
        env.set(wandb_run.sdk_env(s.dir, mode))
        config = {"sweep": s.meta.get("sweep", {}), "domains": s.domains,
                  "winner": s.winner, "method": s.fit.get("method", "regression"),
                  "chosen": s.fit.get("chosen", {})}
        run = wandb_run.start_wandb(s.dir, run_id=s.name, group=s.meta["sweep"]["name"],
                                     config=json.loads(json.dumps(config)), tracking=cfg,
                                     mode=mode)
        import wandb
        _log(run, wandb, s)
        run.finish()
        run = None
        wandb_run.teardown_if_idle()
    except Exception as e:
        if run is not None:
            run.finish(exit_code=1)
            wandb_run.teardown_if_idle()
        # like a run's tracker: offline W&B is a copy of what is on disk; losing it is a warning
        if not (mode == "offline" and wandb_run.recoverable(e)):
            raise
        log(f"warning: W&B summary of sweep {s.name} failed ({type(e).__name__}: {e})")
        return None
    finally:
        env.restore()
    where = s.dir / wandb_run.WANDB_SUBDIR
    log(f"W&B sweep summary {s.name}: " + (f"{where} (upload: wandb sync {where}/offline-run-*)"
                                           if mode == "offline" else "online"))
    return where
