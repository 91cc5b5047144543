"""A mixture sweep's directory, read back: its files, the trials table's columns, finding it.

Sweep dir: <runs root>/sweeps/<name>-<fingerprint[:8]>/ with sweep.json (what the sweep runs:
its config, the proxy and target experiments, domains, token counts), schedules/, tune/,
trials.csv (one row per trial, the `gx fit` table format), fit.json, winner.json,
validate.json (when validated), report.txt, report.html and wandb/ (its W&B summary run).
Everything that reads a finished sweep (the reports, the W&B summary) reads it through here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from gemini_core.errors import UserError

WEIGHT, LOSS = "weight/", "loss/"  # trials.csv columns: weight/s<k>/<domain>, loss/<domain>
# and, when the proxy declares downstream tasks, their values: downstream/<task>/<metric>
DOWNSTREAM = "downstream/"


def objective_columns(columns) -> list[str]:
    """The trials table's columns an objective may name besides the domains: each task metric
    (`downstream/<task>/<metric>`) and the mean loss. The tasks' mean (`downstream/mean/bpb`) is
    left out: `downstream/*/bpb` means the tasks, not their mean as one more."""
    return [c for c in columns if c == f"{LOSS}mean" or c.startswith(DOWNSTREAM)
            and not c.startswith(f"{DOWNSTREAM}mean/")]


def mean_loss(predicted: dict, domains: list[str]) -> float:
    """The mean over the domains' losses of a fit's predictions (which may hold task metrics)."""
    return float(sum(predicted[d] for d in domains) / len(domains))


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
        """The fit's predicted mean domain loss of a trial."""
        for p in self.fit.get("per_trial_predicted") or []:
            if p["trial"] == trial:
                return mean_loss(p["predicted"], self.domains)
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
        if col.startswith((WEIGHT, LOSS, DOWNSTREAM, "start/")):
            table[col] = pd.to_numeric(table[col], errors="coerce")
    table["failed"] = table["failed"].astype(str)
    table["run_id"] = table["run_id"].astype(str)
    val = sweep_dir / "validate.json"
    return SweepData(sweep_dir, meta, list(meta["domains"]), table,
                     json.loads((sweep_dir / "fit.json").read_text()),
                     json.loads((sweep_dir / "winner.json").read_text()),
                     json.loads(val.read_text()) if val.is_file() else None,
                     Path(meta.get("runs_root") or sweep_dir.parent.parent))


def find_sweep(root: Path, name: str) -> Path:
    """A sweep dir by path, by full name, or by its unique prefix (the newest if several)."""
    if (Path(name) / "sweep.json").is_file():
        return Path(name)
    found = sorted((root / "sweeps").glob(f"{name}*/fit.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UserError(f"no finished sweep named {name!r} under {root / 'sweeps'}")
    return found[-1].parent
