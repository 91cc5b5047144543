"""MixtureSchedule — the contract between sweeps/ and gemini_core/ — and the batch sampler.

A schedule is a list of stages; stage `start` is a fraction of total training steps (first at
0.0, strictly increasing, each in [0, 1)); weights are non-negative over known domains and sum
to 1. The last stage is the end-of-training upweighting phase when there is one. Step s runs
the last stage with start <= s / total_steps.

How many sequences each domain gets per batch (`domain_counts`)
-----------------------------------------------------------------
Weights are normalised to sum to 1 and quantised exactly to integers q_d / Q, Q a power of two
as fine as int64 allows (2^48 up to 16k steps, 2^42 at 1M): the quantisation moves a domain by
less than 2 * steps * B / Q sequences over a run (0.002 at 1M steps of B=4096). Within a stage, let
C_d(k) = k * B * q_d / Q be domain d's ideal cumulative count after the stage's k-th step and
N_d(k) its realized count. Each step hands out B sequences with a carried remainder
r_d = C_d - N_d:

    ideal_d = B * w_d + r_d,   n_d = max(0, floor(ideal_d)),
    the B - sum(n) leftover slots go one each to domains still below their ideal (n_d < ideal_d),
    earliest deadline first (the first step at which C_d would reach N_d + n_d + 1; ties to
    whichever reaches it sooner in real-valued time, then by domain order).

This is largest-remainder rounding with a carry, with one change that makes it sound: the
textbook version (leftovers to the largest fractional parts) is not house-monotone — the
Alabama paradox — and can hand a domain a negative count (weights 1/6, 3/10, 4/15, 4/15 with
B=1 do it at step 20). Read as scheduling, domain d's j-th sequence is a unit job released at
the step where C_d first exceeds j - 1 and due at the step where C_d reaches j; the B slots of
a step are B identical machines; and earliest-deadline-first is optimal for unit jobs with
integer release times (exchange argument), while a feasible schedule exists because the fluid
one is (the job/step transportation polytope is integral). Hence, at every step of a stage,

    floor(C_d(k)) <= N_d(k) <= ceil(C_d(k)),

so over any window of steps inside one stage |realized - ideal| < 2, over any prefix of a
stage (and over each whole stage) < 1, and over the whole run < the number of stages. Counts
are never negative, a domain with weight 0 in a stage gets nothing in that stage, and a tiny
positive weight gets at least floor(ideal) sequences over every stage prefix. The carry resets
at each stage start: that keeps the zero-weight guarantee and makes every stage — the
end-of-training upweighting one included — accurate on its own.

The schedule is a closed form except at rare steps: the leftover set is the top-L by deadline
(vectorised over all steps); only where a domain that was already ahead must keep its slot does
a short sequential repair run, until the closed form takes over again.

Which sequences (`Sampler`)
----------------------------
A domain's token array is cut into non-overlapping windows of seq_len + 1 tokens (inputs and
shifted targets). Epoch e of domain d shifts the windows by a random offset and visits them in a
random order, both drawn from SeedSequence([seed, sha256(domain name), e]); the domain's k-th
sequence of the run is window k % n_windows of epoch k // n_windows. So each epoch reads every
window once (no replacement), repeats get a fresh shift and order, and `batch(step)` is a pure
function of (seed, step, schedule, token arrays, total_steps, batch_size, seq_len): resuming
never replays or skips data. Seeding by name, not position, keeps a domain's stream unchanged
when domains are added or reordered.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import types
from fractions import Fraction
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from gemini_core.errors import UserError

WEIGHT_TOLERANCE = 1e-6
MAX_TOTAL_STEPS = 1 << 30  # keeps k * q exact in int64 (see weight_scale)
_CUM_BLOCK = 256  # cumulative counts are stored every this many steps
_CHUNK = 1 << 15  # steps per vectorised chunk: bounds the temporaries of domain_counts


@dataclasses.dataclass(frozen=True)
class Stage:
    start: float
    weights: Mapping[str, float]  # or a named rule ("natural") before it is resolved

    def __post_init__(self) -> None:
        # frozen means frozen: a caller's dict must not change the schedule behind our back
        if isinstance(self.weights, Mapping) and not isinstance(self.weights,
                                                                types.MappingProxyType):
            object.__setattr__(self, "weights", types.MappingProxyType(dict(self.weights)))
        if isinstance(self.start, int) and not isinstance(self.start, bool):
            object.__setattr__(self, "start", float(self.start))


@dataclasses.dataclass(frozen=True)
class MixtureSchedule:
    stages: tuple[Stage, ...]

    @classmethod
    def from_dict(cls, obj: Mapping, where: str = "schedule") -> "MixtureSchedule":
        if not isinstance(obj, Mapping) or not isinstance(obj.get("stages"), list):
            raise UserError(f"{where}: expected {{\"stages\": [{{\"start\": ..., \"weights\": "
                            "{...}}, ...]}")
        stages = []
        for i, st in enumerate(obj["stages"]):
            if not isinstance(st, Mapping) or set(st) != {"start", "weights"}:
                raise UserError(f"{where}.stages[{i}]: expected exactly the keys start, weights")
            if not isinstance(st["weights"], Mapping):
                raise UserError(f"{where}.stages[{i}].weights: expected a mapping domain -> weight")
            start = st["start"]
            if isinstance(start, bool) or not isinstance(start, (int, float)):
                raise UserError(f"{where}.stages[{i}].start={start!r}: expected a number")
            stages.append(Stage(float(start), types.MappingProxyType(dict(st["weights"]))))
        return cls(tuple(stages))

    @classmethod
    def from_stage_weights(cls, stages: Sequence[tuple[float, Mapping[str, float]]]
                           ) -> "MixtureSchedule":
        """`[(0.0, {"web": 0.7, "code": 0.3}), (0.9, {...})]` -> schedule (not validated)."""
        return cls(tuple(Stage(float(start), weights) for start, weights in stages))

    @classmethod
    def constant(cls, weights: Mapping[str, float]) -> "MixtureSchedule":
        return cls.from_stage_weights([(0.0, weights)])

    @classmethod
    def load(cls, path: str | Path) -> "MixtureSchedule":
        path = Path(path)
        try:
            obj = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{path}: schedule file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(obj, where=str(path))

    def to_dict(self) -> dict:
        return {"stages": [{"start": s.start, "weights": dict(s.weights)
                            if isinstance(s.weights, Mapping) else s.weights}
                           for s in self.stages]}

    def dump(self, path: str | Path) -> None:
        # json writes floats by repr, so load(dump(s)) == s exactly
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def validate(self, domains: Sequence[str], where: str = "schedule") -> "MixtureSchedule":
        """Raises UserError naming the stage and domain of the first violation; returns self."""
        if not self.stages:
            raise UserError(f"{where}: no stages")
        if self.stages[0].start != 0.0:
            raise UserError(f"{where}.stages[0].start={self.stages[0].start}: must be 0.0")
        for i, st in enumerate(self.stages):
            if not 0.0 <= st.start < 1.0:
                raise UserError(f"{where}.stages[{i}].start={st.start}: must be in [0, 1)")
            if i and st.start <= self.stages[i - 1].start:
                raise UserError(f"{where}.stages[{i}].start={st.start}: stage starts must be "
                                "strictly increasing")
            if not isinstance(st.weights, Mapping):
                raise UserError(f"{where}.stages[{i}].weights={st.weights!r}: expected a mapping "
                                "domain -> weight (resolve named weights first)")
            for d, w in st.weights.items():
                if d not in domains:
                    raise UserError(f"{where}.stages[{i}].weights.{d}: unknown domain "
                                    f"(known: {', '.join(domains)})")
                if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                    raise UserError(f"{where}.stages[{i}].weights.{d}={w!r}: expected a number")
                if w < 0:
                    raise UserError(f"{where}.stages[{i}].weights.{d}={w}: must be non-negative")
            total = sum(st.weights.values())
            if abs(total - 1.0) > WEIGHT_TOLERANCE:
                raise UserError(f"{where}.stages[{i}].weights: sum to {total:.8g}, not 1")
        return self

    def stage_index(self, fraction: float) -> int:
        """Index of the stage active at `fraction` of training."""
        idx = 0
        for i, st in enumerate(self.stages):
            if st.start <= fraction:
                idx = i
        return idx

    def weights_at(self, fraction: float, domains: Sequence[str]) -> tuple[float, ...]:
        st = self.stages[self.stage_index(fraction)]
        return tuple(float(st.weights.get(d, 0.0)) for d in domains)

    def time_average(self, domains: Sequence[str]) -> dict[str, float]:
        """Weights averaged over training time: the overall pretraining mix."""
        ends = [s.start for s in self.stages[1:]] + [1.0]
        avg = {d: 0.0 for d in domains}
        for st, end in zip(self.stages, ends):
            for d in domains:
                avg[d] += (end - st.start) * float(st.weights.get(d, 0.0))
        return avg

    def first_steps(self, total_steps: int) -> list[int]:
        """First step of each stage: the least s with s / total_steps >= start (may be
        total_steps: a stage too short to own a step). Same float test as stage_index."""
        return [_first_step(st.start, total_steps) for st in self.stages]

    def weight_matrix(self, domains: Sequence[str]) -> np.ndarray:
        """(stages, domains) float64; a domain a stage leaves out has weight 0."""
        return np.array([[float(st.weights.get(d, 0.0)) for d in domains]
                         for st in self.stages], dtype=np.float64).reshape(-1, len(domains))


def _first_step(start: float, total_steps: int) -> int:
    step = min(math.ceil(start * total_steps), total_steps)
    while step > 0 and (step - 1) / total_steps >= start:  # ceil of a rounded product may overshoot
        step -= 1
    while step < total_steps and step / total_steps < start:
        step += 1
    return step


# ---------------------------------------------------------------------------------------------
# domain counts per step


def weight_scale(total_steps: int) -> int:
    # k * q_d must fit in int64 for every stage step k <= total_steps; within that, the finer the
    # better: the quantisation error per domain over a run is below total_steps * B / Q.
    return 1 << min(48, 62 - max(total_steps, 1).bit_length())


def quantize_weights(weights: Sequence[float], scale: int) -> list[int]:
    """Non-negative integers summing exactly to `scale`, proportional to `weights` (normalised).

    Exact (fractions), largest remainder; a zero weight stays 0 and a positive one gets >= 1.
    """
    exact = [Fraction(w) for w in weights]
    total = sum(exact)
    if total <= 0:
        raise ValueError(f"weights {list(weights)} have no positive entry")
    exact = [w / total * scale for w in exact]
    q = [math.floor(w) for w in exact]
    order = sorted(range(len(q)), key=lambda d: (-(exact[d] - q[d]), d))
    for d in order[:scale - sum(q)]:
        q[d] += 1
    for d, w in enumerate(exact):
        if w > 0 and q[d] == 0:  # only weights below 1/scale: take one unit from the largest
            q[max(range(len(q)), key=lambda e: (q[e], -e))] -= 1
            q[d] = 1
    return q


def _pack(mask_KxD: np.ndarray) -> list[int]:
    """Each row's booleans as one int bitmask (bit d = column d): cheap set logic in repairs."""
    bits_D = [1 << d for d in range(mask_KxD.shape[1])]
    if mask_KxD.shape[1] <= 62:
        return (mask_KxD.astype(np.int64) @ np.array(bits_D, np.int64)).tolist()
    return [sum(b for b, m in zip(bits_D, row) if m) for row in mask_KxD.tolist()]


