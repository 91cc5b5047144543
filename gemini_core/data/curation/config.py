"""The typed config of a data-curation pipeline (`gx data prepare EXPERIMENT`).

Same boundary as training configs (gemini_core/config.py): the user's ConfigDict is validated
once and becomes frozen dataclasses; every mistake is one UserError naming the key path.
Each stage has `enabled` and its parameters; `quality.overrides.<domain>` adjusts rules per
domain on top of the built-in per-domain defaults (code and math are not prose).
"""

from __future__ import annotations

import dataclasses
import os
import types
from pathlib import Path
from typing import Any, Collection, Mapping

import ml_collections

from gemini_core.config import DEFAULT_DOMAINS, path_kind, to_dataclass
from gemini_core.data.curation import quality
from gemini_core.data.curation.classifier import MIN_DOCS
from gemini_core.data.curation.contamination import (
    benchmark_file,
    default_benchmarks,
    known_task,
)
from gemini_core.data.curation.dedup import DedupParams
from gemini_core.errors import UserError

SPLIT_FILES = types.MappingProxyType({"train": "train.jsonl.gz", "valid": "valid.jsonl.gz"})
EMPTY: Mapping = types.MappingProxyType({})


def _no_entries():
    return dataclasses.field(default_factory=lambda: EMPTY)  # a dict default is not allowed


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """Where one domain's raw documents come from, when not `data.root/<domain>/<file>`."""

    kind: str = "files"  # files | hf
    # kind=files: split -> glob; relative globs are under data.root/<domain>/
    files: Mapping[str, str] = _no_entries()
    # kind=hf: datasets.load_dataset(hf_name, hf_config, split=hf_splits[split], streaming=True,
    # data_files=hf_data_files or None): a hub dataset, or a builder ("json", "parquet") on files
    hf_name: str = ""
    hf_config: str = ""
    # our split -> the dataset's split; default: same name
    hf_splits: Mapping[str, str] = _no_entries()
    # our split -> files, for builder datasets
    hf_data_files: Mapping[str, str] = _no_entries()
    text_field: str = ""  # "" = data.text_field


@dataclasses.dataclass(frozen=True)
class CurationDataConfig:
    root: str
    domains: tuple[str, ...] = DEFAULT_DOMAINS
    # split -> file name in each domain folder
    files: Mapping[str, str] = dataclasses.field(default_factory=lambda: SPLIT_FILES)
    text_field: str = "text"
    # domain -> source, when not the default files
    sources: Mapping[str, SourceConfig] = _no_entries()
    # > 0: only the first max_docs records of each domain and split (local .jsonl/.txt files),
    # e.g. a quick pass over a slice of a large corpus; 0 = everything
    max_docs: int = 0


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    dir: str = ""  # "" = <runs root>/data/<name>-<fingerprint[:8]>
    examples: int = 3  # removed-text snippets kept per rule and domain for the report


@dataclasses.dataclass(frozen=True)
class QualityConfig:
    enabled: bool = True
    # QualityParams fields for every domain
    params: Mapping[str, Any] = _no_entries()
    # domain -> {QualityParams field: value}
    overrides: Mapping[str, Any] = _no_entries()


@dataclasses.dataclass(frozen=True)
class LangidConfig:
    enabled: bool = True


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    enabled: bool = True
    positives: tuple[str, ...] = ("wiki", "books")  # domains whose train docs are "good"
    negatives: tuple[str, ...] = ("web",)  # raw docs the classifier learns to tell apart
    apply_to: tuple[str, ...] = ("web",)  # domains whose docs are dropped below the threshold
    # drop this fraction of apply_to documents: the threshold is that quantile of the scores of
    # the negatives' documents (a rank, as GPT-3 and DCLM filter), so it means the same
    # whatever the classifier's calibration; a threshold > 0 replaces it with a fixed P(good)
    drop_fraction: float = 0.1
    threshold: float = 0.0
    max_docs_per_class: int = 5000
    model: str = ""  # a trained model (.npz); "" = train it (cached by content)


@dataclasses.dataclass(frozen=True)
class SafetyConfig:
    enabled: bool = True
    blocklist_dir: str = ""  # "" = <data.root>/_filters/ldnoobw
    max_matches: int = 2  # documents with more blocklist matches than this are dropped
    # matches are counted but never drop documents here: in code, "XXX" marks a to-do
    exempt: tuple[str, ...] = ("code",)


@dataclasses.dataclass(frozen=True)
class PiiConfig:
    enabled: bool = True


@dataclasses.dataclass(frozen=True)
class DedupConfig:
    exact: bool = True
    near: bool = True
    ngram: int = 5
    num_perm: int = 128
    bands: int = 16
    threshold: float = 0.8


@dataclasses.dataclass(frozen=True)
class DecontaminateConfig:
    """Drops documents that share a word n-gram with an example of a benchmark
    (contamination.py); off while no task is named."""

    tasks: tuple[str, ...] = ()  # e.g. ("gsm8k", "humaneval"); () = off
    ngram: int = 13  # words per n-gram (the GPT-3 / lm-eval convention)
    benchmarks: str = ""  # folder of <task>/data.jsonl.gz; "" = benchmarks/ beside data.root


