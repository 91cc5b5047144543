"""DoReMi (Xie et al., 2023) as a sweep method: `--config.method=doremi`.

Two proxy runs instead of a swarm: a reference run on the prior mixture (a normal proxy trial),
then a proxy of the same shape trained with Group DRO over domains. At every step the proxy's
per-token excess loss over the frozen reference, clipped at 0 and averaged per domain, drives
an exponentiated-gradient step on the domain weights alpha (step size eta), smoothed towards
uniform; the proxy minimizes the alpha-weighted per-domain loss. The batches come from the
reference mixture, as in the paper; the chosen mixture is alpha averaged over all steps,
projected onto the sweep's caps and minimum weight.

The DRO proxy is a run like any other, trained by gemini_core's one loop
(`trainer.run_experiment` with the `GroupDRO` objective): its own run dir, fingerprint (the
proxy config, the DoReMi parameters and the reference run's id), checkpoints with alpha in them
(so a killed trial resumes exactly), metrics.jsonl with `doremi/alpha/<domain>` and
`doremi/excess/<domain>` per logged step, W&B when tracking is on, and `doremi/weights/<domain>`
(the average) in its summary.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gemini_core.config import ExperimentConfig
from gemini_core.errors import UserError
from gemini_core.runs.checkpoint import Checkpointer
from gemini_core.runs.rundir import RunDir
from gemini_core.scale.sharding import Layout
from gemini_core.train import step_fns, trainer
from gemini_core.train.objective import LoopState, ObjectiveStep

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class DoReMiConfig:
    eta: float = 1.0  # step size of the exponentiated-gradient update of the domain weights
    smoothing: float = 1e-3  # alpha <- (1 - c) alpha + c / K after each update
    reference: str = "prior"  # the reference run's (and the DRO batches') mixture: prior | uniform


def check(c: DoReMiConfig) -> None:
    if not c.eta > 0:
        raise UserError(f"config.doremi.eta={c.eta}: must be > 0")
    if not 0 <= c.smoothing <= 1:
        raise UserError(f"config.doremi.smoothing={c.smoothing}: must be in [0, 1]")
    if c.reference not in ("prior", "uniform"):
        raise UserError(f"config.doremi.reference={c.reference!r}: expected 'prior' or 'uniform'")


# ---------------------------------------------------------------------------------------------
# the jitted DRO step


def _domain_means(x_B: jax.Array, onehot_BxK: jax.Array, rows_K: jax.Array) -> jax.Array:
    return (onehot_BxK.T @ x_B) / jnp.maximum(rows_K, 1.0)


def make_doremi_step(graphdef: nnx.GraphDef, n_domains: int, eta: float, smoothing: float):
    """step(loop, tokens_BxT1, domain_B, ref_state) -> (loop, metrics), unjitted.

    loop = {"state": train state, "carry": {"alpha_K", "alpha_sum_K"}}; the reference is read
    only. alpha is updated from this batch's excess before the proxy's loss is weighted by it.
    """

    def loss_fn(model, tokens_BxT1, onehot_BxK, rows_K, ref_nll_BxT, alpha_K):
        nll_BxT = model.token_nll(tokens_BxT1[:, :-1], tokens_BxT1[:, 1:])
        excess_B = jnp.mean(jnp.maximum(jax.lax.stop_gradient(nll_BxT) - ref_nll_BxT, 0.0), -1)
        excess_K = _domain_means(excess_B, onehot_BxK, rows_K)
        # exponentiated gradient on the simplex, only for the domains present in this batch
        logits_K = jnp.log(alpha_K) + eta * jnp.where(rows_K > 0, excess_K, 0.0)
        new_alpha_K = (1 - smoothing) * jax.nn.softmax(logits_K) + smoothing / n_domains
        row_loss_B = jnp.mean(nll_BxT, -1)
        loss_K = _domain_means(row_loss_B, onehot_BxK, rows_K)
        return jnp.sum(new_alpha_K * loss_K), (new_alpha_K, excess_K, row_loss_B)

    def step(loop, tokens_BxT1, domain_B, ref_state):
        carry = loop["carry"]
        ts = nnx.merge(graphdef, loop["state"])
        ref_model = nnx.merge(graphdef, ref_state).model
        ref_nll_BxT = ref_model.token_nll(tokens_BxT1[:, :-1], tokens_BxT1[:, 1:])
        onehot_BxK = jax.nn.one_hot(domain_B, n_domains, dtype=jnp.float32)
        rows_K = onehot_BxK.sum(0)
        lr = ts.schedule(ts.optimizer.step[...])
        (loss, (alpha_K, excess_K, row_loss_B)), grads = nnx.value_and_grad(
            loss_fn, has_aux=True)(ts.model, tokens_BxT1, onehot_BxK, rows_K, ref_nll_BxT,
                                   carry["alpha_K"])
        grad_norm = optax.tree.norm(grads)
        ts.optimizer.update(ts.model, grads)
        metrics = {"loss": jnp.mean(row_loss_B), "dro_loss": loss, "grad_norm": grad_norm,
                   "lr": jnp.asarray(lr, jnp.float32), "row_loss": row_loss_B,
                   "alpha": alpha_K, "excess": excess_K}
        carry = {"alpha_K": alpha_K, "alpha_sum_K": carry["alpha_sum_K"] + alpha_K}
        return {"state": nnx.state(ts), "carry": carry}, metrics

    return step


def reference_state(ref: RunDir, like):
    """The reference run's final train state, onto `like`'s shapes and shardings (the proxy's:
    the same architecture)."""
    ckpt = Checkpointer(ref.checkpoints, keep=1, async_save=False, read_only=True)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise UserError(f"DoReMi reference run {ref.run_id} has no checkpoint: {ref.path}")
        return ckpt.restore(step, like)
    finally:
        ckpt.close()


# ---------------------------------------------------------------------------------------------
# the objective the trainer runs (gemini_core.train.objective.Objective)


@dataclasses.dataclass(frozen=True)
class GroupDRO:
    reference: RunDir
    dc: DoReMiConfig
    domains: tuple[str, ...]
    suffix: str = "doremi"

    def identity(self) -> dict:
        return {"doremi": dataclasses.asdict(self.dc), "reference_run": self.reference.run_id}

    def init_carry(self, layout: Layout) -> dict[str, jax.Array]:
        K = len(self.domains)
        # replicated on the mesh (made inside a jit: every process builds its own copy)
        return jax.jit(lambda: {"alpha_K": jnp.full((K,), 1.0 / K, jnp.float32),
                                "alpha_sum_K": jnp.zeros((K,), jnp.float32)},
                       out_shardings=layout.replicated)()

    def make_step(self, graphdef: nnx.GraphDef, like: LoopState, layout: Layout) -> ObjectiveStep:
        ref_state = reference_state(self.reference, like["state"])
        step = step_fns.jit_sharded(
            make_doremi_step(graphdef, len(self.domains), self.dc.eta, self.dc.smoothing),
            layout, donate=True)

        def call(loop: LoopState, tokens_BxT1, domain_B: np.ndarray):
            return step(loop, tokens_BxT1, layout.place_batch(np.asarray(domain_B, np.int32)),
                        ref_state)

        return call

    def log_metrics(self, fetched: dict[str, np.ndarray]) -> dict[str, float]:
        alpha_K, excess_K = fetched.pop("alpha"), fetched.pop("excess")
        return {**{f"doremi/alpha/{d}": float(a) for d, a in zip(self.domains, alpha_K)},
                **{f"doremi/excess/{d}": float(e) for d, e in zip(self.domains, excess_K)}}

    def summary(self, carry: dict[str, jax.Array], steps: int) -> dict[str, float]:
        average_K = np.asarray(jax.device_get(carry["alpha_sum_K"]), np.float64) / steps
        return {f"doremi/weights/{d}": float(w) for d, w in zip(self.domains, average_K)}


def train_doremi(cfg: ExperimentConfig, reference: RunDir, dc: DoReMiConfig, runs_root: Path,
                 log: Log = print) -> dict:
    """Trains the DRO proxy (or reuses a done one, or resumes); returns its summary."""
    summary = trainer.run_experiment(cfg, runs_root, log=log,
                                     objective=GroupDRO(reference, dc, cfg.data.domains))
    log("DoReMi weights (average over steps): " + ", ".join(
        f"{d}={summary[f'doremi/weights/{d}']:.3f}" for d in cfg.data.domains))
    return summary
