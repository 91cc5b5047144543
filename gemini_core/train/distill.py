"""Distillation: a student trained on a mix of a finished teacher run's next-token distribution
and the data, as Gemini trains Nano from larger Gemini models.

    loss = alpha * tau^2 * KL + (1 - alpha) * CE(data)

with KL(teacher || student) (forward, as Gemma 2 uses) or KL(student || teacher) (reverse), both
on the temperature-tau distributions (tau^2 keeps the KL's gradient scale independent of tau,
as in Hinton et al.). `train/loss` stays the data cross-entropy, so a distilled run's curve is
comparable with a run from scratch; `train/kl` and `train/distill_loss` are logged beside it.

The teacher is any done run, referenced by run id (or its run dir): its config gives the
architecture, its last checkpoint the parameters, and its fingerprint enters the student's
(a retrained teacher is a new student). It must share the student's tokenizer, checked by the
tokenizer's content fingerprint. Two ways to get the teacher's distribution:
- top_k = 0: the teacher runs inside the student's jitted step (teacher state as an argument,
  not a baked-in constant), full vocabulary.
- top_k = K: for a teacher that does not fit beside the student. One pass of the teacher alone
  over exactly the batches the student will see (the sampler is a pure function of the step)
  writes its top-K log-probs and token ids to a cache (memmaps; built once, shared by every
  student with the same teacher, data and schedule); the student then trains without the
  teacher in memory, on the forward KL over the teacher's top K, renormalized.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gemini_core.config import DistillConfig, ModelConfig, OptimizerConfig, model_from_json
from gemini_core.data.tokenizer import Tokenizer, build_once
from gemini_core.errors import UserError
from gemini_core.runs.checkpoint import Checkpointer
from gemini_core.runs.rundir import RunDir, find_run, fingerprint
from gemini_core.scale.sharding import Layout
from gemini_core.train import step_fns

Log = Callable[[str], None]


@dataclasses.dataclass
class Teacher:
    run: RunDir
    fingerprint: str
    model: ModelConfig
    graphdef: Any = None
    state: Any = None  # loaded only when the teacher runs (top_k = 0, or to build the cache)


def resolve_teacher(dc: DistillConfig, runs_root: Path, tokenizer: Tokenizer) -> Teacher:
    """The teacher run, checked: done, and the same tokenizer as the student's data."""
    where = f"config.distill.teacher={dc.teacher!r}"
    try:
        run = find_run(runs_root, dc.teacher)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    state = (run.status() or {}).get("state")
    if state != "done":
        raise UserError(f"{where}: run {run.run_id} is {state or 'not started'}; a teacher must "
                        f"be a done run ({run.path})")
    cfg = run.config() or {}
    teacher_tok = (cfg.get("paths") or {}).get("tokenizer")
    theirs = Tokenizer(Path(teacher_tok)).fingerprint if teacher_tok and \
        Path(teacher_tok).is_dir() else None
    if theirs != tokenizer.fingerprint:
        raise UserError(
            f"{where}: the teacher's tokenizer ({(theirs or 'missing')[:12]}, {teacher_tok}) is not "
            f"the student's ({tokenizer.fingerprint[:12]}, {tokenizer.path}); distillation "
            "compares distributions over the same token ids: give the student the teacher's "
            "data.tokenizer settings and data")
    # the teacher's resolved config.json, written by the trainer: trusted as it is
    return Teacher(run, cfg["fingerprint"], model_from_json(cfg["model"]))


def load_teacher_state(t: Teacher, layout: Layout | None = None) -> Teacher:
    """The teacher's last checkpoint, restored onto its shards under `layout` (its parameters
    follow the same logical-axis rules as the student's)."""
    cfg = t.run.config()
    opt = OptimizerConfig(**cfg["optimizer"])
    graphdef, like = step_fns.init_state(t.model, opt, cfg["train"]["steps"], cfg["seed"], layout)
    ckpt = Checkpointer(t.run.checkpoints, keep=1, async_save=False, read_only=True)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise UserError(f"teacher {t.run.run_id} has no checkpoint in {t.run.checkpoints}")
        state = ckpt.restore(step, like)
    finally:
        ckpt.close()
    return dataclasses.replace(t, graphdef=graphdef, state=state)


