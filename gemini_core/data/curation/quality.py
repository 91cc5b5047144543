"""Heuristic document quality rules in the style of Gopher, C4 and FineWeb; pure functions.

`quality_failures(text, lang, params)` names every rule a document fails ([] = keep). Thresholds
live in `QualityParams` (prose defaults from the papers); `params_for(domain, ...)` layers the
built-in per-domain overrides (`DOMAIN_DEFAULTS`: code and math are not prose) and the user's.
Every threshold can be switched off with 0 (or None, or () for the n-gram tables). "max" rules
fail when the measured value is strictly above the threshold, "min" rules when strictly below.

What a "word" is: for speed, a whitespace-separated token of the lower-cased text (Gopher and
datatrove use a spaCy tokenizer, ~20x slower); punctuation-only tokens are left out of the word
count and mean word length, as in Gopher. Languages written without spaces (Chinese, Japanese,
Thai, ... - `langid.SCRIPTIO_CONTINUA`) tokenize each character of those scripts (with its
combining marks) separately, and count words and n-gram sizes in word-equivalents of
`_CHARS_PER_WORD` characters, so min_words=50 means ~100 Chinese characters and a "5-gram" is 10;
their mean-word-length rule is skipped and their stop words are found as substrings. Lines are
the non-blank lines, stripped; short lines are measured in Latin-equivalent characters.

Speed (~8 MB/s per core on web text): the per-word work is done by C code (str.split,
map(hash/len), compiled regexes) and numpy; n-gram repetition hashes each word once and derives
every n-gram hash arithmetically, then one sort finds the repeats of all sizes - no n-gram string
or tuple is built. Python's string hash is salted per process, so two documents could only get
different verdicts in different processes through a 2^-40-rare hash collision.
"""

from __future__ import annotations

import collections
import dataclasses
import operator
import re
import typing
from typing import Any, Mapping

import numpy as np

from gemini_core.data.curation.langid import SCRIPTIO_CONTINUA, STOP_WORDS
from gemini_core.errors import UserError

NgramTable = tuple[tuple[int, float], ...]  # (n, max char fraction) pairs


@dataclasses.dataclass(frozen=True)
class QualityParams:
    # --- Gopher quality filter (Rae et al. 2021, appendix A) ---
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_len: float = 3.0  # over non-punctuation words
    max_mean_word_len: float = 10.0
    max_symbol_word_ratio: float = 0.1  # '#' per word, and '...' / '…' per word (each)
    max_ellipsis_line_frac: float = 0.3  # lines ending in '...' or '…'
    max_bullet_line_frac: float = 0.9  # lines starting with a bullet
    min_alpha_word_frac: float = 0.8  # words with at least one letter
    min_stop_words: int = 2  # distinct stop words of the language; skipped without a list
    # --- Gopher repetition filter ---
    max_dup_line_frac: float = 0.3  # lines equal to an earlier line, by count
    max_dup_line_char_frac: float = 0.2  # ... by characters
    max_dup_para_frac: float = 0.3  # paragraphs (blank-line separated), by count
    max_dup_para_char_frac: float = 0.2
    # characters of the most frequent n-gram (counting every occurrence, if it occurs twice)
    max_top_ngram_char_frac: NgramTable = ((2, 0.20), (3, 0.18), (4, 0.16))
    # characters covered by n-grams that repeat an earlier n-gram (overlaps counted once)
    max_dup_ngram_char_frac: NgramTable = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12),
                                           (9, 0.11), (10, 0.10))
    # --- C4 (Raffel et al. 2020) ---
    drop_lorem_ipsum: bool = True  # C4 drops any page containing "lorem ipsum"
    # C4 deletes lines mentioning javascript or cookie/terms/privacy policies; we keep documents
    # whole, so we count such lines and drop the document when they are this large a fraction
    max_boilerplate_line_frac: float = 0.2
    min_sentences: int = 0  # C4 uses 5 after its line filtering; sentence = terminal punctuation
    # --- FineWeb (Penedo et al. 2024) ---
    min_line_punct_frac: float = 0.12  # lines ending in terminal punctuation
    max_short_line_frac: float = 0.67  # lines of at most short_line_chars characters
    short_line_chars: int = 30
    max_newline_word_ratio: float = 0.3  # newlines per word: lists and menus


