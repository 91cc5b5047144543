"""Downstream evaluation of real runs: `gx eval RUN --tasks`, `gx generate`, and the tasks of
`config.eval.downstream` inside training, on a tiny run trained once per module on
../shared/corpus.

The scorers' own truths (log-likelihood = the model's token NLL, cached decode = full forward,
HumanEval's canonical solutions in the sandbox, GSM8K's answer pattern) are in test_scoring,
test_generate, test_sandbox and test_tasks; here the checks are that the pieces are put together
right: each reported number recomputed by hand from the scorers, the files and their contract,
and what a user sees on a mistake."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_run import TINY  # pytest puts tests/ on sys.path (rootdir conftest)

from gemini_core.eval import downstream, metrics, scoring
from gemini_core.eval.loaded_run import load_run
from gemini_core.eval.settings import DownstreamConfig
from gemini_core.eval.task_examples import load_examples
from gemini_core.model.generate import SamplingConfig, generate
from gemini_core.runs.rundir import RunDir, iter_runs, read_json
from gx import cli

REPO = Path(__file__).resolve().parents[1]


def gx(*args: str, runs: Path, check: bool = True, extra: tuple[str, ...] = ()
       ) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "gx", "--runs-root", str(runs), *args, *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "offline"})
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def gx_here(capsys, *args: str, runs: Path) -> tuple[int, str]:
    """The CLI in this process (a mistake is found before any model loads): (exit code, stderr)."""
    capsys.readouterr()
    try:
        code = cli.main(["--runs-root", str(runs), *args])
    except SystemExit as e:  # argparse's own errors exit
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(eval_run) -> dict:
    """The session's tiny run (conftest.eval_run): piqa and lambada every 12 steps and at the
    end. Read only; tests that write use `run_copy`."""
    return eval_run


@pytest.fixture(scope="module")
def loaded(trained):
    return load_run(trained["run"], log=lambda _: None)


def model_of(loaded) -> downstream.Model:
    return downstream.Model(loaded.model, loaded.tokenizer, loaded.seq_len, loaded.layout)


def test_in_training_tasks_are_logged_at_their_cadence_and_at_the_end(trained):
    run: RunDir = trained["run"]
    rows = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    at = {r["step"]: r for r in rows if "downstream/piqa/acc" in r}
    assert sorted(at) == [12, 24], sorted(at)  # every 12 steps, the end included once
    for step, row in at.items():
        for key in ("downstream/piqa/acc", "downstream/piqa/acc_norm", "downstream/piqa/bpb",
                    "downstream/lambada/acc", "downstream/lambada/ppl", "downstream/lambada/bpb",
                    "downstream/piqa/acc_stderr", "downstream/mean/bpb"):
            assert math.isfinite(row[key]), (step, key)
        assert row["downstream/mean/bpb"] == pytest.approx(
            (row["downstream/piqa/bpb"] + row["downstream/lambada/bpb"]) / 2)
        assert 0 <= row["downstream/piqa/acc"] <= 1
    summary = run.summary()
    assert summary["downstream/piqa/acc"] == at[24]["downstream/piqa/acc"]
    saved = read_json(run.path / downstream.FILE)
    assert saved["step"] == 24 and set(saved["tasks"]) == {"piqa", "lambada"}
    assert saved["tasks"]["piqa"]["examples"] == 6
    assert saved["metrics"]["downstream/lambada/bpb"] == summary["downstream/lambada/bpb"]
    assert "downstream evaluation of 2 task(s)" in trained["printed"]


def test_every_reported_number_is_recomputed_from_the_scorers(trained, loaded):
    """The final in-training values, from the same checkpoint by hand: acc/acc_norm from each
    choice's summed NLL (acc_norm per character), bpb = NLL / ln 2 / UTF-8 bytes of the gold."""
    m = model_of(loaded)
    specs = downstream.task_specs("piqa,lambada")
    piqa, lambada = (load_examples(s, 6) for s in specs)
    liks = scoring.loglikelihood(m.model, m.tokenizer,
                                 [(ex.context, c) for ex in piqa for c in ex.choices],
                                 seq_len=m.seq_len)
    acc, acc_norm, bpb = [], [], []
    for i, ex in enumerate(piqa):
        nll = [liks[2 * i].nll, liks[2 * i + 1].nll]
        lengths = [len(c.lstrip(" ")) for c in ex.choices]  # lm-eval: characters, no delimiter
        acc.append(float(np.argmin(nll) == ex.gold_index))
        acc_norm.append(float(np.argmin(np.array(nll) / lengths) == ex.gold_index))
        gold = liks[2 * i + ex.gold_index]
        bpb.append(gold.nll / math.log(2) / len(ex.choices[ex.gold_index].encode()))
    summary = trained["run"].summary()
    assert summary["downstream/piqa/acc"] == pytest.approx(np.mean(acc), abs=1e-9)
    assert summary["downstream/piqa/acc_norm"] == pytest.approx(np.mean(acc_norm), abs=1e-9)
    assert summary["downstream/piqa/bpb"] == pytest.approx(np.mean(bpb), rel=1e-5)
    assert summary["downstream/piqa/bpb_stderr"] == pytest.approx(
        np.std(bpb, ddof=1) / math.sqrt(len(bpb)), rel=1e-4)
    word = scoring.loglikelihood(m.model, m.tokenizer, [(ex.context, ex.gold) for ex in lambada],
                                 seq_len=m.seq_len)
    assert summary["downstream/lambada/acc"] == pytest.approx(np.mean([w.greedy for w in word]))
    assert summary["downstream/lambada/ppl"] == pytest.approx(
        math.exp(np.mean([w.nll for w in word])), rel=1e-5)


