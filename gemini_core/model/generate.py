"""Text generation with a KV cache: a jitted prefill and a jitted one-token decode step.

Token level (`Decoder`): prompts of different lengths share a batch right-padded, so each row's
positions are those of its own unpadded sequence; the prefill runs the training forward over
the padded prompts and returns a preallocated cache of S slots per row and layer ((B, S, G, K)
for k and v: a multi-query model keeps its one kv head, H times smaller than the queries); each
decode step feeds one token per row at that row's position and writes its keys and values in
place (the cache is donated); a jitted sampler turns the logits into the next tokens on device,
and the host reads them a step behind. Prompt lengths and cache lengths are bucketed to powers
of two and the batch is fixed, so a stream of batches compiles a handful of programs. A finished
row keeps its slot (shapes are static) and is ignored.

Sampling: greedy at temperature 0; else logits / temperature, then top-k, then top-p (the
smallest set of most likely tokens whose probability reaches top_p), then a draw by inverse CDF
with the key fold_in(fold_in(key(seed), prompt index), step): a prompt's samples depend on the
seed and its index, not on which batch or row it landed in. Ties at the top-k / nucleus
threshold are all kept.

Text level (`generate`): prompts are document starts ([EOS] + encode(prompt), as training data
packs documents), left-truncated with a warning when longer than max_len - max_new_tokens; a row
ends at EOS (not part of the text), at a stop string (checked on the decoded text, cut from it)
or after max_new_tokens. `on_text` streams the text as it becomes final (a tail that could start
a stop string or an unfinished UTF-8 character is held back until it resolves).

Under a `Layout` (a run's mesh) the parameters keep their shardings, the cache is split along
the batch (and kv heads where the rules split them), and tokens come back replicated.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemini_core.data.tokenizer import document_ids
from gemini_core.errors import UserError
from gemini_core.model.transformer import KVCache, Transformer
from gemini_core.scale.sharding import Layout, constrain

MIN_PROMPT_BUCKET = 16
Log = Callable[[str], None]
OnToken = Callable[[int, int], bool]  # (prompt index, token) -> True: that prompt is done


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0
    stop: tuple[str, ...] = ()

    def validate(self, where: str = "sampling") -> SamplingConfig:
        checks = [("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
                  ("temperature", self.temperature >= 0, "must be >= 0 (0 = greedy)"),
                  ("top_k", self.top_k >= 0, "must be >= 0 (0 = off)"),
                  ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
                  ("stop", all(isinstance(s, str) and s for s in self.stop),
                   "must be non-empty strings")]
        for name, ok, rule in checks:
            if not ok:
                raise UserError(f"{where}.{name}={getattr(self, name)!r}: {rule}")
        return self

    @property
    def mode(self) -> str:
        """greedy | sample (the full distribution) | filtered (top-k and/or top-p)."""
        if self.temperature == 0:
            return "greedy"
        return "filtered" if self.top_k > 0 or self.top_p < 1 else "sample"


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str  # without the stop string
    tokens: tuple[int, ...]  # generated ids: with the stop string's tokens, without EOS
    finish_reason: str  # stop | length | eos
    prompt_tokens: int  # the prompt's ids the model saw (EOS included), after truncation
    truncated: int = 0  # prompt ids dropped from the left to fit max_len


def bucket(n: int, minimum: int = 1) -> int:
    """The power of two >= n (and >= minimum): the shapes a stream of batches compiles."""
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


# ---------------------------------------------------------------------------------------------
# sampling (traced)


BISECTION_STEPS = 40  # halvings of the logit range: below f32 resolution for any range in use


def filter_logits(logits_BxV: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """-inf outside the top_k most likely tokens (0 = all) and outside the nucleus: the most
    likely of those whose probabilities (renormalised over them), taken in order, reach top_p.

    Both cut-offs are logit thresholds found by bisection (the largest threshold that keeps k
    tokens; then the largest that keeps top_p of the mass), not by sorting: on CPU a sort of
    the (B, V) logits costs ten times the rest of a quickstart model's decode step.
    """
    V = logits_BxV.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    above_B = jnp.max(logits_BxV, axis=-1) + 1.0  # keeps nothing: never a threshold

    def largest(keeps: Callable[[jax.Array], jax.Array], lo_B: jax.Array) -> jax.Array:
        """The largest threshold t with keeps(t), knowing keeps(lo) holds (bisection)."""
        def halve(_, lo_hi):
            lo_B, hi_B = lo_hi
            mid_B = (lo_B + hi_B) / 2
            ok_B = keeps(mid_B)
            return jnp.where(ok_B, mid_B, lo_B), jnp.where(ok_B, hi_B, mid_B)
        return jax.lax.fori_loop(0, BISECTION_STEPS, halve, (lo_B, above_B))[0]

    def kept(t_B: jax.Array) -> jax.Array:
        return logits_BxV >= t_B[:, None]

    lowest_B = jnp.min(jnp.where(jnp.isfinite(logits_BxV), logits_BxV, jnp.inf), axis=-1)
    top_k_B = largest(lambda t_B: jnp.sum(kept(t_B), axis=-1) >= k, lowest_B)
    p_BxV = jax.nn.softmax(jnp.where(kept(top_k_B), logits_BxV, -jnp.inf), axis=-1)
    nucleus_B = largest(lambda t_B: jnp.sum(jnp.where(kept(t_B), p_BxV, 0.0), axis=-1) >= top_p,
                        top_k_B)
    # top_p = 1 keeps the top-k set whole (rounding could make a smaller set "reach" 1)
    threshold_B = jnp.where(top_p < 1, nucleus_B, top_k_B)
    return jnp.where(kept(threshold_B), logits_BxV, -jnp.inf)


MODES = ("greedy", "sample", "filtered")


def sample(logits_BxV: jax.Array, keys_Bx2: jax.Array, step: jax.Array, mode: jax.Array,
           temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Next tokens (B,) int32; keys_Bx2 are each row's raw key data (its prompt's key), mode
    an index into MODES. A traced mode: one program serves greedy and sampled decoding."""
    def draw(logits_BxV: jax.Array) -> jax.Array:
        # inverse CDF: one uniform per row (a Gumbel draw per vocabulary entry costs a
        # millisecond a step on CPU); a token of probability 0 is never the first whose CDF
        # passes u, and the clamp to the last possible token covers u·total rounding to total
        u_B = jax.vmap(lambda key_data: jax.random.uniform(
            jax.random.fold_in(jax.random.wrap_key_data(key_data), step)))(keys_Bx2)
        p_BxV = jax.nn.softmax(logits_BxV, axis=-1)
        cdf_BxV = jnp.cumsum(p_BxV, axis=-1)
        token_B = jnp.sum(cdf_BxV <= (u_B * cdf_BxV[:, -1])[:, None], axis=-1)
        V = logits_BxV.shape[-1]
        last_B = V - 1 - jnp.argmax((p_BxV > 0)[:, ::-1], axis=-1)
        return jnp.minimum(token_B, last_B).astype(jnp.int32)

    return jax.lax.switch(mode, [
        lambda z: jnp.argmax(z, axis=-1).astype(jnp.int32),
        lambda z: draw(z / temperature),
        lambda z: draw(filter_logits(z / temperature, top_k, top_p))], logits_BxV)