# Rule names, stable: they are the keys of the curation report. Each is checked only when its
# threshold(s) are on.
RULES: tuple[str, ...] = (
    "lorem_ipsum",  # drop_lorem_ipsum
    "min_words",  # min_words
    "max_words",  # max_words
    "mean_word_len",  # min_mean_word_len, max_mean_word_len
    "symbol_word_ratio",  # max_symbol_word_ratio
    "ellipsis_lines",  # max_ellipsis_line_frac
    "bullet_lines",  # max_bullet_line_frac
    "alpha_words",  # min_alpha_word_frac
    "stop_words",  # min_stop_words
    "dup_lines",  # max_dup_line_frac
    "dup_line_chars",  # max_dup_line_char_frac
    "dup_paras",  # max_dup_para_frac
    "dup_para_chars",  # max_dup_para_char_frac
    "top_ngram",  # max_top_ngram_char_frac
    "dup_ngram",  # max_dup_ngram_char_frac
    "boilerplate_lines",  # max_boilerplate_line_frac
    "min_sentences",  # min_sentences
    "line_punct",  # min_line_punct_frac
    "short_lines",  # max_short_line_frac
    "newline_ratio",  # max_newline_word_ratio
)

# Built-in per-domain overrides of the prose defaults (tuned on the shared corpus: see the
# comments). Domains not listed (books, wiki, web) are judged as prose.
DOMAIN_DEFAULTS: dict[str, dict[str, object]] = {
    # Source code: identifiers, operators and '#' comments are not prose, and short repeated
    # lines ('}', 'end', 'return x') are normal. Keep only size bounds and gross repetition.
    "code": dict(
        min_words=20, max_words=1_000_000, min_mean_word_len=0, max_mean_word_len=0,
        max_symbol_word_ratio=0, max_ellipsis_line_frac=0, max_bullet_line_frac=0,
        min_alpha_word_frac=0, min_stop_words=0, max_dup_line_frac=0, max_dup_line_char_frac=0,
        max_dup_para_frac=0, max_dup_para_char_frac=0, max_top_ngram_char_frac=((2, 0.5),),
        max_dup_ngram_char_frac=((10, 0.6),), drop_lorem_ipsum=False, max_boilerplate_line_frac=0,
        min_sentences=0, min_line_punct_frac=0, max_short_line_frac=0, max_newline_word_ratio=0),
    # Math: short worked problems full of numbers and formulas; '...' in sequences, '#### 42'
    # answers, one equation per line, and solutions that restate the question (repetition).
    "math": dict(
        min_words=5, min_mean_word_len=1.5, max_mean_word_len=20.0, max_symbol_word_ratio=0.5,
        max_ellipsis_line_frac=0.5, min_alpha_word_frac=0.25, min_stop_words=0,
        max_dup_line_frac=0.6, max_dup_line_char_frac=0.5, max_dup_para_frac=0.5,
        max_dup_para_char_frac=0.4, max_top_ngram_char_frac=((2, 0.4), (3, 0.4), (4, 0.4)),
        max_dup_ngram_char_frac=((5, 0.5), (10, 0.4)), min_line_punct_frac=0,
        max_short_line_frac=0, max_newline_word_ratio=0),
    # Books: hard-wrapped at ~70 columns, so a line is not a paragraph and most lines end
    # mid-sentence (FineWeb's line rules assume web text, where a line is a paragraph).
    "books": dict(min_line_punct_frac=0, max_short_line_frac=0),
    # Many languages and scripts: looser word-shape rules (agglutinative words are long, Vietnamese
    # syllables short); scripts without spaces count characters as words (see the module doc).
    "multilingual": dict(
        min_mean_word_len=2.0, max_mean_word_len=15.0, min_line_punct_frac=0.05),
}


# ---------------------------------------------------------------------------------------------
# Parameters from config