def test_without_generation_a_generative_task_scores_the_same_gold_bpb_alone(loaded):
    """eval.downstream.generate=False (a sweep's proxies): gsm8k reports the bpb of its
    reference solutions, equal to the full evaluation's, and no exact match."""
    m = model_of(loaded)
    spec = downstream.task_specs("gsm8k", shots=0)[0]
    full = downstream.evaluate_task(m, spec, downstream.Settings(limit=4, max_new_tokens=8),
                                    log=lambda _: None)
    cheap = downstream.evaluate_task(m, spec, downstream.Settings(limit=4, generate=False),
                                     log=lambda _: None)
    assert list(full.metrics) == ["exact_match", "bpb"] and list(cheap.metrics) == ["bpb"]
    assert cheap.metrics["bpb"].value == pytest.approx(full.metrics["bpb"].value, rel=1e-6)


def test_gx_eval_tasks_prints_the_table_and_merges_downstream_json(run_copy):
    runs, run = run_copy["runs"], run_copy["run"]
    proc = gx("eval", run.run_id, "--tasks", "arc_easy,gsm8k", "--limit", "3", "--shots", "0",
              runs=runs)
    out = proc.stdout
    for word in ("task", "metric", "stderr", "examples", "seconds", "arc_easy", "acc_norm",
                 "gsm8k", "exact_match", "mean"):
        assert word in out, word
    saved = read_json(run.path / downstream.FILE)
    # the new tasks beside the ones training wrote (the same step)
    assert set(saved["tasks"]) == {"piqa", "lambada", "arc_easy", "gsm8k"}
    assert saved["tasks"]["gsm8k"]["num_fewshot"] == 0 and saved["tasks"]["gsm8k"]["examples"] == 3
    bpbs = [t["metrics"]["bpb"]["value"] for t in saved["tasks"].values()]
    assert saved["metrics"]["downstream/mean/bpb"] == pytest.approx(np.mean(bpbs))
    assert 0 <= saved["metrics"]["downstream/gsm8k/exact_match"] <= 1


