"""The `sweep` step of a recipe: a mixture sweep (sweeps/) whose winner.json feeds the steps
after it."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Collection

from gemini_core.runs.rundir import find_run
from gx.recipe.kinds import StepContext, StepKind, run_tokenizer


class SweepStep(StepKind):
    outputs = ("sweep_dir", "winner", "winner_sha256", "tokenizer")

    @property
    def schema(self):
        from sweeps.config import SweepConfig
        return SweepConfig

    def validate(self, cfg: dict) -> Any:
        from sweeps import config as sweep_config
        return sweep_config.from_config_dict(cfg)

    def check_paths(self, typed: Any, pending: Collection[str]) -> None:
        from sweeps import config as sweep_config
        sweep_config.check_proxy_data(typed, skip=pending)

    def run(self, typed: Any, ctx: StepContext) -> dict:
        from sweeps import runner, sweep_setup
        # Ray may already be up (started by a data_prepare step), and then runner's own
        # start-up, which sets this, is skipped: Tune's boxed output would break up the log
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        if ctx.force:  # redo the fit and the choice; done trial runs are reused by content
            shutil.rmtree(sweep_setup.setup_sweep(typed, ctx.runs_root, ctx.log).dir,
                          ignore_errors=True)
        sweep_dir = runner.run_sweep(typed, ctx.runs_root, log=ctx.log)
        winner = sweep_dir / "winner.json"
        return {"sweep_dir": str(sweep_dir), "winner": str(winner),
                "winner_sha256": hashlib.sha256(winner.read_bytes()).hexdigest(),
                "tokenizer": _trials_tokenizer(sweep_dir, ctx.runs_root)}

    def check(self, outputs: dict) -> str | None:
        winner = Path(outputs["winner"])
        if not winner.is_file():
            return f"{winner} is gone"
        if hashlib.sha256(winner.read_bytes()).hexdigest() != outputs["winner_sha256"]:
            return f"{winner} was rewritten"
        return None

    def describe(self, outputs: dict) -> str:
        return outputs.get("winner", "")


def _trials_tokenizer(sweep_dir: Path, runs_root: Path) -> str | None:
    """The tokenizer the sweep's proxy runs trained with (they all share one)."""
    run_id = None
    if (sweep_dir / "trials.csv").is_file():
        with open(sweep_dir / "trials.csv", newline="") as f:
            run_id = next((row["run_id"] for row in csv.DictReader(f) if row.get("run_id")), None)
    elif (sweep_dir / "fit.json").is_file():  # DoReMi: its reference run
        run_id = (json.loads((sweep_dir / "fit.json").read_text()).get("reference") or {}).get(
            "run_id")
    return run_tokenizer(find_run(runs_root, run_id).path) if run_id else None