def params_from(values: Mapping[str, object], where: str = "config.quality",
                base: QualityParams | None = None) -> QualityParams:
    """`base` (default: the prose defaults) with `values` replaced, checked and typed.

    Unknown names and ill-typed or negative values are UserErrors naming f"{where}.{name}".
    None switches a threshold off (stored as 0, or () for the n-gram tables).
    """
    base = QualityParams() if base is None else base
    hints = typing.get_type_hints(QualityParams)
    changes = {}
    for name, value in values.items():
        path = f"{where}.{name}"
        if name not in hints:
            raise UserError(f"{path}: unknown quality parameter (known: {', '.join(hints)})")
        changes[name] = _convert(value, hints[name], path)
    return dataclasses.replace(base, **changes)


def params_for(domain: str, base: QualityParams,
               overrides: Mapping[str, Mapping[str, object]] = {}) -> QualityParams:
    """base <- DOMAIN_DEFAULTS[domain] <- overrides[domain] (the user's, from the config)."""
    p = params_from(DOMAIN_DEFAULTS.get(domain, {}), f"DOMAIN_DEFAULTS.{domain}", base)
    return params_from(overrides.get(domain, {}), f"config.quality.overrides.{domain}", p)


def _convert(value: Any, tp: Any, path: str) -> Any:
    if tp is NgramTable or typing.get_origin(tp) is tuple:
        return _ngram_table(value, path)
    if value is None:
        return False if tp is bool else tp(0)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if tp is int and value != int(value):
            raise UserError(f"{path}={value!r}: expected an integer")
        if value < 0:
            raise UserError(f"{path}={value!r}: must be >= 0 (0 switches the rule off)")
        return tp(value)
    raise UserError(f"{path}={value!r}: expected {tp.__name__}, got {type(value).__name__}")


def _ngram_table(value: Any, path: str) -> NgramTable:
    """Accepts {n: frac}, [(n, frac), ...] or None; returns sorted (n, frac) pairs, 0s dropped."""
    if value is None:
        return ()
    items = list(value.items()) if hasattr(value, "items") else value  # Mapping, ConfigDict
    try:
        pairs = [(n, f) for n, f in items]
    except (TypeError, ValueError):
        raise UserError(f"{path}={value!r}: expected {{n: max_char_frac}} or "
                        "[(n, max_char_frac), ...]") from None
    table = {}
    for n, f in pairs:
        n = int(n) if isinstance(n, str) and n.isdigit() else n
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 64:
            raise UserError(f"{path}={value!r}: n-gram size {n!r} must be an integer in 1..64")
        f = _convert(f, float, f"{path}[{n}]")
        if f:
            table[n] = f
    return tuple(sorted(table.items()))


# ---------------------------------------------------------------------------------------------
# Measurement

_BULLETS = ("•", "‣", "▪", "▫", "●", "○", "◦", "∙", "⁃", "■", "□", "►", "▶", "➢", "➤", "✓", "✔",
            "- ", "* ", "+ ", "– ", "— ", "-\t", "*\t")
_ELLIPSES = ("...", "…")
# sentence-final marks of the scripts in the corpus, and closing quotes/brackets after them
_TERMINAL = (".", "!", "?", '"', "'", "”", "’", "»", ")", "]", ":", ";", "…", "。", "！", "？",
             "．", "｡", "」", "』", "）", "।", "॥", "؟", "۔", "።", "။", "។")
_SENTENCE_END = re.compile(r"[.!?…][\"'”’»)\]]*(?=\s|$)|[。！？｡।॥؟۔።။។]")
_BOILERPLATE = ("lorem ipsum", "javascript", "privacy policy", "terms of use", "cookie policy",
                "uses cookies", "use of cookies", "use cookies")
