"""The needle evaluation (`gx eval RUN --tasks needle`) on the session's tiny trained run
(conftest.eval_run, trained at 512 tokens): the passkey prompt's construction, the grid's
numbers recomputed from the model's own logits, the files it writes, and the flags' mistakes.

The tiny run retrieves no key (its accuracy is 0 everywhere), so the checks that the accuracy
is real go through a control: a continuation that is the model's own argmax must count as
retrieved, and the key's NLL must be the one the model gives with the whole prompt before it."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from gemini_core.data import synthetic
from gemini_core.data.tokenizer import document_ids
from gemini_core.errors import UserError
from gemini_core.eval import needle, scoring
from gemini_core.eval.loaded_run import load_run
from gemini_core.runs.rundir import iter_runs, read_json
from gx import cli

LENGTHS, DEPTHS, PER_CELL = (256, 512), (0.0, 1.0), 2
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def loaded(eval_run):
    return load_run(eval_run["run"], log=lambda _: None)


def gx_here(capsys, *args: str, runs: Path) -> tuple[int, str, str]:
    """The CLI in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = cli.main(["--runs-root", str(runs), *args])
    except SystemExit as e:  # argparse's own errors exit
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def direct(model, tokenizer, prompt: str, cont: str) -> tuple[float, bool]:
    """(summed NLL of cont after prompt, whether every cont token is the argmax), by one full
    forward over the whole row: no scorer, no windows, no buckets."""
    ids, n = scoring.continuation_split(tokenizer, prompt, cont)
    tokens_1xL = jnp.asarray([ids[:-1]], jnp.int32)
    logits_LxV = np.asarray(model(tokens_1xL)[0], np.float64)
    logp_LxV = logits_LxV - np.log(np.exp(logits_LxV - logits_LxV.max(-1, keepdims=True)).sum(
        -1, keepdims=True)) - logits_LxV.max(-1, keepdims=True)
    targets = np.asarray(ids[1:])
    nll = -logp_LxV[np.arange(len(targets)), targets][-n:].sum()
    return float(nll), bool((logits_LxV.argmax(-1)[-n:] == targets[-n:]).all())


# ---------------------------------------------------------------------------------------------
# the prompt


def test_passkey_prompt_fills_its_length_and_places_the_needle(loaded):
    tok = loaded.tokenizer
    sentence = max(len(tok.encode(" " + s)) for s in synthetic.FILLER)  # one more sentence's cost
    for n_tokens in (200, 300, 512, 1500):
        for depth in (0.0, 0.3, 1.0):
            prompt = needle.passkey_prompt(tok, n_tokens, depth, 48213)
            used = needle.row_tokens(tok, prompt, 48213)
            assert n_tokens - sentence < used <= n_tokens, (n_tokens, depth, used)
            assert prompt.startswith(synthetic.INTRO) and prompt.endswith(synthetic.QUESTION)
    key, needle_text = 31337, synthetic.NEEDLE.format(key=31337)
    first = needle.passkey_prompt(tok, 512, 0.0, key)
    last = needle.passkey_prompt(tok, 512, 1.0, key)
    middle = needle.passkey_prompt(tok, 512, 0.5, key)
    before, after = first.split(needle_text)
    assert before == f"{synthetic.INTRO} " and after.startswith(f" {synthetic.FILLER[0]}")
    before, after = last.split(needle_text)
    assert after == f" {synthetic.QUESTION}" and before.endswith(tuple(f"{s} " for s in synthetic.FILLER))
    assert len(before) > len(synthetic.INTRO) + 500  # all the filler is before it
    at = middle.index(needle_text) / len(middle)
    assert 0.4 < at < 0.6, at
    assert all(p.count(needle_text) == 1 and p.count(str(key)) == 2
               for p in (first, last, middle))
    with pytest.raises(UserError, match="passkey prompt needs at least"):
        needle.passkey_prompt(tok, 64, 0.5, key)


def test_keys_are_seeded_by_the_cell():
    a = needle.cell_keys(0, 512, 0.5, 10)
    assert a == needle.cell_keys(0, 512, 0.5, 10)  # reproducible
    assert needle.cell_keys(0, 512, 0.5, 4) == a[:4]  # fewer per cell: a prefix
    others = [needle.cell_keys(0, 512, 0.25, 10), needle.cell_keys(0, 1024, 0.5, 10),
              needle.cell_keys(1, 512, 0.5, 10)]
    assert all(o != a for o in others)
    assert all(10_000 <= k < 100_000 for keys in [a, *others] for k in keys)
    assert len(set(a)) > 1


# ---------------------------------------------------------------------------------------------
# the grid's numbers


