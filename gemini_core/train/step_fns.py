"""The jitted functional core the trainer calls: init, train step, eval step.

The train state is one NNX module (model + nnx.Optimizer + the lr schedule, which is static),
split into a static `graphdef` and a pytree `state` of arrays: params, AdamW moments, step
counts. `state` is what orbax saves and restores (an nnx.State: a nested mapping of arrays), and
what the steps take and return; `graphdef` closes over the architecture, the optimizer
transformation and the schedule, so `make_train_step(graphdef)` needs nothing else.

Eval returns per-row summed NLL in nats; bits per byte is computed by the caller from a
per-token byte-length table (gemini_core.eval.domain_loss), which keeps the tokenizer out of the jit.

With a `sharding.Layout` the state is created directly sharded (jit out_shardings from the
parameters' logical names), each step keeps the state's shardings, takes the host batch and
places it (batch split over data and fsdp), and returns replicated metrics; without one
(tests, benches on one device) the steps are the plain jits.
"""

from __future__ import annotations

import ctypes
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gemini_core.config import ModelConfig, OptimizerConfig
from gemini_core.model.transformer import Transformer
from gemini_core.scale.sharding import Layout
from gemini_core.train.optim import lr_schedule, make_optimizer

State = Any  # nnx.State: a pytree of arrays
Metrics = dict[str, jax.Array]
TrainFn = Callable[[State, jax.Array], tuple[State, Metrics]]
EvalFn = Callable[[State, jax.Array], jax.Array]


class TrainState(nnx.Module):
    def __init__(self, model: Transformer, tx: optax.GradientTransformation,
                 schedule: optax.Schedule):
        self.model = model
        self.optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        self.schedule = schedule  # static: only used to report the lr of a step


def build(model_cfg: ModelConfig, opt_cfg: OptimizerConfig, total_steps: int,
          seed: int | jax.Array) -> TrainState:
    model = Transformer(model_cfg, rngs=nnx.Rngs(params=seed))
    tx = make_optimizer(opt_cfg, total_steps)
    return TrainState(model, tx, lr_schedule(opt_cfg, total_steps))


def init_state(model_cfg: ModelConfig, opt_cfg: OptimizerConfig, total_steps: int,
               seed: int, layout: Layout | None = None) -> tuple[nnx.GraphDef, State]:
    # initialised inside one jit: a single compiled program instead of one dispatch per tensor;
    # with a layout each array is born on its shards (never whole on one device)
    graphdef, abstract = nnx.split(nnx.eval_shape(
        lambda: build(model_cfg, opt_cfg, total_steps, seed)))
    shardings = {} if layout is None else {"out_shardings": layout.state_shardings(abstract)}

    def init(key: jax.Array) -> State:
        return nnx.split(build(model_cfg, opt_cfg, total_steps, key))[1]

    # the seed is an argument, not a constant baked into the program: runs that differ only in
    # seed (validation's seeds, a sweep's trials) share one compiled init in the persistent cache
    return graphdef, jax.jit(init, **shardings)(jax.random.key(seed))


def graphdef_of(model_cfg: ModelConfig, opt_cfg: OptimizerConfig, total_steps: int
                ) -> nnx.GraphDef:
    """The static half of the train state for `model_cfg`, no arrays made: a stage's own model
    setting over the same state (gemini_core.train.context_stages)."""
    return nnx.graphdef(nnx.eval_shape(lambda: build(model_cfg, opt_cfg, total_steps, 0)))


def count_params(state_or_cfg: State | ModelConfig) -> int:
    """Number of model parameters (not optimizer state), from a state or by formula."""
    if isinstance(state_or_cfg, ModelConfig):
        from gemini_core.scale.flops import param_counts
        return param_counts(state_or_cfg)["total"]
    # parameters only: a multimodal model's media tables are state, not parameters
    params = nnx.filter_state(state_or_cfg["model"], nnx.Param)
    return sum(int(x.size) for x in jax.tree.leaves(params))