# a token without a letter (those without a digit or '_' either are punctuation-only). Matched
# from the whitespace before it, on " " + text: a leading literal class lets the regex engine
# skip ahead to candidates, 25% faster than a look-behind.
_NON_ALPHA_TOKEN = re.compile(r"\s((?:[^\w\s]|[\d_])+)(?!\S)")
_DIGIT_OR_UNDERSCORE = re.compile(r"[\d_]")
_PARAGRAPH_BREAK = re.compile(r"\n[^\S\n]*\n\s*")  # a blank line
# scripts written without spaces: CJK ideographs and punctuation, kana, fullwidth forms, Thai,
# Lao, Tibetan, Myanmar, Khmer. Each such character is one word.
_CONTINUA = ("\u0e00-\u0eff\u0f00-\u0fff\u1000-\u109f\u1780-\u17ff\u2e80-\u2fdf\u3000-\u30ff"
             "\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
             "\U00020000-\U0003ffff")
# combining marks (Thai/Lao vowels and tones, Tibetan, Myanmar, Khmer signs, kana voicing)
# stay with the character they modify
_MARKS = ("\u0300-\u036f\u0e31\u0e34-\u0e3a\u0e47-\u0e4e\u0eb1\u0eb4-\u0ebc\u0ec8-\u0ecd"
          "\u0f71-\u0f84\u102b-\u103e\u17b4-\u17d3\u3099\u309a")
_CONTINUA_TOKEN = re.compile(f"[{_CONTINUA}][{_MARKS}]*|[^\\s{_CONTINUA}]+")
# characters per word in those scripts: word counts and n-gram sizes are scaled by it
_CHARS_PER_WORD = {"zh": 2, "yue": 2, "wuu": 2, "ja": 2, "th": 4, "lo": 4, "km": 4, "my": 4,
                   "dz": 4}
# how much longer a line of Latin text is than one saying the same in these scripts (for
# short_line_chars); Hangul is written with spaces but each syllable block is dense too
_CHAR_DENSITY = {"zh": 2, "yue": 2, "wuu": 2, "ja": 2, "ko": 2}
# scripts that end sentences with a space, not punctuation (line_punct is skipped)
_NO_TERMINAL_PUNCT = frozenset({"th", "lo"})
_NGRAM_MAX_WORDS = 250_000  # longer documents: n-gram repetition of their start (bounds memory)
_HASH_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd: the n-gram hash is a polynomial mod 2^64
_HASH_MULT_INV = np.uint64(pow(0x9E3779B97F4A7C15, -1, 1 << 64))

_starts_with_bullet = operator.methodcaller("startswith", _BULLETS)
_ends_with_ellipsis = operator.methodcaller("endswith", _ELLIPSES)
_ends_with_terminal = operator.methodcaller("endswith", _TERMINAL)


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(items equal to an earlier item, their characters)."""
    counts = collections.Counter(items)
    if len(counts) == len(items):
        return 0, 0
    return len(items) - len(counts), sum(len(s) * (c - 1) for s, c in counts.items() if c > 1)


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(M^0 .. M^n, M^0 .. M^-n) mod 2^64, cached and grown as documents get longer."""
    global _POW
    if _POW[0].size <= n:
        size = max(n + 1, 2 * _POW[0].size)
        up = np.full(size, _HASH_MULT, dtype=np.uint64)
        down = np.full(size, _HASH_MULT_INV, dtype=np.uint64)
        up[0] = down[0] = 1
        _POW = (np.cumprod(up), np.cumprod(down))  # integer overflow wraps: mod 2^64
    return _POW


_POW = (np.ones(1, dtype=np.uint64), np.ones(1, dtype=np.uint64))


