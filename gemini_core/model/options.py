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


MODALITIES = ("image", "audio")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """`model.encoders.<name>`: a small encoder whose outputs are soft tokens in the decoder's
    sequence (gemini_core.model.media). Images: square patches of `patch` pixels, a linear
    embedding plus learned row and column embeddings. Audio: log-mel frames of 10 ms, stacked
    `frames_per_token` at a time, a linear embedding plus a learned position per soft token."""
    modality: str  # image | audio
    patch: int = 7  # image: patch side in pixels (must divide the image side)
    n_mels: int = 40  # audio: mel bands
    frames_per_token: int = 4  # audio: 10 ms frames per soft token
    max_tokens: int = 32  # audio: soft tokens per recording at most (longer ones are cut)

    def check(self, path: str) -> None:
        if self.modality not in MODALITIES:
            raise UserError(f"{path}.modality={self.modality!r}: must be one of "
                            f"{', '.join(MODALITIES)}")
        for name in ("patch", "n_mels", "frames_per_token", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{path}.{name}={value!r}: must be a whole number >= 1")


@dataclasses.dataclass(frozen=True)
class MediaTable:
    """Filled from data (never declared): one modality domain's media table, as the model holds
    it. Reference id `first_id + item·slots + slot` is soft token `slot` of row `item`."""
    domain: str
    encoder: str  # its name under model.encoders
    modality: str
    first_id: int
    items: int  # rows: the domain's train and held-out items, then one scratch row
    slots: int  # soft tokens per item
    features: int  # values per soft token
    grid: int = 0  # image: patches per side (slots = grid²)

    @property
    def end_id(self) -> int:
        return self.first_id + self.items * self.slots
