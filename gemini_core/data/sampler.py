"""The batch sampler: deterministic, random-access batches for a MixtureSchedule
(gemini_core.data.mixture says how many sequences each domain gets per step; this, which).

A domain's token array is cut into non-overlapping windows of seq_len + 1 tokens (inputs and
shifted targets). Epoch e of domain d shifts the windows by a random offset and visits them in a
random order, both drawn from SeedSequence([seed, sha256(domain name), e]); the domain's k-th
sequence of the run is window k % n_windows of epoch k // n_windows. So each epoch reads every
window once (no replacement), repeats get a fresh shift and order, and `batch(step)` is a pure
function of (seed, step, schedule, token arrays, total_steps, batch_size, seq_len): resuming
never replays or skips data. Seeding by name, not position, keeps a domain's stream unchanged
when domains are added or reordered.

A stage with its own `seq_len` (a long-context stage) draws from its own cut of each domain:
windows of that length + 1, their own epochs (seeded with the width too) and their own running
count, so the base stages' stream is the one a schedule without the long stage draws. Its
batches hold `MixtureSchedule.batch_sizes` rows: as many tokens per step as the others.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from typing import Mapping, Sequence

import numpy as np

from gemini_core.data.mixture import MixtureSchedule, domain_counts
from gemini_core.errors import UserError

_CUM_BLOCK = 256  # cumulative counts are stored every this many steps


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
        self.stage_seq_lens = schedule.seq_lens(seq_len)
        self.stage_batch_sizes = schedule.batch_sizes(batch_size, seq_len)
        counts_TxD = domain_counts(schedule, self.domains, total_steps, batch_size, seq_len)
        self._first_steps = np.array(schedule.first_steps(total_steps))
        # the window width of every step's stage: each width has its own running counts
        bounds = list(self._first_steps) + [total_steps]
        width_T = np.empty(total_steps, np.int64)
        for i, length in enumerate(self.stage_seq_lens):
            width_T[bounds[i]:bounds[i + 1]] = length + 1
        self._width_T = width_T
        # per-step counts in int32 (<= batch_size) plus cumulative counts every _CUM_BLOCK steps
        # give any step's running sample index at a quarter of a cumulative int64 table's memory
        self._cum_blocks, self._totals = {}, {}
        for width in sorted(set(width_T.tolist())):
            cum_TxD = np.cumsum(np.where((width_T == width)[:, None], counts_TxD, 0), axis=0)
            self._cum_blocks[width] = np.concatenate([np.zeros((1, len(self.domains)), np.int64),
                                                      cum_TxD[_CUM_BLOCK - 1::_CUM_BLOCK]])
            self._totals[width] = cum_TxD[-1].copy()
            del cum_TxD
        self._counts_TxD = counts_TxD.astype(np.int32)
        self._arrays, self._layouts = self._check_tokens(tokens)
        self._epochs: collections.OrderedDict[tuple[int, int], tuple[int, np.ndarray]] = \
            collections.OrderedDict()
        self._cache_epochs = cache_epochs or 2 * len(self.domains) + 2

    def _check_tokens(self, tokens: Mapping[str, np.ndarray]
                      ) -> tuple[list[np.ndarray | None], dict[tuple[int, int], _Layout]]:
        arrays, layouts = [], {}
        for d, name in enumerate(self.domains):
            array = tokens.get(name)
            if array is not None and np.ndim(array) != 1:
                raise ValueError(f"tokens[{name!r}]: expected a 1-D token array, got shape "
                                 f"{np.shape(array)}")
            for width, totals_D in self._totals.items():
                layout = _Layout(0 if array is None else len(array), width)
                if totals_D[d] and layout.n_windows < 2:  # a domain never drawn may be short
                    length = width - 1
                    raise UserError(
                        f"domain {name!r} has {layout.n_tokens:,} tokens: too few for seq_len="
                        f"{length} (two sequences of seq_len+1 tokens plus seq_len of shift "
                        f"room = {3 * length + 2:,} tokens); add data, lower seq_len, or give "
                        "the domain weight 0" + (" in that stage" if len(self._totals) > 1
                                                 else ""))
                layouts[d, width] = layout
            arrays.append(array)
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

    def shape(self, step: int) -> tuple[int, int]:
        """(rows, seq_len) of the batch at `step`: its stage's."""
        stage = self.stage(step)
        return self.stage_batch_sizes[stage], self.stage_seq_lens[stage]

    def counts(self, step: int) -> np.ndarray:
        self._check_step(step, self.total_steps)
        return self._counts_TxD[step].astype(np.int64)

    def counts_table(self) -> np.ndarray:
        """(total_steps, D) int32, read-only: the whole run's per-step domain counts."""
        view = self._counts_TxD.view()
        view.flags.writeable = False
        return view

    def drawn_before(self, step: int, width: int | None = None) -> np.ndarray:
        """(D,) int64: sequences each domain has given in steps [0, step) (of `width` tokens
        only, with a width: a stage's own running count)."""
        self._check_step(step, self.total_steps + 1)
        block = step // _CUM_BLOCK
        widths = list(self._cum_blocks) if width is None else [width]
        span = slice(block * _CUM_BLOCK, step)
        return sum(self._cum_blocks[w][block] + np.where(
            (self._width_T[span] == w)[:, None], self._counts_TxD[span], 0).sum(0, dtype=np.int64)
            for w in widths)

    # -- the data ---------------------------------------------------------------------------

    def _epoch(self, d: int, epoch: int, width: int) -> tuple[int, np.ndarray]:
        """(offset, window order) of one epoch of domain d's windows of `width` tokens; a small
        LRU, as a step touches at most a couple of epochs per domain."""
        key = (d, epoch, width)
        if key in self._epochs:
            self._epochs.move_to_end(key)
            return self._epochs[key]
        layout = self._layouts[d, width]
        # the base length's epochs are seeded as they always were (its stream is unchanged)
        extra = [] if width == self.seq_len + 1 else [width]
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
            [self.seed % 2**64, _domain_key(self.domains[d]), epoch, *extra])))
        offset = int(rng.integers(0, layout.slack + 1))
        order = rng.permutation(layout.n_windows)
        order = order.astype(np.uint32 if layout.n_windows < 2**32 else np.int64)
        self._epochs[key] = (offset, order)
        if len(self._epochs) > self._cache_epochs:
            self._epochs.popitem(last=False)
        return offset, order

    def window_starts(self, d: int, first: int, count: int,
                      width: int | None = None) -> np.ndarray:
        """(count,) int64: token offsets of domain d's sequences number first .. first+count-1
        (of `width` tokens; default seq_len + 1)."""
        width = self.seq_len + 1 if width is None else width
        layout = self._layouts[d, width]
        k_N = np.arange(first, first + count, dtype=np.int64)
        epoch_N, pos_N = np.divmod(k_N, layout.n_windows)
        starts_N = np.empty(count, np.int64)
        for epoch in np.unique(epoch_N).tolist():
            offset, order = self._epoch(d, epoch, width)
            sel = epoch_N == epoch
            starts_N[sel] = offset + order[pos_N[sel]].astype(np.int64) * layout.width
        return starts_N

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens_BxW int32, domain_B int32) with W = seq_len + 1, rows grouped by domain
        (B and seq_len: the step's stage's, `shape`)."""
        n_D = self.counts(step)
        rows, length = self.shape(step)
        width = length + 1
        first_D = self.drawn_before(step, width)
        tokens_BxW = np.empty((rows, width), np.int32)
        row = 0
        for d in np.flatnonzero(n_D).tolist():
            starts_N = self.window_starts(d, int(first_D[d]), int(n_D[d]), width)
            # a strided view reads each row as one contiguous slice (memmap friendly)
            windows = np.lib.stride_tricks.sliding_window_view(self._arrays[d], width)
            tokens_BxW[row:row + len(starts_N)] = windows[starts_N]
            row += len(starts_N)
        domain_B = np.repeat(np.arange(len(self.domains), dtype=np.int32), n_D)
        return tokens_BxW, domain_B

    # -- repetition -------------------------------------------------------------------------

    def epochs(self, steps: int | None = None) -> dict[str, float]:
        """Realized epochs per domain after `steps` steps (default: the whole run): sequences
        drawn / windows per epoch, so 1.0 = every window of the domain seen once (summed over
        the stages' lengths)."""
        steps = self.total_steps if steps is None else steps
        drawn = {w: self.drawn_before(steps, w) for w in self._cum_blocks}
        return {name: sum(float(drawn[w][d]) / self._layouts[d, w].n_windows
                          for w in drawn if self._layouts[d, w].n_windows)
                for d, name in enumerate(self.domains)}

    def repetition_warnings(self, max_epochs: float) -> list[str]:
        """One message per domain that the whole run repeats more than max_epochs times."""
        out = []
        for d, (name, epochs) in enumerate(self.epochs().items()):
            if epochs > max_epochs:
                layouts = [self._layouts[d, w] for w in self._totals]
                drawn = sum(int(t[d]) for t in self._totals.values())
                available = (f"{layouts[0].n_windows:,} sequences of {layouts[0].width} tokens"
                             if len(layouts) == 1 else "cut in windows of each stage's length")
                out.append(f"domain {name!r} is repeated {epochs:.2f} epochs (> max_epochs="
                           f"{max_epochs:g}): {layouts[0].n_tokens:,} tokens available "
                           f"({available}), the run draws {drawn:,} sequences")
        return out