def test_grid_accuracy_and_bpb_are_the_models_own_on_the_whole_prompt(loaded):
    tok, model = loaded.tokenizer, loaded.model
    grid = needle.needle_grid(model, tok, lengths=[256], depths=DEPTHS, per_cell=PER_CELL,
                              seed=3, batch_size=4, log=lambda _: None)
    assert [(c["length"], c["depth"], c["n"]) for c in grid["cells"]] == [
        (256, 0.0, PER_CELL), (256, 1.0, PER_CELL)]
    for cell in grid["cells"]:
        assert cell["keys"] == needle.cell_keys(3, 256, cell["depth"], PER_CELL)
        requests = needle.cell_requests(tok, 256, cell["depth"], cell["keys"])
        by_hand = [direct(model, tok, p, a) for p, a in requests]
        assert cell["greedy"] == [g for _, g in by_hand]
        assert cell["accuracy"] == np.mean(cell["greedy"])
        bpb = np.mean([nll / math.log(2) / len(a) for (nll, _), (_, a) in zip(by_hand, requests)])
        assert cell["bpb"] == pytest.approx(bpb, rel=1e-4)

    # the key's NLL is read with the prompt before it: with another key in the needle, or with
    # a bare "x" before the answer, the same answer scores differently
    prompt, ans = needle.cell_requests(tok, 256, 0.0, [48213])[0]
    other = prompt.replace("48213", "77777")
    with_key = scoring.loglikelihood(model, tok, [(prompt, ans), (other, ans), ("x", ans)],
                                     seq_len=256)
    assert with_key[0].nll == pytest.approx(direct(model, tok, prompt, ans)[0], rel=1e-4)
    assert abs(with_key[0].nll - with_key[1].nll) > 1e-3
    assert abs(with_key[0].nll - with_key[2].nll) > 1e-3


def test_a_continuation_that_is_the_models_argmax_counts_as_retrieved(loaded):
    """The control for an accuracy that could be 0 by construction: the model's own greedy
    continuation of a passkey prompt is `greedy`, the true key (which this tiny model does not
    recall) is not, and the direct forward agrees on both."""
    tok, model = loaded.tokenizer, loaded.model
    prompt = needle.passkey_prompt(tok, 256, 0.5, 48213)
    ids = document_ids(tok, prompt)
    gen: list[int] = []
    for _ in range(3):
        logits_1xLxV = model(jnp.asarray([ids + gen], jnp.int32))
        gen.append(int(jnp.argmax(logits_1xLxV[0, -1])))
    own = tok.decode(gen)
    assert document_ids(tok, prompt + own) == ids + gen  # the same tokens when scored
    liks = scoring.loglikelihood(model, tok, [(prompt, own), (prompt, " 48213")], seq_len=256)
    assert liks[0].greedy and liks[0].tokens == 3
    assert liks[1].greedy == direct(model, tok, prompt, " 48213")[1]
    assert [x.truncated for x in liks] == [0, 0]


# ---------------------------------------------------------------------------------------------
# the files and the command


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > 5_000


def test_evaluate_needle_writes_the_json_and_two_pngs(run_copy, loaded, monkeypatch):
    run, lines = run_copy["run"], []
    monkeypatch.setenv("WANDB_MODE", "offline")
    content = needle.evaluate_needle(run, lengths=LENGTHS, depths=DEPTHS, per_cell=PER_CELL,
                                     batch_size=4, wandb=True, log=lines.append)
    saved = read_json(run.path / needle.FILE)
    assert saved == json.loads(json.dumps(content))
    assert saved["step"] == loaded.step and saved["seq_len"] == 512
    assert [(c["length"], c["depth"], c["n"]) for c in saved["cells"]] == [
        (n, d, PER_CELL) for n in LENGTHS for d in DEPTHS]
    for cell in saved["cells"]:
        assert cell["accuracy"] == np.mean(cell["greedy"]) and cell["bpb"] > 0
    curve = saved["position_nll"]
    assert curve["length"] == 512 and 1 <= curve["documents"] <= 8 and curve["domain"] == "books"
    # the quarters' mean is the running mean at the last position (512 splits in 4 equal parts)
    assert np.mean(curve["quarters"]) == pytest.approx(curve["cumulative_final"], rel=1e-6)
    assert all(0 < q < math.log(384) + 1 for q in curve["quarters"])
    assert _is_png(run.path / needle.HEATMAP) and _is_png(run.path / needle.POSITION_PLOT)
    printed = "\n".join(lines)
    assert "depth \\ length" in printed and str(run.path / needle.FILE) in printed
    assert sum("needle: " in x and " cells, " in x for x in lines) == len(LENGTHS)  # progress
    # the run's W&B summary, read back from the offline run on disk: the accuracies and both
    # plots, whose files are the PNGs written beside needle.json
    from gemini_core.runs import wandb_offline
    [session] = wandb_offline.session_logs(run.path)
    summary, files = {}, []
    for record in wandb_offline.inspect_records(session):
        if record.get("type") == "summary":
            summary.update(record["summary"].get("update", {}))
    accuracy = [c["accuracy"] for c in saved["cells"]]
    assert summary["needle/acc"] == pytest.approx(np.mean(accuracy))
    for n in LENGTHS:
        assert summary[f"needle/acc/{n}"] == pytest.approx(
            np.mean([c["accuracy"] for c in saved["cells"] if c["length"] == n]))
    for name, png in (("needle/heatmap", needle.HEATMAP),
                      ("needle/position_nll", needle.POSITION_PLOT)):
        image = summary[name]
        assert image["_type"] == "image-file", image
        files = list(session.parent.glob(f"files/{image['path']}"))
        assert len(files) == 1 and files[0].read_bytes() == (run.path / png).read_bytes()
    assert any(x.startswith("W&B: needle/acc") for x in lines)