def test_gx_eval_split_scores_one_half_under_the_task_at_split_name(run_copy):
    runs, run = run_copy["runs"], run_copy["run"]
    proc = gx("eval", run.run_id, "--tasks", "arc_easy", "--split", "heldout", "--limit", "3",
              "--shots", "0", runs=runs)
    assert "arc_easy@heldout" in proc.stdout
    saved = read_json(run.path / downstream.FILE)
    assert set(saved["tasks"]) == {"piqa", "lambada", "arc_easy@heldout"}
    assert saved["tasks"]["arc_easy@heldout"]["split"] == "heldout"
    assert saved["tasks"]["piqa"]["split"] == "all"  # the training's own, rewritten as it was
    assert "downstream/arc_easy@heldout/acc_norm" in saved["metrics"]
    bpbs = [t["metrics"]["bpb"]["value"] for t in saved["tasks"].values()]
    assert saved["metrics"]["downstream/mean/bpb"] == pytest.approx(np.mean(bpbs))


def test_a_done_run_asked_for_a_split_evaluates_it_as_tasks_it_lacks(run_copy):
    """The run's training scored piqa on every example; asked for piqa's heldout half, it does
    not reuse those figures but evaluates `piqa@heldout`, once."""
    run = run_copy["run"]
    dc = DownstreamConfig(tasks=("piqa",), split="heldout", limit=4)
    specs = downstream.configured_specs(dc)
    lines: list[str] = []
    summary = downstream.add_missing_tasks(run, dc, specs, 0, lines.append)
    assert "evaluating 1 downstream task(s) it lacks: piqa@heldout" in "\n".join(lines)
    assert {"downstream/piqa/bpb", "downstream/piqa@heldout/bpb"} <= set(summary)
    assert run.summary() == summary
    record = read_json(run.path / downstream.FILE)["tasks"]["piqa@heldout"]
    assert (record["split"], record["examples"]) == ("heldout", 4)
    again: list[str] = []
    assert downstream.add_missing_tasks(run, dc, specs, 0, again.append) == summary and not again


