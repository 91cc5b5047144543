"""Device mesh and sharding rules: logical axis names -> mesh axes, as MaxText does.

Model code names logical axes only (parameters carry them as `out_sharding` metadata; activations
through `constrain`). The mesh (axes data, fsdp, context, model) and the rules that map each logical axis
to zero or more mesh axes come from `config.mesh` (a preset, per-axis overrides). From these this
module derives the PartitionSpec of every leaf of the train state (AdamW moments carry their
parameter's names, so they follow it), the sharding of a batch (batch -> data and fsdp), and the
placement of a host batch onto the devices, in one process or many.

Axis types are Auto (GSPMD/Shardy propagation), not JAX's default Explicit: with Explicit axes
every reshape and einsum of a sharded operand must state its output sharding, so the model's
(N, D) flattening, its fused QKV concatenation and its attention reshapes would each need
mesh-aware code; with Auto the compiler propagates the shardings we pin at the boundary (state,
batch, metrics) and at the few activation constraints, and model code stays mesh-free.

Rule resolution per array: dimension by dimension, the mesh axes of its logical name, minus axes
an earlier dimension already took (one mesh axis shards one dimension, as in MaxText), cut to
the longest prefix whose product divides the dimension (a multi-query model's single kv head
cannot be split over `model`: it stays replicated, like MaxText's kv replication under TP).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gemini_core.errors import UserError

# context: the sequence split over devices (context parallelism): `length` -> context, and
# attention gathers the keys and values of the whole sequence (context_axes, attention.py)
MESH_AXES = ("data", "fsdp", "context", "model")
# logical axes of activations; the parameters' own come from gemini_core.model.transformer.LOGICAL_AXES
ACTIVATION_AXES = ("batch", "length")
# the residual stream flattened to (B·L, D): its rows are split like batch, then length (row
# b·L + l: batch-major, so the mesh axes of batch come first)
TOKENS = "tokens"
# media: an encoder's input features (gemini_core.model.media)
PARAM_AXES = ("vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "media")
LOGICAL_AXES = ACTIVATION_AXES + PARAM_AXES
PRESET_RULE = "preset"  # a rules value meaning "what the preset says"


@dataclasses.dataclass(frozen=True)
class Preset:
    sizes: Mapping[str, int]  # -1: the devices the other axes leave
    rules: Mapping[str, str]  # logical axis -> comma-separated mesh axes; absent = replicated
    doc: str


# The batch is split over every axis that does not split the model's math (data and fsdp), so
# FSDP is data parallelism whose parameters, gradients and moments are also split over `fsdp`.
# Every preset splits the sequence over `context` (size 1 unless config.mesh.context says).
PRESETS = {
    "dp": Preset({"data": -1, "fsdp": 1, "context": 1, "model": 1},
                 {"batch": "data,fsdp", "length": "context"},
                 "pure data parallel: batch split, state replicated"),
    "fsdp": Preset({"data": 1, "fsdp": -1, "context": 1, "model": 1},
                   {"batch": "data,fsdp", "length": "context", "embed": "fsdp"},
                   "FSDP (ZeRO-3): batch split; params, grads, moments split on embed"),
    "fsdp_tp": Preset({"data": 1, "fsdp": -1, "context": 1, "model": 2},
                      {"batch": "data,fsdp", "length": "context", "embed": "fsdp",
                       "vocab": "model", "q_heads": "model", "kv_heads": "model",
                       "mlp": "model"},
                      "FSDP + tensor parallel (Megatron): heads, mlp and vocab split on model"),
}


# ---------------------------------------------------------------------------------------------
# config: presets resolved into explicit sizes and a full rule table (called by config.py)


def default_rules() -> dict[str, str]:
    return {name: PRESET_RULE for name in LOGICAL_AXES}


def parse_rule(value: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in value.split(",") if a.strip())


def resolve_config(m: Any) -> Any:
    """A MeshConfig with the preset applied: sizes filled, every logical axis' rule explicit."""
    p = "config.mesh"
    if m.preset not in PRESETS:
        raise UserError(f"{p}.preset={m.preset!r}: must be one of {', '.join(PRESETS)}")
    preset = PRESETS[m.preset]
    given = {a: getattr(m, a) for a in MESH_AXES}
    for axis, size in given.items():
        if size < -1:
            raise UserError(f"{p}.{axis}={size}: must be a size >= 1, -1 (the devices the "
                            "other axes leave) or 0 (the preset's)")
    autos = [a for a, s in given.items() if s == -1]
    if len(autos) > 1:
        raise UserError(f"{p}.{autos[1]}=-1: only one mesh axis may be -1 "
                        f"({p}.{autos[0]} is -1 too)")
    sizes = {}
    for axis, size in given.items():
        if size == 0:
            size = preset.sizes[axis]
            if size == -1 and autos:  # the user named their own auto axis
                size = 1
        sizes[axis] = size
    rules = {}
    for name, value in m.rules.items():
        path = f"{p}.rules.{name}"
        if name not in LOGICAL_AXES:
            raise UserError(f"{path}: unknown logical axis (known: {', '.join(LOGICAL_AXES)})")
        if value == PRESET_RULE:
            value = preset.rules.get(name, "")
        axes = parse_rule(value)
        for axis in axes:
            if axis not in MESH_AXES:
                raise UserError(f"{path}={value!r}: unknown mesh axis {axis!r} (known: "
                                f"{', '.join(MESH_AXES)}; '' = replicated)")
        if len(set(axes)) != len(axes):
            raise UserError(f"{path}={value!r}: a mesh axis is named twice")
        rules[name] = ",".join(axes)
    for name in LOGICAL_AXES:  # a rules mapping given whole may leave names out
        rules.setdefault(name, preset.rules.get(name, ""))
    if not m.device_memory_gib > 0:
        raise UserError(f"{p}.device_memory_gib={m.device_memory_gib}: must be > 0")
    return dataclasses.replace(m, rules=rules, **sizes)


