"""Templates over a downstream task's records: str.format syntax, field paths and filters.

`{question[stem]}` and `{question.stem}` reach into nested records; a number in brackets
indexes a list (`{test_list[0]}`). `{premise|strip|drop_period}` pipes the value through
filters, left to right; a filter named like one of the task's `tables` looks the value up in
that table. Format specs and conversions work as in str.format (`{n:>4}`, `{x!r}`; a spec
holding another field does not), and `{{` `}}` are literal braces. A field path outside a template (`label="answerKey"`,
`choices_from="question.choices"`) has the same syntax, without braces and filters.

Errors here are `TemplateError`s that say what is wrong with the field; gemini_core.eval.tasks
adds the file:line and the declaration's key path.
"""

from __future__ import annotations

import collections
import collections.abc
import dataclasses
import functools
import json
import re
import string
from typing import Any, Callable, Iterator, Mapping

# one trailing sentence-final period: Latin, CJK ideographic and fullwidth. XCOPA's premises end
# in one except in Thai (never) and Tamil (2 of 600), which is why this is not `s[:-1]`.
_PERIODS = (".", "\u3002", "\uff0e")


def _drop_period(value: Any) -> str:
    text = str(value)
    return text[:-1] if text.endswith(_PERIODS) else text


def _join_lines(value: Any) -> str:
    if not isinstance(value, (list, tuple)):
        raise TemplateError(f"join_lines expects a list, got {type(value).__name__}")
    return "\n".join(str(v) for v in value)


FILTERS: dict[str, Callable[[Any], Any]] = {
    "strip": lambda v: str(v).strip(),
    "lower": lambda v: str(v).lower(),
    "upper": lambda v: str(v).upper(),
    "lower_first": lambda v: str(v)[:1].lower() + str(v)[1:],
    "upper_first": lambda v: str(v)[:1].upper() + str(v)[1:],
    "drop_period": _drop_period,
    "join_lines": _join_lines,
    "json": lambda v: json.dumps(v, ensure_ascii=False),
}

_NAME = r"[^.\[\]|{}:!]+"
_PATH = re.compile(rf"({_NAME})((?:\.{_NAME}|\[[^\]]*\])*)")
_STEP = re.compile(rf"\.({_NAME})|\[([^\]]*)\]")


class TemplateError(Exception):
    """A template or field path that cannot be used, or a record it does not fit."""


@functools.lru_cache(maxsize=4096)
def split_path(path: str) -> tuple[str, ...]:
    """`question.choices[0]` -> ("question", "choices", "0"); TemplateError when malformed."""
    match = _PATH.fullmatch(path.strip())
    if not match:
        raise TemplateError(f"{path!r} is not a field path (name, name.key or name[key])")
    steps = [match.group(1)]
    for attr, key in _STEP.findall(match.group(2)):
        steps.append(attr or key)
    return tuple(steps)


def resolve(namespace: Mapping[str, Any], path: str) -> Any:
    """The value at `path`; TemplateError naming the first step that is not there."""
    return _walk(namespace, split_path(path))


def _walk(node: Any, steps: tuple[str, ...]) -> Any:
    for i, step in enumerate(steps):
        if type(node) is dict:  # the common case, without the ABC check below
            if step not in node:
                raise TemplateError(f"no field {'.'.join(steps[:i + 1])!r}")
            node = node[step]
        else:
            node = _step(node, step, steps[:i])
    return node


def _step(node: Any, step: str, walked: tuple[str, ...]) -> Any:
    where = ".".join(walked + (step,))
    if isinstance(node, collections.abc.Mapping):  # typing.Mapping's check is slower
        if step in node:
            return node[step]
        raise TemplateError(f"no field {where!r}")
    if isinstance(node, (list, tuple)) and step.lstrip("-").isdigit():
        index = int(step)
        if -len(node) <= index < len(node):
            return node[index]
        raise TemplateError(f"{'.'.join(walked)!r} has {len(node)} items, no [{index}]")
    raise TemplateError(f"no field {where!r} ({'.'.join(walked)!r} is a "
                        f"{type(node).__name__})")


@dataclasses.dataclass(frozen=True)
class _Field:
    path: str
    steps: tuple[str, ...]
    filters: tuple[str, ...]
    conversion: str | None
    spec: str