@dataclasses.dataclass(frozen=True)
class CurationConfig:
    name: str
    data: CurationDataConfig
    output: OutputConfig = OutputConfig()
    quality: QualityConfig = QualityConfig()
    langid: LangidConfig = LangidConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    safety: SafetyConfig = SafetyConfig()
    pii: PiiConfig = PiiConfig()
    dedup: DedupConfig = DedupConfig()
    decontaminate: DecontaminateConfig = DecontaminateConfig()
    workers: int = 0  # Ray workers for the per-document stages; 0 = all cores
    strict: bool = False  # any bad record is an error (exit 2) instead of counted
    seed: int = 0


def _check(c: CurationConfig) -> None:
    if not c.name:
        raise UserError("config.name='': every pipeline needs a name")
    if not c.data.domains:
        raise UserError("config.data.domains=(): name at least one domain")
    if len(set(c.data.domains)) != len(c.data.domains):
        raise UserError(f"config.data.domains={c.data.domains}: a domain is listed twice")
    if not c.data.files:
        raise UserError("config.data.files={}: name at least one split (e.g. train)")
    for domain, source in c.data.sources.items():
        p = f"config.data.sources.{domain}"
        if domain not in c.data.domains:
            raise UserError(f"{p}: {domain!r} is not in config.data.domains={c.data.domains}")
        if source.kind not in ("files", "hf"):
            raise UserError(f"{p}.kind={source.kind!r}: expected 'files' or 'hf'")
        if source.kind == "hf" and not source.hf_name:
            raise UserError(f"{p}.hf_name='': name the dataset (or a builder such as 'json')")
        unknown = set(source.files) | set(source.hf_splits) | set(source.hf_data_files)
        unknown -= set(c.data.files)
        if unknown:
            raise UserError(f"{p}: split {sorted(unknown)[0]!r} is not in config.data.files "
                            f"({', '.join(c.data.files)})")
    cl = c.classifier
    for key in ("positives", "negatives", "apply_to") if cl.enabled else ():
        for d in getattr(cl, key):
            if d not in c.data.domains:
                raise UserError(f"config.classifier.{key}: {d!r} is not in config.data.domains")
    if cl.enabled and not cl.model and not (cl.positives and cl.negatives):
        raise UserError("config.classifier: name positives and negatives, or a trained model")
    if not 0.0 <= cl.threshold < 1.0:
        raise UserError(f"config.classifier.threshold={cl.threshold}: must be in [0, 1)")
    if not 0.0 <= cl.drop_fraction < 1.0:
        raise UserError(f"config.classifier.drop_fraction={cl.drop_fraction}: must be in [0, 1)")
    if cl.max_docs_per_class < MIN_DOCS:
        raise UserError(f"config.classifier.max_docs_per_class={cl.max_docs_per_class}: must be "
                        f">= {MIN_DOCS} (documents per class, some for training, some held out)")
    if c.safety.max_matches < 0:
        raise UserError(f"config.safety.max_matches={c.safety.max_matches}: must be >= 0")
    if c.output.examples < 0:
        raise UserError(f"config.output.examples={c.output.examples}: must be >= 0 (0 = none)")
    if not c.data.text_field:
        raise UserError("config.data.text_field='': name the field that holds each record's text")
    if c.quality.enabled:
        _check_quality(c)
    dedup_params(c)  # DedupParams checks its own fields, with the config's key paths
    if c.data.max_docs < 0:
        raise UserError(f"config.data.max_docs={c.data.max_docs}: must be >= 0 (0 = all)")
    if c.workers < 0:
        raise UserError(f"config.workers={c.workers}: must be >= 0 (0 = all cores)")
    _check_decontaminate(c.decontaminate)


def _check_decontaminate(d: DecontaminateConfig) -> None:
    for task in d.tasks:
        known_task(task, "config.decontaminate.tasks")
    if len(set(d.tasks)) != len(d.tasks):
        raise UserError(f"config.decontaminate.tasks={d.tasks}: a task is listed twice")
    if d.ngram < 1:
        raise UserError(f"config.decontaminate.ngram={d.ngram}: must be >= 1 (words per n-gram)")


def _check_quality(c: CurationConfig) -> None:
    """Every domain's rules build (a misspelt or negative parameter names its key); the
    pipeline builds them again where it uses them."""
    base = quality.params_from(c.quality.params, "config.quality.params")
    for domain, values in c.quality.overrides.items():
        if domain not in c.data.domains:
            raise UserError(f"config.quality.overrides.{domain}: not in config.data.domains")
        if not isinstance(values, Mapping):
            raise UserError(f"config.quality.overrides.{domain}={values!r}: expected a section "
                            "of quality parameters, e.g. {'min_words': 20}")
    for domain in c.data.domains:
        quality.params_for(domain, base, {k: dict(v) for k, v in c.quality.overrides.items()})


# ---------------------------------------------------------------------------------------------
# paths: checked when the config is loaded, before any document is read or Ray starts


