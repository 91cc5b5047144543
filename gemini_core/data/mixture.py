"""MixtureSchedule — the contract between sweeps/ and gemini_core/ — and how many sequences each
domain gets in each batch (`domain_counts`); which sequences they are is gemini_core.data.sampler.

A schedule is a list of stages; stage `start` is a fraction of total training steps (first at
0.0, strictly increasing, each in [0, 1)); weights are non-negative over known domains and sum
to 1. The last stage is the end-of-training upweighting phase when there is one. Step s runs
the last stage with start <= s / total_steps. A stage may set its own `seq_len` (a long-context
stage); its batch then holds batch_size * data.seq_len / seq_len sequences, so every step trains
on as many tokens (`batch_sizes`), and the counts below are of those sequences.

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
"""

from __future__ import annotations

import dataclasses
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
_CHUNK = 1 << 15  # steps per vectorised chunk: bounds the temporaries of domain_counts


@dataclasses.dataclass(frozen=True)
class Stage:
    start: float
    weights: Mapping[str, float]  # or a named rule ("natural") before it is resolved
    seq_len: int | None = None  # None: the run's data.seq_len

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
            if not isinstance(st, Mapping) or not {"start", "weights"} <= set(st) \
                    or not set(st) <= {"start", "weights", "seq_len"}:
                raise UserError(f"{where}.stages[{i}]: expected the keys start, weights and "
                                f"optionally seq_len (got {', '.join(map(str, st))})"
                                if isinstance(st, Mapping) else
                                f"{where}.stages[{i}]: expected the keys start, weights")
            if not isinstance(st["weights"], Mapping):
                raise UserError(f"{where}.stages[{i}].weights: expected a mapping domain -> weight")
            start = st["start"]
            if isinstance(start, bool) or not isinstance(start, (int, float)):
                raise UserError(f"{where}.stages[{i}].start={start!r}: expected a number")
            stages.append(Stage(float(start), types.MappingProxyType(dict(st["weights"])),
                                st.get("seq_len")))
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
        """The JSON form; `seq_len` only where a stage sets it (a schedule without one has the
        dict, hence the run identity, it always had)."""
        return {"stages": [{"start": s.start, "weights": dict(s.weights)
                            if isinstance(s.weights, Mapping) else s.weights,
                            **({"seq_len": s.seq_len} if s.seq_len is not None else {})}
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
            if st.seq_len is not None and (isinstance(st.seq_len, bool)
                                           or not isinstance(st.seq_len, int) or st.seq_len < 1):
                raise UserError(f"{where}.stages[{i}].seq_len={st.seq_len!r}: expected a "
                                "whole number of tokens >= 1")
        return self

    def seq_lens(self, seq_len: int) -> list[int]:
        """Each stage's sequence length, `seq_len` (data.seq_len) where it sets none."""
        return [seq_len if st.seq_len is None else st.seq_len for st in self.stages]

    def batch_sizes(self, batch_size: int, seq_len: int, where: str = "schedule") -> list[int]:
        """Each stage's sequences per step: as many tokens per step as batch_size x seq_len.
        UserError naming the stage when its length does not divide those tokens."""
        tokens = batch_size * seq_len
        out = []
        for i, length in enumerate(self.seq_lens(seq_len)):
            if tokens % length:
                raise UserError(f"{where}.stages[{i}].seq_len={length}: must divide the "
                                f"{tokens:,} tokens of a step (train.batch_size={batch_size} x "
                                f"data.seq_len={seq_len}), which every stage keeps")
            out.append(tokens // length)
        return out

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
                  batch_size: int, seq_len: int | None = None) -> np.ndarray:
    """(total_steps, D) int64: sequences of each domain in the batch at each step. With
    `seq_len` (data.seq_len), a stage of its own length has its own batch size
    (`MixtureSchedule.batch_sizes`)."""
    if not 1 <= total_steps <= MAX_TOTAL_STEPS:
        raise ValueError(f"total_steps={total_steps}: must be in [1, {MAX_TOTAL_STEPS}]")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    schedule.validate(domains)
    batches = (schedule.batch_sizes(batch_size, seq_len) if seq_len is not None
               else [batch_size] * len(schedule.stages))
    scale = weight_scale(total_steps)
    bounds = schedule.first_steps(total_steps) + [total_steps]
    counts_TxD = np.empty((total_steps, len(domains)), np.int64)
    for i, weights_D in enumerate(schedule.weight_matrix(domains)):
        first, end = bounds[i], bounds[i + 1]  # first steps are non-decreasing
        if end <= first:
            continue  # this stage owns no step
        cum_KxD = stage_cumulative(quantize_weights(weights_D, scale), scale, batches[i],
                                    end - first)
        counts_TxD[first:end] = cum_KxD
        counts_TxD[first + 1:end] -= cum_KxD[:-1]
    return counts_TxD