def mesh_shape(m: Any, n_devices: int) -> dict[str, int]:
    """Axis sizes with the -1 axis filled; UserError when they do not match the devices."""
    m = resolve_config(m)  # idempotent; a MeshConfig built in code has not been through config
    sizes = {a: getattr(m, a) for a in MESH_AXES}
    fixed = math.prod(s for s in sizes.values() if s != -1)
    auto = [a for a, s in sizes.items() if s == -1]
    named = " x ".join(f"{a}={s}" for a, s in sizes.items() if s != -1)
    if auto:
        if n_devices % fixed:
            raise UserError(f"config.mesh.{auto[0]}=-1: the other axes ({named} = {fixed}) do "
                            f"not divide the {n_devices} devices")
        sizes[auto[0]] = n_devices // fixed
    elif fixed != n_devices:
        paths = ", ".join(f"config.mesh.{a}={s}" for a, s in sizes.items())
        raise UserError(f"{paths}: the mesh has {fixed} devices, but there are {n_devices} "
                        "(make one axis -1 to take the rest)")
    return sizes


def make_mesh(m: Any, devices: Sequence[Any] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(m, len(devices))
    return jax.make_mesh(tuple(shape[a] for a in MESH_AXES), MESH_AXES,
                         axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


# ---------------------------------------------------------------------------------------------
# the layout: a mesh and its rules


def spec_for(logical: Sequence[str | None], shape: Sequence[int] | None,
             rules: Mapping[str, tuple[str, ...]], sizes: Mapping[str, int]) -> P:
    """PartitionSpec of one array from its dimensions' logical names (see the module doc)."""
    used: set[str] = set()
    out = []
    for i, name in enumerate(logical):
        wanted = (tuple(rules.get("batch", ())) + tuple(rules.get("length", ()))
                  if name == TOKENS else rules.get(name, ()))
        axes = tuple(a for a in wanted if a not in used) if name else ()
        if shape is not None:
            while axes and shape[i] % math.prod(sizes[a] for a in axes):
                axes = axes[:-1]
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _logical_names(var: nnx.Variable) -> tuple[str, ...] | None:
    names = var.get_metadata().get("out_sharding")
    return tuple(names) if names else None


@dataclasses.dataclass(frozen=True)
class Layout:
    mesh: Mesh
    rules: Mapping[str, tuple[str, ...]]  # logical axis -> mesh axes

    @classmethod
    def from_config(cls, m: Any, devices: Sequence[Any] | None = None) -> "Layout":
        m = resolve_config(m)
        return cls(make_mesh(m, devices), {k: parse_rule(v) for k, v in m.rules.items()})

    @property
    def sizes(self) -> dict[str, int]:
        return dict(self.mesh.shape)

    def spec(self, logical: Sequence[str | None], shape: Sequence[int] | None = None) -> P:
        return spec_for(logical, shape, self.rules, self.sizes)

    def named(self, logical: Sequence[str | None],
              shape: Sequence[int] | None = None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical, shape))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def batch_shards(self) -> int:
        """Into how many parts the batch dimension is split."""
        return math.prod(self.sizes[a] for a in self.rules.get("batch", ()))

    @property
    def context_shards(self) -> int:
        """Into how many parts the sequence is split (context parallelism)."""
        return math.prod(self.sizes[a] for a in self.rules.get("length", ()))

    # -- the train state

    def state_specs(self, abstract_state: Any) -> Any:
        """PartitionSpecs in the state's own structure (each Variable holds its spec)."""
        def leaf(x):
            if _is_var(x):
                names = _logical_names(x)
                return x.replace(self.spec(names, x.shape) if names else P())
            return P()
        return jax.tree.map(leaf, abstract_state, is_leaf=_is_var)

    def state_shardings(self, abstract_state: Any) -> Any:
        return jax.tree.map(lambda s: NamedSharding(self.mesh, s),
                            self.state_specs(abstract_state))

    # -- batches

    def batch_sharding(self, ndim: int = 2) -> NamedSharding:
        return self.named(("batch",) + (None,) * (ndim - 1))

    def place_batch(self, tokens_BxT1: np.ndarray) -> jax.Array:
        """The global batch (the same on every process) -> a sharded array.

        Every process computes the whole batch (the sampler is a pure function of seed and
        step), and each device takes its slice; in one process that is a plain device_put.
        """
        sharding = self.batch_sharding(tokens_BxT1.ndim)
        if jax.process_count() == 1:
            return jax.device_put(tokens_BxT1, sharding)
        return jax.make_array_from_callback(tokens_BxT1.shape, sharding,
                                            lambda index: tokens_BxT1[index])

    # -- activations

    @contextlib.contextmanager
    def activate(self) -> Iterator["Layout"]:
        """Traces under this mesh: `constrain` becomes a sharding constraint."""
        token = _ACTIVE.set(self)
        try:
            with jax.set_mesh(self.mesh):
                yield self
        finally:
            _ACTIVE.reset(token)


_ACTIVE: contextvars.ContextVar[Layout | None] = contextvars.ContextVar("layout", default=None)


def context_axes() -> tuple[Mesh, tuple[str, ...]] | None:
    """The active mesh and the axes the sequence is split over, when it is split (context
    parallelism); None otherwise."""
    layout = _ACTIVE.get()
    if layout is None or layout.context_shards == 1:
        return None
    return layout.mesh, tuple(a for a in layout.rules["length"] if layout.sizes[a] > 1)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Pins an activation's sharding by the logical names of its dimensions; a no-op outside
    `Layout.activate()` (one device, tests of the model alone)."""
    layout = _ACTIVE.get()
    if layout is None:
        return x
    return jax.lax.with_sharding_constraint(x, layout.named(logical, x.shape))


def shard_factor(spec: P, sizes: Mapping[str, int]) -> int:
    """Into how many parts an array with this spec is split (its per-device fraction is 1/x)."""
    factor = 1
    for entry in spec:
        for axis in (entry,) if isinstance(entry, str) else (entry or ()):
            factor *= sizes[axis]
    return factor
