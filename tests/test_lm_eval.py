"""The lm-evaluation-harness adapter (model "gx") on a tiny real run: PIQA parity with `gx eval`,
generation equal to gx's, rolling scores, model_args and generation kwargs."""

from __future__ import annotations

from pathlib import Path

import pytest

lm_eval = pytest.importorskip(
    "lm_eval", reason="lm-evaluation-harness is not installed: pip install -e '.[lmeval]' "
    "(the test extra and CI install it)")

from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager

from gemini_core.errors import UserError
from gemini_core.eval import downstream, lm_eval_adapter, task_examples
from gemini_core.eval.lm_eval_adapter import GxLM, parse_batch_size, sampling_of
from gemini_core.model import generate as gen
from gemini_core.runs.rundir import RunDir

# piqa_local: PIQA read in place from ../shared
TASKS_DIR = Path(__file__).parent / "data" / "lm_eval"
# the session's eval_run (conftest) has a 512-token window: the longest of the 50 PIQA
# questions `gx eval --limit 50` picks is 253 tokens of TINY's 384-piece tokenizer (and no
# context is cut: at most 291 tokens), so every continuation fits one window
N = 50


@pytest.fixture(scope="module")
def run(eval_run) -> RunDir:
    return eval_run["run"]


@pytest.fixture(scope="module")
def lm(run) -> GxLM:
    # as lm_eval builds it: model_args, plus its own --batch_size (default 1) and --device
    return get_model("gx").create_from_arg_string(
        f"run={run.run_id},runs_root={run.path.parent.parent},batch_size=32",
        {"batch_size": 1, "max_batch_size": None, "device": "cpu"})


def test_importing_the_adapter_registers_gx_and_model_args_build_it(lm, run):
    assert get_model("gx") is GxLM and get_model("dummy").__name__ == "DummyLM"
    assert lm.loaded.run.path == run.path and lm.loaded.step == 24
    assert lm.score_batch == 32  # model_args win over lm_eval's --batch_size default
    assert lm.max_length == 512
    assert lm.get_model_info()["gx_run"] == run.run_id


def test_piqa_acc_and_acc_norm_equal_gx_eval_exactly(lm, run):
    # what `gx eval RUN --tasks piqa --limit 50` computes (without writing into the shared run)
    m = downstream.Model(lm.loaded.model, lm.loaded.tokenizer, lm.loaded.seq_len,
                         lm.loaded.layout)
    gx_eval = downstream.evaluate_tasks(m, downstream.task_specs("piqa"),
                                        downstream.Settings(limit=N), log=lambda _: None)[0]
    # gx eval's --limit takes a seeded subset: lm_eval evaluates the same records
    examples = task_examples.load_examples(downstream.task_specs("piqa")[0], N)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=["piqa_local"], samples={"piqa_local": [ex.index for ex in examples]},
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
        log_samples=True)
    got = out["results"]["piqa_local"]
    assert gx_eval.examples == N and len(out["samples"]["piqa_local"]) == N
    assert got["acc,none"] == gx_eval.metrics["acc"].value
    assert got["acc_norm,none"] == gx_eval.metrics["acc_norm"].value
    assert got["acc_stderr,none"] == pytest.approx(gx_eval.metrics["acc"].stderr, rel=1e-12)
    # why they agree: lm_eval asked exactly the (context, continuation) pairs gx scores
    asked = {s["doc_id"]: [tuple(a) for a in s["arguments"]] for s in out["samples"]["piqa_local"]}
    assert asked == {ex.index: [(ex.context, c) for c in ex.choices] for ex in examples}
    assert out["config"]["gx_run"] == run.run_id


def test_generate_until_is_gx_greedy_generation(lm):
    prompts = ["Question: How do you boil an egg?\nAnswer:", "The history of the city"]
    until = [["\n"], []]  # two groups of requests: one per generation setting
    texts = lm.generate_until([
        Instance("generate_until", {}, (p, {"until": u, "max_gen_toks": 8}), i)
        for i, (p, u) in enumerate(zip(prompts, until))])
    want = [gen.generate(lm.model, lm.tokenizer, [p],
                         gen.SamplingConfig(max_new_tokens=8, stop=tuple(u)),
                         batch_size=lm.generate_batch, max_len=lm.max_length,
                         log=lambda _: None)[0]
            for p, u in zip(prompts, until)]
    assert texts == [c.text for c in want]
    assert "\n" not in texts[0] and len(want[1].tokens) == 8 and texts[1]


def test_rolling_loglikelihood_is_the_whole_text_scored_from_a_document_start(lm):
    text = "A short text, which fits one window."
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ((whole, _),) = lm.loglikelihood([Instance("loglikelihood", {}, ("", text), 0)])
    assert rolling < 0 and rolling == pytest.approx(whole, rel=1e-6)


def test_generation_kwargs_map_to_gx_sampling():
    assert sampling_of({"until": "\n\n", "max_gen_toks": 5}) == gen.SamplingConfig(
        max_new_tokens=5, stop=("\n\n",))
    assert sampling_of({}) == gen.SamplingConfig(max_new_tokens=256)  # lm_eval's default
    # lm_eval's rule: temperature without do_sample is greedy only when it is 0
    assert sampling_of({"do_sample": False, "temperature": 0.7}).temperature == 0.0
    assert sampling_of({"temperature": 0.7, "top_p": 0.9, "seed": 3}) == gen.SamplingConfig(
        max_new_tokens=256, temperature=0.7, top_p=0.9, seed=3)
    with pytest.raises(UserError, match="num_beams: not supported by model gx"):
        sampling_of({"num_beams": 4})
    with pytest.raises(UserError, match="top_p=1.5"):
        sampling_of({"do_sample": True, "temperature": 1.0, "top_p": 1.5})


def test_batch_size_and_cli_defaults():
    assert parse_batch_size(None) is None and parse_batch_size("auto:4") is None
    assert parse_batch_size("8") == 8
    with pytest.raises(UserError, match="batch_size='0'"):
        parse_batch_size("0")
    assert lm_eval_adapter.with_default_batch(["--model", "gx"])[-2:] == ["--batch_size", "auto"]
    assert lm_eval_adapter.with_default_batch(["--batch_size=4"]) == ["--batch_size=4"]
    assert lm_eval_adapter.with_default_batch(["ls", "tasks"]) == ["ls", "tasks"]


def test_bad_model_args_are_one_line_user_errors(tmp_path, run):
    with pytest.raises(UserError, match="nope: no such run under"):
        GxLM.create_from_arg_string(f"run=nope,runs_root={tmp_path}")
    with pytest.raises(UserError, match="pretrained: unknown for model gx"):
        GxLM.create_from_arg_string(f"run={run.path},pretrained=gpt2")
    with pytest.raises(UserError, match="model gx needs a run"):
        GxLM.create_from_arg_string("")


def test_main_runs_lm_evals_command_line(capsys):
    assert lm_eval_adapter.main(["run", "--help"]) == 0
    assert "--model_args" in capsys.readouterr().out
    assert lm_eval_adapter.main(["run", "--no-such-flag", "x"]) == 2  # argparse's usage error
    # what lm_eval rejects is the user's mistake: one line, exit 2 (not gx's internal error)
    with pytest.raises(UserError, match="^lm-eval: If --samples is not None, then --limit must"):
        lm_eval_adapter.main(["run", "--model", "gx", "--tasks", "piqa_local", "--limit", "1",
                              "--samples", '{"piqa_local": [0]}'])