def _require(key: str, path: str, wanted: str, what: str) -> None:
    kind = path_kind(path)
    if kind != wanted:
        problem = {"missing": f"no such {wanted}", "directory": "a directory, not a file",
                   "file": "a file, not a directory", "other": f"not a {wanted}"}.get(kind, kind)
        raise UserError(f"{key}={path!r}: {problem} ({what})")


def _check_output_dir(path: str) -> None:
    """A folder to create or reuse: not a file, and not under one."""
    kind = path_kind(path)
    if kind in ("directory", "missing"):
        parent = Path(path).absolute().parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if kind == "directory" or parent.is_dir():
            return
        kind = f"{parent} is a file, not a directory"
    problem = "a file, not a directory" if kind == "file" else kind
    raise UserError(f"config.output.dir={path!r}: {problem} (the folder the cleaned data root "
                    "is written to)")


def _needs_root(c: CurationConfig) -> bool:
    """Whether any input is looked up under data.root: a domain's files by a relative pattern
    (sources.py), or the default blocklist."""
    if c.safety.enabled and not c.safety.blocklist_dir:
        return True
    for domain in c.data.domains:
        source = c.data.sources.get(domain)
        if source and source.kind == "hf":
            continue
        for split, pattern in c.data.files.items():
            if not os.path.isabs((source.files.get(split) if source else None) or pattern):
                return True
    return False


def check_paths(c: CurationConfig, skip: Collection[str] = ()) -> None:
    """The paths the pipeline reads exist and are of the right kind, and its output folder can
    be one. `skip`: key paths (data.root, ...) whose values are not there yet: a recipe's
    upstream steps write them."""
    root, s, cl = c.data.root, c.safety, c.classifier
    if root and "data.root" not in skip:
        _require("config.data.root", root, "directory", "the raw corpus, one folder per domain")
    if s.enabled and s.blocklist_dir and "safety.blocklist_dir" not in skip:
        _require("config.safety.blocklist_dir", s.blocklist_dir, "directory",
                 "the blocklists, <lang>.txt")
    if cl.enabled and cl.model and "classifier.model" not in skip:
        _require("config.classifier.model", cl.model, "file", "a trained quality classifier, "
                 ".npz")
    if c.output.dir and "output.dir" not in skip:
        _check_output_dir(c.output.dir)
    _check_benchmarks(c, skip)
    if "data.root" in skip:
        return
    if not root and _needs_root(c):
        raise UserError("config.data.root='': set it to the raw corpus folder (one folder per "
                        "domain), e.g. --config.data.root=../shared/corpus")
    default = Path(root) / "_filters" / "ldnoobw"
    if root and s.enabled and not s.blocklist_dir and not default.is_dir():
        raise UserError(f"config.safety.blocklist_dir='': its default {default} is not a "
                        "directory; name the blocklists' folder, or set "
                        "config.safety.enabled=false")


def benchmarks_dir(c: CurationConfig) -> Path:
    return Path(c.decontaminate.benchmarks or default_benchmarks(c.data.root))


def _check_benchmarks(c: CurationConfig, skip: Collection[str]) -> None:
    d = c.decontaminate
    if "decontaminate.benchmarks" in skip:
        return
    if d.benchmarks:  # named: it must be a folder, the rule on or off
        _require("config.decontaminate.benchmarks", d.benchmarks, "directory",
                 "the benchmarks, <task>/data.jsonl.gz")
    if not d.tasks or (not d.benchmarks and "data.root" in skip):
        return
    if not d.benchmarks and not c.data.root:
        raise UserError("config.decontaminate.benchmarks='': set it to the benchmarks folder "
                        "(<task>/data.jsonl.gz), e.g. ../shared/benchmarks")
    where = "config.decontaminate.benchmarks" + ("" if d.benchmarks else " (default: "
                                                  "benchmarks/ beside config.data.root)")
    if not benchmarks_dir(c).is_dir():
        raise UserError(f"{where}={str(benchmarks_dir(c))!r}: no such directory (the benchmarks, "
                        "<task>/data.jsonl.gz)")
    for task in d.tasks:
        benchmark_file(benchmarks_dir(c), task, "config.decontaminate.tasks")


def without_off_sections(resolved: dict) -> dict:
    """A CurationConfig as plain data, less the sections that are off and were added after
    outputs were first fingerprinted (decontaminate): an output or recipe step declared before
    they existed keeps its fingerprint."""
    out = dict(resolved)
    if not (out.get("decontaminate") or {}).get("tasks"):
        out.pop("decontaminate", None)
    return out


def dedup_params(c: CurationConfig) -> DedupParams:
    d = c.dedup
    return DedupParams(exact=d.exact, near=d.near, ngram=d.ngram, num_perm=d.num_perm,
                       bands=d.bands, threshold=d.threshold, seed=c.seed)


def from_config_dict(cfg: ml_collections.ConfigDict | Mapping, *,
                     paths: bool = True) -> CurationConfig:
    """The typed config. `paths`: check the paths too (check_paths); a recipe checks them
    itself, but for the fields its upstream steps fill."""
    c = to_dataclass(cfg, CurationConfig, "config")
    _check(c)
    if paths:
        check_paths(c)
    return c
