"""Fuzz-style: every command fed families of bad inputs generated from the config schema and the
file formats; docs/guarantees.md lists what this module checks.

The inputs: every field of ExperimentConfig (enumerated from the dataclasses in
gemini_core/config.py), and of the sweep, scaling-ladder and data-curation configs, with values
of the wrong type and impossible values; paths of the wrong kind (missing, a file for a folder,
a folder under a file) for the recipe, data prepare, a sweep and a ladder; names with path
separators and markup for every command that takes a name; experiment files, schedule JSON,
run records, tables and data reports that are truncated, empty, of the wrong JSON type, binary,
or a directory in place of a file; bad command-line values. Each runs in-process through
gx.cli.main (the `gx` command's own code path, without a new interpreter per case) with
`--dry-run` where the command has one, so nothing trains.

Each must end in exit 2 with one line on stderr naming the key path or the file, no traceback,
nothing written outside the runs root, and nothing half-written. A value the schema allows for
a field (a negative seed, any text in a free-text field, the field's own default) may instead
pass (exit 0); the lists below say which, so a newly accepted bad value fails the test.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import os
import shutil
import typing
from pathlib import Path
from typing import Any, Iterator

from gemini_core import config as config_lib
from gemini_core.data.curation import config as curation_config
from gx import cli
from sweeps import config as sweep_config
from sweeps import ladder as ladder_lib

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "experiments/quickstart.py")
SWEEP = str(REPO / "experiments/mixture_sweep.py") + ":size=tiny"
PREP = str(REPO / "experiments/data_prep.py")
LADDER = str(REPO / "experiments/scaling_ladder.py") + ":size=tiny"

BAD_NAMES = ("../../escaped_run", "/abs/escaped_run", "a/b", "a\\b", "<img src=x onerror=alert(1)>",
             "sw<img src=x onerror=alert(1)>", "x" * 101, ".hidden", "-flag", "a..b", "a b",
             "a\nb", "名前", "a:b", "a#b", "a?b", "a%b", "a'b", "a;b", "a,b", '"q"', "..", ".")

# by field type: values that are never of that type
WRONG_TYPE = {int: ("abc", "1.5", "[1]", "", "True", str(2**60)),
              float: ("abc", "[1.0]", "", "'x'"),
              bool: ("maybe", "2", "[]")}
IMPOSSIBLE = {int: ("-7",), float: ("nan", "inf", "-inf", "-1e9")}
BAD_TEXT = ("<img src=x onerror=alert(1)>", "../../escaped_x", "/abs/escaped_x", "bogus",
            "x" * 300)
# fields where such a value is allowed: any integer seeds; free text (file names inside each
# domain folder, W&B's job type, a host:port, a teacher run looked up when training starts) and
# a cache folder (created where the user names it) are the user's to choose
MAY_PASS = {("seed", "-7"), ("name", "bogus"), ("tracking.project", "bogus"),
            # W&B's own rule for projects (no / \\ # ? % :, at most 128): gx's report escapes it
            ("tracking.project", "<img src=x onerror=alert(1)>")} | {
    (field, value) for field in ("data.train_file", "data.valid_file", "data.text_field",
                                 "data.cache_dir", "tracking.job_type",
                                 "distributed.coordinator_address", "distill.teacher")
    for value in BAD_TEXT}


@dataclasses.dataclass
class Case:
    argv: list[str]
    names: tuple[str, ...]  # the one error line contains one of these (ok: stdout, all)
    may_pass: bool = False  # exit 0 allowed (a legitimate value), never a crash
    ok: bool = False  # exit 0 expected (gx ls over damaged records lists them)


def schema_fields(cls: type = config_lib.ExperimentConfig,
                  prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(key path, type, default) of every overridable field of the schema, nested sections
    unrolled."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if cls is config_lib.ModelConfig and f.name == "vocab_size":
            continue  # not a key: filled from data.tokenizer.vocab_size
        tp, path = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from schema_fields(tp, path + ".")
            continue
        default = (f.default if f.default is not dataclasses.MISSING else
                   f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        yield path, tp, default


def rotate(values: tuple[str, ...], i: int, k: int) -> tuple[str, ...]:
    """k of `values`, a different k for each i: every value is used across the fields, without
    every field taking every value (each case costs a config load)."""
    return tuple(values[(i * k + j) % len(values)] for j in range(min(k, len(values))))


def field_values(i: int, tp: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(values of the wrong type, impossible values) for the i-th field, of type `tp`."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        return ("5", "(1, 2)", "[None]"), ()
    if origin in (collections.abc.Mapping, dict):
        return ("5", "'x'", "[1]"), ()
    if tp is str:
        return (), rotate(BAD_TEXT, i, 2)
    return rotate(WRONG_TYPE[tp], i, 2), rotate(IMPOSSIBLE.get(tp, ()), i, 2)


def config_cases() -> Iterator[Case]:
    for i, (path, tp, default) in enumerate(schema_fields()):
        if tp is Any:
            continue  # stage weights: their own family below
        key = f"config.{path}"
        values, impossible = field_values(i, tp)
        for v in values:
            yield Case(["run", QUICKSTART, "--dry-run", f"--{key}={v}"], (key,))
        for v in impossible:
            yield Case(["run", QUICKSTART, "--dry-run", f"--{key}={v}"], (key,),
                       may_pass=(path, v) in MAY_PASS or v == str(default))
    stage = "config.mixture.stages.base"
    for suffix, v in ((".start", "abc"), (".start", "1.5"), (".start", "-0.1"), (".start", "nan"),
                      (".weights", "'bogus'"), (".weights", "{'web': -1.0}"),
                      (".weights", "{'web': 2.0}"), (".weights", "{'nope': 1.0}"),
                      (".weights", "{'web': float('nan')}"), (".weights", "5")):
        yield Case(["run", QUICKSTART, "--dry-run", f"--{stage}{suffix}={v}"], (stage,))


def schema_cases(schema: type, command: list[str], may_pass: set[tuple[str, str]],
                 stop: str) -> Iterator[Case]:
    """Every field of a command's own schema (its nested sections unrolled) with values of the
    wrong type and impossible values, checked at load, before any data is read or Ray starts.
    A value the field may hold (`may_pass`, or the field's default) passes the config and then
    stops at `stop`, the key path of the corpus the experiment file leaves to the command
    line."""
    for i, (path, tp, default) in enumerate(schema_fields(schema)):
        if tp is Any:
            continue  # an experiment config inside (a proxy, a ladder's base): the first family
        key = f"config.{path}"
        values, impossible = field_values(i, tp)
        for v in (*values, *impossible):
            legit = (path, v) in may_pass or v == str(default)
            yield Case([*command, f"--{key}={v}"], (key, stop) if legit else (key,))


# values those fields may hold: a name, a search space's concentration range, any seed; an
# output folder (created where the user names it) and the name of the records' text field
SWEEP_MAY_PASS = {("name", "bogus"), ("space.concentration", "(1, 2)"), ("space.seed", "0")}
LADDER_MAY_PASS = {("name", "bogus"), ("fit.seed", "-7")}
CURATION_MAY_PASS = {("name", "bogus"), ("seed", "-7")} | {
    (field, value) for field in ("output.dir", "data.text_field") for value in BAD_TEXT}


def sweep_config_cases() -> Iterator[Case]:
    """A sweep's config (SweepConfig, its search space, fit, resources...); one that gets past
    it stops at the proxy's unset corpus, named as the user types it."""
    yield from schema_cases(sweep_config.SweepConfig, ["sweep", SWEEP], SWEEP_MAY_PASS,
                            "config.proxy.data.root")


def ladder_config_cases() -> Iterator[Case]:
    """A scaling ladder's config (sizes, steps, fit, resources)."""
    yield from schema_cases(ladder_lib.LadderConfig, ["scaling", "run", LADDER],
                            LADDER_MAY_PASS, "config.base.data.root")


def curation_config_cases() -> Iterator[Case]:
    """A data-curation pipeline's config (every stage's fields), for `gx data prepare`."""
    yield from schema_cases(curation_config.CurationConfig, ["data", "prepare", PREP],
                            CURATION_MAY_PASS, "config.data.root")


def name_cases() -> Iterator[Case]:
    """Every bad name as a run's name, and as the name of one other thing (rotating): a domain,
    a sweep, a data output, a scaling ladder."""
    others = (lambda n: Case(["run", QUICKSTART, "--dry-run",
                              f"--config.data.domains=('web', {n!r})"], ("config.data.domains",)),
              lambda n: Case(["sweep", SWEEP, f"--config.name={n}"], ("config.name",)),
              lambda n: Case(["data", "prepare", PREP, f"--config.name={n}"], ("config.name",)),
              lambda n: Case(["scaling", "run", LADDER, f"--config.name={n}"], ("config.name",)))
    for i, name in enumerate(BAD_NAMES):
        yield Case(["run", QUICKSTART, "--dry-run", f"--config.name={name}"], ("config.name",))
        yield others[i % len(others)](name)


def recipe_file(tmp: Path, i: int, step: str) -> Path:
    path = tmp / f"recipe_{i}.py"
    path.write_text(
        "import ml_collections\n\n\ndef get_config(arg=None):\n"
        "    c = ml_collections.ConfigDict()\n    c.name = 'r'\n"
        "    c.params = dict(corpus='', wandb=False)\n    c.steps = ml_collections.ConfigDict()\n"
        f"    c.steps[{step!r}] = dict(kind='tokenizer', config=dict(tokenizer=dict("
        "vocab_size=384, sample_weights='natural')), inputs=dict(root='ref:params.corpus'))\n"
        "    return c\n")
    return path


def recipe_cases(tmp: Path) -> Iterator[Case]:
    for i, name in enumerate(BAD_NAMES):
        path = recipe_file(tmp, i, name)
        # ConfigDict itself refuses a dot in a key: then the file's line is the thing named
        yield Case(["run", str(path), "--dry-run"], ("config.steps", str(path)))


def experiment_files(tmp: Path) -> Iterator[Path]:
    d = tmp / "experiment_files"
    d.mkdir()
    yield d / "missing.py"
    (d / "folder.py").mkdir()
    yield d / "folder.py"
    files = {"notes.txt": "c = 1\n", "empty.py": "", "syntax.py": "def get_config(:\n",
             "raises.py": "def get_config(arg=None):\n    raise RuntimeError('boom')\n",
             "returns_dict.py": "def get_config(arg=None):\n    return {'name': 'x'}\n",
             "wrong_section.py": "import ml_collections\n\n\ndef get_config(arg=None):\n"
                                 "    return ml_collections.ConfigDict({'name': 'x', "
                                 "'model': 5})\n",
             "not_callable.py": "get_config = 5\n"}
    for name, text in files.items():
        (d / name).write_text(text)
        yield d / name
    (d / "binary.py").write_bytes(b"\xff\xfe\x00def get_config")
    yield d / "binary.py"
    text = Path(QUICKSTART).read_text()
    for i, cut in enumerate((len(text) // 3, len(text) // 2, len(text) - 40)):
        (d / f"truncated_{i}.py").write_text(text[:cut])
        yield d / f"truncated_{i}.py"


def file_cases(tmp: Path) -> Iterator[Case]:
    for path in experiment_files(tmp):
        names = (str(path), "config.")  # a truncation may leave valid Python missing a section
        for argv in (["run", str(path), "--dry-run"], ["sweep", str(path)],
                     ["data", "prepare", str(path)], ["data", "train-classifier", str(path)],
                     ["data", "tokenizer-report", str(path)], ["scaling", "run", str(path)]):
            yield Case(argv, names)
    sched = tmp / "schedules"
    sched.mkdir()
    good = '{"stages": [{"start": 0.0, "weights": {"web": 0.5, "code": 0.5}}]}'
    bodies = {"empty.json": "", "truncated.json": good[:30], "list.json": "[1, 2]",
              "string.json": '"x"', "stages_int.json": '{"stages": 5}',
              "start.json": good.replace("0.0", "0.5"),
              "sum.json": good.replace("0.5, \"code\": 0.5", "0.5"),
              "domain.json": good.replace("web", "nope"),
              "weights_str.json": '{"stages": [{"start": 0.0, "weights": "x"}]}',
              "negative.json": good.replace("0.5, \"code\": 0.5", "1.5, \"code\": -0.5")}
    for name, body in bodies.items():
        (sched / name).write_text(body)
    (sched / "binary.json").write_bytes(b"\xff\xfe\x00")
    (sched / "folder.json").mkdir()
    for path in sorted(sched.iterdir()):
        yield Case(["run", QUICKSTART, "--dry-run", f"--config.data.schedule={path}"],
                   (str(path), "config.data.schedule"))
    yield Case(["run", QUICKSTART, "--dry-run", f"--config.data.schedule={sched}/nope.json"],
               ("config.data.schedule",))
    yield Case(["run", QUICKSTART, "--dry-run", f"--config.data.root={tmp}/no_corpus"],
               ("config.data.root",))
    yield Case(["run", QUICKSTART, "--dry-run", f"--config.data.root={sched}/list.json"],
               ("config.data.root",))
    tables = tmp / "tables"
    tables.mkdir()
    for name, body in {"empty.csv": "", "header.csv": "a,b\n", "truncated.csv": "a,b\n1",
                       "no_weights.csv": "loss/web\n1.0\n"}.items():
        (tables / name).write_text(body)
    (tables / "binary.parquet").write_bytes(b"\xff\xfe\x00PAR")
    (tables / "folder.csv").mkdir()
    for path in sorted(tables.iterdir()):
        yield Case(["fit", str(path)], (str(path),))
    report = tmp / "prepared"
    report.mkdir()
    yield Case(["data", "report", str(report)], (str(report),))
    (report / "report.json").write_text('{"domains": ')
    yield Case(["data", "report", str(report)], (str(report),))


def path_cases(tmp: Path, corpus: Path) -> Iterator[Case]:
    """Paths of the wrong kind (missing, a file for a folder, a folder for a file, a folder
    under a file) for the recipe, `gx data prepare`, a sweep and a ladder: each named at load
    by the key the user typed, before any data is read."""
    paths = tmp / "paths"
    paths.mkdir()
    afile, missing, folder = paths / "a_file", paths / "missing", paths / "folder"
    afile.write_text("x")
    folder.mkdir()
    under = afile / "out"
    recipe = str(REPO / "experiments/gemini_recipe.py") + ":size=tiny"
    for corpus_value in (missing, afile):
        yield Case(["run", recipe, "--dry-run", f"--config.params.corpus={corpus_value}"],
                   ("config.params.corpus",))
    for key, value in (("pretrain.config.data.cache_dir", afile),
                       ("distill.config.data.cache_dir", afile),
                       ("tokenizer.config.cache_dir", afile),
                       ("sweep.config.proxy.data.cache_dir", afile),
                       ("prepare.config.output.dir", under),
                       ("prepare.config.safety.blocklist_dir", missing),
                       ("prepare.config.classifier.model", folder)):
        yield Case(["run", recipe, "--dry-run", f"--config.params.corpus={corpus}",
                    f"--config.steps.{key}={value}"], (f"config.steps.{key}",))
    root = f"--config.data.root={corpus}"
    for args, key in (([f"--config.data.root={missing}"], "config.data.root"),
                      ([f"--config.data.root={afile}"], "config.data.root"),
                      ([root, f"--config.output.dir={afile}"], "config.output.dir"),
                      ([root, f"--config.output.dir={under}"], "config.output.dir"),
                      ([root, f"--config.safety.blocklist_dir={afile}"],
                       "config.safety.blocklist_dir"),
                      ([f"--config.data.root={folder}", "--config.classifier.enabled=false",
                        "--config.data.domains=('web',)"], "config.safety.blocklist_dir"),
                      ([root, f"--config.classifier.model={missing}"], "config.classifier.model"),
                      ([root, f"--config.classifier.model={folder}"], "config.classifier.model")):
        for command in (["data", "prepare", PREP], ["data", "train-classifier", PREP]):
            yield Case([*command, *args], (key,))
    for value in (missing, afile):
        yield Case(["sweep", SWEEP, f"--config.proxy.data.root={value}"],
                   ("config.proxy.data.root",))
        yield Case(["scaling", "run", LADDER, f"--config.base.data.root={value}"],
                   ("config.base.data.root",))
    yield Case(["scaling", "run", LADDER, f"--config.base.data.root={corpus}",
                f"--config.base.data.schedule={folder}"], ("config.base.data.schedule",))


RECORD_DAMAGE = {"truncated": b'{"state": "do', "empty": b"", "list": b"[1, 2]",
                 "string": b'"done"', "number": b"5", "binary": b"\xff\xfe\x00{"}


def fake_run(root: Path, rid: str) -> Path:
    """A run directory as gx writes one (what ls, show and eval read; no checkpoint)."""
    run = root / "fuzz" / rid
    run.mkdir(parents=True)
    (run / "config.json").write_text(
        '{"run_id": "%s", "fingerprint": "0", "overrides": {}, "seed": 0, "model": {}, '
        '"optimizer": {}, "train": {"steps": 4, "eval_batches": 1, "batch_size": 2, '
        '"keep_checkpoints": 1}, "data": {"valid_file": "valid.jsonl.gz", "domains": ["web"], '
        '"seq_len": 8, "text_field": "text", "on_bad_record": "error", "num_workers": 0}}' % rid)
    (run / "status.json").write_text('{"state": "done", "pid": 1, "host": "h"}')
    (run / "summary.json").write_text('{"eval/mean/loss": 1.5}')
    return run


def record_cases(records: Path, corpus: Path) -> Iterator[Case]:
    """Damaged run records, each in a runs root of its own beside a healthy run."""
    for file in ("status.json", "config.json", "summary.json"):
        for kind, body in [*RECORD_DAMAGE.items(), ("folder", None)]:
            root = records / f"{file.split('.')[0]}_{kind}"
            fake_run(root, "fuzz-00000001")
            run = fake_run(root, "fuzz-00000002")
            (run / file).unlink()
            if body is None:
                (run / file).mkdir()
            else:
                (run / file).write_bytes(body)
            where = str(run / file)
            # the damaged run is listed as damaged, naming the file; the healthy one still listed
            yield Case(["--runs-root", str(root), "ls"], (where, "damaged", "fuzz-00000001"),
                       ok=True)
            yield Case(["--runs-root", str(root), "show", "fuzz-00000002"], (where,))
            if file == "config.json":
                yield Case(["--runs-root", str(root), "eval", "fuzz-00000002", "--data",
                            str(corpus)], (where,))


def cli_cases(tmp: Path, corpus: Path) -> Iterator[Case]:
    afile = tmp / "a_file"
    afile.write_text("x")
    for root in ("/dev/null", str(afile)):
        for argv in (["ls"], ["show", "x"], ["run", QUICKSTART, "--dry-run"]):
            yield Case(["--runs-root", root, *argv], (root,))
    for batches in ("0", "-3"):
        yield Case(["eval", "x", "--data", str(corpus), "--batches", batches], ("--batches",))
    yield Case(["eval", "x", "--data", str(corpus), "--batches", "abc"], ("--batches",))
    for value in ("abc", "-1", "nan", "inf", "0"):
        yield Case(["plan", "--compute", value], ("--compute",))
    yield Case(["frobnicate"], ("frobnicate",))
    yield Case(["ls", "--config.name=x"], ("--config.name",))
    yield Case(["run", QUICKSTART, "--dry-run", "--config.nope=1"], ("config.nope",))
    yield Case(["run", QUICKSTART, "--dry-run", "--config.model.nope=1"], ("config.model.nope",))
    yield Case(["run", QUICKSTART, "--dry-run", "--config.train.steps"], ("config.train.steps",))
    pretrain = str(REPO / "experiments/pretrain.py")
    for arg in ("size=bogus", "nope=1", "steps=abc"):
        yield Case(["run", f"{pretrain}:{arg}", "--dry-run"], (pretrain,))


def run_case(case: Case, capsys) -> tuple[int, str, str]:
    try:
        code = cli.main(list(case.argv))
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def check(case: Case, code: int, out: str, err: str) -> str | None:
    """What is wrong with how gx answered `case`; None when all is well."""
    if "Traceback" in out + err:
        return "a traceback"
    if case.ok:
        if code != 0:
            return f"exit {code}, expected 0"
        missing = [n for n in case.names if n not in out]
        return f"{missing} not in the listing" if missing else None
    if code == 0 and case.may_pass:
        return None
    if code != 2:
        return f"exit {code}, expected 2"
    lines = [line for line in err.splitlines() if line.strip()]
    if len(lines) != 1:
        return f"{len(lines)} lines on stderr, expected 1"
    if not any(n in lines[0] for n in case.names):
        return f"the line names none of {case.names}"
    return None


def snapshot(*dirs: Path) -> dict[str, set[str]]:
    return {str(d): set(os.listdir(d)) for d in dirs if d.is_dir()}


def test_fuzz_every_command(tmp_path, corpus_root, capsys, monkeypatch):
    runs = tmp_path / "runs"
    work = tmp_path / "cwd"  # the current directory: a default ./runs would appear here
    work.mkdir()
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    records = tmp_path / "records"
    monkeypatch.chdir(work)
    monkeypatch.setenv("GX_RUNS_ROOT", str(runs))
    monkeypatch.setenv("WANDB_MODE", "offline")
    # a case that wrongly passed validation must fail fast, not start a local Ray and train
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")

    cases = [*config_cases(), *sweep_config_cases(), *ladder_config_cases(),
             *curation_config_cases(), *name_cases(), *recipe_cases(inputs), *file_cases(inputs),
             *path_cases(inputs, corpus_root), *record_cases(records, corpus_root),
             *cli_cases(inputs, corpus_root)]
    watched = (Path("/"), REPO, REPO / "experiments", tmp_path.parent, tmp_path, work)
    before = snapshot(*watched)
    records_before = sorted(str(p) for p in records.rglob("*"))

    failures, passed = [], 0
    for case in cases:
        code, out, err = run_case(case, capsys)
        problem = check(case, code, out, err)
        if problem:
            failures.append(f"{case.argv!r}: {problem}\n    exit {code}; stderr: {err[-600:]!r}")
        passed += code == 0
    with capsys.disabled():
        print(f"\nfuzz: {len(cases)} bad inputs, {len(cases) - passed} rejected with exit 2, "
              f"{passed} allowed (legitimate values or listings), {len(failures)} failures")
    assert not failures, f"{len(failures)} of {len(cases)} inputs:\n" + "\n".join(failures[:40])

    # nothing written outside the named roots, nothing half-written
    assert snapshot(*watched) == before
    assert not runs.exists() or not any(runs.rglob("*")), sorted(runs.rglob("*"))[:10]
    assert not list(work.iterdir())
    assert sorted(str(p) for p in records.rglob("*")) == records_before
    leftovers = [p for p in tmp_path.rglob("*") if ".tmp" in p.name or p.name.endswith(".tmp")]
    assert not leftovers, leftovers
    assert not shutil.which("escaped_run") and not Path("/abs").exists()
