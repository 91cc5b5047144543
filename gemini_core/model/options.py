"""The model's long-context options as declarations, without jax: RoPE scaling (`model.rope`),
the attention kernels' names (`model.attention`) and the remat policies (`model.remat`).

gemini_core.config validates a user's config with them before anything imports jax; the modules
that implement them (rope, attention, transformer) import them from here.
"""

from __future__ import annotations

import dataclasses
import math

from gemini_core.errors import UserError

ATTENTION = ("auto", "dense", "blockwise", "cudnn")
# jax.checkpoint_policies that need no arguments; "full" saves nothing (every block recomputed)
REMAT = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
         "checkpoint_dots", "checkpoint_dots_with_no_batch_dims", "nothing_saveable",
         "everything_saveable")
ROPE_METHODS = ("none", "linear", "ntk", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """`model.rope`: how RoPE's frequencies are scaled for a longer context
    (gemini_core.model.rope has the formulas)."""
    method: str = "none"
    factor: float = 1.0  # s = new context / original context
    original_length: int = 0  # L_orig, the pretraining context (yarn's ramp is measured on it)
    beta_fast: float = 32.0  # rotations over L_orig above which a pair is left as it is
    beta_slow: float = 1.0  # rotations over L_orig below which a pair is interpolated fully
    attention_factor: float = 0.0  # yarn's cos/sin multiplier; 0 = the paper's 0.1 ln(s) + 1

    def check(self, path: str) -> None:
        """Raises UserError naming `path`.field and the value (path is e.g. "model.rope")."""
        if self.method not in ROPE_METHODS:
            raise UserError(f"{path}.method={self.method!r}: must be one of "
                            f"{', '.join(ROPE_METHODS)}")
        if not (math.isfinite(self.factor) and self.factor >= 1):
            raise UserError(f"{path}.factor={self.factor!r}: must be a finite number >= 1 "
                            "(the context extension factor)")
        if self.method == "none" and self.factor != 1:
            # a factor with no method would silently train at the original frequencies
            raise UserError(f"{path}.factor={self.factor!r}: has no effect with {path}.method="
                            f"'none'; pick a method ({', '.join(ROPE_METHODS[1:])}) or factor 1")
        if not self.original_length >= 0:
            raise UserError(f"{path}.original_length={self.original_length!r}: must be >= 0")
        if self.method == "yarn" and not self.original_length > 0:
            raise UserError(f"{path}.original_length={self.original_length!r}: yarn needs the "
                            "pretraining context length (> 0)")
        if not (math.isfinite(self.beta_slow) and self.beta_slow > 0):
            raise UserError(f"{path}.beta_slow={self.beta_slow!r}: must be > 0")
        if not (math.isfinite(self.beta_fast) and self.beta_fast > self.beta_slow):
            raise UserError(f"{path}.beta_fast={self.beta_fast!r}: must be > "
                            f"{path}.beta_slow={self.beta_slow!r}")
        if not (math.isfinite(self.attention_factor) and self.attention_factor >= 0):
            raise UserError(f"{path}.attention_factor={self.attention_factor!r}: must be >= 0 "
                            "(0 = yarn's default 0.1 ln(factor) + 1)")
        if self.attention_factor != 0 and self.method != "yarn":
            raise UserError(f"{path}.attention_factor={self.attention_factor!r}: only yarn "
                            f"scales attention, {path}.method={self.method!r}")
