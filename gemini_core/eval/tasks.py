"""Downstream tasks declared as data: `TaskSpec`, `Example`, `load_tasks`.

A task is a declaration (an ml_collections ConfigDict or a plain dict) turned once into a frozen
`TaskSpec` by gemini_core.config.to_dataclass, every mistake a UserError naming the key path.
No task has code of its own: prompts, choices, gold answers and programs are templates over the
record's fields (gemini_core.eval.task_templates), and the metric arithmetic is in
gemini_core.eval.metrics. The kinds, and what each example carries for its scorer:

- multiple_choice: `choices` (continuations of `context`), `gold_index`; acc, acc_norm, bpb.
- generate: `gold` (reference text, for bpb) and `target` (the answer exact match compares the
  extracted model answer with); exact_match, bpb.
- code: `gold` (reference code) and `program(completion)`, run against the task's tests;
  pass@k, bpb.
- last_word (LAMBADA): the passage split at its last space, `gold` = " " + the last word; acc
  (the greedy decode reproduces it), ppl, bpb.
- media_choice (fashion_mnist, spoken_digits): the held-out items of a modality domain
  (`domain`, gemini_core.data.modality), each an image or recording followed by the domain's
  evaluation caption of each label; acc (the gold caption is the most likely), bpb of the gold
  caption. The items and labels come from the run's media data, not from a file (no `path`).

Where declarations come from, in `load_tasks(items)` (names and files may be mixed):
- a shipped name (gemini_core.eval.task_library);
- a name in `declared` (an experiment's `config.eval.downstream.declare`: name -> declaration);
- a task file `my_tasks.py` defining `get_tasks()`, which returns a mapping (ConfigDict or
  dict) task name -> declaration; every task in it is loaded.
A declaration may name a `base` task (shipped, or declared in the same place) whose
declaration it extends key by key, nested mappings merged: `dict(base="arc_easy",
num_fewshot=25)`; a shipped task's name cannot be declared again, so a figure under that name
always means the shipped declaration. A relative `path` resolves against the benchmarks root:
the `root` argument, else $GX_BENCHMARKS, else <repo>/../shared/benchmarks (a task file can
name its own data absolutely: `str(Path(__file__).parent / "qa.jsonl")`).

A spec's examples, with their few-shot contexts: gemini_core.eval.task_examples.load_examples.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import ml_collections

from gemini_core import nested
from gemini_core.config import to_dataclass
from gemini_core.errors import UserError
from gemini_core.eval import metrics, task_library
from gemini_core.eval import task_templates as tt
from gemini_core.eval.settings import TASK_SPLITS
from gemini_core.experiment import user_frame

KINDS = ("multiple_choice", "generate", "code", "last_word", "media_choice")
ENV_ROOT = "GX_BENCHMARKS"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str  # the metric prefix: downstream/<name>/<metric>
    path: str  # jsonl or jsonl.gz; relative to the benchmarks root (absolute after load_tasks)
    kind: str  # multiple_choice | generate | code | last_word | media_choice
    domain: str = ""  # media_choice: the modality domain whose held-out items are scored
    prompt: str = ""  # template; last_word: the whole passage ("{text}")
    # records used: field path -> a value, or a list of values (any of them)
    filter: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # derived fields: name -> template over the record (and other derived fields)
    fields: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # lookup tables, used as filters: {lang_question|connector}
    tables: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)
    id_field: str = ""  # field path of the record's id ("" = <task>/<index>)
    description: str = ""  # template put before the shots and the prompt
    target_delimiter: str = " "  # between a prompt and its answer (choice, gold)
    # multiple choice: fixed choices (one template each) or one per item of a list field
    choices: tuple[str, ...] = ()
    choices_from: str = ""  # field path of a list; each item is `choice` in choice_template
    choice_template: str = "{choice}"
    label: str = ""  # field path of the gold label
    label_type: str = "index"  # index (an int or digit string) | match (equals a choice_label)
    label_offset: int = 0  # subtracted from an index label: 1 for 1-based labels
    choice_label: str = ""  # match: template of each choice's label; sees choice, index, letter
    norm_length: str = "chars"  # acc_norm divides by the choice's: chars (lm-eval) | UTF-8 bytes
    # generate and code
    gold: str = ""  # template of the gold answer (its bpb; exact match's target by default)
    target: str = ""  # template of exact match's reference ("" = gold)
    target_pattern: str = ""  # regex pulling the reference answer out of the rendered target
    answer_pattern: str = ""  # regex pulling the answer out of the model's output ("" = all of it)
    answer_select: str = "first"  # first | last match (of both patterns)
    ignore_case: bool = False
    ignore_patterns: tuple[str, ...] = ()  # regexes removed from both sides before comparing
    stop: tuple[str, ...] = ()
    max_new_tokens: int = 0  # 0 = the caller's default
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    samples: int = 1  # code: completions per problem (n of pass@k)
    pass_k: tuple[int, ...] = (1,)  # code: the k of each pass@k reported; each <= samples
    program: str = ""  # code: template with one {completion}: the program run against the tests
    entry_point: str = ""  # code: template of the function's name
    timeout_s: float = 10.0  # code: wall-clock limit of one program
    # few-shot
    num_fewshot: int = 0
    fewshot_path: str = ""  # "" = the task's own file
    # records shots are drawn from ({} = the task's own records; with fewshot_path, all of it)
    fewshot_filter: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    fewshot_match: tuple[str, ...] = ()  # field paths a shot shares with the example (language)
    fewshot_sampler: str = "random"  # random (seeded) | first_n
    fewshot_answer: str = ""  # template of a shot's answer ("" = its gold answer or choice)
    fewshot_delimiter: str = "\n\n"
    seed: int = 1234
    limit: int = 0  # 0 = every record
    limit_from: str = "random"  # random (a seeded subset) | first
    # all | search | heldout: two disjoint fixed halves of the records (seeded by `seed`), so a
    # mixture search can score one and its validation the other, never seen by the search;
    # `limit` then selects within the half
    split: str = "all"
    where: str = dataclasses.field(default="", compare=False)  # set by load_tasks: key path


@dataclasses.dataclass(frozen=True)
class Example:
    index: int  # position among the task's records (after `filter`), the same under any limit
    id: str  # the record's id_field, else <task>/<index>
    line: int  # 1-based line of the record in its file
    prompt: str  # this example's prompt alone: no description, no shots
    context: str  # what the model is given: description, shots, prompt
    gold: str  # the gold continuation of `context` (target_delimiter included): bpb is of this
    choices: tuple[str, ...] = ()  # multiple_choice: the continuations of `context`
    choice_lengths: tuple[int, ...] = ()  # multiple_choice: acc_norm's length of each
    gold_index: int = -1  # multiple_choice
    target: str = ""  # generate: exact match's reference answer; last_word: the gold word
    program_prefix: str = ""  # code: program(completion) = prefix + completion + suffix
    program_suffix: str = ""
    entry_point: str = ""
    shot_lines: tuple[int, ...] = ()  # lines (in the few-shot file) of the shots, in order
    record: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def program(self, completion: str) -> str:
        return self.program_prefix + completion + self.program_suffix


# ---------------------------------------------------------------------------------------------
# declarations -> TaskSpecs

FIELDS = tuple(f.name for f in dataclasses.fields(TaskSpec) if f.name != "where")


def benchmarks_root(root: str | os.PathLike | None = None) -> Path:
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get(ENV_ROOT):
        return Path(os.environ[ENV_ROOT]).expanduser()
    return Path(__file__).resolve().parents[2].parent / "shared" / "benchmarks"


def shipped_names() -> tuple[str, ...]:
    return tuple(task_library.declarations())


def load_tasks(items: Sequence[str] | str, *, root: str | os.PathLike | None = None,
               overrides: Mapping[str, Any] | None = None,
               declared: Mapping[str, Any] | None = None,
               declared_where: str = "config.eval.downstream.declare") -> list[TaskSpec]:
    """Task names and task files (a comma-separated string is split) -> validated TaskSpecs, in
    order. `overrides` (field -> value) applies to every task, e.g. {"num_fewshot": 0}."""
    if isinstance(items, str):
        items = items.split(",")
    root_dir = benchmarks_root(root)
    overrides = nested.plain(overrides or {})
    for key in overrides:
        if key not in FIELDS or key == "name":
            raise UserError(f"task overrides: unknown key {key!r} (known: "
                            f"{', '.join(f for f in FIELDS if f != 'name')})")
    shipped = task_library.declarations()
    declared = {str(k): nested.plain(v) for k, v in (declared or {}).items()}
    _no_shadowing(declared, shipped, declared_where)
    specs: list[TaskSpec] = []
    for item in (i.strip() for i in items):
        for where, decl in _declarations(item, shipped, declared, declared_where):
            spec = _to_spec(nested.merge(decl, overrides), where, root_dir)
            clash = next((s for s in specs if s.name == spec.name), None)
            if clash:
                raise UserError(f"{where}: task {spec.name!r} is loaded twice (also from "
                                f"{clash.where}); give one another name")
            specs.append(spec)
    return specs


def _declarations(item: str, shipped: Mapping[str, dict], declared: Mapping[str, dict],
                  declared_where: str) -> Iterator[tuple[str, dict]]:
    if not item:
        raise UserError("tasks: an empty task name (a stray comma?)")
    if item.endswith(".py"):
        path = Path(item)
        decls = _read_task_file(path)
        where = f"{path}:get_tasks()"
        _no_shadowing(decls, shipped, where)
        for name in decls:
            yield f"{where}.{name}", _resolve(name, decls, shipped, where)
    elif item in declared:
        yield f"{declared_where}.{item}", _resolve(item, declared, shipped, declared_where)
    elif item in shipped:
        yield f"tasks.{item}", _resolve(item, shipped, shipped, "tasks")
    else:
        known = sorted(set(shipped) | set(declared))
        raise UserError(f"unknown task {item!r} (known: {', '.join(known)}; or a task file "
                        "my_tasks.py defining get_tasks())")


def _no_shadowing(decls: Mapping[str, Any], shipped: Mapping[str, Any], where: str) -> None:
    """A shipped name always means the shipped declaration, and <task>@<split> always one half
    of a task (gemini_core.eval.downstream.with_split): figures under one metric name stay
    comparable across runs, and a done run's `all` figures never pass for a half's."""
    for name in decls:
        if "@" in name:
            raise UserError(f"{where}.{name}: '@' is kept for a split's name (<task>@<split>); "
                            "give yours another name (a declaration's `split` key picks a half)")
        if name in shipped:
            raise UserError(f"{where}.{name}: the name of a shipped task; give yours another "
                            f"(it may extend the shipped one: base={name!r})")


def _resolve(name: str, here: Mapping[str, dict], shipped: Mapping[str, dict], where: str,
             seen: tuple[str, ...] = ()) -> dict:
    """The declaration with its `base` chain merged in, and its name."""
    if not isinstance(here[name], Mapping):
        raise UserError(f"{where}.{name}: expected a task declaration (a mapping of keys), got "
                        f"{type(here[name]).__name__}")
    decl = dict(here[name])
    if "where" in decl:
        raise UserError(f"{where}.{name}.where: set by gx, not declared")
    base = decl.pop("base", "")
    if base:
        if base in seen + (name,):
            raise UserError(f"{where}.{name}.base={base!r}: a cycle of bases")
        if base in here and base != name:
            parent = _resolve(base, here, shipped, where, seen + (name,))
        elif base in shipped:
            parent = _resolve(base, shipped, shipped, "tasks", seen + (name,))
        else:
            raise UserError(f"{where}.{name}.base={base!r}: unknown task (known: "
                            f"{', '.join(sorted(set(here) | set(shipped)))})")
        parent.pop("name")
        decl = nested.merge(parent, decl)
    if decl.get("name", name) != name:
        raise UserError(f"{where}.{name}.name={decl['name']!r}: differs from its key {name!r}")
    decl["name"] = name
    return decl


def _read_task_file(path: Path) -> dict[str, dict]:
    if not path.is_file():
        raise UserError(f"{path}: task file not found")
    spec = importlib.util.spec_from_file_location(f"gx_tasks_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not callable(getattr(module, "get_tasks", None)):
            raise UserError(f"{path}: defines no get_tasks() function (it returns a mapping "
                            "task name -> declaration)")
        decls = module.get_tasks()
    except UserError:
        raise
    except Exception as e:  # the user's file: its own line, not our traceback
        raise UserError(f"{user_frame(e, path)}: {type(e).__name__}: {e}") from None
    if not isinstance(decls, (Mapping, ml_collections.ConfigDict)) or not decls:
        raise UserError(f"{path}: get_tasks() must return a non-empty mapping task name -> "
                        f"declaration, got {decls!r:.80}")
    return {str(k): nested.plain(v) for k, v in decls.items()}


def _to_spec(decl: dict, where: str, root: Path) -> TaskSpec:
    unknown = [k for k in decl if k not in FIELDS]
    if unknown:  # before to_dataclass, whose list of known keys would hold `where`
        raise UserError(f"{where}.{unknown[0]}: unknown key (known keys: {', '.join(FIELDS)})")
    spec = to_dataclass(decl, TaskSpec, where)
    spec = dataclasses.replace(spec, where=where)
    check_spec(spec)
    if spec.kind == "media_choice":  # its items are the run's media data
        return spec
    path = _data_path(spec.path, root, f"{where}.path")
    fewshot = (_data_path(spec.fewshot_path, root, f"{where}.fewshot_path")
               if spec.fewshot_path else "")
    return dataclasses.replace(spec, path=str(path), fewshot_path=str(fewshot))


def _data_path(path: str, root: Path, key: str) -> Path:
    if not path.endswith((".jsonl", ".jsonl.gz")):
        raise UserError(f"{key}={path!r}: expected a .jsonl or .jsonl.gz file")
    full = Path(path).expanduser()
    full = full if full.is_absolute() else root / full
    if not full.is_file():
        hint = "" if Path(path).is_absolute() else (f" (relative to the benchmarks root {root}; "
                                                    f"set ${ENV_ROOT} or pass another root)")
        raise UserError(f"{key}={path!r}: no such file {full}{hint}")
    return full


# ---------------------------------------------------------------------------------------------
# checks of a declaration: each names the key path and the value


def _one_of(key: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise UserError(f"{key}={value!r}: must be one of {', '.join(allowed)}")


def check_split(key: str, split: str) -> None:
    """A split asked for from outside a declaration (`gx eval --split`, the config's)."""
    _one_of(key, split, TASK_SPLITS)


def _template(spec: TaskSpec, name: str) -> list[str]:
    try:
        return tt.check(getattr(spec, name), spec.tables)
    except tt.TemplateError as e:
        raise UserError(f"{spec.where}.{name}={getattr(spec, name)!r}: {e}") from None


def _field_path(spec: TaskSpec, key: str, path: str) -> None:
    try:
        tt.split_path(path)
    except tt.TemplateError as e:
        raise UserError(f"{spec.where}.{key}={path!r}: {e}") from None


def _regex(spec: TaskSpec, key: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise UserError(f"{spec.where}.{key}={pattern!r}: not a valid regex ({e})") from None


def check_spec(spec: TaskSpec) -> None:
    """Everything that can be checked without reading the data."""
    w = spec.where
    _one_of(f"{w}.kind", spec.kind, KINDS)
    if spec.kind == "media_choice" and not spec.domain:
        raise UserError(f"{w}.domain='': a media_choice task names the modality domain whose "
                        "held-out items it scores")
    for key, allowed in (("label_type", ("index", "match")), ("norm_length", ("chars", "bytes")),
                         ("answer_select", ("first", "last")),
                         ("fewshot_sampler", ("random", "first_n")),
                         ("limit_from", ("random", "first")), ("split", TASK_SPLITS)):
        _one_of(f"{w}.{key}", getattr(spec, key), allowed)
    for key in ("num_fewshot", "limit", "max_new_tokens", "top_k", "temperature"):
        if getattr(spec, key) < 0:
            raise UserError(f"{w}.{key}={getattr(spec, key)!r}: must be >= 0")
    if not 0 < spec.top_p <= 1:
        raise UserError(f"{w}.top_p={spec.top_p}: must be in (0, 1]")
    if not spec.timeout_s > 0:
        raise UserError(f"{w}.timeout_s={spec.timeout_s}: must be > 0")
    for name in spec.tables:
        if name in tt.FILTERS or not re.fullmatch(r"\w+", name):
            raise UserError(f"{w}.tables.{name}: a table name is a word other than a filter's "
                            f"({', '.join(tt.FILTERS)})")
    for name in spec.fields:
        if not re.fullmatch(r"\w+", name):
            raise UserError(f"{w}.fields.{name}: a derived field's name is a word")
        _check_template_value(spec, f"fields.{name}", spec.fields[name])
    for key in ("id_field", "choices_from", "label"):
        if getattr(spec, key):
            _field_path(spec, key, getattr(spec, key))
    for key in ("filter", "fewshot_filter"):
        for path, value in getattr(spec, key).items():
            _field_path(spec, f"{key}.{path}", path)
            if isinstance(value, Mapping):
                raise UserError(f"{w}.{key}.{path}: expected a value or a list of values")
    for i, path in enumerate(spec.fewshot_match):
        _field_path(spec, f"fewshot_match[{i}]", path)
    for key in ("target_pattern", "answer_pattern"):
        _regex(spec, key, getattr(spec, key))
    for i, pattern in enumerate(spec.ignore_patterns):
        _regex(spec, f"ignore_patterns[{i}]", pattern)
    if any(not s for s in spec.stop):
        raise UserError(f"{w}.stop={spec.stop!r}: a stop string cannot be empty")
    for name in ("prompt", "description", "fewshot_answer", "choice_template", "choice_label",
                 "gold", "target", "entry_point"):
        _template(spec, name)
    for i, choice in enumerate(spec.choices):
        _check_template_value(spec, f"choices[{i}]", choice)
    if not spec.prompt and spec.kind != "media_choice":  # its prompt is the item's media
        raise UserError(f"{w}.prompt='': declare the prompt template")
    {"media_choice": lambda s: None, "multiple_choice": _check_mc, "generate": _check_generate,
     "code": _check_code, "last_word": lambda s: None}[spec.kind](spec)


def _check_template_value(spec: TaskSpec, key: str, template: str) -> None:
    try:
        tt.check(template, spec.tables)
    except tt.TemplateError as e:
        raise UserError(f"{spec.where}.{key}={template!r}: {e}") from None


def _check_mc(spec: TaskSpec) -> None:
    w = spec.where
    if bool(spec.choices) == bool(spec.choices_from):
        raise UserError(f"{w}.choices / {w}.choices_from: declare exactly one (fixed choice "
                        "templates, or the field path of a list)")
    if spec.choices and len(spec.choices) < 2:
        raise UserError(f"{w}.choices={spec.choices!r}: a question needs at least 2 choices")
    if not spec.label:
        raise UserError(f"{w}.label='': name the field holding the gold label")
    if spec.label_type == "match" and not spec.choice_label:
        raise UserError(f"{w}.choice_label='': label_type 'match' compares the label with each "
                        "choice's label: declare its template, e.g. '{choice[label]}' or "
                        "'{letter}'")


def _check_generate(spec: TaskSpec) -> None:
    if not spec.gold:
        raise UserError(f"{spec.where}.gold='': declare the gold answer template")


def _check_code(spec: TaskSpec) -> None:
    w = spec.where
    if not spec.gold:
        raise UserError(f"{w}.gold='': declare the reference solution template")
    if _template(spec, "program").count("completion") != 1:
        raise UserError(f"{w}.program={spec.program!r}: must hold {{completion}} exactly once "
                        "(where the model's code goes)")
    if spec.samples < 1:
        raise UserError(f"{w}.samples={spec.samples}: must be >= 1")
    if spec.samples > 1 and spec.temperature == 0:
        raise UserError(f"{w}.samples={spec.samples} with temperature=0: greedy samples are all "
                        "the same; set a temperature > 0")
    if not spec.pass_k:
        raise UserError(f"{w}.pass_k=(): name at least one k")
    for i, k in enumerate(spec.pass_k):
        if not 1 <= k <= spec.samples:
            raise UserError(f"{w}.pass_k[{i}]={k}: must be in [1, samples={spec.samples}]")


def metric_names(spec: TaskSpec, generate: bool = True) -> tuple[str, ...]:
    """The metrics a task reports (each also with `<metric>_stderr`); without `generate`, a
    generate or code task reports its gold answer's bpb alone."""
    if spec.kind == "multiple_choice":
        return ("acc", "acc_norm", "bpb")
    if spec.kind == "media_choice":
        return ("acc", "bpb")
    if not generate and spec.kind in ("generate", "code"):
        return ("bpb",)
    if spec.kind == "generate":
        return ("exact_match", "bpb")
    if spec.kind == "code":
        return tuple(f"pass@{k}" for k in spec.pass_k) + ("bpb",)
    return ("acc", "ppl", "bpb")


def exact_match(spec: TaskSpec, example: Example, output: str) -> float:
    """1.0 when the answer `answer_pattern` finds in a model's output is the example's target."""
    return metrics.exact_match(output, example.target, pattern=spec.answer_pattern,
                               select=spec.answer_select, ignore_case=spec.ignore_case,
                               ignore_patterns=spec.ignore_patterns)
