"""Train states between the unrolled and the scanned layer layouts (`model.scan_layers`).

Unrolled, every layer's weights sit under `blocks/<i>/...`; scanned, one array per weight holds
all layers along a leading axis under `blocks/...`. The same holds for the AdamW moments, which
mirror the parameters. A checkpoint of one layout converts to the other (`convert`), exactly:
stacking and slicing move no value, so a run trained scanned continues unrolled (or the other way
round) from the same numbers. `model.scan_layers` is part of a run's identity (the checkpoints
differ), so a converted state belongs to the run of the other setting.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

BLOCKS = "blocks"


def is_scanned(blocks: Mapping) -> bool:
    """Unrolled blocks are keyed by layer index."""
    return not all(isinstance(k, int) for k in blocks)


def _stack(blocks: Mapping) -> dict:
    layers = [blocks[i] for i in sorted(blocks)]
    return jax.tree.map(lambda *w: jnp.stack(w), *layers)


def _unstack(blocks: Mapping) -> dict:
    n = jax.tree.leaves(blocks)[0].shape[0]
    return {i: jax.tree.map(lambda w, i=i: w[i], blocks) for i in range(n)}


def convert_tree(tree: Any, scanned: bool) -> Any:
    """A pure-dict train state (or any part of it) with every `blocks` node in the wanted
    layout; nodes already in it are left as they are."""
    if not isinstance(tree, Mapping):
        return tree
    out = {}
    for key, value in tree.items():
        if key == BLOCKS and isinstance(value, Mapping) and is_scanned(value) != scanned:
            out[key] = _stack(value) if scanned else _unstack(value)
        else:
            out[key] = convert_tree(value, scanned)
    return out


def convert(state: nnx.State, like: nnx.State) -> nnx.State:
    """`state` in the layer layout of `like` (a train state of the target config: its shapes,
    and under a mesh its shardings), values from `state`."""
    like_blocks = nnx.to_pure_dict(like)["model"][BLOCKS]
    converted = convert_tree(nnx.to_pure_dict(state), scanned=is_scanned(like_blocks))
    out = jax.tree.map(lambda x: x, like)  # a copy: `like` stays as it was
    nnx.replace_by_pure_dict(out, converted)
    return jax.tree.map(lambda new, old: jax.device_put(new, old.sharding)
                        if hasattr(old, "sharding") else new, out, like)
