"""ReST^EM (gemini_core.selftrain): the procedural task, the verifier contract, the kept set, the
masked fine-tune, a whole job end to end with a real base run (reused when repeated), and the
Ray fan-out surviving a killed worker with the same samples."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from gemini_core.data import word_problems
from gemini_core.data.synthetic import SyntheticDomain, documents
from gemini_core.errors import UserError
from gemini_core.selftrain import loop, sampling
from gemini_core.selftrain.finetune import make_rows
from gx.cli import main as gx_main

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = str(REPO / "experiments" / "rest_em.py")
EQUATION = word_problems.EQUATION


def test_word_problems_are_seeded_and_their_solutions_add_up():
    first = [word_problems.problem(3, i) for i in range(200)]
    assert first == [word_problems.problem(3, i) for i in range(200)]  # a pure function
    assert first != [word_problems.problem(4, i) for i in range(200)]
    for p in first:
        steps = EQUATION.findall(p.solution)
        assert len(steps) == p.steps
        x = int(re.search(r"has (\d+)", p.question).group(1))
        for a, op, b, c in steps:  # each step starts from the last result and is right
            assert int(a) == x
            x = {"+": int(a) + int(b), "-": int(a) - int(b), "x": int(a) * int(b)}[op]
            assert x == int(c) and 0 <= x <= word_problems.MAX_VALUE
        assert p.answer == str(x) and p.solution.endswith(f"The answer is {x}.")
        assert "\n" not in p.solution  # generation stops at the newline
    hard = [word_problems.problem(0, i, min_steps=3, max_steps=3, ops="+") for i in range(50)]
    assert all(p.steps == 3 and "-" not in p.solution for p in hard)


def test_check_work_rejects_a_lucky_answer():
    p = word_problems.problem(5, 0, min_steps=2, max_steps=2)
    record = p.record(0)
    assert word_problems.check_work(record, " " + p.solution)
    a, op, b, c = EQUATION.findall(p.solution)[0]
    wrong = p.solution.replace(f"{a} {op} {b} = {c}", f"{a} {op} {b} = {int(c) + 1}", 1)
    assert wrong != p.solution and not word_problems.check_work(record, wrong)  # answer kept
    assert not word_problems.check_work(record, f"The answer is {p.answer}.")  # no work shown
    assert not word_problems.check_work(record, p.solution.replace(
        f"The answer is {p.answer}", f"The answer is {int(p.answer) + 1}"))


def test_word_problem_domain_and_range_errors():
    spec = SyntheticDomain(kind="word_problems", train_documents=5, valid_documents=2, seed=9)
    docs = list(documents(spec, "train"))
    assert len(docs) == 5 and all(d.startswith("Question: ") and "\nAnswer: " in d for d in docs)
    assert docs[0] == word_problems.document(word_problems.problem(9, 0))
    for bad, field in ((dict(min_steps=0), "min_steps"), (dict(max_operand=1), "max_operand"),
                       (dict(ops="+/"), "ops")):
        with pytest.raises(UserError, match=rf"config\.data\.synthetic\.w\.{field}"):
            SyntheticDomain(kind="word_problems", **bad).check("config.data.synthetic.w")


def test_keep_caps_correct_samples_per_problem_and_drops_duplicates():
    S = sampling.Sample
    samples = [S(0, " a", True), S(0, "a ", True), S(0, " b", False), S(0, " c", True),
               S(0, " d", True), S(1, " x", False), S(2, " y", True)]
    assert loop.keep(samples, 2) == [(0, " a"), (0, " c"), (2, " y")]
    c = loop.counts(samples, loop.keep(samples, 2), 3)
    assert c["correct"] == 5 and c["kept"] == 3 and c["solved"] == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, corpus_root, data_cache):
    """A tiny base pretrained with the word-problem domain (a real gx run)."""
    root = tmp_path_factory.mktemp("selftrain_runs")
    assert gx_main(["--runs-root", str(root), "run", f"{EXPERIMENT}:role=base,size=tiny",
                    f"--config.data.root={corpus_root}",
                    f"--config.data.cache_dir={data_cache}"]) == 0
    return root


def test_rows_mask_exactly_the_solution_and_its_eos(tiny_base):
    from gemini_core.eval.loaded_run import load_run
    from gemini_core.runs.rundir import find_run
    loaded = load_run(find_run(tiny_base, "rest_em_base_tiny"), log=lambda _: None)
    tok = loaded.tokenizer
    pairs = [("Question: Mia has 2 cards.\nAnswer:", " The answer is 2."),
             ("Q" * 400 + "\nAnswer:", " The answer is 5.")]  # longer than the context
    rows = make_rows(tok, pairs, seq_len=64)
    assert rows.tokens_NxT1.shape == (2, 65) and rows.mask_NxT.shape == (2, 64)
    for i, (_, solution) in enumerate(pairs):
        targets = rows.tokens_NxT1[i, 1:][rows.mask_NxT[i] > 0].tolist()
        assert targets[-1] == tok.eos_id
        assert tok.decode(targets[:-1]).strip() == solution.strip()
        assert rows.mask_NxT[i].sum() == len(targets)  # nothing of the prompt


def _verifier(tmp_path: Path) -> str:
    """A verifier a tiny model passes sometimes (a digit anywhere), that raises on some."""
    path = tmp_path / "digit_verifier.py"
    path.write_text("def check(record, completion):\n"
                    "    if completion.count('1') > 2:\n"
                    "        raise ValueError('too many ones')\n"
                    "    return any(ch.isdigit() for ch in completion)\n")
    return f"{path}:check"


TINY = ["--config.problems.train=8", "--config.problems.valid=4", "--config.problems.test=4",
        "--config.sample.samples=2", "--config.sample.shard_problems=4",
        "--config.sample.batch_size=8", "--config.held_out.samples=2",
        "--config.held_out.pass_k=[1,2]", "--config.finetune.steps=4",
        "--config.finetune.eval_every=2"]


def test_rest_em_job_end_to_end_and_reused(tiny_base, tmp_path, capsys):
    args = ["--runs-root", str(tiny_base), "run", f"{EXPERIMENT}:size=tiny",
            "--config.base=rest_em_base_tiny", f"--config.verifier={_verifier(tmp_path)}", *TINY]
    assert gx_main(args) == 0
    first = capsys.readouterr().out
    (job,) = (tiny_base / "rest_em_tiny").iterdir()
    report = json.loads((job / "report.json").read_text())
    assert [r["policy"] for r in report["rows"]] == ["base", "sft", "rest_em 1"]
    for row in report["rows"]:
        assert set(row["held_out"]) == {"greedy", "pass@1", "pass@2", "bpb"}
        assert 0 <= row["held_out"]["pass@1"]["value"] <= row["held_out"]["pass@2"]["value"] <= 1
    e = report["rows"][2]["estep"]
    assert e["samples"] == 16 and 0 < e["kept"] <= min(e["correct"], 8 * 2)
    (estep,) = (tiny_base / "rest_em_tiny_estep").iterdir()
    kept = [json.loads(x) for x in (estep / "kept.jsonl").read_text().splitlines()]
    assert len(kept) == e["kept"]
    shards = [json.loads(x) for f in sorted((estep / "shards").iterdir())
              for x in f.read_text().splitlines()]
    assert len(shards) == 16 and all(s["correct"] == any(c.isdigit() for c in s["completion"])
                                     or s["error"] for s in shards)
    assert all(not s["correct"] for s in shards if s["error"])  # a raising verifier rejects
    # the M-step is a run like any: loadable, its checkpoint the best on valid
    from gemini_core.eval.loaded_run import load_run
    from gemini_core.runs.rundir import find_run
    mstep = find_run(tiny_base, report["rows"][2]["run_id"])
    assert load_run(mstep, log=lambda _: None).step == mstep.summary()["best_step"]
    assert (job / "pass_at_k.png").stat().st_size > 0 and "| rest_em 1 |" in (
        job / "report.md").read_text()
    # gx show / gx compare read the job, the E-step and the M-step like any run
    for target, shown in ((job.name, "| rest_em 1 |"), (estep.name, "kept = "),
                          (mstep.run_id, "best_step = ")):
        assert gx_main(["--runs-root", str(tiny_base), "show", target]) == 0
        assert shown in capsys.readouterr().out
    assert gx_main(["--runs-root", str(tiny_base), "compare", job.name]) == 0
    assert "| sft |" in capsys.readouterr().out
    # the same command again: everything reused, the same report
    assert gx_main(args) == 0
    again = capsys.readouterr().out
    assert "done, reused" in again and "shard 1/" not in again and "fine-tuning" not in again
    assert json.loads((job / "report.json").read_text()) == report
    # an interrupted job (no report yet) finds each E-step, M-step and evaluation done
    (job / "status.json").unlink()
    assert gx_main(args) == 0
    resumed = capsys.readouterr().out
    assert "E-step rest_em_tiny_estep-" in resumed and resumed.count("done, reused") == 3
    assert "shard 1/" not in resumed and "held-out evaluation of" not in resumed
    assert json.loads((job / "report.json").read_text()) == report
    assert "shard 1/" in first and "held-out evaluation of" in first


@pytest.mark.parametrize("override, message", [
    ("--config.sample.keep=9",
     r"config\.sample\.keep=9: must be in \[1, config\.sample\.samples=4\]"),
    ("--config.sample.samples=0", r"config\.sample\.samples=0: must be >= 1"),
    ("--config.base=nope", r"nope: no such run"),
    ("--config.verifier=nowhere.py:f", r"config\.verifier='nowhere\.py:f': nowhere\.py not found"),
    ("--config.task=piqa --config.verifier=", r"a multiple_choice task has no verifier"),
    ("--config.verifier=gemini_core.data.word_problems:nope",
     r"gemini_core\.data\.word_problems defines no function nope"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_base, override, message, capsys):
    code = gx_main(["--runs-root", str(tiny_base), "run", f"{EXPERIMENT}:size=tiny",
                    "--config.base=rest_em_base_tiny", *override.split()])
    err = capsys.readouterr().err
    assert code == 2 and re.search(message, err), err
    assert len(err.strip().splitlines()) == 1


def test_base_without_checkpoint_is_refused(tiny_base, tmp_path, capsys):
    from gemini_core.runs.rundir import RunDir
    empty = RunDir(tiny_base, "no_ckpt", "no_ckpt-00000000")
    empty.write_config({"name": "no_ckpt"})
    assert gx_main(["--runs-root", str(tiny_base), "run", f"{EXPERIMENT}:size=tiny",
                    f"--config.base={empty.path}"]) == 2
    assert "has no checkpoint" in capsys.readouterr().err


def _ray_job(root: Path, tmp_path: Path, name: str) -> subprocess.Popen:
    # a short folder: Ray's unix socket paths must fit in 107 bytes
    temp = tempfile.mkdtemp(prefix="gxr")
    env = dict(os.environ, WANDB_MODE="disabled", GX_RAY_TEMP_DIR=temp)
    job = subprocess.Popen(
        [sys.executable, "-m", "gx", "--runs-root", str(root), "run", f"{EXPERIMENT}:size=tiny",
         "--config.base=rest_em_base_tiny", f"--config.name={name}",
         f"--config.verifier={_verifier(tmp_path)}", "--config.sft_baseline=False", *TINY,
         "--config.problems.train=24", "--config.sample.shard_problems=2",
         "--config.sample.workers=2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    job.args_temp = temp
    return job


def _kept(root: Path, name: str) -> list:
    (estep,) = (root / f"{name}_estep").iterdir()
    return (estep / "kept.jsonl").read_text().splitlines()


def _ray_workers(job: subprocess.Popen) -> list[int]:
    """The sampling actors of `job`'s own Ray (its GX_RAY_TEMP_DIR is in their environment)."""
    out = subprocess.run(["pgrep", "-f", "ray::Worker"], capture_output=True, text=True).stdout
    mine = f"GX_RAY_TEMP_DIR={job.args_temp}".encode()
    pids = []
    for pid in map(int, out.split()):
        try:
            if mine in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                pids.append(pid)
        except OSError:  # gone meanwhile
            continue
    return pids


