"""Synthetic domains, declared in config like any domain and generated from a seed:
`data.synthetic.<domain> = dict(kind="passkey", ...)` with `<domain>` in `data.domains`.

`passkey`: documents that hide a 5-digit pass key in filler text and ask for it at the end —
the passkey prompt of Mohtashami & Jaggi 2023 ("Landmark Attention"), the same text the
needle evaluation (gemini_core.eval.needle) builds, with its answer. Each document draws its
length (a number of filler sentences), the key and the needle's depth from the domain's seed,
so a long-context stage can teach retrieval over the lengths it trains at.

`word_problems`: procedural arithmetic word problems with worked solutions
(gemini_core.data.word_problems), so a small model learns the format and some arithmetic that
self-training (gemini_core.selftrain) then amplifies. Its problems are drawn from the stream
`seed` (train) and `seed + 1` (valid); a self-training task's problems from other seeds.

The generated files are written once per setting into the data cache
(`<cache>/synthetic/<hash>/<domain>/{train,valid}.jsonl.gz`), and the run reads a data root in
the cache that holds them beside links to the real domains' folders (`materialize`): every
reader of a data root (tokenizer training, token arrays, `gx eval`) sees one folder per domain
as always, the real domains' files are read in place, and the token cache is keyed by the
generated files' content like any file's. No jax here: the config boundary imports it.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from gemini_core.data import word_problems
from gemini_core.errors import UserError
from gemini_core.runs.rundir import fingerprint

KINDS = ("passkey", "word_problems")
FORMAT = 1

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about the important information there.")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
          "There and back again.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


def answer(key: int) -> str:
    return f" {key}"


def assemble(fillers: int, depth: float, key: int) -> str:
    """The prompt with `fillers` filler sentences, the needle after round(depth·fillers)."""
    sentences = [FILLER[i % len(FILLER)] for i in range(fillers)]
    at = round(depth * fillers)
    return " ".join([INTRO, *sentences[:at], NEEDLE.format(key=key), *sentences[at:], QUESTION])


@dataclasses.dataclass(frozen=True)
class SyntheticDomain:
    """`data.synthetic.<domain>`: how a synthetic domain's documents are drawn."""
    kind: str = "passkey"
    train_documents: int = 20_000
    valid_documents: int = 500
    # filler sentences per document, drawn uniformly (about 5 tokens each; the intro, needle
    # and question add about 50): 4-100 spans roughly 70-550 tokens
    min_fillers: int = 4
    max_fillers: int = 100
    seed: int = 0
    # word_problems: steps per problem, the largest operand, the operations (+, -, x)
    min_steps: int = 1
    max_steps: int = 3
    max_operand: int = 20
    ops: str = "+-x"

    def check(self, path: str) -> None:
        if self.kind not in KINDS:
            raise UserError(f"{path}.kind={self.kind!r}: must be one of {', '.join(KINDS)}")
        for name in ("train_documents", "valid_documents"):
            if getattr(self, name) < 1:
                raise UserError(f"{path}.{name}={getattr(self, name)}: must be >= 1")
        if not 0 <= self.min_fillers <= self.max_fillers:
            raise UserError(f"{path}.min_fillers={self.min_fillers}, max_fillers="
                            f"{self.max_fillers}: need 0 <= min_fillers <= max_fillers")
        if self.kind == "word_problems":
            word_problems.check_ranges(path, **self.problem_ranges())

    def problem_ranges(self) -> dict:
        return dict(min_steps=self.min_steps, max_steps=self.max_steps,
                    max_operand=self.max_operand, ops=self.ops)


def check_declared(synthetic: Mapping[str, SyntheticDomain], domains: tuple[str, ...]) -> None:
    for name, spec in synthetic.items():
        path = f"config.data.synthetic.{name}"
        if name not in domains:
            raise UserError(f"{path}: {name!r} is not in config.data.domains "
                            f"({', '.join(domains)}); a synthetic domain is trained on only "
                            "when listed there")
        spec.check(path)


def documents(spec: SyntheticDomain, split: str) -> Iterator[str]:
    """The split's documents, a pure function of (spec, split)."""
    n = spec.train_documents if split == "train" else spec.valid_documents
    if spec.kind == "word_problems":
        seed = spec.seed + (0 if split == "train" else 1)
        yield from map(word_problems.document,
                       word_problems.problems(seed, n, **spec.problem_ranges()))
        return
    rng = np.random.default_rng([spec.seed, 0 if split == "train" else 1])
    fillers_N = rng.integers(spec.min_fillers, spec.max_fillers + 1, n)
    depth_N = rng.random(n)
    key_N = rng.integers(10_000, 100_000, n)
    for fillers, depth, key in zip(fillers_N.tolist(), depth_N.tolist(), key_N.tolist()):
        yield assemble(fillers, depth, key) + answer(key)


def _write(path: Path, texts: Iterator[str]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    # mtime 0: the same bytes every time, so the token cache (keyed by content) is reused
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        for text in texts:
            gz.write((json.dumps({"text": text}) + "\n").encode("utf-8"))
    os.replace(tmp, path)


def generated_folder(name: str, spec: SyntheticDomain, cache_root: Path,
                     files: Mapping[str, str]) -> Path:
    """`<cache>/synthetic/<hash>/`, holding `<name>/<file>` for every split (written once)."""
    key = fingerprint({"format": FORMAT, "spec": dataclasses.asdict(spec), "files": dict(files)})
    folder = Path(cache_root) / "synthetic" / key[:16]
    for split, file_name in files.items():
        path = folder / name / file_name
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            _write(path, documents(spec, split))
    return folder


def materialize(data, cache_root: Path):
    """`data` (a DataConfig) reading a root that holds its synthetic domains, generated, beside
    links to its real domains' folders; `data` itself when it declares none."""
    synthetic = data.synthetic
    if not synthetic:
        return data
    files = {"train": data.train_file, "valid": data.valid_file}
    folders = {d: generated_folder(d, spec, cache_root, files) / d
               for d, spec in synthetic.items()}
    real = {d: Path(data.root).absolute() / d for d in data.domains if d not in synthetic}
    key = fingerprint({"format": FORMAT, "links": {d: str(p) for d, p in
                                                    {**real, **folders}.items()}})
    root = Path(cache_root).absolute() / "synthetic" / "roots" / key[:16]
    root.mkdir(parents=True, exist_ok=True)
    for d, target in {**real, **folders}.items():
        link = root / d
        if not link.is_symlink():
            tmp = root / f".{d}.{os.getpid()}"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(Path(target).absolute(), target_is_directory=True)
            os.replace(tmp, link)
    return dataclasses.replace(data, root=str(root))