# ---------------------------------------------------------------------------------------------
# losses (per token, f32)


def kl_full(student_NxV: jax.Array, teacher_NxV: jax.Array, tau: float, kind: str) -> jax.Array:
    """KL between the temperature-tau softmaxes, per token: forward KL(t||s) or reverse KL(s||t)."""
    log_s_NxV = jax.nn.log_softmax(student_NxV / tau, axis=-1)
    log_t_NxV = jax.nn.log_softmax(teacher_NxV / tau, axis=-1)
    if kind == "reverse":
        log_s_NxV, log_t_NxV = log_t_NxV, log_s_NxV
    return jnp.sum(jnp.exp(log_t_NxV) * (log_t_NxV - log_s_NxV), axis=-1)


def kl_topk(student_NxV: jax.Array, logp_t_NxK: jax.Array, ids_NxK: jax.Array,
            tau: float) -> jax.Array:
    """Forward KL over the teacher's top K (its log-probs renormalized over them), per token."""
    log_s_NxV = jax.nn.log_softmax(student_NxV / tau, axis=-1)
    log_s_NxK = jnp.take_along_axis(log_s_NxV, ids_NxK, axis=-1)
    log_t_NxK = jax.nn.log_softmax(logp_t_NxK, axis=-1)
    return jnp.sum(jnp.exp(log_t_NxK) * (log_t_NxK - log_s_NxK), axis=-1)


def _mix(dc: DistillConfig, nll_N: jax.Array, kl_N: jax.Array):
    ce, kl = jnp.mean(nll_N), jnp.mean(kl_N)
    return dc.alpha * dc.temperature ** 2 * kl + (1 - dc.alpha) * ce, (ce, kl)


# ---------------------------------------------------------------------------------------------
# the student's train step: (state, tokens_Bx(T+1), step) -> (state, metrics), like steps'