def test_a_killed_ray_worker_changes_no_sample(tiny_base, tmp_path):
    clean = _ray_job(tiny_base, tmp_path, "ray_clean")
    out, _ = clean.communicate(timeout=600)
    assert clean.returncode == 0, out
    job = _ray_job(tiny_base, tmp_path, "ray_killed")
    shards = None
    deadline = time.time() + 300
    while time.time() < deadline and not shards:  # the E-step's first shard is written
        shards = list((tiny_base / "ray_killed_estep").glob("*/shards/*.jsonl"))
        time.sleep(0.2)
    victims = _ray_workers(job)
    assert shards and victims
    os.kill(victims[0], signal.SIGKILL)
    status = json.loads((shards[0].parent.parent / "status.json").read_text())
    assert status["state"] == "running"  # killed mid-E-step: its other shards are still to come
    out, _ = job.communicate(timeout=600)
    assert job.returncode == 0, out
    assert _kept(tiny_base, "ray_killed") == _kept(tiny_base, "ray_clean")
    # a shard lost (a command killed before writing it) is the only one sampled again
    (estep,) = (tiny_base / "ray_killed_estep").iterdir()
    (estep / "shards" / "00003.jsonl").unlink()
    (estep / "status.json").unlink()
    (job_dir,) = (tiny_base / "ray_killed").iterdir()
    (job_dir / "status.json").unlink()
    again = _ray_job(tiny_base, tmp_path, "ray_killed")
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    assert "11 of 12 shards already sampled" in out and "shard 1/1:" in out
    assert _kept(tiny_base, "ray_killed") == _kept(tiny_base, "ray_clean")