def ngram_stats(words: list[str], lens: np.ndarray, top_ns: tuple[int, ...],
                 dup_ns: tuple[int, ...], out: dict[str, float]) -> None:
    """Gopher repetition over word n-grams, written to `out`: for each n in top_ns, the
    character fraction of the most frequent n-gram (all its occurrences, when it occurs at least
    twice); for each n in dup_ns, the character fraction of words covered by an n-gram that
    already occurred earlier (overlaps counted once). Characters are word characters.

    Each word is hashed once (h); the n-gram at i hashes to sum_j h[i+j] M^(n-1-j) mod 2^64,
    for all i and n at once from one prefix sum of h[j] M^-j (M is odd, so invertible). One sort
    then does all sizes: each n-gram becomes a 64-bit key (size group | hash | position), so
    equal n-grams of a size end up adjacent, earliest first."""
    n_words = len(words)
    for n in top_ns:
        out[f"top_{n}gram_char_frac"] = 0.0
    for n in dup_ns:
        out[f"dup_{n}gram_char_frac"] = 0.0
    ns = [n for n in sorted(set(top_ns) | set(dup_ns)) if n < n_words]  # else nothing repeats
    if not ns:
        return
    total = int(lens.sum())  # lens: the words' lengths
    if total == 0:
        return
    cum = np.zeros(n_words + 1, dtype=np.int64)
    np.cumsum(lens, out=cum[1:])
    word_hash = np.fromiter(map(hash, words), dtype=np.int64, count=n_words).view(np.uint64)
    up, down = _powers(n_words)
    prefix = np.zeros(n_words + 1, dtype=np.uint64)
    np.cumsum(word_hash * down[:n_words], out=prefix[1:])
    group_bits, pos_bits = len(ns).bit_length(), n_words.bit_length()
    # key = group (top bits) | the hash's high, best-mixed bits | position (low bits)
    hash_shift, pos_shift = np.uint64(group_bits + pos_bits), np.uint64(pos_bits)
    counts = n_words + 1 - np.asarray(ns, dtype=np.int64)  # n-grams of each size
    keys = np.empty(int(counts.sum()), dtype=np.uint64)
    at = 0
    for n, m in zip(ns, counts.tolist()):
        part = keys[at:at + m]
        np.subtract(prefix[n:], prefix[:m], out=part)
        part *= up[n - 1:n_words]  # = hash of words[i:i+n]
        at += m
    keys >>= hash_shift
    keys <<= pos_shift
    group_of = np.repeat(np.arange(len(ns), dtype=np.uint64), counts)
    offsets = np.repeat(np.cumsum(counts) - counts, counts).view(np.uint64)
    keys |= np.arange(keys.size, dtype=np.uint64) - offsets  # position in the document
    keys |= group_of << np.uint64(64 - group_bits)
    keys.sort()
    gram_id = keys >> pos_shift
    first = np.empty(keys.size, dtype=bool)
    first[0] = True
    np.not_equal(gram_id[1:], gram_id[:-1], out=first[1:])
    if first.all():
        return  # nothing repeats
    pos = (keys & np.uint64((1 << pos_bits) - 1)).view(np.int64)
    group = (keys >> np.uint64(64 - group_bits)).view(np.int64)
    sizes = np.asarray(ns, dtype=np.int64)
    if dup_ns:
        repeat = ~first  # n-grams equal to an earlier one: cover their words
        rep_group = group[repeat]
        lo = rep_group * (n_words + 1) + pos[repeat]
        bins = len(ns) * (n_words + 1)
        edges = (np.bincount(lo, minlength=bins)
                 - np.bincount(lo + sizes[rep_group], minlength=bins))
        covered = np.cumsum(edges.reshape(len(ns), n_words + 1), axis=1)[:, :n_words] > 0
        dup_chars = covered @ lens
        for g, n in enumerate(ns):
            if n in dup_ns:
                out[f"dup_{n}gram_char_frac"] = int(dup_chars[g]) / total
    if top_ns:
        run_start = np.flatnonzero(first)
        run_len = np.empty_like(run_start)
        np.subtract(run_start[1:], run_start[:-1], out=run_len[:-1])
        run_len[-1] = keys.size - run_start[-1]
        run_group = group[run_start]
        # keys sort by group first, so runs (and the best runs) come grouped, every group
        # non-empty: per-group maxima are reduceat over contiguous segments
        groups = np.arange(len(ns))
        most = np.maximum.reduceat(run_len, np.searchsorted(run_group, groups))
        best = run_len == most[run_group]  # the most frequent n-grams of each size
        at, best_group = pos[run_start[best]], run_group[best]
        chars = np.maximum.reduceat(cum[at + sizes[best_group]] - cum[at],
                                    np.searchsorted(best_group, groups))
        for g, n in enumerate(ns):
            if n in top_ns and most[g] >= 2:
                out[f"top_{n}gram_char_frac"] = int(most[g]) * int(chars[g]) / total