def make_train_step(graphdef: nnx.GraphDef, teacher: Teacher, dc: DistillConfig,
                    topk: "TopKCache | None" = None, layout: Layout | None = None):
    """Under `layout` the student's state keeps its shardings, the batch and the cached top-K
    rows are split like the batch, and the teacher's state stays on the shards it was restored
    onto (`load_teacher_state(..., layout)`), as step_fns.make_train_step does for a plain run."""
    from gemini_core.model.transformer import cross_entropy

    def student_logits(model, tokens_BxT1):
        return model.logits(model.hidden(tokens_BxT1[:, :-1]))

    def finish(ts, loss_fn, lr, tokens_BxT1, *args):
        B = tokens_BxT1.shape[0]
        (loss, (ce, kl, nll_N)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(
            ts.model, tokens_BxT1, *args)
        grad_norm = optax.tree.norm(grads)
        ts.optimizer.update(ts.model, grads)
        return nnx.state(ts), {"loss": ce, "kl": kl, "distill_loss": loss,
                               "grad_norm": grad_norm, "lr": jnp.asarray(lr, jnp.float32),
                               "row_loss": jnp.mean(nll_N.reshape(B, -1), axis=-1)}

    def loss_full(model, tokens_BxT1, teacher_NxV):
        logits_NxV = student_logits(model, tokens_BxT1)
        nll_N = cross_entropy(logits_NxV, tokens_BxT1[:, 1:].reshape(-1))
        loss, (ce, kl) = _mix(dc, nll_N, kl_full(logits_NxV, teacher_NxV, dc.temperature,
                                                  dc.kl))
        return loss, (ce, kl, nll_N)

    def loss_topk(model, tokens_BxT1, logp_NxK, ids_NxK):
        logits_NxV = student_logits(model, tokens_BxT1)
        nll_N = cross_entropy(logits_NxV, tokens_BxT1[:, 1:].reshape(-1))
        loss, (ce, kl) = _mix(dc, nll_N, kl_topk(logits_NxV, logp_NxK, ids_NxK, dc.temperature))
        return loss, (ce, kl, nll_N)

    def jit(fn):
        return (jax.jit(fn, donate_argnums=0) if layout is None
                else step_fns.jit_sharded(fn, layout, donate=True))

    if topk is None:
        def step_full(state, tokens_BxT1, teacher_state):
            ts = nnx.merge(graphdef, state)
            t_model = nnx.merge(teacher.graphdef, teacher_state).model
            teacher_NxV = jax.lax.stop_gradient(
                t_model.logits(t_model.hidden(tokens_BxT1[:, :-1])))
            lr = ts.schedule(ts.optimizer.step[...])
            return finish(ts, loss_full, lr, tokens_BxT1, teacher_NxV)

        full = jit(step_full)
        return lambda state, tokens_BxT1, step: full(state, tokens_BxT1, teacher.state)

    def step_topk(state, tokens_BxT1, logp_NxK, ids_NxK):
        ts = nnx.merge(graphdef, state)
        lr = ts.schedule(ts.optimizer.step[...])
        return finish(ts, loss_topk, lr, tokens_BxT1, logp_NxK, ids_NxK)

    cached = jit(step_topk)
    if layout is None:
        return lambda state, tokens_BxT1, step: cached(state, tokens_BxT1, *topk.get(step))
    return lambda state, tokens_BxT1, step: cached(
        state, tokens_BxT1, *(layout.place_batch(np.asarray(a)) for a in topk.get(step)))


# ---------------------------------------------------------------------------------------------
# the teacher's top-K over the student's batches, cached


@dataclasses.dataclass
class TopKCache:
    logp_SxNxK: np.ndarray  # float16 memmaps: log-probs at temperature tau
    ids_SxNxK: np.ndarray  # int32

    def get(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        return (np.asarray(self.logp_SxNxK[step], np.float32),
                np.asarray(self.ids_SxNxK[step], np.int32))


def topk_cache(teacher: Teacher, dc: DistillConfig, sampler, identity: dict, cache_root: Path,
               log: Log) -> TopKCache:
    """Builds (once) or opens the teacher's top-K for every step of `sampler`."""
    key = fingerprint({"teacher": teacher.fingerprint, "k": dc.top_k, "tau": dc.temperature,
                       "batches": identity})
    final = Path(cache_root) / "distill" / f"{teacher.run.run_id}-top{dc.top_k}-{key[:12]}"
    S, N = sampler.total_steps, sampler.batch_size * sampler.seq_len
    shape = (S, N, dc.top_k)

    def build(tmp: Path) -> None:
        t = load_teacher_state(teacher)
        model_fn = jax.jit(lambda st, tok: _teacher_topk(t.graphdef, st, tok, dc))
        logp = np.lib.format.open_memmap(tmp / "logp.npy", "w+", np.float16, shape)
        ids = np.lib.format.open_memmap(tmp / "ids.npy", "w+", np.int32, shape)
        for s in range(S):
            lp, ix = model_fn(t.state, sampler.batch(s)[0])
            logp[s], ids[s] = np.asarray(lp, np.float16), np.asarray(ix)
            if (s + 1) % max(S // 10, 1) == 0:
                log(f"distill: teacher top-{dc.top_k} for step {s + 1}/{S}")
        logp.flush(), ids.flush()
        (tmp / "meta.json").write_text(json.dumps({"shape": shape, "teacher": teacher.run.run_id}))

    if build_once(final, lambda p: (p / "meta.json").is_file(), build):
        log(f"distill: cached the teacher's top-{dc.top_k} in {final}")
    return TopKCache(np.load(final / "logp.npy", mmap_mode="r"),
                     np.load(final / "ids.npy", mmap_mode="r"))


def _teacher_topk(graphdef, state, tokens_BxT1, dc: DistillConfig):
    model = nnx.merge(graphdef, state).model
    logits_NxV = model.logits(model.hidden(tokens_BxT1[:, :-1]))
    logp_NxV = jax.nn.log_softmax(logits_NxV / dc.temperature, axis=-1)
    return jax.lax.top_k(logp_NxV, dc.top_k)
