"""DoReMi (Xie et al., 2023) as a sweep method: `--config.method=doremi`.

Two proxy runs instead of a swarm: a reference run on the prior mixture (a normal proxy trial),
then a proxy of the same shape trained with Group DRO over domains. At every step the proxy's
per-token excess loss over the frozen reference, clipped at 0 and averaged per domain, drives
an exponentiated-gradient step on the domain weights alpha (step size eta), smoothed towards
uniform; the proxy minimizes the alpha-weighted per-domain loss. The batches come from the
reference mixture, as in the paper; the chosen mixture is alpha averaged over all steps,
projected onto the sweep's caps and minimum weight.

The DRO proxy is a run like any other: its own run dir, fingerprint (the proxy config, the
DoReMi parameters and the reference run's id), checkpoints with alpha in them (so a killed trial
resumes exactly), metrics.jsonl with `doremi/alpha/<domain>` and `doremi/excess/<domain>` per
logged step, W&B when tracking is on, and `doremi/weights/<domain>` (the average) in its summary.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemini_core.train import step_fns, trainer
from gemini_core.runs.checkpoint import Checkpointer
from gemini_core.config import ExperimentConfig
from gemini_core.data.mixture import Sampler
from gemini_core.errors import UserError
from gemini_core.eval.domain_loss import EvalSet, evaluate
from gemini_core.train.progress import Progress
from gemini_core.runs.rundir import RunDir, fingerprint, run_id
from gemini_core.runs.tracking import Tracker

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
    """step(state, ref_state, carry, tokens_BxT1, domain_B) -> (state, carry, metrics).

    carry = (alpha_K, alpha_sum_K). Donates state and carry; the reference is read only.
    """

    def loss_fn(model, tokens_BxT1, onehot_BxK, rows_K, ref_nll_BxT, alpha_K):
        nll_BxT = model.token_nll(tokens_BxT1[:, :-1], tokens_BxT1[:, 1:])
        excess_B = jnp.mean(jnp.maximum(jax.lax.stop_gradient(nll_BxT) - ref_nll_BxT, 0.0), -1)
        excess_K = _domain_means(excess_B, onehot_BxK, rows_K)
        # exponentiated gradient on the simplex, only for the domains present in this batch
        logits_K = jnp.log(alpha_K) + eta * jnp.where(rows_K > 0, excess_K, 0.0)
        new_alpha_K = (1 - smoothing) * jax.nn.softmax(logits_K) + smoothing / n_domains
        loss_K = _domain_means(jnp.mean(nll_BxT, -1), onehot_BxK, rows_K)
        return jnp.sum(new_alpha_K * loss_K), (new_alpha_K, excess_K, jnp.mean(nll_BxT))

    def step(state, ref_state, carry, tokens_BxT1, domain_B):
        alpha_K, alpha_sum_K = carry
        ts = nnx.merge(graphdef, state)
        ref_model = nnx.merge(graphdef, ref_state).model
        ref_nll_BxT = ref_model.token_nll(tokens_BxT1[:, :-1], tokens_BxT1[:, 1:])
        onehot_BxK = jax.nn.one_hot(domain_B, n_domains, dtype=jnp.float32)
        rows_K = onehot_BxK.sum(0)
        lr = ts.schedule(ts.optimizer.step[...])
        (loss, (alpha_K, excess_K, mean_nll)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(
            ts.model, tokens_BxT1, onehot_BxK, rows_K, ref_nll_BxT, alpha_K)
        ts.optimizer.update(ts.model, grads)
        metrics = {"loss": mean_nll, "dro_loss": loss, "lr": jnp.asarray(lr, jnp.float32),
                   "alpha": alpha_K, "excess": excess_K}
        return nnx.state(ts), (alpha_K, alpha_sum_K + alpha_K), metrics

    return jax.jit(step, donate_argnums=(0, 2))


# ---------------------------------------------------------------------------------------------
# the run


def _reference_state(ref: RunDir, graphdef, like):
    """The reference run's final parameters (the same architecture as the proxy)."""
    ckpt = Checkpointer(ref.checkpoints, keep=1, async_save=False)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise UserError(f"DoReMi reference run {ref.run_id} has no checkpoint: {ref.path}")
        return ckpt.restore(step, like)
    finally:
        ckpt.close()