def stage_cumulative(q_D: Sequence[int], scale: int, batch_size: int, n_steps: int,
                     chunk: int = _CHUNK) -> np.ndarray:
    """(n_steps, D) int64: N_d(k), realized cumulative counts after the stage's k-th step."""
    D = len(q_D)
    # B * q_d / scale = whole_D + frac_D / scale, split so nothing below overflows int64
    whole_D = np.array([batch_size * q // scale for q in q_D], np.int64)
    frac_D = np.array([batch_size * q % scale for q in q_D], np.int64)
    rate_D = np.array([float(batch_size * q or 1) for q in q_D])  # B * q_d, correctly rounded
    d_D = np.arange(D, dtype=np.int64)
    never = np.iinfo(np.int64).max
    out_KxD = np.empty((n_steps, D), np.int64)
    up_prev_D = np.zeros(D, bool)  # carry resets at the stage start: nobody is ahead
    floor_prev_D = np.zeros(D, np.int64)
    for k0 in range(1, n_steps + 1, chunk):
        k_K = np.arange(k0, min(k0 + chunk, n_steps + 1), dtype=np.int64)
        kf_KxD = k_K[:, None] * frac_D
        floor_KxD = k_K[:, None] * whole_D + kf_KxD // scale  # floor(C_d(k))
        rem_KxD = kf_KxD % scale  # fractional part of C_d(k), in units of 1/scale
        leftover_K = rem_KxD.sum(1) // scale  # exact: sum_d C_d(k) = k * B
        crossed_KxD = floor_KxD > np.concatenate([floor_prev_D[None], floor_KxD[:-1]])
        # deadline of d's optional sequence: whole steps until C_d reaches its next integer;
        # equal deadlines go to the domain that gets there first (real-valued time), then by
        # domain order. Any tie-break keeps EDF's guarantee; this one keeps an ideal that the
        # weight quantisation nudged just below an integer from losing its sequence.
        due_KxD = np.where(whole_D >= 1, 1, -((rem_KxD - scale) // np.maximum(frac_D, 1)))
        due_KxD = np.where(rem_KxD > 0, due_KxD, never)
        eta_KxD = (scale - rem_KxD) / rate_D
        order_KxD = np.lexsort((np.broadcast_to(d_D, due_KxD.shape), eta_KxD, due_KxD), axis=-1)
        rank_KxD = np.empty_like(order_KxD)
        np.put_along_axis(rank_KxD, order_KxD, np.broadcast_to(d_D, order_KxD.shape), axis=1)
        up_KxD = rank_KxD < leftover_K[:, None]  # closed form: leftovers to the top-L by deadline
        _repair(up_KxD, up_prev_D, crossed_KxD, rem_KxD > 0, order_KxD, leftover_K)
        out_KxD[k0 - 1:k0 - 1 + len(k_K)] = floor_KxD + up_KxD
        up_prev_D, floor_prev_D = up_KxD[-1].copy(), floor_KxD[-1]
    return out_KxD


def _repair(up_KxD: np.ndarray, up_prev_D: np.ndarray, crossed_KxD: np.ndarray,
            open_KxD: np.ndarray, order_KxD: np.ndarray, leftover_K: np.ndarray) -> None:
    """Fixes, in place, the steps where the closed form would take a slot back.

    A domain that holds its optional slot (is ahead) and whose floor did not move must keep it
    (counts never go negative); if the closed form drops it, the step is recomputed — forced
    domains first, then the remaining leftovers by deadline — and so on until the closed form
    agrees again. Earliest-deadline-first guarantees the forced ones fit (module docstring).
    """
    kept_KxD = np.concatenate([up_prev_D[None], up_KxD[:-1]]) & ~crossed_KxD
    suspects = np.flatnonzero((kept_KxD & ~up_KxD).any(1))
    if not len(suspects):
        return
    closed = _pack(up_KxD)
    stay = _pack(~crossed_KxD)
    is_open = _pack(open_KxD)
    prev = _pack(up_prev_D[None])[0]
    fixed: dict[int, int] = {}
    done = -1
    for k in suspects.tolist():
        if k <= done:  # already walked through while repairing an earlier step
            continue
        while k < len(closed):
            before = fixed.get(k - 1, closed[k - 1]) if k else prev
            forced = before & stay[k]
            if not forced & ~closed[k]:
                break  # the closed form is consistent again from here on
            need = int(leftover_K[k]) - forced.bit_count()
            if need < 0:
                raise AssertionError(f"mixture counts: infeasible step {k} (please report)")
            row = forced
            for d in order_KxD[k].tolist():
                if not need:
                    break
                bit = 1 << d
                if is_open[k] & bit and not forced & bit:
                    row |= bit
                    need -= 1
            fixed[k] = row
            k += 1
        done = k
    for k, bits in fixed.items():
        up_KxD[k] = [(bits >> d) & 1 for d in range(up_KxD.shape[1])]


def domain_counts(schedule: MixtureSchedule, domains: Sequence[str], total_steps: int,
                  batch_size: int) -> np.ndarray:
    """(total_steps, D) int64: sequences of each domain in the batch at each step."""
    if not 1 <= total_steps <= MAX_TOTAL_STEPS:
        raise ValueError(f"total_steps={total_steps}: must be in [1, {MAX_TOTAL_STEPS}]")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    schedule.validate(domains)
    scale = weight_scale(total_steps)
    bounds = schedule.first_steps(total_steps) + [total_steps]
    counts_TxD = np.empty((total_steps, len(domains)), np.int64)
    for i, weights_D in enumerate(schedule.weight_matrix(domains)):
        first, end = bounds[i], bounds[i + 1]  # first steps are non-decreasing
        if end <= first:
            continue  # this stage owns no step
        cum_KxD = stage_cumulative(quantize_weights(weights_D, scale), scale, batch_size,
                                    end - first)
        counts_TxD[first:end] = cum_KxD
        counts_TxD[first + 1:end] -= cum_KxD[:-1]
    return counts_TxD


# ---------------------------------------------------------------------------------------------
# sequence windows


def _domain_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How a domain's token array is cut: n_windows windows of `width` tokens per epoch, shifted
    by an offset in [0, slack] (slack >= width - 1, so every shift in [0, seq_len] is possible
    and the tail is reachable too)."""
    n_tokens: int
    width: int

    @property
    def n_windows(self) -> int:
        return max(0, (self.n_tokens - (self.width - 1)) // self.width)

    @property
    def slack(self) -> int:
        return self.n_tokens - self.n_windows * self.width


class Sampler:
    """Deterministic, random-access batches for a mixture schedule (module docstring).

    Rows of a batch are grouped by domain, in domain order: the loss is a mean over rows, so
    order within a batch does not matter, and grouping makes `domain_B` trivially auditable.
    """

    def __init__(self, schedule: MixtureSchedule, domains: Sequence[str],
                 tokens: Mapping[str, np.ndarray], *, total_steps: int, batch_size: int,
                 seq_len: int, seed: int, cache_epochs: int = 0):
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len}: must be >= 1")
        self.schedule = schedule
        self.domains = tuple(domains)
        self.total_steps, self.batch_size, self.seq_len = total_steps, batch_size, seq_len
        self.seed = int(seed)
        counts_TxD = domain_counts(schedule, self.domains, total_steps, batch_size)
        # per-step counts in int32 (<= batch_size) plus cumulative counts every _CUM_BLOCK steps
        # give any step's running sample index at a quarter of a cumulative int64 table's memory
        cum_TxD = np.cumsum(counts_TxD, axis=0)
        self._cum_blocks = np.concatenate([np.zeros((1, len(self.domains)), np.int64),
                                           cum_TxD[_CUM_BLOCK - 1::_CUM_BLOCK]])
        self._totals_D = cum_TxD[-1].copy()
        del cum_TxD
        self._counts_TxD = counts_TxD.astype(np.int32)
        self._first_steps = np.array(schedule.first_steps(total_steps))
        self._arrays, self._layouts = self._check_tokens(tokens)
        self._epochs: collections.OrderedDict[tuple[int, int], tuple[int, np.ndarray]] = \
            collections.OrderedDict()
        self._cache_epochs = cache_epochs or 2 * len(self.domains) + 2

    def _check_tokens(self, tokens: Mapping[str, np.ndarray]
                      ) -> tuple[list[np.ndarray | None], list[_Layout]]:
        width = self.seq_len + 1
        arrays, layouts = [], []
        for d, name in enumerate(self.domains):
            array = tokens.get(name)
            if array is not None and np.ndim(array) != 1:
                raise ValueError(f"tokens[{name!r}]: expected a 1-D token array, got shape "
                                 f"{np.shape(array)}")
            layout = _Layout(0 if array is None else len(array), width)
            if self._totals_D[d] and layout.n_windows < 2:  # a domain never drawn may be short
                need = 3 * self.seq_len + 2
                raise UserError(f"domain {name!r} has {layout.n_tokens:,} tokens: too few for "
                                f"seq_len={self.seq_len} (two sequences of seq_len+1 tokens plus "
                                f"seq_len of shift room = {need:,} tokens); add data, lower "
                                "seq_len, or give the domain weight 0")
            arrays.append(array)
            layouts.append(layout)
        return arrays, layouts

    # -- the mixture ------------------------------------------------------------------------

    def _check_step(self, step: int, end: int) -> None:
        if not 0 <= step < end:
            raise ValueError(f"step {step} outside [0, {end})")

    def stage(self, step: int) -> int:
        """Index of the stage active at `step` (the last with start <= step / total_steps)."""
        self._check_step(step, self.total_steps)
        return int(np.searchsorted(self._first_steps, step, side="right")) - 1

    def weights(self, step: int) -> tuple[float, ...]:
        weights = self.schedule.stages[self.stage(step)].weights
        return tuple(float(weights.get(d, 0.0)) for d in self.domains)

    def counts(self, step: int) -> np.ndarray:
        self._check_step(step, self.total_steps)
        return self._counts_TxD[step].astype(np.int64)

    def counts_table(self) -> np.ndarray:
        """(total_steps, D) int32, read-only: the whole run's per-step domain counts."""
        view = self._counts_TxD.view()
        view.flags.writeable = False
        return view

    def drawn_before(self, step: int) -> np.ndarray:
        """(D,) int64: sequences each domain has given in steps [0, step)."""
        self._check_step(step, self.total_steps + 1)
        block = step // _CUM_BLOCK
        return self._cum_blocks[block] + self._counts_TxD[block * _CUM_BLOCK:step].sum(
            0, dtype=np.int64)

    # -- the data ---------------------------------------------------------------------------

    def _epoch(self, d: int, epoch: int) -> tuple[int, np.ndarray]:
        """(offset, window order) of one epoch of domain d; a small LRU, as a step touches at
        most a couple of epochs per domain."""
        key = (d, epoch)
        if key in self._epochs:
            self._epochs.move_to_end(key)
            return self._epochs[key]
        layout = self._layouts[d]
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
            [self.seed % 2**64, _domain_key(self.domains[d]), epoch])))
        offset = int(rng.integers(0, layout.slack + 1))
        order = rng.permutation(layout.n_windows)
        order = order.astype(np.uint32 if layout.n_windows < 2**32 else np.int64)
        self._epochs[key] = (offset, order)
        if len(self._epochs) > self._cache_epochs:
            self._epochs.popitem(last=False)
        return offset, order

    def window_starts(self, d: int, first: int, count: int) -> np.ndarray:
        """(count,) int64: token offsets of domain d's sequences number first .. first+count-1."""
        layout = self._layouts[d]
        k_N = np.arange(first, first + count, dtype=np.int64)
        epoch_N, pos_N = np.divmod(k_N, layout.n_windows)
        starts_N = np.empty(count, np.int64)
        for epoch in np.unique(epoch_N).tolist():
            offset, order = self._epoch(d, epoch)
            sel = epoch_N == epoch
            starts_N[sel] = offset + order[pos_N[sel]].astype(np.int64) * layout.width
        return starts_N

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens_BxW int32, domain_B int32) with W = seq_len + 1, rows grouped by domain."""
        n_D = self.counts(step)
        first_D = self.drawn_before(step)
        width = self.seq_len + 1
        tokens_BxW = np.empty((self.batch_size, width), np.int32)
        row = 0
        for d in np.flatnonzero(n_D).tolist():
            starts_N = self.window_starts(d, int(first_D[d]), int(n_D[d]))
            # a strided view reads each row as one contiguous slice (memmap friendly)
            windows = np.lib.stride_tricks.sliding_window_view(self._arrays[d], width)
            tokens_BxW[row:row + len(starts_N)] = windows[starts_N]
            row += len(starts_N)
        domain_B = np.repeat(np.arange(len(self.domains), dtype=np.int32), n_D)
        return tokens_BxW, domain_B

    # -- repetition -------------------------------------------------------------------------

    def epochs(self, steps: int | None = None) -> dict[str, float]:
        """Realized epochs per domain after `steps` steps (default: the whole run): sequences
        drawn / windows per epoch, so 1.0 = every window of the domain seen once."""
        drawn_D = self.drawn_before(self.total_steps if steps is None else steps)
        return {name: float(drawn_D[d]) / self._layouts[d].n_windows
                if self._layouts[d].n_windows else 0.0
                for d, name in enumerate(self.domains)}

    def repetition_warnings(self, max_epochs: float) -> list[str]:
        """One message per domain that the whole run repeats more than max_epochs times."""
        out = []
        for d, (name, epochs) in enumerate(self.epochs().items()):
            if epochs > max_epochs:
                layout = self._layouts[d]
                out.append(f"domain {name!r} is repeated {epochs:.2f} epochs (> max_epochs="
                           f"{max_epochs:g}): {layout.n_tokens:,} tokens available "
                           f"({layout.n_windows:,} sequences of {layout.width} tokens), the run "
                           f"draws {int(self._totals_D[d]):,} sequences")
        return out