def _measure(text: str, lang: str, p: QualityParams) -> dict[str, float]:
    """The quantities the rules need; n-gram statistics only for the sizes `p` checks.

    Word counts are in word-equivalents: tokens, or for scripts without spaces, characters
    divided by the language's characters per word (so min_words=50 means ~100 Chinese characters).
    """
    s: dict[str, float] = {}
    lower = text.lower()
    per_word = _CHARS_PER_WORD.get(lang, 1) if lang in SCRIPTIO_CONTINUA else 0
    words = _CONTINUA_TOKEN.findall(lower) if per_word else lower.split()
    spaced = " ".join(words) if per_word else text
    # tokens without a letter are few: find them with one regex, then the punctuation-only ones
    non_alpha = _NON_ALPHA_TOKEN.findall(" " + spaced)
    punct = [t for t in non_alpha if not _DIGIT_OR_UNDERSCORE.search(t)]
    n_tokens, scale = len(words), per_word or 1
    n_words = n_tokens / scale
    content = n_tokens - len(punct)
    s["words"] = n_words
    s["content_words"] = content / scale
    lens = np.fromiter(map(len, words), dtype=np.int64, count=n_tokens)
    word_chars = int(lens.sum())
    s["mean_word_len"] = (word_chars - sum(map(len, punct))) / content if content else 0.0
    s["hash_per_word"] = text.count("#") / n_words if n_words else 0.0
    s["ellipsis_per_word"] = ((text.count("...") + text.count("…")) / n_words
                              if n_words else 0.0)
    s["alpha_word_frac"] = 1.0 - len(non_alpha) / n_tokens if n_tokens else 0.0
    stops = STOP_WORDS.get(lang)
    if stops is None:
        s["stop_words"] = -1  # no list for this language: the rule is skipped
    elif lang in SCRIPTIO_CONTINUA:
        s["stop_words"] = sum(1 for w in stops if w in lower)
    else:
        s["stop_words"] = len(stops.intersection(words))
    s["newline_per_word"] = text.count("\n") / n_words if n_words else 0.0

    lines = [line for line in map(str.strip, text.split("\n")) if line]
    n_lines = len(lines) or 1
    s["lines"] = len(lines)
    s["ellipsis_line_frac"] = sum(map(_ends_with_ellipsis, lines)) / n_lines
    s["bullet_line_frac"] = sum(map(_starts_with_bullet, lines)) / n_lines
    s["punct_line_frac"] = sum(map(_ends_with_terminal, lines)) / n_lines
    short = p.short_line_chars / _CHAR_DENSITY.get(lang, 1)
    s["short_line_frac"] = sum(map(short.__ge__, map(len, lines))) / n_lines
    dup, dup_chars = _duplicates(lines)
    s["dup_line_frac"] = dup / n_lines
    s["dup_line_char_frac"] = dup_chars / (sum(map(len, lines)) or 1)
    if _PARAGRAPH_BREAK.search(text):
        paras = [q for q in map(str.strip, _PARAGRAPH_BREAK.split(text)) if q]
        dup, dup_chars = _duplicates(paras)
        s["dup_para_frac"] = dup / (len(paras) or 1)
        s["dup_para_char_frac"] = dup_chars / (sum(map(len, paras)) or 1)
    else:  # a single paragraph
        s["dup_para_frac"] = s["dup_para_char_frac"] = 0.0
    s["lorem_ipsum"] = float("lorem ipsum" in lower)
    if any(phrase in lower for phrase in _BOILERPLATE):  # rare: only then look line by line
        low_lines = [line for line in map(str.strip, lower.split("\n")) if line]
        hits = sum(1 for line in low_lines if any(ph in line for ph in _BOILERPLATE))
        s["boilerplate_line_frac"] = hits / n_lines
    else:
        s["boilerplate_line_frac"] = 0.0
    s["sentences"] = len(_SENTENCE_END.findall(text)) if p.min_sentences else -1
    top_ns = tuple(n for n, _ in p.max_top_ngram_char_frac)
    dup_ns = tuple(n for n, _ in p.max_dup_ngram_char_frac)
    if top_ns or dup_ns:
        grams: dict[str, float] = {}
        ngram_stats(words[:_NGRAM_MAX_WORDS], lens[:_NGRAM_MAX_WORDS],
                     tuple(n * scale for n in top_ns), tuple(n * scale for n in dup_ns), grams)
        for n in top_ns:
            s[f"top_{n}gram_char_frac"] = grams[f"top_{n * scale}gram_char_frac"]
        for n in dup_ns:
            s[f"dup_{n}gram_char_frac"] = grams[f"dup_{n * scale}gram_char_frac"]
    return s


