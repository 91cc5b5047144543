"""A training state in host memory and back, shard by shard (a sharded state is never gathered
on one device), and two states compared bit for bit: what in-memory snapshots, the Ray replica
and the silent-data-corruption checks of gemini_core.scale.faults are made of.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _index_key(index: tuple) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index)


def to_host(leaves: list[jax.Array]) -> list[dict[tuple, np.ndarray]]:
    """Per leaf: shard index -> host array, one copy of each distinct shard this process holds
    (replicas are not copied twice)."""
    datas, keys = [], []
    for i, x in enumerate(leaves):
        seen = set()
        for shard in x.addressable_shards:
            key = _index_key(shard.index)
            if key not in seen:
                seen.add(key)
                datas.append(shard.data)
                keys.append((i, key))
    host = jax.device_get(datas)  # one batched device->host transfer
    out: list[dict[tuple, np.ndarray]] = [{} for _ in leaves]
    for (i, key), h in zip(keys, host):
        out[i][key] = h
    return out


def to_device(host: list[dict[tuple, np.ndarray]], like: list[jax.ShapeDtypeStruct | jax.Array],
              shardings: list) -> list[jax.Array]:
    # np.array copies: the arrays may be donated to the next step, the snapshot must stay intact
    return [jax.make_array_from_callback(x.shape, sh, lambda idx, h=h: np.array(h[_index_key(idx)]))
            for h, x, sh in zip(host, like, shardings)]


# fingerprints: a wrapping sum of each leaf's bit patterns


def _bits_u32(x: jax.Array) -> jax.Array:
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def fingerprint(tree: Any) -> jax.Array:
    """uint32[n_leaves]: per leaf, the sum mod 2^32 of its elements' bit patterns. One flipped
    bit anywhere changes its leaf's sum by ±2^k, never 0 mod 2^32: always seen."""
    return jnp.stack([jnp.sum(_bits_u32(x), dtype=jnp.uint32) for x in jax.tree.leaves(tree)])


def _device_name(d: Any) -> str:
    return f"{d.platform}:{d.id}"


def differing_devices(a: jax.Array, b: jax.Array) -> list[str]:
    """Devices whose shard of leaf `a` differs bitwise from the same shard of `b`."""
    out = []
    for sa, sb in zip(a.addressable_shards, b.addressable_shards):
        if np.asarray(sa.data).tobytes() != np.asarray(sb.data).tobytes():
            out.append(_device_name(sa.device))
    return out
