"""Stages of their own sequence length (a long-context stage): what changes between stages.

A MixtureSchedule stage may set `seq_len` (gemini_core.data.mixture): its batches hold as many
tokens as every other step's, in fewer, longer rows (the sampler cuts each domain in windows of
that length). Everything here is what the trainer needs on top:

- the mesh must split every stage's batch and sequence (`check_layout`);
- RoPE scaling (`model.rope`) is the long-context stage's: it applies from the first stage longer
  than data.seq_len to the end of training, and to the run's evaluation afterwards (the model
  that comes out is the long-context one); the stages before it train with the unscaled RoPE
  they would have without it. Without a longer stage it applies throughout, as it always did
  (`stage_models`);
- each distinct model setting is its own graphdef over the same train state, so one state
  (and one checkpoint) crosses the change, and a run resumes on either side of it
  (`StagePrograms`). The jitted steps retrace for the new batch shape once per stage.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from flax import nnx

from gemini_core.config import ExperimentConfig, ModelConfig, RopeScaling
from gemini_core.data.mixture import MixtureSchedule
from gemini_core.errors import UserError
from gemini_core.scale import sharding


def is_staged(schedule: MixtureSchedule, seq_len: int) -> bool:
    """Whether any stage trains at a length other than data.seq_len."""
    return any(length != seq_len for length in schedule.seq_lens(seq_len))


def check_layout(cfg: ExperimentConfig, schedule: MixtureSchedule,
                 layout: sharding.Layout) -> None:
    """Every stage's rows split over the batch shards and its length over the context shards;
    UserError naming the stage otherwise (before anything is read or written)."""
    seq_len, where = cfg.data.seq_len, cfg.data.schedule or "config.mixture"
    rows = schedule.batch_sizes(cfg.train.batch_size, seq_len, where)
    for i, (n, length) in enumerate(zip(rows, schedule.seq_lens(seq_len))):
        if length == seq_len:
            continue  # data.seq_len and train.batch_size: checked with their own key paths
        if n % layout.batch_shards:
            raise UserError(f"{where}: stage {i} (seq_len={length}) has {n} rows per step, not "
                            f"divisible by the {layout.batch_shards} batch shards of the mesh")
        if length % layout.context_shards:
            raise UserError(f"{where}: stage {i} seq_len={length} is not divisible by the "
                            f"{layout.context_shards} context shards of the mesh")


def stage_models(model: ModelConfig, schedule: MixtureSchedule, seq_len: int
                 ) -> list[ModelConfig]:
    """The model setting each stage trains with (module docstring: RoPE scaling)."""
    lengths = schedule.seq_lens(seq_len)
    longer = [i for i, length in enumerate(lengths) if length > seq_len]
    if not longer or model.rope.method == "none":
        return [model] * len(lengths)
    plain = dataclasses.replace(model, rope=RopeScaling())
    return [plain if i < longer[0] else model for i in range(len(lengths))]


class StagePrograms:
    """Per stage, a graphdef of the train state and the functions made from it, built once per
    distinct model setting (`make(graphdef)`), looked up by step."""

    def __init__(self, graphdef: nnx.GraphDef, build_graphdef: Callable[[ModelConfig],
                                                                          nnx.GraphDef],
                 models: list[ModelConfig], stage_of: Callable[[int], int]):
        final = models[-1]
        self._graphdefs = {final: graphdef}
        for m in models:
            if m not in self._graphdefs:
                self._graphdefs[m] = build_graphdef(m)
        self._models, self._stage_of = models, stage_of
        self._made: dict[tuple[int, ModelConfig], object] = {}

    def graphdef(self, step: int) -> nnx.GraphDef:
        return self._graphdefs[self._models[self._stage_of(step)]]

    def describe(self, step: int, shape: tuple[int, int]) -> str:
        """"4 x 1024 tokens per step, RoPE yarn x4": what the stage of `step` trains on."""
        rope = self._models[self._stage_of(step)].rope
        return (f"{shape[0]} x {shape[1]} tokens per step, RoPE "
                + (f"{rope.method} x{rope.factor:g}" if rope.method != "none" else "unscaled"))

    def get(self, kind: int, step: int, make: Callable[[nnx.GraphDef], object]):
        """`make(graphdef)` for the stage of `step`, made once per kind and model setting."""
        model = self._models[self._stage_of(step)]
        key = (kind, model)
        if key not in self._made:
            self._made[key] = make(self._graphdefs[model])
        return self._made[key]