def _over(value: float, limit: float) -> bool:
    return bool(limit) and value > limit


def _under(value: float, limit: float) -> bool:
    return bool(limit) and value < limit


def _judge(s: Mapping[str, float], lang: str, p: QualityParams) -> list[str]:
    """Rule names failed, in RULES order, given the measurements `s`."""
    failed = []
    if p.drop_lorem_ipsum and s["lorem_ipsum"]:
        failed.append("lorem_ipsum")
    if _under(s["content_words"], p.min_words):
        failed.append("min_words")
    if _over(s["content_words"], p.max_words):
        failed.append("max_words")
    if s["content_words"] and lang not in SCRIPTIO_CONTINUA and (
            _under(s["mean_word_len"], p.min_mean_word_len)
            or _over(s["mean_word_len"], p.max_mean_word_len)):
        failed.append("mean_word_len")
    if (_over(s["hash_per_word"], p.max_symbol_word_ratio)
            or _over(s["ellipsis_per_word"], p.max_symbol_word_ratio)):
        failed.append("symbol_word_ratio")
    if _over(s["ellipsis_line_frac"], p.max_ellipsis_line_frac):
        failed.append("ellipsis_lines")
    if _over(s["bullet_line_frac"], p.max_bullet_line_frac):
        failed.append("bullet_lines")
    if s["words"] and _under(s["alpha_word_frac"], p.min_alpha_word_frac):
        failed.append("alpha_words")
    if s["stop_words"] >= 0 and _under(s["stop_words"], p.min_stop_words):
        failed.append("stop_words")
    if _over(s["dup_line_frac"], p.max_dup_line_frac):
        failed.append("dup_lines")
    if _over(s["dup_line_char_frac"], p.max_dup_line_char_frac):
        failed.append("dup_line_chars")
    if _over(s["dup_para_frac"], p.max_dup_para_frac):
        failed.append("dup_paras")
    if _over(s["dup_para_char_frac"], p.max_dup_para_char_frac):
        failed.append("dup_para_chars")
    if any(_over(s[f"top_{n}gram_char_frac"], f) for n, f in p.max_top_ngram_char_frac):
        failed.append("top_ngram")
    if any(_over(s[f"dup_{n}gram_char_frac"], f) for n, f in p.max_dup_ngram_char_frac):
        failed.append("dup_ngram")
    if _over(s["boilerplate_line_frac"], p.max_boilerplate_line_frac):
        failed.append("boilerplate_lines")
    if s["sentences"] >= 0 and _under(s["sentences"], p.min_sentences):
        failed.append("min_sentences")
    if (s["lines"] and lang not in _NO_TERMINAL_PUNCT
            and _under(s["punct_line_frac"], p.min_line_punct_frac)):
        failed.append("line_punct")
    if _over(s["short_line_frac"], p.max_short_line_frac):
        failed.append("short_lines")
    if _over(s["newline_per_word"], p.max_newline_word_ratio):
        failed.append("newline_ratio")
    return failed


def quality_failures(text: str, lang: str, p: QualityParams) -> list[str]:
    """Names (from RULES) of every rule the document fails, in RULES order; [] = keep.

    `lang` is the document's language code (langid.detect); it picks the stop-word list and
    whether words are characters (scripts without spaces).
    """
    return _judge(_measure(text, lang, p), lang, p)


_ALL_ON = QualityParams(min_sentences=1)


def stats(text: str, lang: str = "en") -> dict[str, float]:
    """Every measured quantity (for debugging and reports); stop_words is -1 without a list."""
    return _measure(text, lang, _ALL_ON)