def test_a_failed_evaluation_leaves_downstream_json_as_it_was(run_copy, tmp_path):
    """The second task's data has a bad record: the first task is scored, then the error; the
    file keeps what it had (one line, exit 2, naming file:line)."""
    run = run_copy["run"]
    before = (run.path / downstream.FILE).read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"goal": "a", "sol1": "b", "sol2": "c", "label": 0}) + "\n"
                   + json.dumps({"goal": "a", "sol1": "b", "label": 1}) + "\n")
    tasks = tmp_path / "my_tasks.py"
    tasks.write_text("def get_tasks():\n"
                     f"    return {{'mine': dict(base='piqa', path={str(bad)!r})}}\n")
    proc = gx("eval", run.run_id, "--tasks", f"piqa,{tasks}", "--limit", "2",
              runs=run_copy["runs"], check=False)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and f"{bad}:2" in err[0] and "sol2" in err[0], err
    assert "Traceback" not in proc.stderr
    assert (run.path / downstream.FILE).read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["--tasks", "no_such_task"], "unknown task 'no_such_task' (known: arc_challenge"),
    (["--tasks", "piqa", "--limit", "-1"], "--limit=-1"),
    (["--tasks", "piqa", "--data", "x"], "not allowed with argument"),
    (["--tasks", "piqa", "--split", "valid.jsonl.gz"],
     "--split='valid.jsonl.gz': must be one of all, search, heldout"),
    (["--tasks", "needle", "--split", "heldout"], "--split picks a half of the downstream"),
])
def test_eval_mistakes_are_one_line_and_exit_2(trained, args, message, capsys):
    code, err = gx_here(capsys, "eval", trained["run"].run_id, *args, runs=trained["runs"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_asking_a_done_run_for_another_task_evaluates_it_without_training(trained, run_copy,
                                                                          data_cache,
                                                                          corpus_root):
    runs, run = run_copy["runs"], run_copy["run"]
    mtime = (run.checkpoints / "24").stat().st_mtime_ns
    more = [a.replace("('piqa','lambada')", "('piqa','lambada','arc_challenge')")
            for a in trained["args"]]
    proc = gx("run", "experiments/quickstart.py", runs=runs, extra=(
        *TINY, *more, f"--config.data.root={corpus_root}", f"--config.data.cache_dir={data_cache}"))
    assert "already done" in proc.stdout
    assert "evaluating 1 downstream task(s) it lacks: arc_challenge" in proc.stdout
    assert len(list(iter_runs(runs))) == 1  # the same run: evaluation is not its identity
    assert (run.checkpoints / "24").stat().st_mtime_ns == mtime
    summary = run.summary()
    assert {"downstream/arc_challenge/acc", "downstream/piqa/acc"} <= set(summary)
    assert read_json(run.path / downstream.FILE)["tasks"]["arc_challenge"]["examples"] == 6


def test_generate_streams_one_prompt_and_batches_a_file_with_the_same_greedy_text(trained,
                                                                                  loaded,
                                                                                  tmp_path):
    runs, run = trained["runs"], trained["run"]
    prompts = ["The capital of France is", "Question: What is 2 + 3?\nAnswer:", "def add(a, b):"]
    one = gx("generate", run.run_id, "--prompt", prompts[1], "--max-new-tokens", "12", runs=runs)
    file = tmp_path / "prompts.jsonl"
    file.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n"
                            for i, p in enumerate(prompts)))
    gx("generate", run.run_id, "--prompts", str(file), "--max-new-tokens", "12",
       "--batch-size", "2", runs=runs)
    rows = [json.loads(x) for x in (tmp_path / "prompts.completions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2]  # the prompts' own fields kept, in order
    assert one.stdout == rows[1]["completion"] + "\n"  # batched or alone: the same greedy text
    direct = generate(loaded.model, loaded.tokenizer, prompts, SamplingConfig(max_new_tokens=12),
                      max_len=loaded.seq_len)
    assert [r["completion"] for r in rows] == [c.text for c in direct]
    assert all(r["new_tokens"] <= 12 and r["finish_reason"] in ("length", "eos", "stop")
               for r in rows)


def test_generate_mistakes_name_the_file_line_or_flag(trained, tmp_path, capsys):
    runs, run = trained["runs"], trained["run"]
    file = tmp_path / "p.jsonl"
    file.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    code, err = gx_here(capsys, "generate", run.run_id, "--prompts", str(file), runs=runs)
    assert code == 2 and f"{file}:2: no string field 'prompt'" in err, err
    code, err = gx_here(capsys, "generate", run.run_id, "--prompt", "x", "--top-p", "0",
                        runs=runs)
    assert code == 2 and "top_p=0.0: must be in (0, 1]" in err and "Traceback" not in err


def test_code_tasks_run_their_samples_in_the_sandbox(loaded):
    """HumanEval through the whole path with 2 samples per problem at temperature 1: pass@k of
    counts the sandbox gave (a tiny model passes none; the canonical solutions pass in
    test_sandbox), and bpb of the canonical solution."""
    m = model_of(loaded)
    [spec] = downstream.task_specs("humaneval")
    import dataclasses
    spec = dataclasses.replace(spec, samples=2, pass_k=(1, 2), temperature=1.0, max_new_tokens=8)
    result = downstream.evaluate_task(m, spec, downstream.Settings(limit=2, batch_size=4))
    assert set(result.metrics) == {"pass@1", "pass@2", "bpb"}
    assert result.metrics["pass@1"].value == 0.0 and result.metrics["pass@1"].n == 2
    gold = scoring.loglikelihood(m.model, m.tokenizer,
                                 [(ex.context, ex.gold) for ex in load_examples(spec, 2)],
                                 seq_len=m.seq_len)
    assert result.metrics["bpb"].value == pytest.approx(
        np.mean([metrics.bits_per_byte(g.nll, g.bytes) for g in gold]), rel=1e-6)