@functools.lru_cache(maxsize=1024)
def _compile(template: str) -> tuple[tuple[str, _Field | None], ...]:
    """(literal text, field after it) pairs; TemplateError on bad syntax."""
    if not isinstance(template, str):
        raise TemplateError(f"expected a template string, got {type(template).__name__}")
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise TemplateError(f"not a valid template ({e})") from None
    out = []
    for literal, field, spec, conversion in parts:
        if field is None:
            out.append((literal, None))
            continue
        path, *filters = (p.strip() for p in field.split("|"))
        if not path or path.isdigit():
            raise TemplateError(f"{{{field}}} names no field: write {{field_name}}")
        if "{" in (spec or ""):
            raise TemplateError(f"{{{field}:{spec}}}: a format spec cannot hold a field")
        out.append((literal, _Field(path, split_path(path), tuple(filters), conversion,
                                    spec or "")))
    return tuple(out)


def check(template: str, tables: Mapping[str, Mapping[str, str]]) -> list[str]:
    """The names a template reads (the first step of each field path); TemplateError when it
    cannot render any record: bad syntax, an unknown filter."""
    names = []
    for _, field in _compile(template):
        if field is None:
            continue
        for name in field.filters:
            if name not in FILTERS and name not in tables:
                known = ", ".join(sorted(FILTERS) + sorted(tables))
                raise TemplateError(f"unknown filter {name!r} in {{{field.path}|...}} "
                                    f"(known: {known})")
        names.append(field.steps[0])
    return names


def _filter(name: str, value: Any, path: str, tables: Mapping[str, Mapping[str, str]]) -> Any:
    if name in tables:
        table = tables[name]
        if str(value) not in table:
            shown = ", ".join(sorted(table)[:12]) + (", ..." if len(table) > 12 else "")
            raise TemplateError(f"{path}={value!r} is not a key of table {name!r} "
                                f"(keys: {shown})")
        return table[str(value)]
    if name not in FILTERS:
        raise TemplateError(f"unknown filter {name!r}")
    return FILTERS[name](value)


_CONVERT = {"s": str, "r": repr, "a": ascii}


def render(template: str, namespace: Mapping[str, Any],
           tables: Mapping[str, Mapping[str, str]]) -> str:
    out = []
    for literal, field in _compile(template):
        out.append(literal)
        if field is None:
            continue
        value = _walk(namespace, field.steps)
        for name in field.filters:
            value = _filter(name, value, field.path, tables)
        try:
            if field.conversion:
                value = _CONVERT[field.conversion](value)
            out.append(value if type(value) is str and not field.spec
                       else format(value, field.spec))
        except (ValueError, TypeError, KeyError) as e:
            raise TemplateError(f"cannot format {{{field.path}}}={value!r:.60}: {e}") from None
    return "".join(out)


class Namespace(Mapping):
    """A record seen by templates: its own fields and the task's derived `fields` (each a
    template over the record, rendered on first use, so one may use another). `with_extra`
    lays a few names over it (`choice`, `index`, `letter`, `completion`) that derived fields
    do not see."""

    def __init__(self, record: Mapping[str, Any], derived: Mapping[str, str],
                 tables: Mapping[str, Mapping[str, str]]):
        for name in derived:
            if name in record:
                raise TemplateError(f"derived field {name!r} is also a field of the record; "
                                    "give it another name")
        self.record, self.derived, self.tables = record, derived, tables
        self._done: dict[str, str] = {}
        self._busy: set[str] = set()

    def with_extra(self, **extra: Any) -> Mapping[str, Any]:
        return collections.ChainMap(extra, self)

    def __getitem__(self, key: str) -> Any:
        if key in self.derived:
            if key not in self._done:
                if key in self._busy:
                    raise TemplateError(f"derived field {key!r} refers to itself")
                self._busy.add(key)
                try:
                    self._done[key] = render(self.derived[key], self, self.tables)
                finally:
                    self._busy.discard(key)
            return self._done[key]
        return self.record[key]

    def __contains__(self, key: object) -> bool:
        return key in self.derived or key in self.record

    def __iter__(self) -> Iterator[str]:
        yield from dict.fromkeys([*self.derived, *self.record])

    def __len__(self) -> int:
        return sum(1 for _ in self)
