"""Training progress: step, loss, tokens/s and ETA — a live bar on a terminal, plain lines elsewhere.

Plain lines (about every 10 s) keep CI logs and Ray worker logs readable, where a redrawn bar
would be one endless line.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, start: int, log: Callable[[str], None],
                 interactive: bool | None = None, every_s: float = 10.0):
        self.total, self.step, self.log = total, start, log
        self.first_loss: float | None = None  # of the first step this process ran
        self.last_loss: float | None = None
        self.rate: float | None = None
        self._t0 = time.perf_counter()
        # the first step of a process includes XLA's compile: the ETA counts from after it
        self._t_first: float | None = None
        self._step_first = start
        self._last_line = self._t0
        self._every_s = every_s
        if interactive is None:
            interactive = sys.stderr.isatty()
        self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                         mininterval=0.5) if interactive else None

    def update(self, step: int, loss: float) -> None:
        if self._bar is not None:
            self._bar.update(step - self.step)
        first = self.first_loss is None
        if first:
            self.first_loss = loss
            self._t_first, self._step_first = time.perf_counter(), step
        self.step, self.last_loss = step, loss
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=False)
        elif first or time.perf_counter() - self._last_line >= self._every_s or step == self.total:
            self._last_line = time.perf_counter()
            self.log(f"step {step}/{self.total}  {self._postfix()}  eta {self._eta()}")

    def set_rate(self, tokens_per_s: float) -> None:
        self.rate = tokens_per_s

    def note(self, text: str) -> None:
        (self._bar.write if self._bar is not None else self.log)(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def _postfix(self) -> str:
        parts = [f"loss {self.last_loss:.4f}"]
        if self.rate:
            parts.append(f"{self.rate:,.0f} tok/s")
        return "  ".join(parts)

    def _eta(self) -> str:
        done = self.step - self._step_first
        if self._t_first is None or done <= 0:
            return "? (compiling; measured from the next steps)"
        left = (time.perf_counter() - self._t_first) / done * (self.total - self.step)
        return f"{int(left // 60)}m{int(left % 60):02d}s"
