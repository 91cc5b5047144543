"""The multilingual word blocklist: LDNOOBW-style `<lang>.txt` lists, compiled per document
language into tries of regexes.

Lists. `<directory>/<lang>.txt`, one term per line (UTF-8; blank lines and `#` comments
skipped); a term may be a phrase. The file stem's primary subtag is the language, so region
variants (`fr-CA-u-sd-caqc.txt`) fold into their language (`fr`). Terms are NFC-normalized and
casefolded; the text is casefolded before matching, so matching is case-insensitive without
the IGNORECASE flag (and German `ß` matches `ss`).

Which lists apply. A document in language L is checked against L's list plus the `always`
lists. The default, always=("en",), is a deliberate choice: English profanity turns up in the
web text of every language. Its cost is English terms that are ordinary words elsewhere
(Romanian `cum` "how", Vietnamese `mong` "hope"); pass always=() to check each document against
its own list only. A language with no list (unknown, or empty code) gets the `always` lists
only. Common langid codes are aliased to the list names (`tl` -> `fil`, `nb`/`nn` -> `no`).

Where a match may start and end is decided per term edge by the script of the term's first
and last character, not by the list the term came from (zh's list holds `13.`, ja's `sm`):
  - space-delimited scripts (Latin, Cyrillic, Greek, Arabic, Devanagari, digits, ...): the
    neighbour must not be a word character of a space-delimited script nor a combining mark,
    so `ass` matches neither `class` nor `passage`, and a Devanagari or Arabic term does not
    match the front of a longer word that goes on with a vowel sign;
  - Han, Hiragana, Thai, Lao, Khmer, Myanmar (no spaces between words): substring matching,
    there is no boundary to test;
  - Katakana: the neighbour must not be Katakana: a loanword is one Katakana run, so `グロ`
    is not found in `グローバル` ("global");
  - Hangul: a boundary before the term only, since Korean attaches particles to the end of a
    word (`개새끼가`) but nothing to its front;
  - punctuation or a symbol at an edge (`13.`, `🖕`): nothing to test on that side.
A one-character term of a script without spaces is skipped by default (min_unspaced_len=2): it
is a morpheme of countless ordinary words (性 "nature" in 可能性 "possibility", 幹 in 幹部
"cadre", 裸), so substring matching finds it in most documents of that language.

A space inside a phrase matches any run of whitespace. Matches are non-overlapping, leftmost
and longest first (a list is compiled as a trie, so the engine tries `asshole` before `ass`
and backtracks when a boundary fails).

Speed (~35 MB/s per core on English web text, measured): per language (always lists included)
two regexes. Terms that start on a word boundary are searched in " " + text as "one character
that cannot continue a word, then the term": the search loop (in C) stops only at spaces and
punctuation, not at every letter. Terms that may start anywhere (unspaced scripts, symbols) are
a branch on their first character, which the search loop skips to. A span where terms of the
two kinds overlap counts once per kind (only a spaced-script term and an unspaced one; rare).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import unicodedata
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

from gemini_core.errors import UserError

# Part of the fingerprint: bump it whenever matching semantics change, so the pipeline's
# identity (and the cache behind it) changes with them even where the lists do not.
MATCHER_VERSION = 1
DEFAULT_ALWAYS = ("en",)
DEFAULT_MIN_UNSPACED_LEN = 2
LANG_ALIASES = {"tl": "fil", "nb": "no", "nn": "no"}  # langid code -> LDNOOBW file name

_Ranges = tuple[tuple[int, int], ...]
# Katakana letters and the prolonged sound mark; not ・ (U+30FB), which separates words.
_KATAKANA: _Ranges = ((0x30A1, 0x30FA), (0x30FC, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F))
# Scripts written without spaces between words (Katakana included, though it has its own rule).
_UNSPACED: _Ranges = (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x2E80, 0x2FDF),  # CJK radicals
    (0x3005, 0x3007),  # 々 〆 〇
    (0x3021, 0x3029),  # Hangzhou numerals
    (0x3031, 0x3035),  # kana repeat marks
    (0x3038, 0x303C),
    (0x3040, 0x312F),  # Hiragana, Katakana, Bopomofo
    (0x31A0, 0x31FF),  # Bopomofo extended, Katakana phonetic extensions
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF66, 0xFF9F),  # halfwidth Katakana
    (0x20000, 0x3FFFF),  # CJK extension B and later
)
_HANGUL: _Ranges = ((0x1100, 0x11FF), (0x3130, 0x318F), (0xA960, 0xA97F), (0xAC00, 0xD7FF))


def _in(ranges: _Ranges, ch: str) -> bool:
    c = ord(ch)
    return any(lo <= c <= hi for lo, hi in ranges)


def _is_mark(ch: str) -> bool:
    return unicodedata.category(ch)[0] == "M"


def _is_wordish(ch: str) -> bool:
    return ch.isalnum() or ch == "_" or _is_mark(ch)


def _edge(ch: str, side: str) -> str:
    """What must not stand next to a term whose first (side="left") or last character is
    `ch`: "word" (a word character of a space-delimited script), "kata" (Katakana) or ""."""
    if _in(_KATAKANA, ch):
        return "kata"
    if _in(_UNSPACED, ch):
        return ""
    if _in(_HANGUL, ch):
        return "word" if side == "left" else ""
    return "word" if _is_wordish(ch) else ""


def _class_ranges(ranges: Sequence[tuple[int, int]]) -> str:
    def esc(c: int) -> str:
        return f"\\U{c:08x}"
    return "".join(esc(lo) if lo == hi else f"{esc(lo)}-{esc(hi)}" for lo, hi in ranges)


@dataclasses.dataclass(frozen=True)
class _Classes:
    start: str  # one character after which a "word"-bounded term may start
    mark: str  # a combining mark: not \w to `re`, yet it continues a word
    word: str  # one character that continues a word of a space-delimited script
    kata: str  # one Katakana letter


@functools.cache
def _classes() -> _Classes:
    """Built once per process (~40 ms). `start` is a non-word character or one of an unspaced
    script (`你好sm` starts a word); marks, which `[\\W]` lets through, are excluded by a
    lookbehind. Only BMP marks: astral ones belong to historic scripts, and astral ranges make
    `re` test a class range by range instead of looking it up in a bitmap. Mark ranges are
    merged across \\w characters (those continue a word anyway) to keep the class short."""
    unspaced = bytearray(0x10000)
    for lo, hi in _UNSPACED:
        hi = min(hi, 0xFFFF)
        unspaced[lo:hi + 1] = b"\1" * max(0, hi + 1 - lo)
    marks: list[tuple[int, int]] = []
    lo = hi = -1
    for c in range(0x10000):
        ch = chr(c)
        if unspaced[c] or not _is_wordish(ch):
            if lo >= 0:
                marks.append((lo, hi))
            lo = -1
        elif _is_mark(ch):
            lo, hi = (c if lo < 0 else lo), c
    if lo >= 0:
        marks.append((lo, hi))
    unspaced_cls = _class_ranges(_UNSPACED)
    mark = f"[{_class_ranges(marks)}]"
    return _Classes(start=f"[\\W{unspaced_cls}]", mark=mark,
                    word=f"(?:[^\\W{unspaced_cls}]|{mark})", kata=f"[{_class_ranges(_KATAKANA)}]")


def fold_lang(code: str) -> str:
    """`fr-CA-u-sd-caqc` -> `fr`, `pt_BR` -> `pt`, `tl` -> `fil`: the key a list is filed under."""
    primary = code.strip().replace("_", "-").split("-")[0].lower()
    return LANG_ALIASES.get(primary, primary)


def normalize_term(term: str) -> str:
    # LDNOOBW's Thai list spells SARA AM decomposed (U+0E4D U+0E32, its NFKD); text has U+0E33
    term = unicodedata.normalize("NFC", term).replace("\u0e4d\u0e32", "\u0e33")
    return " ".join(term.casefold().split())


def _atoms(term: str) -> list[str]:
    """A normalized term as regex atoms: one per character, a space = any whitespace run."""
    return [r"\s+" if ch == " " else re.escape(ch) for ch in term]


def _trie_regex(node: dict) -> str:
    """Alternatives share prefixes, so the engine takes one step per character instead of one
    attempt per term; a terminal ("" key) is an optional tail, tried after the longer terms."""
    alts = [atom + _trie_regex(child) for atom, child in sorted(node.items()) if atom]
    if not alts:
        return ""
    body = alts[0] if len(alts) == 1 and "" not in node else "(?:" + "|".join(alts) + ")"
    return body + "?" if "" in node else body


def _alternation(terms: Sequence[tuple[list[str], str]]) -> str:
    """A regex for (atoms, lookahead that must follow) pairs: one trie per lookahead, the
    lookahead after it (backtracking into the trie tries the shorter terms when it fails)."""
    tries: dict[str, dict] = defaultdict(dict)
    for atoms, after in terms:
        node = tries[after]
        for atom in atoms:
            node = node.setdefault(atom, {})
        node[""] = {}
    parts = [(_trie_regex(trie), after) for after, trie in tries.items()]
    # longest first: a part that matches nothing more (a term ending here) goes last
    parts.sort(key=lambda p: (not p[0], p[1] != ""))
    alts = [f"(?:{body}){after}" if body else after for body, after in parts]
    return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"


@dataclasses.dataclass(frozen=True)
class Matcher:
    """The compiled regexes for one set of normalized terms; methods take casefolded text."""

    bounded: re.Pattern | None  # terms that start on a word boundary, searched in " " + text
    free: re.Pattern | None  # the others

    @classmethod
    def build(cls, terms: Sequence[str]) -> "Matcher":
        c = _classes()
        lookahead = {"": "", "word": f"(?!{c.word})", "kata": f"(?!{c.kata})"}
        bounded, free = [], defaultdict(list)
        for term in sorted(set(terms) - {""}):
            atoms, after = _atoms(term), lookahead[_edge(term[-1], "right")]
            if _edge(term[0], "left") == "word":
                bounded.append((atoms, after))
            else:
                free[atoms[0]].append((atoms[1:], after))
        bounded_re = free_re = None
        if bounded:
            # the lookbehind rejects a combining mark as the character before a term
            bounded_re = re.compile(f"{c.start}(?<!{c.mark})({_alternation(bounded)})", re.S)
        if free:
            # the top level is a branch of literals, so the search loop skips to a possible
            # start; a Katakana start is checked after its first character for the same reason
            free_re = re.compile("|".join(
                first + (f"(?<!{c.kata}.)" if _edge(first[-1], "left") == "kata" else "")
                + _alternation(tails) for first, tails in sorted(free.items())), re.S)
        return cls(bounded_re, free_re)

    def findall(self, folded: str) -> list[str]:
        found = self.bounded.findall(" " + folded) if self.bounded is not None else []
        return found + self.free.findall(folded) if self.free is not None else found

    def finditer(self, folded: str) -> list[tuple[int, str]]:
        """(position in `folded`, matched text), in text order."""
        found = []
        if self.bounded is not None:
            found += [(m.start(1) - 1, m.group(1)) for m in self.bounded.finditer(" " + folded)]
        if self.free is not None:
            found += [(m.start(), m.group()) for m in self.free.finditer(folded)]
        return sorted(found)


class Blocklist:
    """Per-language term lists; `count` is the pure per-document function the pipeline calls.

    Picklable (for Ray workers): matchers are compiled lazily, once per language and process
    (~10-30 ms each), and left out of the pickle.
    """

    def __init__(self, terms: Mapping[str, Sequence[str]], always: Sequence[str] = DEFAULT_ALWAYS,
                 min_unspaced_len: int = DEFAULT_MIN_UNSPACED_LEN):
        merged: dict[str, set[str]] = defaultdict(set)
        for lang, ts in terms.items():
            merged[fold_lang(lang)].update(t for t in map(normalize_term, ts) if t)
        self._terms = {lang: tuple(sorted(ts)) for lang, ts in sorted(merged.items())}
        self.languages: tuple[str, ...] = tuple(self._terms)
        self.always: tuple[str, ...] = tuple(dict.fromkeys(fold_lang(a) for a in always))
        missing = [a for a in self.always if a not in self._terms]
        if missing:
            raise UserError(f"blocklist: always={tuple(always)!r} names {missing[0]!r}, which has "
                            f"no list (languages: {', '.join(self.languages) or 'none'}); pass "
                            "always=() to check each document against its own language only")
        self.min_unspaced_len = min_unspaced_len
        # the matcher version and options change what counts, so they are identity too
        self.fingerprint: str = hashlib.sha256(json.dumps(
            {"matcher": MATCHER_VERSION, "always": sorted(self.always),
             "min_unspaced_len": min_unspaced_len, "terms": sorted(self._terms.items())},
            ensure_ascii=False).encode()).hexdigest()
        self._matchers: dict[str, Matcher] = {}

    @classmethod
    def load(cls, directory: Path, languages: Sequence[str] | None = None,
             always: Sequence[str] = DEFAULT_ALWAYS,
             min_unspaced_len: int = DEFAULT_MIN_UNSPACED_LEN) -> "Blocklist":
        """Reads `<directory>/<lang>.txt`; `languages` (None = all) picks the lists to load,
        and the `always` languages are loaded in any case."""
        directory = Path(directory)
        if not directory.is_dir():
            raise UserError(f"{directory}: blocklist directory not found")
        files = sorted(p for p in directory.glob("*.txt") if p.is_file())
        if not files:
            raise UserError(f"{directory}: no <lang>.txt blocklist files in the directory")
        by_lang: dict[str, list[str]] = defaultdict(list)
        for path in files:
            by_lang[fold_lang(path.stem)].extend(_read_terms(path))
        if languages is not None:
            wanted = {fold_lang(x) for x in languages} | {fold_lang(a) for a in always}
            unknown = sorted(wanted - by_lang.keys())
            if unknown:
                raise UserError(f"{directory}: no blocklist for language(s) {', '.join(unknown)} "
                                f"(have: {', '.join(sorted(by_lang))})")
            by_lang = {k: v for k, v in by_lang.items() if k in wanted}
        missing = [a for a in always if fold_lang(a) not in by_lang]
        if missing:
            raise UserError(f"{directory}: no {missing[0]}.txt for always={tuple(always)!r}; pass "
                            "always=() to check each document against its own language only")
        return cls(by_lang, always=always, min_unspaced_len=min_unspaced_len)

    def terms(self, lang: str) -> tuple[str, ...]:
        """The normalized terms a document in `lang` is checked against: its list and the
        `always` lists, less unspaced-script terms shorter than `min_unspaced_len`."""
        key = fold_lang(lang)
        terms = {t for k in (key, *self.always) for t in self._terms.get(k, ())}
        return tuple(sorted(t for t in terms if not self._too_short(t)))

    def _too_short(self, term: str) -> bool:
        return len(term) < self.min_unspaced_len and all(_in(_UNSPACED, ch) for ch in term)

    def matcher(self, lang: str) -> Matcher:
        try:
            return self._matchers[lang]
        except KeyError:
            pass
        key = fold_lang(lang)
        if key not in self._terms:
            key = ""  # every language without a list shares the always-only matcher
        if key not in self._matchers:
            self._matchers[key] = Matcher.build(self.terms(key))
        self._matchers[lang] = self._matchers[key]  # raw code -> matcher: no folding per doc
        return self._matchers[lang]

    def count(self, text: str, lang: str) -> int:
        """Non-overlapping blocklist matches in `text` for a document in language `lang`."""
        return len(self.matcher(lang).findall(text.casefold()))

    def matches(self, text: str, lang: str, limit: int = 5) -> list[str]:
        """The first `limit` distinct matched terms in text order (casefolded, whitespace
        collapsed): examples for the report."""
        found: dict[str, None] = {}
        for _, term in self.matcher(lang).finditer(text.casefold()):
            if len(found) >= limit:
                break
            found[" ".join(term.split())] = None
        return list(found)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_matchers": {}}

    def __repr__(self) -> str:
        return (f"Blocklist(languages={self.languages!r}, always={self.always!r}, "
                f"fingerprint={self.fingerprint[:12]})")


def _read_terms(path: Path) -> list[str]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 ({e})") from None
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]