def train_doremi(cfg: ExperimentConfig, reference: RunDir, dc: DoReMiConfig, runs_root: Path,
                 log: Log = print) -> dict:
    """Trains the DRO proxy (or reuses a done one, or resumes); returns its summary."""
    runs_root = Path(runs_root).absolute()
    trainer.enable_compilation_cache(trainer.cache_root(cfg, runs_root))
    p = trainer.prepare(cfg, runs_root, log)
    name = f"{cfg.name}_doremi"
    ident = {**p.identity, "doremi": dataclasses.asdict(dc), "reference_run": reference.run_id}
    fp = fingerprint(ident)
    run = RunDir(runs_root, name, run_id(name, fp))
    if (run.status() or {}).get("state") == "done":
        return run.summary() or {}
    run.write_config({**ident, "fingerprint": fp, "run_id": run.run_id})
    run.set_status("running")
    return trainer.record_outcome(run, lambda: _train(cfg, p, run, reference, dc, log))


def _train(cfg: ExperimentConfig, p: trainer.Prepared, run: RunDir, reference: RunDir,
           dc: DoReMiConfig, log: Log) -> dict:
    tc, domains = cfg.train, cfg.data.domains
    K = len(domains)
    sampler = Sampler(p.schedule, domains, p.data.train, total_steps=tc.steps,
                      batch_size=tc.batch_size, seq_len=cfg.data.seq_len, seed=cfg.seed)
    graphdef, state = step_fns.init_state(cfg.model, cfg.optimizer, tc.steps, cfg.seed)
    ref_state = _reference_state(reference, graphdef, state)
    carry = (jnp.full((K,), 1.0 / K, jnp.float32), jnp.zeros((K,), jnp.float32))
    ckpt = Checkpointer(run.checkpoints, keep=tc.keep_checkpoints)
    start = ckpt.latest_step() or 0
    if start:
        saved = ckpt.restore(start, {"state": state, "carry": carry})
        state, carry = saved["state"], tuple(saved["carry"])
        log(f"resuming {run.run_id} from step {start}")
    step_fn = make_doremi_step(graphdef, K, dc.eta, dc.smoothing)
    progress = Progress(tc.steps, start, log)
    with Tracker(run.path, run_id=run.run_id, group=cfg.name, config=run.config(),
                 tracking=cfg.tracking, resume_step=start or None, log=log) as tracker:
        try:
            for step in range(start, tc.steps):
                tokens_BxT1, domain_B = sampler.batch(step)
                state, carry, metrics = step_fn(state, ref_state, carry, tokens_BxT1, domain_B)
                done = step + 1
                if done % tc.log_every == 0 or done == tc.steps:
                    m = jax.device_get(metrics)
                    row = {"train/loss": float(m["loss"]), "train/dro_loss": float(m["dro_loss"]),
                           "train/lr": float(m["lr"])}
                    row.update({f"doremi/alpha/{d}": float(a) for d, a in zip(domains, m["alpha"])})
                    row.update({f"doremi/excess/{d}": float(e)
                                for d, e in zip(domains, m["excess"])})
                    tracker.log(done, row)
                    progress.update(done, row["train/loss"])
                if tc.checkpoint_every and done % tc.checkpoint_every == 0 and done < tc.steps:
                    ckpt.save(done, {"state": state, "carry": carry})
            if ckpt.latest_step() != tc.steps:
                ckpt.save(tc.steps, {"state": state, "carry": carry})
        finally:
            progress.close()
            ckpt.close()
        average_K = np.asarray(jax.device_get(carry[1]), np.float64) / tc.steps
        evalset = EvalSet.build(p.data.valid, p.data.token_bytes, seq_len=cfg.data.seq_len,
                                batch_size=tc.batch_size, batches=tc.eval_batches)
        final = evaluate(step_fns.make_eval_step(graphdef), state, evalset, tc.batch_size)
        weights = {f"doremi/weights/{d}": float(w) for d, w in zip(domains, average_K)}
        tracker.log(tc.steps, final)
        tracker.summary({**final, **weights})
    log("DoReMi weights (average over steps): "
        + ", ".join(f"{d}={w:.3f}" for d, w in zip(domains, average_K)))
    return {**final, **weights, "run_id": run.run_id, "steps": tc.steps,
            "reference_run": reference.run_id}
