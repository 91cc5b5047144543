"""The whole recipe as one pipeline (`gx run experiments/gemini_recipe.py:size=tiny`) on a slice
of ../shared/corpus: data prepare -> tokenizer -> mixture sweep (real Ray Tune) -> pretraining
on winner.json -> distillation of a smaller student; then reruns, dry runs, --force, a stale
`running` step and the recipe's lock, all through the real CLI.

The recipe runs once per module; every test gets that run's tree as it was when the run
finished (a test that changes it has it put back after: see `recipe`), so any order, any `-k`
and any single test give the same results."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from gemini_core.data.mixture import MixtureSchedule
from gemini_core.runs.rundir import read_json
from gx import cli

REPO = Path(__file__).resolve().parents[1]
RECIPE = "experiments/gemini_recipe.py:size=tiny"
NAME = "gemini_recipe_tiny"
STEPS = ("prepare", "tokenizer", "sweep", "pretrain", "distill")
VERDICT = re.compile(r"^  (\w+)\s+(would run|up to date|may run|running)\s", re.M)


def recipe_args(corpus: Path) -> list[str]:
    return [RECIPE, f"--config.params.corpus={corpus}", "--config.params.wandb=false"]


def gx(*args: str, runs: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gx", "--runs-root", str(runs),
                           *args], cwd=REPO, env=env, capture_output=True, text=True)


def gx_here(capsys, *args: str, runs: Path) -> tuple[int, str, str]:
    """The same CLI in this process: dry runs and errors read no data and start nothing."""
    capsys.readouterr()
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        code = cli.main(["--runs-root", str(runs), *args])
    finally:
        os.chdir(cwd)
    out = capsys.readouterr()
    return code, out.out, out.err


def states(runs: Path) -> dict[str, dict]:
    return {name: read_json(runs / "recipes" / NAME / f"{name}.json") for name in STEPS}


def verdicts(text: str) -> dict[str, str]:
    return dict(VERDICT.findall(text))


def step_block(text: str, step: str) -> str:
    """The dry run's lines for one step: its verdict line and the reasons under it."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if VERDICT.match(line + " ")
                 and line.split()[0] == step)
    end = next((i for i in range(start + 1, len(lines)) if VERDICT.match(lines[i] + " ")),
               len(lines))
    return "\n".join(lines[start:end])


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    ray_tmp = tmp_path_factory.mktemp("r")  # a Ray cluster of this module's own
    return {**os.environ, "GX_RAY_TEMP_DIR": str(ray_tmp), "RAY_AUTH_MODE": "disabled"}


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under root (relative path -> sha256 of its bytes)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture(scope="module")
def built(tmp_path_factory, corpus_root, env) -> dict:
    """The expensive part, once per module: the real recipe run, and a pristine copy of its runs
    root with the digest of every file in it."""
    root = tmp_path_factory.mktemp("recipe")
    runs = root / "runs"
    proc = gx("run", *recipe_args(corpus_root), runs=runs, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shutil.copytree(runs, root / "pristine", symlinks=True)
    return {"runs": runs, "stdout": proc.stdout, "pristine": root / "pristine",
            "digest": tree_digest(runs)}


@pytest.fixture
def recipe(built) -> Iterator[dict]:
    """The module's recipe run, as it was when it finished. A test may change it (rerun, force,
    break a step): afterwards the tree is put back from the pristine copy, at the same path,
    because the state files and the runs' configs name their paths absolutely."""
    assert tree_digest(built["runs"]) == built["digest"]  # as the run left it
    yield built
    if tree_digest(built["runs"]) != built["digest"]:
        shutil.rmtree(built["runs"])
        shutil.copytree(built["pristine"], built["runs"], symlinks=True)


def test_tiny_recipe_runs_end_to_end(recipe):
    runs = recipe["runs"]
    st = states(runs)
    assert all(st[n]["state"] == "done" for n in STEPS), {n: st[n]["state"] for n in STEPS}
    assert [st[n]["index"] for n in STEPS] == list(range(5))
    assert "5 of 5 steps ran" in recipe["stdout"]
    out = {n: st[n]["outputs"] for n in STEPS}

    report = read_json(Path(out["prepare"]["data_root"]) / "report.json")
    # a slice of the corpus: the first 40 documents of each domain and split (code has 16 valid)
    assert report["identity"]["config"]["data"]["max_docs"] == 40
    assert {d: v["docs_in"] for d, v in report["domains"].items()} == {
        "books": 80, "wiki": 80, "math": 80, "code": 56, "web": 80, "multilingual": 80}
    # one tokenizer, trained on the prepared data, used by every run of the recipe
    assert st["tokenizer"]["inputs"]["root"]["value"] == out["prepare"]["data_root"]
    tok = out["tokenizer"]["fingerprint"]
    assert out["sweep"]["tokenizer"] == out["pretrain"]["tokenizer"] == \
        out["distill"]["tokenizer"] == tok

    winner = Path(out["sweep"]["winner"])
    trials = (winner.parent / "trials.csv").read_text().splitlines()
    assert len(trials) == 1 + 6
    assert not (winner.parent / "validate.json").exists()  # validate.enabled=false at tiny
    pretrain = read_json(Path(out["pretrain"]["run_dir"]) / "config.json")
    assert pretrain["paths"]["schedule"] == str(winner)
    assert pretrain["mixture"] == MixtureSchedule.load(winner).to_dict()
    assert pretrain["paths"]["data_root"] == out["prepare"]["data_root"]

    student_dir = Path(out["distill"]["run_dir"])
    student = read_json(student_dir / "config.json")
    assert student["overrides"]["distill.teacher"] == out["pretrain"]["run_id"]
    assert student["distill"]["teacher"] == pretrain["fingerprint"]  # the teacher by content
    assert student["mixture"] == pretrain["mixture"]
    teacher_params = read_json(Path(out["pretrain"]["run_dir"]) / "summary.json")["params"]
    assert read_json(student_dir / "summary.json")["params"] < teacher_params
    metrics = [json.loads(line) for line in (student_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("train/kl" in m for m in metrics)  # trained towards the teacher


def test_running_again_runs_nothing_and_ls_shows_the_steps(recipe, corpus_root, env, capsys):
    runs = recipe["runs"]
    before = states(runs)
    proc = gx("run", *recipe_args(corpus_root), runs=runs, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0 of 5 steps ran, all up to date" in proc.stdout
    assert states(runs) == before

    code, out, _ = gx_here(capsys, "ls", runs=runs)
    assert code == 0
    block = out[out.index(f"recipe {NAME}"):]
    for name in STEPS:
        row = next(line for line in block.splitlines() if line.split()[:1] == [name])
        assert row.split()[2] == "done", row
    assert before["pretrain"]["outputs"]["run_id"] in block


def test_dry_run_names_the_changed_field_and_exactly_the_steps_downstream(recipe, corpus_root,
                                                                           capsys):
    runs = recipe["runs"]
    files = {p: p.read_bytes() for p in (runs / "recipes" / NAME).iterdir()}
    base = recipe_args(corpus_root)

    def dry(*extra: str) -> str:
        code, out, err = gx_here(capsys, "run", *base, *extra, "--dry-run", runs=runs)
        assert code == 0, err
        return out

    # a filter threshold of the first step: every step downstream of it
    out = dry("--config.steps.prepare.config.classifier.drop_fraction=0.2")
    assert verdicts(out) == {n: "would run" for n in STEPS}
    assert "classifier.drop_fraction: 0.1 -> 0.2" in step_block(out, "prepare")
    assert "input root <- ref:prepare.data_root changed" in step_block(out, "tokenizer")
    # the sweep's search space: the sweep and what uses its winner, not the data or tokenizer
    out = dry("--config.steps.sweep.config.space.seed=1")
    assert verdicts(out) == {"prepare": "up to date", "tokenizer": "up to date",
                             "sweep": "would run", "pretrain": "would run",
                             "distill": "would run"}
    assert "space.seed: 0 -> 1" in step_block(out, "sweep")
    assert "input data.schedule <- ref:sweep.winner changed" in step_block(out, "pretrain")
    # the teacher's length: the teacher and its student
    out = dry("--config.steps.pretrain.config.train.steps=50")
    assert verdicts(out) == {**{n: "up to date" for n in STEPS[:3]},
                             "pretrain": "would run", "distill": "would run"}
    assert "train.steps: 40 -> 50" in step_block(out, "pretrain")
    assert "input distill.teacher <- ref:pretrain.run_id changed" in step_block(out, "distill")
    # how a run is protected is not what it computes (as the run's own identity): nothing
    assert set(verdicts(dry("--config.steps.pretrain.config.faults.snapshot_every=7"))
               .values()) == {"up to date"}
    # forced: that step; its student only if the teacher comes out different
    out = dry("--force", "pretrain")
    assert verdicts(out) == {**{n: "up to date" for n in STEPS[:3]},
                             "pretrain": "would run", "distill": "may run"}
    assert "forced" in step_block(out, "pretrain")
    assert {p: p.read_bytes() for p in (runs / "recipes" / NAME).iterdir()} == files


def test_force_reruns_that_step_and_not_those_its_unchanged_output_feeds(recipe, corpus_root,
                                                                         env):
    runs = recipe["runs"]
    before = states(runs)
    proc = gx("run", *recipe_args(corpus_root), "--force", "prepare", runs=runs, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 of 5 steps ran (prepare)" in proc.stdout
    after = states(runs)
    assert after["prepare"]["runs"] == before["prepare"]["runs"] + 1
    assert after["prepare"]["end"] >= before["prepare"]["end"]
    assert after["prepare"]["reasons"] == ["forced (--force)"]
    # rebuilt byte for byte: what it feeds stays up to date
    assert after["prepare"]["outputs"] == before["prepare"]["outputs"]
    assert {n: after[n] for n in STEPS[1:]} == {n: before[n] for n in STEPS[1:]}


def test_a_stale_running_step_is_recovered(recipe, corpus_root, env, capsys):
    """A step marked running by a process that is gone (as after kill -9 between the student's
    checkpoints at steps 12 and 16): `gx ls` says interrupted, and the next run resumes the run
    from its last checkpoint, to the same result."""
    runs = recipe["runs"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = runs / "recipes" / NAME / "distill.json"
    rec = read_json(path)
    run_dir = Path(rec["outputs"]["run_dir"])
    rec.update(state="running", pid=dead.pid, host=socket.gethostname())
    rec.pop("end")
    path.write_text(json.dumps(rec))
    status = read_json(run_dir / "status.json")
    status.update(state="running", pid=dead.pid, host=socket.gethostname())
    (run_dir / "status.json").write_text(json.dumps(status))
    (run_dir / "summary.json").unlink()
    shutil.rmtree(run_dir / "checkpoints" / "16")

    code, out, _ = gx_here(capsys, "ls", NAME, runs=runs)
    assert code == 0
    assert next(line for line in out.splitlines() if line.split()[:1] == ["distill"]).split()[2] \
        == "interrupted"
    code, out, _ = gx_here(capsys, "run", *recipe_args(corpus_root), "--dry-run", runs=runs)
    assert verdicts(out) == {**{n: "up to date" for n in STEPS[:4]}, "distill": "would run"}
    assert f"interrupted: marked running by pid {dead.pid}" in step_block(out, "distill")

    proc = gx("run", *recipe_args(corpus_root), runs=runs, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 of 5 steps ran (distill)" in proc.stdout
    assert f"resuming {rec['outputs']['run_id']} from step 12" in proc.stdout
    assert read_json(path)["state"] == "done"
    assert read_json(run_dir / "status.json")["state"] == "done"
    assert read_json(run_dir / "summary.json")["eval/mean/loss"] == \
        pytest.approx(rec["outputs"]["eval_mean_loss"], rel=1e-6)


@pytest.mark.parametrize("extra, message", [
    (["--config.steps.pretrain.inputs.data.schedule=ref:swep.winner"],
     "config.steps.pretrain.inputs.data.schedule='ref:swep.winner': unknown step 'swep' "
     "(steps: distill, prepare, pretrain, sweep, tokenizer)"),
    (["--config.steps.pretrain.inputs.data.schedule=ref:sweep.winer"],
     "config.steps.pretrain.inputs.data.schedule='ref:sweep.winer': step sweep (sweep) has no "
     "output 'winer'"),
    (["--config.steps.prepare.inputs.data.root=ref:distill.run_id"],
     "config.steps.prepare.inputs.data.root='ref:distill.run_id': a cycle: "
     "distill -> prepare -> distill"),
    (["--config.steps.tokenizer.inputs.root=ref:params.corpse"],
     "config.steps.tokenizer.inputs.root='ref:params.corpse': config.params has no corpse"),
    (["--config.steps.pretrain.config.data.root=/elsewhere"],
     "config.steps.pretrain.config.data.root: filled by input "
     "config.steps.pretrain.inputs.data.root='ref:prepare.data_root'"),
    (["--config.steps.pretrain.config.optimizer.lr=-1"],
     "config.steps.pretrain.config.optimizer.lr=-1.0: must be > 0"),
    (["--force", "pretrian"], "--force pretrian: no such step in recipe gemini_recipe_tiny"),
])
def test_recipe_mistakes_name_the_key_path(tmp_path, corpus_root, capsys, extra, message):
    runs = tmp_path / "runs"
    code, _, err = gx_here(capsys, "run", *recipe_args(corpus_root), *extra, "--dry-run",
                           runs=runs)
    assert code == 2, err
    assert message in err and "Traceback" not in err, err
    assert not runs.exists()


def test_an_unset_corpus_is_named(tmp_path, capsys):
    code, _, err = gx_here(capsys, "run", RECIPE, "--dry-run", runs=tmp_path)
    assert code == 2
    assert "config.params.corpus='': must be set (used by config.steps.prepare.inputs.data.root)" \
        in err, err


# a process that holds the recipe's lock, as a running `gx run` does, until its stdin closes
HOLD = """import sys
from pathlib import Path
from gx.recipe.state import hold_lock
with hold_lock(Path(sys.argv[1]), sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()
"""


def hold(state_dir: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(state_dir), NAME], cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_second_run_of_the_same_recipe_is_refused_while_one_holds_its_lock(
        tmp_path, corpus_root, env):
    runs = tmp_path / "runs"
    state_dir = runs / "recipes" / NAME
    holder = hold(state_dir)
    try:
        proc = gx("run", *recipe_args(corpus_root), runs=runs, env=env)
    finally:
        holder.stdin.close()
        holder.wait()
        holder.stdout.close()
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"recipe {NAME}: already being run by pid {holder.pid} on {socket.gethostname()}" \
        in proc.stderr, proc.stderr
    assert f"({state_dir / '.lock'})" in proc.stderr and "Traceback" not in proc.stderr
    # refused before anything ran: no step queued, no data root, no run
    assert sorted(p.name for p in state_dir.iterdir()) == [".lock"]
    assert sorted(p.name for p in runs.iterdir()) == ["recipes"]
    # a holder that exits normally releases the lock: nothing is left to take over
    assert (state_dir / ".lock").read_text() == ""


def test_the_lock_of_a_killed_run_is_taken_over(recipe, corpus_root, env):
    runs = recipe["runs"]
    state_dir = runs / "recipes" / NAME
    before = states(runs)
    holder = hold(state_dir)
    holder.send_signal(signal.SIGKILL)  # dies holding the lock: its pid stays in the file
    holder.wait()
    holder.stdin.close()
    holder.stdout.close()
    assert json.loads((state_dir / ".lock").read_text())["pid"] == holder.pid

    proc = gx("run", *recipe_args(corpus_root), runs=runs, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"recipe {NAME}: taking over the lock of pid {holder.pid} on " \
        f"{socket.gethostname()}" in proc.stdout, proc.stdout
    assert "0 of 5 steps ran, all up to date" in proc.stdout
    assert states(runs) == before
    assert (state_dir / ".lock").read_text() == ""  # released when the run ended
