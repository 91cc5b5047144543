"""The trainer's extension point: a training objective other than the plain next-token loss.

`trainer.run_experiment(cfg, runs_root, objective=...)` trains it in the one training loop every
run uses (logging, eval, checkpoints, resume, fault handling, W&B), so a method with a loss of
its own (DoReMi's Group-DRO proxy, sweeps/doremi.py) brings a step function, not a loop.

With an objective the loop's state is `{"state": <train state>, "carry": <the objective's
arrays>}`: checkpoints, in-memory snapshots, rollbacks and the Ray replica hold the carry with the
parameters, so a resumed run continues exactly. gemini_core defines this protocol and never
imports an implementation of it.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import jax
import numpy as np
from flax import nnx

from gemini_core.scale.sharding import Layout

Carry = Any  # a pytree of arrays
LoopState = dict[str, Any]  # {"state": train state (params, optimizer), "carry": Carry}
Metrics = dict[str, jax.Array]
# step(loop state, tokens_Bx(T+1), domain_B) -> (loop state, metrics); donates the loop state
ObjectiveStep = Callable[[LoopState, Any, np.ndarray], tuple[LoopState, Metrics]]


class Objective(Protocol):
    # the run dir's experiment is `<config name>_<suffix>`; the W&B group stays the config name
    suffix: str

    def identity(self) -> dict:
        """Fields added to the run's identity, hence its fingerprint and run id."""
        ...

    def init_carry(self, layout: Layout) -> Carry:
        """The carry before step 0, on `layout`'s mesh; a restore reads back into its shapes."""
        ...

    def make_step(self, graphdef: nnx.GraphDef, like: LoopState, layout: Layout) -> ObjectiveStep:
        """The jitted step; `like` gives the loop state's shapes and shardings (to restore frozen
        arrays onto). Its metrics are step_fns.make_train_step's ("loss" and "lr" scalars,
        "row_loss"_B; other scalars are logged as train/<name>) plus the arrays `log_metrics`
        takes."""
        ...

    def log_metrics(self, fetched: dict[str, np.ndarray]) -> dict[str, float]:
        """Pops this objective's non-scalar metrics from one step's fetched metrics and returns
        them by full metric name; they are logged with the step's row."""
        ...

    def summary(self, carry: Carry, steps: int) -> dict[str, float]:
        """Entries of the run's summary (and W&B summary) from the final carry."""
        ...
