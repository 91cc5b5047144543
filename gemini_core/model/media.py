"""The encoders: media references in the token stream become soft tokens (early fusion).

An id below the text vocabulary V is a text token; V..V+3 are the begin/end markers of an image
and of a recording (learned embeddings); an id in a media table's range names one soft token of
one item (gemini_core.data.modality has the layout). `MediaEmbed` computes, for every position,
the embedding its id calls for, and the decoder reads the result like any embedded sequence.

Each soft token is a function of its own features and slot alone: image patches through one
linear map plus learned row and column embeddings (Fuyu-style: the decoder's attention does the
mixing), stacks of log-mel frames through one linear map plus a learned position. So a window
that cuts an item still embeds the references it holds exactly as the whole item would. The
tables are `MediaState`, not `nnx.Param`: the optimizer and the gradients leave them alone, the
checkpoint keeps them.

Shape letters: N positions (B·L), D d_model, S slots per item, F features per slot, I items.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from gemini_core.data.modality import MARKERS
from gemini_core.model.options import MediaTable
from gemini_core.scale.sharding import constrain

# the encoders' input normalisation: Fashion-MNIST's pixel statistics on a 0-1 scale; audio
# features are normalised per recording when the table is built
PIXEL_MEAN, PIXEL_STD = 0.286, 0.353


class MediaState(nnx.Variable):
    """A media table: data the model reads, never trains."""


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], std: float,
           dtype: jnp.dtype) -> nnx.Param:
    value = std * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class Encoder(nnx.Module):
    """One declared encoder: a linear map of a slot's features to D, plus slot positions
    (image: row + column of a grid; audio: one per slot)."""

    def __init__(self, table: MediaTable, d_model: int, std: float, dtype: jnp.dtype, *,
                 rngs: nnx.Rngs):
        F, D, S = table.features, d_model, table.slots
        self.modality, self.grid = table.modality, table.grid
        # input std ~1 after normalisation: std/sqrt(F)·sqrt(D) puts a soft token's scale near
        # a text embedding's (std·sqrt(D), the sqrt(D)-scaled gather)
        self.proj_FxD = _param(rngs, (F, D), ("media", "embed"), std * math.sqrt(D / F), dtype)
        if table.modality == "image":
            self.row_GxD = _param(rngs, (table.grid, D), (None, "embed"), std, dtype)
            self.col_GxD = _param(rngs, (table.grid, D), (None, "embed"), std, dtype)
        else:
            self.pos_SxD = _param(rngs, (S, D), (None, "embed"), std, dtype)

    def __call__(self, feats_NxF: jax.Array, slot_N: jax.Array) -> jax.Array:
        if self.modality == "image":
            x_NxF = (feats_NxF.astype(jnp.float32) / 255.0 - PIXEL_MEAN) / PIXEL_STD
            pos_NxD = (self.row_GxD[...][slot_N // self.grid]
                       + self.col_GxD[...][slot_N % self.grid])
        else:
            x_NxF = feats_NxF.astype(jnp.float32)
            pos_NxD = self.pos_SxD[...][slot_N]
        return x_NxF @ self.proj_FxD[...].astype(jnp.float32) + pos_NxD


class MediaEmbed(nnx.Module):
    """Embeddings of the ids at or above the text vocabulary: markers and media references."""

    def __init__(self, tables: tuple[MediaTable, ...], text_vocab: int, d_model: int,
                 std: float, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        self.text_vocab = text_vocab
        self.markers_4xD = _param(rngs, (MARKERS, d_model), (None, "embed"),
                                  std * math.sqrt(d_model), dtype)
        names = sorted({t.encoder for t in tables})
        first = {name: next(t for t in tables if t.encoder == name) for name in names}
        self.encoders = nnx.Dict({name: Encoder(first[name], d_model, std, dtype, rngs=rngs)
                                  for name in names})
        self.layouts = tables
        table_dtype = {"image": jnp.uint8, "audio": jnp.float16}
        self.tables = nnx.List([
            MediaState(jnp.zeros((t.items, t.slots, t.features), table_dtype[t.modality]),
                       out_sharding=(None, None, None), eager_sharding=False)
            for t in tables])

    def __call__(self, ids_N: jax.Array) -> jax.Array:
        """(N, D) f32: each position's marker or soft-token embedding (zeros for text ids)."""
        V = self.text_vocab
        marker_N = ids_N - V
        is_marker_N = (marker_N >= 0) & (marker_N < MARKERS)
        out_NxD = jnp.where(is_marker_N[:, None],
                            self.markers_4xD[...][jnp.clip(marker_N, 0, MARKERS - 1)]
                            .astype(jnp.float32), 0.0)
        for layout, table in zip(self.layouts, self.tables):
            local_N = ids_N - layout.first_id
            inside_N = (local_N >= 0) & (ids_N < layout.end_id)
            local_N = jnp.where(inside_N, local_N, 0)
            item_N, slot_N = local_N // layout.slots, local_N % layout.slots
            feats_NxF = table[...][item_N, slot_N]
            soft_NxD = self.encoders[layout.encoder](feats_NxF, slot_N)
            out_NxD = jnp.where(inside_N[:, None], soft_NxD, out_NxD)
        return constrain(out_NxD, ("tokens", None))


def with_tables(graphdef: nnx.GraphDef, state, features: dict):
    """The train state with each domain's media table (host arrays, by domain) written in,
    each keeping its sharding: a fresh run's zero tables replaced by the data."""
    ts = nnx.merge(graphdef, state)
    media = ts.model.media
    for layout, var in zip(media.layouts, media.tables):
        old = var[...]
        var[...] = jax.device_put(jnp.asarray(features[layout.domain], old.dtype), old.sharding)
    return nnx.state(ts)
