"""Fault injection for tests, by environment variable (read when a Guard starts;
tests/test_faults.py uses them). STEP counts from 1, like the step numbers in logs and
metrics.jsonl:

    GX_TEST_FLIP_BIT=STEP[:leaf=N|NAME][:bit=K][:always]
        flips bit K (0-15, default 0) of the first element of one state leaf (index N, or the first
        whose path contains NAME; default the first floating-point leaf) in the result of step
        STEP's computation: silent data corruption. Once, or in every attempt with `always`.
    GX_TEST_NAN=STEP[:always]
        makes the first parameter NaN before step STEP: a transient fault (once), or one that
        recurs whenever the step is computed (`always`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gemini_core.errors import UserError

ENV_FLIP = "GX_TEST_FLIP_BIT"
ENV_NAN = "GX_TEST_NAN"


@dataclasses.dataclass
class Hook:
    step: int  # 1-based
    always: bool = False
    leaf: str | int | None = None
    bit: int = 0
    fired: bool = False

    def due(self, n: int) -> bool:
        if n != self.step or (self.fired and not self.always):
            return False
        self.fired = True
        return True


def parse_hook(var: str, value: str | None, *, flip: bool) -> Hook | None:
    if not value:
        return None
    usage = (f"{var}={value!r}: expected STEP[:leaf=N|NAME][:bit=K][:always]" if flip
             else f"{var}={value!r}: expected STEP[:always]")
    head, *rest = value.split(":")
    try:
        hook = Hook(step=int(head))
        for item in rest:
            key, _, val = item.partition("=")
            if key == "always" and not val:
                hook.always = True
            elif flip and key == "leaf" and val:
                hook.leaf = int(val) if val.isdigit() else val
            elif flip and key == "bit" and val:
                hook.bit = int(val)
            else:
                raise ValueError(item)
    except ValueError:
        raise UserError(usage) from None
    if hook.step < 1 or not 0 <= hook.bit < 16:
        raise UserError(usage + " (STEP >= 1, 0 <= bit < 16)")
    return hook


def pick_leaf(names: list[str], leaves: list, which: str | int | None) -> int:
    if isinstance(which, int):
        if not 0 <= which < len(leaves):
            raise UserError(f"{ENV_FLIP}: leaf={which}: the state has {len(leaves)} leaves")
        return which
    for i, (name, x) in enumerate(zip(names, leaves)):
        if jnp.issubdtype(x.dtype, jnp.floating) and (which is None or which in name):
            return i
    raise UserError(f"{ENV_FLIP}: leaf={which}: no floating-point leaf matches "
                    f"(leaves: {', '.join(names[:8])}, ...)")


def flip_bit(x: jax.Array, bit: int) -> jax.Array:
    unsigned = {2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    flat = jax.lax.bitcast_convert_type(x, unsigned).reshape(-1)
    flat = flat.at[0].set(flat[0] ^ jnp.asarray(1 << bit, unsigned))
    return jax.device_put(jax.lax.bitcast_convert_type(flat.reshape(x.shape), x.dtype), x.sharding)


def poison(x: jax.Array) -> jax.Array:
    return jax.device_put(x * jnp.asarray(jnp.nan, x.dtype), x.sharding)
