"""Text normalization before any rule looks at a document.

Unicode NFC (one encoding per character, so hashes and blocklist matches see one form), control
characters removed (they are never text; tab and newline are kept), line endings unified,
trailing spaces and runs of blank lines collapsed. Indentation is kept: code needs it.
"""

from __future__ import annotations

import re
import unicodedata

# C0/C1 controls except \t and \n, plus zero-width and bidi formatting marks that hide text;
# U+200D (zero-width joiner) is kept: it is part of emoji and Indic scripts
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\u202a-\u202e"
                      "\u2066-\u2069\ufeff]")
_TRAILING = re.compile(r"[ \t\u00a0]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalize(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub("", text)
    text = _TRAILING.sub("\n", text)
    return _BLANK_RUNS.sub("\n\n", text).strip()
