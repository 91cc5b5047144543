"""MixtureSchedule — the contract between sweeps/ and gemini_core/ — and the batch sampler.

A schedule is a list of stages; stage `start` is a fraction of total training steps (first at
0.0, strictly increasing, each in [0, 1)); weights are non-negative over known domains and sum
to 1. The last stage is the end-of-training upweighting phase when there is one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
from pathlib import Path
from typing import Mapping, Sequence

from gemini_core.errors import UserError

WEIGHT_TOLERANCE = 1e-6


@dataclasses.dataclass(frozen=True)
class Stage:
    start: float
    weights: Mapping[str, float]


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
        return {"stages": [{"start": s.start, "weights": dict(s.weights)} for s in self.stages]}

    def dump(self, path: str | Path) -> None:
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