def mean_nll(model: Transformer, tokens_BxT1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean NLL over the batch, per-row mean NLL_B): the rows give per-domain train loss.
    Means over the targets the model counts (text only, with media)."""
    nll_BxT = model.token_nll(tokens_BxT1[:, :-1], tokens_BxT1[:, 1:])
    mask_BxT = model.target_mask(tokens_BxT1[:, 1:])
    if mask_BxT is None:
        return jnp.mean(nll_BxT), jnp.mean(nll_BxT, axis=-1)
    # a multimodal batch: the mean over the text targets it holds
    count_B = jnp.sum(mask_BxT, axis=-1, dtype=jnp.float32)
    return (jnp.sum(nll_BxT) / jnp.maximum(jnp.sum(count_B), 1.0),
            jnp.sum(nll_BxT, axis=-1) / jnp.maximum(count_B, 1.0))


def make_train_step(graphdef: nnx.GraphDef, layout: Layout | None = None) -> TrainFn:
    """step_fn(state, tokens_Bx(T+1) int32) -> (state, {loss, grad_norm, lr, row_loss}).

    Donates state. Metrics stay on device (the loop fetches them a step late). `loss` is the
    loss of the parameters before this step's update, `row_loss` the same per row (B,), and
    `lr` the rate this step applied. With a layout, tokens may be a host array (the global
    batch); the state keeps the shardings it came with.
    """

    def step(state: State, tokens_BxT1: jax.Array) -> tuple[State, Metrics]:
        ts = nnx.merge(graphdef, state)
        lr = ts.schedule(ts.optimizer.step[...])
        (loss, row_loss_B), grads = nnx.value_and_grad(mean_nll, has_aux=True)(
            ts.model, tokens_BxT1)
        grad_norm = optax.tree.norm(grads)
        ts.optimizer.update(ts.model, grads)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": jnp.asarray(lr, jnp.float32),
                   "row_loss": row_loss_B}
        return nnx.state(ts), metrics

    if layout is None:
        return jax.jit(step, donate_argnums=0)
    return jit_sharded(step, layout, donate=True)


def jit_sharded(fn: Callable, layout: Layout, donate: bool) -> Callable:
    """fn(state, tokens, *extra) jitted under `layout`: tokens placed, state shardings kept
    (pinned as out_shardings, taken from the first state it sees: init or restore gave them),
    `extra` arrays as they come (place them: a teacher's state by its rules, per-token arrays
    with `layout.place_batch`), outputs other than the state replicated (every process can
    fetch them)."""
    jitted = None

    def call(state: State, tokens_BxT1, *extra):
        nonlocal jitted
        if jitted is None:
            state_sh = jax.tree.map(lambda x: x.sharding, state)
            extra_sh = jax.tree.map(lambda x: x.sharding, extra)
            out = (state_sh, layout.replicated) if donate else layout.replicated
            jitted = jax.jit(fn, in_shardings=(state_sh, layout.batch_sharding(), *extra_sh),
                             out_shardings=out, donate_argnums=0 if donate else ())
        if not isinstance(tokens_BxT1, jax.Array):
            tokens_BxT1 = layout.place_batch(np.asarray(tokens_BxT1))
        with layout.activate():
            return jitted(state, tokens_BxT1, *extra)

    return call


def make_eval_step(graphdef: nnx.GraphDef, layout: Layout | None = None) -> EvalFn:
    """eval_fn(state, tokens_Bx(T+1)) -> nll_sum_B: per-row NLL summed over T targets (nats)."""

    def evaluate(state: State, tokens_BxT1: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, state).model
        nll_BxT = model.token_nll(tokens_BxT1[:, :-1], tokens_BxT1[:, 1:])
        return jnp.sum(nll_BxT, axis=-1)

    if layout is None:
        return jax.jit(evaluate)
    sharded = jit_sharded(evaluate, layout, donate=False)

    def call(state: State, tokens_BxT1: np.ndarray) -> np.ndarray:
        # a last eval batch may be short: pad with rows of token 0 to split evenly, drop them
        B = tokens_BxT1.shape[0]
        pad = -B % layout.batch_shards
        if pad:
            tokens_BxT1 = np.concatenate(
                [tokens_BxT1, np.zeros((pad,) + tokens_BxT1.shape[1:], tokens_BxT1.dtype)])
        return np.asarray(sharded(state, tokens_BxT1))[:B]

    return call


def tune_host_malloc() -> bool:
    """Makes glibc keep freed host memory for reuse; call before JAX's first computation.

    XLA:CPU mallocs each execution's temporaries (about 1 GB for a V=8192 model) from its worker
    threads. glibc serves blocks that large with mmap and munmaps them on free, so every step
    page-faults the whole gigabyte again: 250k faults, a quarter of a CPU step. One arena (so
    worker threads share the main heap), no mmap and no trimming make the blocks reused instead.
    Process-wide, so entry points call it, not library code. False where not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
    return bool(mallopt(m_arena_max, 1) and mallopt(m_mmap_max, 0)
                and mallopt(m_trim_threshold, 2**31 - 1))