def prompt_keys(seed: int, indices: Sequence[int]) -> np.ndarray:
    """Raw key data (n, 2) uint32 of each prompt: fold_in(key(seed), prompt index)."""
    base = jax.random.key(seed)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.uint32))
    return np.asarray(jax.random.key_data(keys))


# ---------------------------------------------------------------------------------------------
# the jitted programs, shared by every Decoder of one architecture and layout


class Programs:
    """The jitted prefill and decode step (logits (B, V) and the cache) and the sampler.

    Sampling is a program of its own, one per batch and vocabulary size: the decode step stays
    a plain forward (a second dispatch per token costs microseconds; a sampler inside every
    prefill and decode program would cost seconds of compilation per prompt bucket). The
    parameters and the sampling settings are arguments, not constants: new weights of the same
    architecture (the in-loop evaluation at each cadence, another checkpoint) and every
    sampling setting reuse the compiled programs.
    """

    def __init__(self, graphdef: nnx.GraphDef, layout: Layout | None):
        self.graphdef, self.layout = graphdef, layout
        self.prefill = jax.jit(self._prefill, static_argnames=("cache_len",))
        self.decode = jax.jit(self._decode, donate_argnames=("cache",))
        self.sample = jax.jit(self._sample)

    def _model(self, state: Any) -> Transformer:
        return nnx.merge(self.graphdef, state)

    def _prefill(self, state, tokens_BxP, lengths_B, *, cache_len: int):
        model = self._model(state)
        B, P = tokens_BxP.shape
        h_NxD, cache = model.prefill(tokens_BxP, cache_len)
        last_BxD = jnp.take_along_axis(h_NxD.reshape(B, P, -1), (lengths_B - 1)[:, None, None],
                                       axis=1)[:, 0]
        return constrain(model.logits(last_BxD), (None, None)), cache

    def _decode(self, state, cache: KVCache, tokens_B, base_B, step):
        # token `step` of each row sits at position base + step
        model = self._model(state)
        h_BxD, cache = model.extend(tokens_B[:, None], base_B + step, cache)
        return constrain(model.logits(h_BxD), (None, None)), cache

    @staticmethod
    def _sample(logits_BxV, step, knobs: Knobs):
        return constrain(sample(logits_BxV, knobs.keys_Bx2, step, knobs.mode, knobs.temperature,
                                knobs.top_k, knobs.top_p), (None,))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Knobs:
    """The sampling settings as device arrays (a pytree of one program's arguments)."""
    keys_Bx2: jax.Array
    mode: jax.Array  # index into MODES
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array


