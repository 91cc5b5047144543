"""Modality domains: images with captions and recordings with transcripts, mixed and swept like
any text domain (`data.modalities.<domain>`, the domain also listed in `data.domains`).

One contract carries them: the token stream. An example is one document,

    <image> r_1 ... r_P </image> a photo of a sneaker. EOS

where each r_i is a *media reference*: an id at or above the text vocabulary that names one soft
token (an image patch, a stack of log-mel frames) of one item in the domain's media table. The
decoder's embedding turns a reference into its encoder's output (gemini_core.model.media), so the
sampler (exact counts, resume), packing, document masks, held-out windows, scoring and generation
take these arrays as they take text, unchanged; the loss is on text tokens only (targets at or
above the text vocabulary are masked). Markers and references are never predicted.

The media tables (raw patches as uint8, normalised log-mel stacks as float16) are model state
that is not trained: they ride in the checkpoint, so a run scores and describes its items
without the dataset, and row `items - 1` of each table is a scratch row that `gx generate
--image/--audio` fills with a user's file. They must fit in device memory beside the model; at a
scale where they would not, the features would travel with the batch instead.

Splits: Fashion-MNIST's `t10k` files and FSDD's takes 0-4 (their conventional test splits) are
the valid split here; the modality tasks (fashion_mnist, spoken_digits) rank captions of those
same held-out items, so no test item is ever trained on. Reading and building them:
gemini_core.data.media_data. No jax here: the config boundary imports this module.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

from gemini_core.errors import UserError
from gemini_core.model.options import EncoderConfig

FORMAT = 2  # 2: audio normalised per recording, not per band
KINDS = {"image_caption": "image", "audio_transcript": "audio"}
MARKERS = 4  # ids V..V+3: begin/end of an image, begin/end of a recording
BEGIN_END = {"image": (0, 1), "audio": (2, 3)}  # marker offsets from V
FASHION_LABELS = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                  "sneaker", "bag", "ankle boot")
DIGIT_LABELS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = {
    "image_caption": ("a photo of a {label}.", "a picture of a {label}.",
                      "an image of a {label}.", "this is a {label}."),
    "audio_transcript": ("the speaker says {label}.", "a recording of the word {label}.",
                         "spoken: {label}.", "{label}."),
}
AUDIO_RATE = 8000
FSDD_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")
FSDD_TEST_TAKES = range(0, 5)  # the dataset's own test split


@dataclasses.dataclass(frozen=True)
class ModalityDomain:
    """`data.modalities.<domain>`: where a modality domain's items come from and how they are
    captioned."""
    kind: str  # image_caption | audio_transcript
    source: str  # the dataset folder (Fashion-MNIST's IDX files; FSDD's folder of WAVs)
    encoder: str  # a name under config.model.encoders whose modality is the kind's
    labels: tuple[str, ...] = ()  # class names; () = Fashion-MNIST's or the ten digits'
    templates: tuple[str, ...] = ()  # caption templates with {label}; () = the kind's own
    seed: int = 0  # which template each training item gets

    @property
    def modality(self) -> str:
        return KINDS[self.kind]

    def label_names(self) -> tuple[str, ...]:
        return self.labels or (FASHION_LABELS if self.kind == "image_caption" else DIGIT_LABELS)

    def caption_templates(self) -> tuple[str, ...]:
        return self.templates or TEMPLATES[self.kind]

    def eval_caption(self, label: int) -> str:
        """The caption ranked at evaluation: the first template's."""
        return self.caption_templates()[0].format(label=self.label_names()[label])


def check_declared(modalities: Mapping[str, ModalityDomain], domains: tuple[str, ...],
                   encoders: Mapping[str, EncoderConfig]) -> None:
    """Each modality domain is listed in data.domains and names a declared encoder of its
    modality; UserError naming the key path otherwise."""
    for name, spec in modalities.items():
        path = f"config.data.modalities.{name}"
        if name not in domains:
            raise UserError(f"{path}: {name!r} is not in config.data.domains "
                            f"({', '.join(domains)}); a modality domain is trained on only when "
                            "listed there")
        if spec.kind not in KINDS:
            raise UserError(f"{path}.kind={spec.kind!r}: must be one of {', '.join(KINDS)}")
        if not spec.source:
            raise UserError(f"{path}.source='': the dataset folder")
        if spec.encoder not in encoders:
            raise UserError(f"{path}.encoder={spec.encoder!r}: no such encoder under "
                            f"config.model.encoders (declared: {', '.join(encoders) or 'none'}); "
                            f"declare one with modality={spec.modality!r}")
        if encoders[spec.encoder].modality != spec.modality:
            raise UserError(f"{path}.encoder={spec.encoder!r}: that encoder reads "
                            f"{encoders[spec.encoder].modality}, a {spec.kind} domain needs "
                            f"{spec.modality}")
        for i, template in enumerate(spec.templates):
            if "{label}" not in template:
                raise UserError(f"{path}.templates[{i}]={template!r}: must contain {{label}}")
        if spec.labels and len(set(spec.labels)) != len(spec.labels):
            raise UserError(f"{path}.labels: a label is named twice")
