"""The M-step (and the SFT baseline): fine-tune the base model on (prompt, solution) pairs, the
loss on the solution tokens only, early-stopped on the valid problems' greedy accuracy.

Each fine-tune is a run directory of its own (`<runs root>/<job>_mstep/<id>/`, the id a
fingerprint of the base run, the training pairs and the settings), with the files every reader
of a run expects: config.json (the base's, with the fine-tune's optimizer and steps), status,
metrics.jsonl (and W&B), summary.json and one checkpoint, the best on valid. So `gx eval`,
`gx generate` and the next E-step load it like any run, and a repeated command reuses it.

Rows are not packed: one pair per row, `EOS prompt solution EOS`, right-padded; a row longer
than the context keeps its end (the solution). The optimizer is fresh (AdamW with the
fine-tune's settings, warmup then cosine); the parameters start from the base's.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gemini_core.config import OptimizerConfig, TrackingConfig, model_from_json, to_json_dict
from gemini_core.eval.loaded_run import LoadedRun, load_run
from gemini_core.eval.scoring import continuation_split
from gemini_core.eval.tasks import Example
from gemini_core.model import generate as gen
from gemini_core.runs.checkpoint import Checkpointer
from gemini_core.runs.rundir import RunDir, fingerprint, run_id
from gemini_core.runs.tracking import Tracker
from gemini_core.selftrain.config import FinetuneConfig
from gemini_core.selftrain.problems import Verify, judge
from gemini_core.train import step_fns

Log = Callable[[str], None]
Pair = tuple[str, str]  # (prompt as the model sees it, the solution that follows it)


@dataclasses.dataclass(frozen=True)
class Rows:
    tokens_NxT1: np.ndarray  # int32, right-padded with 0
    mask_NxT: np.ndarray  # float32: 1 where the target is a solution token (or its EOS)


def make_rows(tokenizer, pairs: Sequence[Pair], seq_len: int) -> Rows:
    T1 = seq_len + 1
    tokens = np.zeros((len(pairs), T1), np.int32)
    mask = np.zeros((len(pairs), seq_len), np.float32)
    for i, (context, solution) in enumerate(pairs):
        ids, n = continuation_split(tokenizer, context, solution)
        ids, n = ids[-T1 + 1:] + [tokenizer.eos_id], min(n, T1 - 2) + 1
        tokens[i, :len(ids)] = ids
        mask[i, len(ids) - 1 - n:len(ids) - 1] = 1.0
    return Rows(tokens, mask)


def masked_nll(model, tokens_BxT1: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    nll_BxT = model.token_nll(tokens_BxT1[:, :-1], tokens_BxT1[:, 1:])
    return jnp.sum(nll_BxT * mask_BxT) / jnp.maximum(jnp.sum(mask_BxT), 1.0)


def make_step(graphdef: nnx.GraphDef, layout) -> Callable:
    """step(state, tokens_Bx(T+1), mask_BxT) -> (state, {loss, grad_norm, lr}); donates state."""

    def step(state, tokens_BxT1, mask_BxT):
        ts = nnx.merge(graphdef, state)
        lr = ts.schedule(ts.optimizer.step[...])
        loss, grads = nnx.value_and_grad(masked_nll)(ts.model, tokens_BxT1, mask_BxT)
        grad_norm = optax.tree.norm(grads)
        ts.optimizer.update(ts.model, grads)
        return nnx.state(ts), {"loss": loss, "grad_norm": grad_norm,
                               "lr": jnp.asarray(lr, jnp.float32)}

    if layout is None or layout.mesh.size == 1:
        return jax.jit(step, donate_argnums=0)
    sharded = step_fns.jit_sharded(step, layout, donate=True)
    return lambda state, tokens, mask: sharded(state, tokens, layout.place_batch(mask))


def optimizer_config(f: FinetuneConfig) -> OptimizerConfig:
    return OptimizerConfig(lr=f.lr, warmup_steps=min(f.warmup_steps, f.steps - 1),
                           schedule="cosine", weight_decay=f.weight_decay, clip_norm=f.clip_norm)


def start_state(base: LoadedRun, f: FinetuneConfig, seed: int):
    """A fresh train state (the fine-tune's optimizer) holding the base's parameters."""
    model_cfg = model_from_json(base.cfg["model"])
    graphdef, state = step_fns.init_state(model_cfg, optimizer_config(f), f.steps, seed,
                                          base.layout)
    ts = nnx.merge(graphdef, state)
    nnx.update(ts.model, nnx.state(base.model))
    return graphdef, nnx.state(ts)


def greedy_accuracy(model, loaded: LoadedRun, problems: Sequence[Example], verify: Verify,
                    max_new_tokens: int, stop: tuple[str, ...], batch_size: int) -> float:
    cfg = gen.SamplingConfig(max_new_tokens=min(max_new_tokens, loaded.seq_len // 2),
                             temperature=0.0, stop=stop)
    out = gen.generate(model, loaded.tokenizer, [ex.context for ex in problems], cfg,
                       batch_size=batch_size, max_len=loaded.seq_len, layout=loaded.layout,
                       log=lambda _: None)
    return float(np.mean([judge(verify, ex, c.text)[0] for ex, c in zip(problems, out)]))


@dataclasses.dataclass(frozen=True)
class Request:
    """One fine-tune: `pairs` on top of the `base` run, named `<job>_mstep`."""
    job: str
    label: str  # what it is, for logs and W&B: "rest_em iteration 2", "sft"
    base: RunDir
    pairs: tuple[Pair, ...]
    valid: tuple[Example, ...]
    verify: Verify
    verifier: str  # its name ("" = the task's own): early stopping depends on it
    finetune: FinetuneConfig
    seed: int
    max_new_tokens: int
    stop: tuple[str, ...]
    batch_size: int  # of the valid decoding
    tracking: TrackingConfig


def run_dir(req: Request, runs_root: Path) -> RunDir:
    identity = {"base": req.base.run_id, "pairs": fingerprint([list(p) for p in req.pairs]),
                "finetune": to_json_dict(req.finetune), "seed": req.seed,
                "valid": fingerprint([ex.context for ex in req.valid]),
                "verifier": req.verifier}
    experiment = f"{req.job}_mstep"
    return RunDir(runs_root, experiment, run_id(experiment, fingerprint(identity)))


def finetune(req: Request, runs_root: Path, log: Log) -> RunDir:
    """The fine-tuned run (reused when done): its checkpoint is the best on valid."""
    run = run_dir(req, runs_root)
    if (run.status() or {}).get("state") == "done" and run.summary():
        log(f"{req.label}: fine-tune {run.run_id} done, reused")
        return run
    base = load_run(req.base, log=lambda _: None)
    f = req.finetune
    cfg = dict(base.cfg, optimizer=to_json_dict(optimizer_config(f)), seed=req.seed,
               name=run.experiment, finetune=dict(label=req.label, base=req.base.run_id,
                                                  pairs=len(req.pairs), **to_json_dict(f)))
    cfg["train"] = dict(base.cfg["train"], steps=f.steps, batch_size=f.batch_size,
                        keep_checkpoints=1)
    run.write_config(cfg)
    run.set_status("running")
    if run.checkpoints.exists():  # an interrupted attempt: a fine-tune is minutes, redo it
        import shutil
        shutil.rmtree(run.checkpoints)
    with Tracker(run.path, run_id=run.run_id, group=req.job, config=cfg, tracking=req.tracking,
                 log=log) as tracker:
        summary = _train(req, base, run, tracker, log)
        tracker.summary(summary)
    run.write_summary(summary)
    run.set_status("done")
    return run


def _train(req: Request, base: LoadedRun, run: RunDir, tracker: Tracker, log: Log) -> dict:
    f = req.finetune
    rows = make_rows(base.tokenizer, req.pairs, base.seq_len)
    graphdef, state = start_state(base, f, req.seed)
    step_fn = make_step(graphdef, base.layout)
    rng = np.random.default_rng(req.seed)
    order = np.empty(0, np.int64)
    ckpt = Checkpointer(run.checkpoints, keep=1, async_save=False)
    best, best_step, bad, started = -1.0, 0, 0, time.perf_counter()
    log(f"{req.label}: fine-tuning {req.base.run_id} on {len(req.pairs):,} solutions, at most "
        f"{f.steps} steps of {f.batch_size} -> {run.run_id}")
    step = 0
    try:
        for step in range(1, f.steps + 1):
            if len(order) < f.batch_size:  # a new pass over the pairs, reshuffled
                order = np.concatenate([order, rng.permutation(len(req.pairs))])
            take, order = order[:f.batch_size], order[f.batch_size:]
            state, m = step_fn(state, rows.tokens_NxT1[take], rows.mask_NxT[take])
            if step % f.eval_every and step != f.steps:
                continue
            model = nnx.merge(graphdef, state).model
            acc = greedy_accuracy(model, base, req.valid, req.verify, req.max_new_tokens,
                                  req.stop, req.batch_size)
            loss = float(m["loss"])
            tracker.log(step, {"train/loss": loss, "train/lr": float(m["lr"]),
                               "valid/accuracy": acc})
            better = acc > best
            log(f"  step {step}/{f.steps}  loss {loss:.4f}  valid accuracy {acc:.1%}"
                f"{'  (best: saved)' if better else ''}  "
                f"{time.perf_counter() - started:.0f}s")
            if better:
                best, best_step, bad = acc, step, 0
                ckpt.save(step, state)
            else:
                bad += 1
                if bad >= f.patience and step < f.steps:
                    log(f"  stopped early: no better valid accuracy in {bad} evaluations")
                    break
        ckpt.wait()
    finally:
        ckpt.close()
    return {"valid/accuracy": best, "best_step": best_step, "steps_run": step,
            "pairs": len(req.pairs), "seconds": round(time.perf_counter() - started, 1)}