_PROGRAMS: dict[tuple, Programs] = {}
_MAX_PROGRAMS = 8


def programs_for(graphdef: nnx.GraphDef, layout: Layout | None) -> Programs:
    key = (graphdef, None if layout is None else
           (layout.mesh, tuple(sorted((k, tuple(v)) for k, v in layout.rules.items()))))
    if key not in _PROGRAMS:
        if len(_PROGRAMS) >= _MAX_PROGRAMS:
            _PROGRAMS.pop(next(iter(_PROGRAMS)))
        _PROGRAMS[key] = Programs(graphdef, layout)
    return _PROGRAMS[key]


# ---------------------------------------------------------------------------------------------
# token level


@dataclasses.dataclass
class RowResult:
    tokens: list[int]
    finish_reason: str = ""


class Decoder:
    """A model (and optionally its layout) ready to prefill, decode and generate token ids."""

    def __init__(self, model: Transformer, layout: Layout | None = None):
        graphdef, self.state = nnx.split(model)
        self.layout = layout
        self.programs = programs_for(graphdef, layout)

    # -- placement: the batch split as the layout says, the rest replicated

    def _batch(self, x: np.ndarray) -> jax.Array:
        return jnp.asarray(x) if self.layout is None else self.layout.place_batch(np.asarray(x))

    def _replicated(self, x: Any) -> jax.Array:
        if self.layout is None:
            return jnp.asarray(x)
        x = np.asarray(x)
        if jax.process_count() == 1:
            return jax.device_put(x, self.layout.replicated)
        return jax.make_array_from_callback(x.shape, self.layout.replicated, lambda i: x[i])

    def _call(self, fn: Callable, *args, **kwargs):
        if self.layout is None:
            return fn(*args, **kwargs)
        with self.layout.activate():
            return fn(*args, **kwargs)

    @property
    def batch_multiple(self) -> int:
        return 1 if self.layout is None else self.layout.batch_shards

    def knobs(self, sampling: SamplingConfig, keys_Bx2: np.ndarray) -> Knobs:
        return Knobs(self._replicated(keys_Bx2),
                     self._replicated(np.int32(MODES.index(sampling.mode))),
                     self._replicated(np.float32(sampling.temperature)),
                     self._replicated(np.int32(sampling.top_k)),
                     self._replicated(np.float32(sampling.top_p)))

    # -- the two steps, with logits

    def prefill(self, tokens_BxP: np.ndarray, lengths_B: np.ndarray,
                cache_len: int) -> tuple[jax.Array, KVCache]:
        """Logits (B, V) after each row's last prompt token (row b: tokens_BxP[b, :lengths_B[b]],
        right-padded), and the cache of cache_len >= P slots."""
        return self._call(self.programs.prefill, self.state, self._batch(tokens_BxP),
                          self._batch(np.asarray(lengths_B, np.int32)), cache_len=cache_len)

    def decode_step(self, tokens_B: np.ndarray, pos_B: np.ndarray,
                    cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Logits (B, V) after one token per row at that row's position; donates `cache`."""
        # tokens replicated, as the sampler returns them: one compiled program for both uses
        return self._call(self.programs.decode, self.state, cache,
                          self._replicated(np.asarray(tokens_B, np.int32)),
                          self._batch(np.asarray(pos_B, np.int32)), self._replicated(np.int32(0)))

    # -- generation

    def generate_ids(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
                     eos_id: int | None = None, batch_size: int = 8,
                     on_token: OnToken | None = None) -> list[RowResult]:
        """Completions of token-id prompts, in prompt order. A prompt ends at eos_id (not
        kept), when on_token(prompt index, token) returns True ("stop"; the token is kept), or
        after max_new_tokens ("length"). Prompts of similar length share a batch."""
        sampling.validate()
        if any(len(p) == 0 for p in prompts):
            raise UserError("generate: a prompt has no tokens (give at least the EOS that "
                            "starts a document)")
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        B = min(bucket(batch_size), bucket(len(prompts)))
        B = -(-B // self.batch_multiple) * self.batch_multiple
        results: list[RowResult | None] = [None] * len(prompts)
        for start in range(0, len(order), B):
            rows = order[start:start + B]
            done = self._batch_of(rows, [prompts[i] for i in rows], B, sampling, eos_id, on_token)
            for i, result in zip(rows, done):
                results[i] = result
        return results  # type: ignore[return-value]

    def _batch_of(self, indices: list[int], prompts: list[Sequence[int]], B: int,
                  sampling: SamplingConfig, eos_id: int | None,
                  on_token: OnToken | None) -> list[RowResult]:
        n_rows, max_new = len(prompts), sampling.max_new_tokens
        lengths_B = np.ones(B, np.int32)  # padding rows: one token, never read
        lengths_B[:n_rows] = [len(p) for p in prompts]
        P = bucket(int(lengths_B.max()), MIN_PROMPT_BUCKET)
        S = bucket(max(P, int(lengths_B.max()) + max_new))
        tokens_BxP = np.zeros((B, P), np.int32)
        for b, p in enumerate(prompts):
            tokens_BxP[b, :len(p)] = p
        keys_Bx2 = np.zeros((B, 2), np.uint32)
        keys_Bx2[:n_rows] = prompt_keys(sampling.seed, indices)
        knobs, lengths = self.knobs(sampling, keys_Bx2), self._batch(lengths_B)
        logits_BxV, cache = self._call(self.programs.prefill, self.state, self._batch(tokens_BxP),
                                       lengths, cache_len=S)
        tok_B = self._call(self.programs.sample, logits_BxV, self._replicated(np.int32(0)), knobs)
        out = [RowResult([]) for _ in range(n_rows)]
        live = list(range(n_rows))
        for t in range(max_new):
            if t + 1 < max_new:
                # dispatched before this step's tokens are read: the device runs ahead of the
                # host's stop checks by one token (a finished batch wastes that one step)
                step = self._replicated(np.int32(t))
                logits_BxV, cache = self._call(self.programs.decode, self.state, cache, tok_B,
                                               lengths, step)
                next_B = self._call(self.programs.sample, logits_BxV,
                                    self._replicated(np.int32(t + 1)), knobs)
            tokens = np.asarray(tok_B)
            live = [b for b in live if not self._take(out[b], indices[b], int(tokens[b]),
                                                      max_new, eos_id, on_token)]
            if not live:
                break
            tok_B = next_B
        return out

    @staticmethod
    def _take(row: RowResult, index: int, token: int, max_new: int, eos_id: int | None,
              on_token: OnToken | None) -> bool:
        """Adds a sampled token to a row; True when that ends the row."""
        if token == eos_id:
            row.finish_reason = "eos"
            return True
        row.tokens.append(token)
        if on_token is not None and on_token(index, token):
            row.finish_reason = "stop"
        elif len(row.tokens) >= max_new:
            row.finish_reason = "length"
        return bool(row.finish_reason)


# ---------------------------------------------------------------------------------------------
# text level


class TextStream:
    """A completion's text as tokens arrive: the stop-string check and the streamed pieces."""

    def __init__(self, tokenizer: Any, stop: Sequence[str],
                 emit: Callable[[str], None] | None = None):
        self.tokenizer, self.stop, self.emit = tokenizer, tuple(stop), emit
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of self.text already emitted

    def push(self, token: int) -> bool:
        """True when the text now holds a stop string (the text is cut before it)."""
        self.ids.append(token)
        # the whole completion decoded again: a byte-fallback character spelled by several
        # tokens reads as U+FFFD until its last byte arrives
        text = self.tokenizer.decode(self.ids)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text = text[:min(hits)]
            self._send(len(self.text))
            return True
        self.text = text
        self._send(self._settled(text))
        return False

    def finish(self) -> str:
        self._send(len(self.text))
        return self.text

    def _settled(self, text: str) -> int:
        """How much of the text can no longer change: not a trailing unfinished character, nor
        a tail that may be the start of a stop string."""
        end = len(text.rstrip("\ufffd"))
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, end), hold, -1):
                if text.endswith(s[:n], 0, end):
                    hold = n
                    break
        return end - hold

    def _send(self, end: int) -> None:
        if end > self.sent and self.emit is not None:
            self.emit(self.text[self.sent:end])
        self.sent = max(self.sent, end)