def test_gx_eval_tasks_needle_prints_the_table(run_copy, capsys):
    runs, run = run_copy["runs"], run_copy["run"]
    code, out, err = gx_here(capsys, "eval", run.run_id, "--tasks", "needle", "--needle-lengths",
                             "256", "--needle-depths", "0.5", "--limit", "1", runs=runs)
    assert code == 0, err
    assert "passkey accuracy" in out and "depth \\ length" in out and "0.50" in out
    saved = read_json(run.path / needle.FILE)
    assert [(c["length"], c["depth"], c["n"]) for c in saved["cells"]] == [(256, 0.5, 1)]
    assert saved["position_nll"]["length"] == 256


@pytest.fixture
def no_checkpoint(eval_run, tmp_path) -> dict:
    """The run without its checkpoints: a mistake caught before loading is still reported as
    itself, not as the missing checkpoint."""
    runs = tmp_path / "runs"
    shutil.copytree(eval_run["runs"], runs, symlinks=True,
                    ignore=shutil.ignore_patterns("checkpoints"))
    [run] = list(iter_runs(runs))
    return {"runs": runs, "run": run}


@pytest.mark.parametrize("args, message", [
    (["--tasks", "needle", "--needle-lengths", "256,abc"],
     "--needle-lengths=256,abc: 'abc' is not a whole number"),
    (["--tasks", "needle", "--needle-lengths", "0,256"], "--needle-lengths=0,256: every length"),
    (["--tasks", "needle", "--needle-lengths", "256.5"], "'256.5' is not a whole number"),
    (["--tasks", "needle", "--needle-lengths", "64,512"],
     "--needle-lengths=64,512: 64 tokens is shorter than the passkey prompt"),
    (["--tasks", "needle", "--needle-depths", "0,1.5"], "--needle-depths=0,1.5: every depth"),
    (["--tasks", "needle", "--needle-depths", "half"], "--needle-depths=half: 'half' is not"),
    (["--tasks", "needle", "--needle-depths", "0.5,0.5"], "0.5 is given twice"),
    (["--tasks", "needle", "--limit", "0"], "--limit=0: needle needs at least 1"),
    (["--tasks", "needle", "--batch-size", "0"], "--batch-size=0"),
    (["--tasks", "piqa", "--needle-lengths", "256"], "need `--tasks needle`"),
    (["--tasks", "needle,piqaa"], "unknown task 'piqaa'"),
])
def test_needle_mistakes_are_one_line_and_exit_2_before_loading(no_checkpoint, args, message,
                                                                capsys):
    code, _, err = gx_here(capsys, "eval", no_checkpoint["run"].run_id, *args,
                           runs=no_checkpoint["runs"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_without_a_checkpoint_good_flags_reach_the_loading(no_checkpoint, capsys):
    """The control of the test above: its copy really has nothing to load."""
    code, _, err = gx_here(capsys, "eval", no_checkpoint["run"].run_id, "--tasks", "needle",
                           "--needle-lengths", "256", runs=no_checkpoint["runs"])
    assert code == 2 and "no checkpoint yet" in err, err


def test_position_curve_takes_long_documents_only_and_none_without_one(loaded):
    tok, model = loaded.tokenizer, loaded.model
    long_text = " ".join(synthetic.FILLER) * 40
    assert needle.position_nll(model, tok, ["too short", "also short"], 256) is None
    rows = needle.long_rows(tok, ["too short", long_text, long_text], 256, documents=1)
    assert rows.shape == (1, 257) and rows[0, 0] == tok.eos_id  # a document start, one kept
    curve = needle.position_nll(model, tok, ["too short", long_text], 256)
    assert curve["documents"] == 1 and curve["mean_nll"].shape == (256,)
    nll_by_hand = np.asarray(model.token_nll(jnp.asarray(rows[:, :-1]), jnp.asarray(rows[:, 1:])))
    np.testing.assert_allclose(curve["mean_nll"], nll_by_hand[0], rtol=1e-5)
    np.testing.assert_allclose(curve["cumulative"][-1], nll_by_hand[0].mean(), rtol=1e-5)
