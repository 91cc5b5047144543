"""A declared task's examples: its records read, filtered, rendered, with their few-shot context.

`load_examples(spec)` reads `spec.path` (jsonl or jsonl.gz), keeps the records `spec.filter`
selects, keeps the half `spec.split` names (below), takes `spec.limit` of those (a seeded
random subset, nested: the examples of a limit of 100 are among those of a limit of 200; or the
first ones with `limit_from="first"`), and renders each into an `Example`
(gemini_core.eval.tasks) whose kind-specific parts its scorer needs. A record that
does not fit the declaration (a missing field, a label out of range, a bad JSON line) is a
UserError naming file:line, the field and the declaration's key path.

Splits: with `split` "search" or "heldout" the filtered records are cut in two fixed, disjoint
halves by a shuffle seeded by the task's `seed` alone: the first n//2 of the shuffled order are
"search", the rest "heldout" ("all" = every record). A mixture sweep's proxies score the search
half and its validation the heldout half, so the schedule it picks is judged on questions the
search never saw. The halves do not depend on `limit`, and `Example.index` stays the
position among the filtered records, so an index means the same record in either half.

Few-shot examples come from `fewshot_filter`'s records (default: the task's own, both halves:
shots are context, never scored), grouped by `fewshot_match`, drawn with a `random.Random`
seeded by (seed, the example's line): the same shots for the same seed in every process, never
the example itself.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import os
import random
import string
from pathlib import Path
from typing import Any, Mapping

from gemini_core.errors import UserError
from gemini_core.eval import metrics
from gemini_core.eval import task_templates as tt
from gemini_core.eval.tasks import Example, TaskSpec


@dataclasses.dataclass(frozen=True)
class _Record:
    path: Path
    line: int
    data: Mapping[str, Any]


def read_records(path: str | os.PathLike) -> tuple[_Record, ...]:
    """Every JSON object of a .jsonl(.gz) file with its line; UserError on a bad line. Cached
    while the file is unchanged (XCOPA's languages share one file): treat them as read-only."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        stat = None
    if stat is None or not path.is_file():
        raise UserError(f"{path}: no such file")
    return _read_records(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _read_records(path: Path, mtime_ns: int, size: int) -> tuple[_Record, ...]:
    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{line_no}: not a JSON line ({e.msg}, column "
                                    f"{e.colno})") from None
                if not isinstance(data, dict):
                    raise UserError(f"{path}:{line_no}: expected a JSON object, got "
                                    f"{type(data).__name__}")
                out.append(_Record(path, line_no, data))
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
    return tuple(out)


class _At:
    """Turns a TemplateError inside into a UserError naming file:line and the key path."""

    __slots__ = ("spec", "rec", "key")

    def __init__(self, spec: TaskSpec, rec: _Record, key: str):
        self.spec, self.rec, self.key = spec, rec, key  # the message is built only on an error

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if isinstance(exc, tt.TemplateError):
            raise UserError(f"{self.rec.path}:{self.rec.line}: {exc} "
                            f"({self.spec.where}.{self.key})") from None
        return False


def _matches(spec: TaskSpec, rec: _Record, filters: Mapping[str, Any], key: str) -> bool:
    for path, wanted in filters.items():
        try:
            value = tt.resolve(rec.data, path)
        except tt.TemplateError:
            with _At(spec, rec, f"{key}.{path}"):
                raise
        allowed = wanted if isinstance(wanted, (list, tuple)) else (wanted,)
        if value not in allowed:
            return False
    return True


def split_positions(spec: TaskSpec, n: int) -> list[int]:
    """The positions (sorted) of `spec.split`'s half of n records. Seeded apart from `limit`'s
    shuffle, so that a limit within a half is as random as one over all records."""
    if spec.split == "all":
        return list(range(n))
    order = list(range(n))
    random.Random(f"split/{spec.seed}").shuffle(order)
    half = order[:n // 2] if spec.split == "search" else order[n // 2:]
    if not half:
        raise UserError(f"{spec.where}.split={spec.split!r}: the task has {n} record(s), too few "
                        "to split in two halves")
    return sorted(half)


def select_positions(spec: TaskSpec, n: int, limit: int) -> list[int]:
    if not limit or limit >= n:
        return list(range(n))
    if spec.limit_from == "first":
        return list(range(limit))
    order = list(range(n))
    random.Random(f"limit/{spec.seed}").shuffle(order)
    return sorted(order[:limit])


def load_examples(spec: TaskSpec, limit: int | None = None) -> list[Example]:
    """The task's examples (`limit` None = spec.limit; 0 = all), each with its few-shot context;
    UserError naming file:line and the field for a record that does not fit the declaration."""
    records = read_records(spec.path)
    mine = [r for r in records if _matches(spec, r, spec.filter, "filter")]
    if not mine:
        raise UserError(f"{spec.where}.filter={dict(spec.filter)!r}: selects none of the "
                        f"{len(records)} records of {spec.path}")
    pool = split_positions(spec, len(mine))
    # `limit` picks positions within the half; the examples keep their positions in `mine`
    chosen = [pool[j] for j in select_positions(spec, len(pool),
                                                 spec.limit if limit is None else limit)]
    shots = _Shots(spec, mine) if spec.num_fewshot else None
    return [_example(spec, i, mine[i], shots) for i in chosen]


def _namespace(spec: TaskSpec, rec: _Record) -> tt.Namespace:
    with _At(spec, rec, "fields"):
        return tt.Namespace(rec.data, spec.fields, spec.tables)


def _render(spec: TaskSpec, rec: _Record, key: str, ns: Mapping[str, Any],
            template: str | None = None) -> str:
    with _At(spec, rec, key):
        return tt.render(getattr(spec, key) if template is None else template, ns, spec.tables)


def _example(spec: TaskSpec, index: int, rec: _Record, shots: _Shots | None) -> Example:
    ns = _namespace(spec, rec)
    body = _body(spec, rec, ns)  # prompt, gold and what the kind needs
    ident = f"{spec.name}/{index}"
    if spec.id_field:
        with _At(spec, rec, "id_field"):
            ident = str(tt.resolve(rec.data, spec.id_field))
    prefix = _render(spec, rec, "description", ns) if spec.description else ""
    picked = shots.pick(rec) if shots else []
    shot_text = "".join(shots.text(s) + spec.fewshot_delimiter for s in picked)
    return Example(index=index, id=ident, line=rec.line,
                   context=prefix + shot_text + body["prompt"],
                   shot_lines=tuple(s.line for s in picked), record=rec.data, **body)


def _body(spec: TaskSpec, rec: _Record, ns: tt.Namespace) -> dict[str, Any]:
    if spec.kind == "last_word":
        passage = _render(spec, rec, "prompt", ns)
        head, sep, word = passage.rpartition(" ")
        if not sep or not word:
            raise UserError(f"{rec.path}:{rec.line}: the passage has no last word after a space "
                            f"({spec.where}.prompt)")
        return dict(prompt=head, gold=" " + word, target=" " + word)
    prompt = _render(spec, rec, "prompt", ns)
    if spec.kind == "multiple_choice":
        texts, gold_index = _choices(spec, rec, ns)
        conts = tuple(spec.target_delimiter + t for t in texts)
        for i, cont in enumerate(conts):
            if not cont:
                raise UserError(f"{rec.path}:{rec.line}: choice {i} is empty ({spec.where}."
                                f"{'choices' if spec.choices else 'choice_template'})")
        lengths = tuple(max(1, len(t.encode()) if spec.norm_length == "bytes" else len(t))
                        for t in texts)
        return dict(prompt=prompt, gold=conts[gold_index], choices=conts,
                    choice_lengths=lengths, gold_index=gold_index)
    gold = _render(spec, rec, "gold", ns)
    if spec.kind == "generate":
        return dict(prompt=prompt, gold=spec.target_delimiter + gold,
                    target=_target(spec, rec, ns, gold))
    head, tail = _program(spec, rec, ns)
    entry = _render(spec, rec, "entry_point", ns) if spec.entry_point else ""
    return dict(prompt=prompt, gold=spec.target_delimiter + gold, program_prefix=head,
                program_suffix=tail, entry_point=entry)


def _choices(spec: TaskSpec, rec: _Record, ns: tt.Namespace) -> tuple[list[str], int]:
    if spec.choices:
        items: list[Any] = [None] * len(spec.choices)
        texts = [_render(spec, rec, f"choices[{i}]", ns, t) for i, t in enumerate(spec.choices)]
    else:
        with _At(spec, rec, "choices_from"):
            items = tt.resolve(rec.data, spec.choices_from)
            if not isinstance(items, list) or len(items) < 2:
                raise tt.TemplateError(f"{spec.choices_from} must be a list of at least 2 "
                                       f"choices, got {items!r:.80}")
        texts = [_render(spec, rec, "choice_template", _item_ns(ns, item, i))
                 for i, item in enumerate(items)]
    with _At(spec, rec, "label"):
        value = tt.resolve(rec.data, spec.label)
    return texts, _gold_index(spec, rec, ns, value, items)


def _item_ns(ns: tt.Namespace, item: Any, i: int) -> Mapping[str, Any]:
    letter = string.ascii_uppercase[i] if i < 26 else str(i)
    return ns.with_extra(choice=item, index=i, letter=letter)


def _gold_index(spec: TaskSpec, rec: _Record, ns: tt.Namespace, value: Any,
                items: list[Any]) -> int:
    where = f"{rec.path}:{rec.line}"
    if spec.label_type == "match":
        labels = [_render(spec, rec, "choice_label", _item_ns(ns, item, i))
                  for i, item in enumerate(items)]
        if len(set(labels)) != len(labels):
            raise UserError(f"{where}: choice labels {labels} repeat ({spec.where}.choice_label)")
        if str(value).strip() not in labels:
            raise UserError(f"{where}: {spec.label}={value!r} is not one of the choice labels "
                            f"{', '.join(labels)} ({spec.where}.label)")
        return labels.index(str(value).strip())
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError(f"{where}: {spec.label}={value!r} is not an index ({spec.where}.label; "
                        "label_type 'match' compares it with choice labels)")
    index = value - spec.label_offset
    if not 0 <= index < len(items):
        raise UserError(f"{where}: {spec.label}={value!r} is out of range for {len(items)} "
                        f"choices ({spec.where}.label, label_offset={spec.label_offset})")
    return index


def _target(spec: TaskSpec, rec: _Record, ns: tt.Namespace, gold: str) -> str:
    text = _render(spec, rec, "target", ns) if spec.target else gold
    answer = metrics.extract_answer(text, spec.target_pattern, spec.answer_select)
    if answer is None:
        raise UserError(f"{rec.path}:{rec.line}: target_pattern {spec.target_pattern!r} "
                        f"matches nothing in the target {text[-80:]!r} ({spec.where}."
                        "target_pattern)")
    return answer


_COMPLETION = "\x00gx-completion\x00"


def _program(spec: TaskSpec, rec: _Record, ns: tt.Namespace) -> tuple[str, str]:
    text = _render(spec, rec, "program", ns.with_extra(completion=_COMPLETION))
    if text.count(_COMPLETION) != 1:
        raise UserError(f"{rec.path}:{rec.line}: the record holds gx's completion marker "
                        f"({spec.where}.program)")
    head, _, tail = text.partition(_COMPLETION)
    return head, tail


class _Shots:
    """The few-shot pool of one task and the seeded draw from it."""

    def __init__(self, spec: TaskSpec, mine: list[_Record]):
        self.spec = spec
        if spec.fewshot_path or spec.fewshot_filter:
            pool_records = read_records(spec.fewshot_path or spec.path)
            pool = [r for r in pool_records
                    if _matches(spec, r, spec.fewshot_filter, "fewshot_filter")]
        else:
            pool = mine
        self.groups: dict[tuple, list[_Record]] = {}
        self.members = {(r.path, r.line) for r in pool}
        for r in pool:
            self.groups.setdefault(self._key(r, "fewshot_match"), []).append(r)
        self._texts: dict[tuple[Path, int], str] = {}

    def _key(self, rec: _Record, key: str) -> tuple:
        with _At(self.spec, rec, key):
            return tuple(json.dumps(tt.resolve(rec.data, p), sort_keys=True)
                         for p in self.spec.fewshot_match)

    def pick(self, rec: _Record) -> list[_Record]:
        spec, k = self.spec, self.spec.num_fewshot
        group = self.groups.get(self._key(rec, "fewshot_match"), [])
        others = len(group) - ((rec.path, rec.line) in self.members)
        if others < k:
            raise UserError(f"{spec.where}.num_fewshot={k}: only {others} records to draw shots "
                            f"from for {rec.path}:{rec.line} (fewshot_filter, fewshot_match)")
        if spec.fewshot_sampler == "first_n":
            drawn = group[:k + 1]
        else:
            rng = random.Random(f"fewshot/{spec.seed}/{rec.line}")
            drawn = rng.sample(group, min(k + 1, len(group)))
        return [r for r in drawn if not (r.path == rec.path and r.line == rec.line)][:k]

    def text(self, rec: _Record) -> str:
        """A shot: its prompt, the target delimiter and its answer."""
        key = (rec.path, rec.line)
        if key not in self._texts:
            self._texts[key] = self._render(rec)
        return self._texts[key]

    def _render(self, rec: _Record) -> str:
        spec = self.spec
        ns = _namespace(spec, rec)
        if spec.kind == "last_word":
            return _render(spec, rec, "prompt", ns)
        prompt = _render(spec, rec, "prompt", ns)
        if spec.fewshot_answer:
            answer = _render(spec, rec, "fewshot_answer", ns)
        elif spec.kind == "multiple_choice":
            texts, gold_index = _choices(spec, rec, ns)
            answer = texts[gold_index]
        else:
            answer = _render(spec, rec, "gold", ns)
        return prompt + spec.target_delimiter + answer