def fit_prompts(ids: list[list[int]], max_len: int | None, max_new_tokens: int,
                log: Log) -> list[tuple[list[int], int]]:
    """Each prompt left-truncated to max_len - max_new_tokens ids (warned), with the count."""
    if max_len is None:
        return [(p, 0) for p in ids]
    room = max_len - max_new_tokens
    if room < 1:
        raise UserError(f"sampling.max_new_tokens={max_new_tokens}: leaves no room for a prompt "
                        f"in the model's context of {max_len} tokens")
    out = [(p[max(0, len(p) - room):], max(0, len(p) - room)) for p in ids]
    cut = [i for i, (_, c) in enumerate(out) if c]
    if len(cut) == 1:  # one line, however many prompts: the count is what a user needs
        i = cut[0]
        log(f"warning: prompt {i} has {len(ids[i])} tokens, more than the context {max_len} - "
            f"max_new_tokens {max_new_tokens} = {room}: its first {out[i][1]} tokens are dropped")
    elif cut:
        log(f"warning: {len(cut)} of {len(ids)} prompts have more than the context {max_len} - "
            f"max_new_tokens {max_new_tokens} = {room} tokens: their first tokens are dropped "
            f"(up to {max(out[i][1] for i in cut)})")
    return out


def generate(model: Transformer, tokenizer: Any, prompts: Sequence[str],
             sampling: SamplingConfig, *, batch_size: int = 8, max_len: int | None = None,
             layout: Layout | None = None, on_text: Callable[[int, str], None] | None = None,
             log: Log = print) -> list[Completion]:
    """Completions of text prompts (each a document start), in prompt order.

    max_len: the model's context (a run's seq_len); prompts longer than max_len -
    max_new_tokens keep their last tokens, with a warning through `log`. on_text(prompt index,
    piece) streams each completion; the pieces of a prompt join to its Completion.text.
    """
    sampling.validate()
    fitted = fit_prompts([document_ids(tokenizer, p) for p in prompts], max_len,
                         sampling.max_new_tokens, log)
    streams = [TextStream(tokenizer, sampling.stop,
                          None if on_text is None else _bind(on_text, i))
               for i in range(len(prompts))]
    rows = Decoder(model, layout).generate_ids(
        [ids for ids, _ in fitted], sampling, eos_id=tokenizer.eos_id, batch_size=batch_size,
        on_token=lambda i, token: streams[i].push(token))
    return [Completion(text=stream.finish(), tokens=tuple(row.tokens),
                       finish_reason=row.finish_reason, prompt_tokens=len(ids), truncated=cut)
            for stream, row, (ids, cut) in zip(streams, rows, fitted)]


def _bind(on_text: Callable[[int, str], None], index: int) -> Callable[[str], None]:
    return lambda piece: on_text(index, piece)
