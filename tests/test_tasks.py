"""Downstream tasks as data (gemini_core.eval.tasks, task_examples, task_library) and the metric
arithmetic (gemini_core.eval.metrics), on the real benchmark files in ../shared/benchmarks."""

import gzip
import itertools
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import ml_collections
import pytest

from gemini_core.errors import UserError
from gemini_core.eval import downstream, metrics, task_library, tasks
from gemini_core.eval.settings import DownstreamConfig
from gemini_core.eval.task_examples import load_examples
from gemini_core.experiment import load_experiment

BENCH = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
QUICKSTART = str(Path(__file__).resolve().parents[1] / "experiments" / "quickstart.py")

# SOURCES.md and the READMEs: records each shipped task scores
COUNTS = {"gsm8k": 1319, "humaneval": 164, "mbpp": 500, "arc_easy": 2376, "arc_challenge": 1172,
          "piqa": 1838, "lambada": 5153, "xcopa": 5500,
          **{f"xcopa_{lang}": 500 for lang in task_library.XCOPA_LANGS}}


def raw(task: str) -> list[dict]:
    with gzip.open(BENCH / task / "data.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def compile_quietly(code: str, name: str) -> None:
    with warnings.catch_warnings():  # their "\d" in plain strings: SyntaxWarning, not an error
        warnings.simplefilter("ignore")
        compile(code, name, "exec")


@pytest.fixture(scope="module")
def loaded() -> dict[str, tuple[tasks.TaskSpec, list[tasks.Example]]]:
    specs = tasks.load_tasks(list(COUNTS))
    return {s.name: (s, load_examples(s)) for s in specs}


# ---------------------------------------------------------------------------------------------
# the shipped tasks on the real data


def test_every_shipped_task_loads_with_its_record_count(loaded):
    # and the modality tasks, whose items are a multimodal run's (tests/test_multimodal.py)
    media = {"fashion_mnist": "image_caption", "spoken_digits": "audio_transcript"}
    assert set(tasks.shipped_names()) == set(COUNTS) | set(media)
    for spec in tasks.load_tasks(list(media)):
        assert (spec.kind, spec.domain) == ("media_choice", media[spec.name])
        assert tasks.metric_names(spec) == ("acc", "bpb")
    for name, (spec, examples) in loaded.items():
        assert len(examples) == COUNTS[name], name
        assert [e.index for e in examples] == list(range(COUNTS[name]))
        assert tasks.metric_names(spec)[-1] == "bpb"
        for e in examples:
            assert e.context.endswith(e.prompt) and e.gold, (name, e.line)
            if spec.kind == "multiple_choice":
                assert 0 <= e.gold_index < len(e.choices) and e.gold == e.choices[e.gold_index]
                assert len(e.choice_lengths) == len(e.choices)


def test_gsm8k_answer_pattern_extracts_the_gold_answer_from_all_1319_solutions(loaded):
    spec, examples = loaded["gsm8k"]
    assert len(examples) == 1319
    for e in examples:
        solution = e.record["answer"]
        after_hashes = solution.split("####")[-1].strip().replace(",", "")
        norm = metrics.normalize_answer(e.target, ignore_patterns=spec.ignore_patterns)
        assert norm == after_hashes, e.line
        # the model-output pattern (the last number) finds the same answer in the gold solution
        found = metrics.extract_answer(solution, spec.answer_pattern, spec.answer_select)
        assert metrics.normalize_answer(found, ignore_patterns=spec.ignore_patterns) == norm
        assert tasks.exact_match(spec, e, solution) == 1.0
        assert e.gold == " " + solution
    e = examples[0]  # Janet's ducks: 18
    assert tasks.exact_match(spec, e, " She makes $18.\n") == 1.0
    assert tasks.exact_match(spec, e, " 9 * 2 = 18 so 1,800 cents") == 0.0  # the last number
    assert tasks.exact_match(spec, e, " no number here") == 0.0


def test_arc_labels_map_to_the_right_choice_on_every_record(loaded):
    numeric = 0
    for name in ("arc_easy", "arc_challenge"):
        _, examples = loaded[name]
        for e, rec in zip(examples, raw(name), strict=True):
            labels = [c["label"] for c in rec["question"]["choices"]]
            texts = [c["text"] for c in rec["question"]["choices"]]
            assert e.gold_index == labels.index(rec["answerKey"])
            assert e.choices == tuple(" " + t for t in texts)
            assert e.gold == " " + texts[labels.index(rec["answerKey"])]
            assert e.context == f"Question: {rec['question']['stem']}\nAnswer:"
            assert e.id == rec["id"]
            numeric += labels[0] == "1"
    assert numeric == 97 + 22  # labels "1".."4" (or "1".."3") in 97 ARC-Easy, 22 Challenge


def test_piqa_and_xcopa_labels_are_indices(loaded):
    _, piqa = loaded["piqa"]
    assert [e.gold_index for e in piqa] == [r["label"] for r in raw("piqa")]
    assert piqa[0].choices == (" " + raw("piqa")[0]["sol1"], " " + raw("piqa")[0]["sol2"])
    _, xcopa = loaded["xcopa"]
    test = [r for r in raw("xcopa") if r["split"] == "test"]
    assert [e.gold_index for e in xcopa] == [r["label"] for r in test]


def test_xcopa_prompt_connector_and_the_thai_premise_kept_whole(loaded):
    _, et = loaded["xcopa_et"]
    rec = et[0].record  # "Ese oli mullikilesse mässitud." / cause / "See oli õrn."
    assert et[0].context == rec["premise"][:-1] + " sest"
    assert et[0].choices[0] == " see oli õrn."
    _, th = loaded["xcopa_th"]
    for e in th:  # no final period in Thai: nothing is cut (lm-eval's [:-1] would cut a letter)
        connector = "เพราะ" if e.record["question"] == "cause" else "ดังนั้น"
        assert e.context == e.record["premise"].strip() + " " + connector
    _, zh = loaded["xcopa_zh"]
    assert all(e.context.split(" ")[0] == e.record["premise"].strip()[:-1] for e in zh)
    _, every = loaded["xcopa"]
    assert sorted({e.record["lang"] for e in every}) == sorted(task_library.XCOPA_LANGS)


def test_lambada_splits_at_the_last_space(loaded):
    spec, examples = loaded["lambada"]
    assert tasks.metric_names(spec) == ("acc", "ppl", "bpb")
    for e in examples:
        assert e.context + e.gold == e.record["text"]
        assert e.gold.startswith(" ") and " " not in e.gold[1:]
    assert sum("\n" in e.gold for e in examples) == 7  # as lm-eval: split at ' ' only


def test_code_programs_put_the_completion_where_the_tests_expect(loaded):
    spec, humaneval = loaded["humaneval"]
    for e in humaneval:
        r = e.record
        expected = (r["prompt"] + r["canonical_solution"] + "\n" + r["test"]
                    + f"\ncheck({r['entry_point']})\n")
        assert e.program(r["canonical_solution"]) == expected
        assert e.entry_point == r["entry_point"] and e.id == r["task_id"]
        compile_quietly(e.program(e.gold), e.id)  # syntax only: the sandbox runs them
    assert spec.target_delimiter == "" and tasks.metric_names(spec) == ("pass@1", "bpb")
    spec, mbpp = loaded["mbpp"]
    for e in mbpp:
        r = e.record
        # the code first: task 367's setup uses the class its reference code defines
        assert e.program("CODE") == ("CODE\n" + r["test_setup_code"] + "\n"
                                     + "\n".join(r["test_list"]) + "\n")
        compile_quietly(e.program(e.gold), str(e.id))
    assert {e.record["split"] for e in mbpp} == {"test"}


# ---------------------------------------------------------------------------------------------
# few-shot and limit


def test_fewshot_is_seeded_reproducible_and_never_the_example_itself(loaded):
    spec, examples = loaded["gsm8k"]
    assert spec.num_fewshot == 5
    again = load_examples(spec)
    for e, f in zip(examples, again, strict=True):
        assert len(e.shot_lines) == 5 and e.line not in e.shot_lines
        assert len(set(e.shot_lines)) == 5
        assert e.context == f.context
    by_line = {r_line: r for r_line, r in enumerate(raw("gsm8k"), 1)}
    e = examples[7]
    shots = [f"Question: {by_line[n]['question']}\nAnswer: {by_line[n]['answer']}"
             for n in e.shot_lines]
    assert e.context == "\n\n".join(shots) + "\n\n" + e.prompt
    other = load_examples(tasks.load_tasks(["gsm8k"], overrides={"seed": 7})[0])
    assert sum(a.shot_lines != b.shot_lines for a, b in zip(examples, other)) > 1300
    # distinct examples get distinct draws: not one fixed set of shots for all
    assert len({e.shot_lines for e in examples}) > 1300


def test_fewshot_draws_are_the_same_in_another_process():
    code = ("from gemini_core.eval import tasks; from gemini_core.eval.task_examples import "
            "load_examples; s = tasks.load_tasks(['gsm8k'])[0]; "
            "print([e.shot_lines for e in load_examples(s, limit=20)])")
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1], check=True).stdout
    here = load_examples(tasks.load_tasks(["gsm8k"])[0], limit=20)
    assert out.strip() == str([e.shot_lines for e in here])


def test_fewshot_pool_filter_match_and_first_n():
    spec = tasks.load_tasks(["xcopa"], overrides={"num_fewshot": 3})[0]
    by_line = dict(enumerate(raw("xcopa"), 1))
    for e in load_examples(spec, limit=200):
        assert len(e.shot_lines) == 3
        for n in e.shot_lines:  # validation split, the example's language
            assert by_line[n]["split"] == "validation"
            assert by_line[n]["lang"] == e.record["lang"]
    mbpp = tasks.load_tasks(["mbpp"])[0]
    e = load_examples(mbpp, limit=1)[0]
    assert [by["task_id"] for by in (raw("mbpp")[n - 1] for n in e.shot_lines)] == [2, 3, 4]
    assert e.context.count("[DONE]\n\nYou are an expert Python programmer") == 3
    with pytest.raises(UserError, match=r"num_fewshot=200: only 100 records to draw shots from"):
        load_examples(tasks.load_tasks(["xcopa_et"], overrides={"num_fewshot": 200})[0], limit=1)


def test_limit_is_a_seeded_nested_subset():
    spec = tasks.load_tasks(["arc_easy"])[0]
    small, large = load_examples(spec, limit=50), load_examples(spec, limit=200)
    assert [e.index for e in small] == sorted(e.index for e in small)
    assert {e.index for e in small} < {e.index for e in large}
    assert [e.index for e in small] == [e.index for e in load_examples(spec, limit=50)]
    assert [e.index for e in small] != list(range(50))
    first = tasks.load_tasks(["arc_easy"], overrides={"limit": 5, "limit_from": "first"})[0]
    assert [e.index for e in load_examples(first)] == [0, 1, 2, 3, 4]
    assert len(load_examples(first, limit=0)) == 2376  # 0 = all


def split_of(task: str, split: str, **overrides) -> tasks.TaskSpec:
    return tasks.load_tasks([task], overrides={"split": split, **overrides})[0]


@pytest.mark.parametrize("task", ["gsm8k", "arc_easy"])
def test_search_and_heldout_are_disjoint_halves_of_every_record(task):
    search = load_examples(split_of(task, "search"), limit=0)
    heldout = load_examples(split_of(task, "heldout"), limit=0)
    every = load_examples(split_of(task, "all"), limit=0)
    assert len(search) == COUNTS[task] // 2 and len(heldout) == COUNTS[task] - len(search)
    assert not {e.index for e in search} & {e.index for e in heldout}
    assert sorted(e.index for e in search + heldout) == [e.index for e in every]
    # an index is the record's position among all of the task's records, in either half
    by_index = {e.index: e for e in every}
    assert all(e.line == by_index[e.index].line and e.prompt == by_index[e.index].prompt
               for e in search + heldout)
    assert [e.index for e in search] != list(range(len(search)))  # shuffled, not a prefix


def test_a_split_is_the_same_in_two_calls_and_its_limit_is_nested():
    spec = split_of("arc_easy", "heldout")
    half = {e.index for e in load_examples(spec, limit=0)}
    small, large = load_examples(spec, limit=50), load_examples(spec, limit=200)
    assert [e.index for e in small] == [e.index for e in load_examples(spec, limit=50)]
    assert [e.context for e in small] == [e.context for e in load_examples(spec, limit=50)]
    assert {e.index for e in small} < {e.index for e in large} <= half
    assert [e.index for e in small] == sorted(e.index for e in small)
    first = split_of("arc_easy", "search", limit=5, limit_from="first")
    search = sorted(e.index for e in load_examples(first, limit=0))
    assert [e.index for e in load_examples(first)] == search[:5]
    # the halves are the task seed's: another seed cuts the records another way
    other = {e.index for e in load_examples(split_of("arc_easy", "heldout", seed=7), limit=0)}
    assert other != half and len(other) == len(half)


def test_configured_specs_name_each_task_by_its_split():
    dc = DownstreamConfig(tasks=("gsm8k", "arc_easy"), split="heldout", shots=0)
    specs = downstream.configured_specs(dc)
    assert [s.name for s in specs] == ["gsm8k@heldout", "arc_easy@heldout"]
    assert {s.split for s in specs} == {"heldout"} and specs[0].num_fewshot == 0
    unsplit = downstream.configured_specs(DownstreamConfig(tasks=("gsm8k",)))
    assert [(s.name, s.split) for s in unsplit] == [("gsm8k", "all")]
    # its examples are the heldout half's, named by the task's new name
    ex = load_examples(specs[0], limit=3)
    heldout = {e.index for e in load_examples(split_of("gsm8k", "heldout"), limit=0)}
    assert {e.index for e in ex} <= heldout and ex[0].id.startswith("gsm8k@heldout/")


def test_a_bad_split_is_one_error_naming_its_key(tmp_path):
    with pytest.raises(UserError) as err:
        load_experiment(QUICKSTART, ["--config.data.root=/data/corpus",
                                     "--config.eval.downstream.split=validation"])
    assert str(err.value) == ("config.eval.downstream.split='validation': must be one of all, "
                              "search, heldout")
    with pytest.raises(UserError, match=r"^tasks\.piqa\.split='half': must be one of all, "
                                        r"search, heldout$"):
        split_of("piqa", "half")
    with pytest.raises(UserError, match=r"^--split='valid': must be one of all, search, heldout$"):
        downstream.task_specs(["piqa"], split="valid", split_key="--split")
    # <task>@<split> names a half: a declaration cannot take such a name
    with pytest.raises(UserError, match=r"declare\.piqa@heldout: '@' is kept for a split's "):
        tasks.load_tasks(["piqa@heldout"], declared={"piqa@heldout": {"base": "piqa"}})
    one = declare(tmp_path, [{"q": "q", "a": "A", "b": "B", "y": 1}], split="search")
    with pytest.raises(UserError, match=r"declare\.bad\.split='search': the task has 1 "
                                        r"record\(s\), too few to split"):
        load_examples(one)


# ---------------------------------------------------------------------------------------------
# declaring tasks: files, bases, overrides, roots


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records))
    return path


def test_a_task_file_loads_mixed_with_shipped_names(tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", [
        {"q": "2+2", "opts": [{"t": "3", "k": "x"}, {"t": "4", "k": "y"}], "ans": "y"},
        {"q": "1+1", "opts": [{"t": "2", "k": "x"}, {"t": "5", "k": "y"}], "ans": "x"}])
    file = tmp_path / "my_tasks.py"
    file.write_text(
        "import ml_collections\n"
        "def get_tasks():\n"
        "    t = ml_collections.ConfigDict()\n"
        f"    t.sums = dict(path={str(data)!r}, kind='multiple_choice', prompt='{{q}} =',\n"
        "                  choices_from='opts', choice_template='{choice[t]}', label='ans',\n"
        "                  label_type='match', choice_label='{choice[k]}')\n"
        "    t.arc_easy_3 = dict(base='arc_easy', num_fewshot=3)\n"
        "    return t\n")
    specs = tasks.load_tasks(["piqa", str(file), "gsm8k"])  # a ConfigDict sorts its keys
    assert [s.name for s in specs] == ["piqa", "arc_easy_3", "sums", "gsm8k"]
    sums = load_examples(specs[2])
    assert [(e.context, e.choices, e.gold_index) for e in sums] == [
        ("2+2 =", (" 3", " 4"), 1), ("1+1 =", (" 2", " 5"), 0)]
    assert specs[1].num_fewshot == 3 and specs[1].choices_from == "question.choices"
    assert specs[2].where == f"{file}:get_tasks().sums"
    assert [s.name for s in tasks.load_tasks(f"{file},piqa")] == ["arc_easy_3", "sums", "piqa"]


def test_declared_tasks_overrides_and_roots(tmp_path, monkeypatch):
    declared = {"piqa_5": ml_collections.ConfigDict({"base": "piqa", "num_fewshot": 5})}
    specs = tasks.load_tasks(["piqa_5", "arc_easy"], declared=declared,
                             overrides={"limit": 10})
    assert [(s.name, s.num_fewshot, s.limit) for s in specs] == [("piqa_5", 5, 10),
                                                                  ("arc_easy", 0, 10)]
    assert Path(specs[0].path) == BENCH / "piqa" / "data.jsonl.gz"
    (tmp_path / "piqa").mkdir()
    with gzip.open(tmp_path / "piqa" / "data.jsonl.gz", "wt") as f:
        f.write(json.dumps({"goal": "g", "sol1": "a", "sol2": "b", "label": 1}) + "\n")
    monkeypatch.setenv("GX_BENCHMARKS", str(tmp_path))
    spec = tasks.load_tasks(["piqa"])[0]
    assert spec.path == str(tmp_path / "piqa" / "data.jsonl.gz")
    assert [e.gold for e in load_examples(spec)] == [" b"]
    assert tasks.load_tasks(["piqa"], root=BENCH)[0].path == str(BENCH / "piqa/data.jsonl.gz")


def test_templates_filters_tables_and_derived_fields(tmp_path):
    data = write_jsonl(tmp_path / "t.jsonl", [
        {"a": {"b": [" x ", "Yes."]}, "k": "one", "n": 7, "tests": ["t1", "t2"], "ok": 1}])
    spec = tasks.load_tasks(["t"], declared={"t": dict(
        path=str(data), kind="generate",
        fields={"both": "{k}-{a[b][1]}", "shout": "{both|upper}"},
        tables={"num": {"one": "1"}},
        prompt="{a[b][0]|strip}|{a.b[1]|drop_period|lower_first}|{k|num}|{n:03d}|{shout}",
        gold="{tests|join_lines}", description="D: ")})[0]
    (e,) = load_examples(spec)
    assert e.prompt == "x|yes|1|007|ONE-YES."
    assert e.context == "D: " + e.prompt and e.gold == " t1\nt2"
    assert e.target == "t1\nt2"  # no target_pattern: the gold answer itself


# ---------------------------------------------------------------------------------------------
# bad input: one clear line naming the file:line, the field and the key path


def declare(tmp_path: Path, records: list, **decl) -> tasks.TaskSpec:
    data = write_jsonl(tmp_path / "d.jsonl", records)
    base = dict(path=str(data), kind="multiple_choice", prompt="{q}", choices=("{a}", "{b}"),
                label="y")
    return tasks.load_tasks(["bad"], declared={"bad": {**base, **decl}})[0]


def test_bad_input_errors_name_file_line_and_field(tmp_path):
    good = {"q": "q", "a": "A", "b": "B", "y": 1}
    with pytest.raises(UserError, match=r"d\.jsonl:2: y=2 is out of range for 2 choices "
                                        r"\(config\.eval\.downstream\.declare\.bad\.label"):
        load_examples(declare(tmp_path, [good, {**good, "y": 2}]))
    with pytest.raises(UserError, match=r"d\.jsonl:3: no field 'b' "
                                        r"\(config\.eval\.downstream\.declare\.bad\.choices\[1\]\)"):
        load_examples(declare(tmp_path, [good, good, {"q": "q", "a": "A", "y": 0}]))
    with pytest.raises(UserError, match=r"d\.jsonl:1: no field 'missing' \(.*bad\.prompt\)"):
        load_examples(declare(tmp_path, [good], prompt="{missing}"))
    with pytest.raises(UserError, match=r"d\.jsonl:2: not a JSON line"):
        load_examples(declare(tmp_path, [good, '{"q": ']))
    with pytest.raises(UserError, match=r"d\.jsonl:1: y='Z' is not one of the choice labels A, B"):
        load_examples(declare(tmp_path, [{**good, "y": "Z"}], label_type="match",
                              choice_label="{letter}"))
    with pytest.raises(UserError, match=r"d\.jsonl:1: y='1' is not an index|"
                                        r"d\.jsonl:1: y=True is not an index"):
        load_examples(declare(tmp_path, [{**good, "y": True}]))
    with pytest.raises(UserError, match=r"bad\.filter=\{'split': 'x'\}: selects none of the 1"):
        load_examples(declare(tmp_path, [{**good, "split": "y"}], filter={"split": "x"}))
    with pytest.raises(UserError, match=r"d\.jsonl:1: no field 'split' \(.*bad\.filter\.split\)"):
        load_examples(declare(tmp_path, [good], filter={"split": "x"}))


def test_bad_declarations_name_the_key_path(tmp_path):
    good = {"q": "q", "a": "A", "b": "B", "y": 1}
    with pytest.raises(UserError, match=r"unknown task 'arc_esay' \(known: arc_challenge, "
                                        r"arc_easy, fashion_mnist, gsm8k, humaneval, lambada, "
                                        r"mbpp, piqa, spoken_digits, xcopa"):
        tasks.load_tasks(["arc_esay"])
    with pytest.raises(UserError, match=r"declare\.bad\.path='/nope/x\.jsonl': no such file"):
        declare(tmp_path, [good], path="/nope/x.jsonl")
    with pytest.raises(UserError, match=r"tasks\.piqa\.path='piqa/data\.jsonl\.gz': no such file "
                                        r".*relative to the benchmarks root"):
        tasks.load_tasks(["piqa"], root=tmp_path)
    with pytest.raises(UserError, match=r"declare\.bad\.prompt='\{q': not a valid template"):
        declare(tmp_path, [good], prompt="{q")
    with pytest.raises(UserError, match=r"declare\.bad\.prompt='\{q\|shout\}': unknown filter "
                                        r"'shout'"):
        declare(tmp_path, [good], prompt="{q|shout}")
    with pytest.raises(UserError, match=r"declare\.bad\.kind='mc': must be one of"):
        declare(tmp_path, [good], kind="mc")
    with pytest.raises(UserError, match=r"declare\.bad\.lable: unknown key \(known keys: name, "):
        declare(tmp_path, [good], lable="y")
    with pytest.raises(UserError, match=r"declare\.bad\.num_fewshot='3': expected int"):
        declare(tmp_path, [good], num_fewshot="3")
    with pytest.raises(UserError, match=r"declare\.bad\.answer_pattern='\(': not a valid regex"):
        declare(tmp_path, [good], answer_pattern="(")
    with pytest.raises(UserError, match=r"declare\.bad\.choices / .*choices_from: declare exactly"):
        declare(tmp_path, [good], choices_from="opts")
    with pytest.raises(UserError, match=r"task overrides: unknown key 'shots'"):
        tasks.load_tasks(["piqa"], overrides={"shots": 3})
    with pytest.raises(UserError, match=r"tasks\.piqa: task 'piqa' is loaded twice"):
        tasks.load_tasks(["piqa", "piqa"])
    with pytest.raises(UserError, match=r"declare\.piqa: the name of a shipped task; give yours "
                                        r"another \(it may extend the shipped one: base='piqa'\)"):
        tasks.load_tasks(["arc_easy"], declared={"piqa": {"base": "piqa", "num_fewshot": 1}})
    code = dict(kind="code", gold="{a}", program="{completion}", samples=4, pass_k=(1, 8),
                temperature=0.8)
    with pytest.raises(UserError, match=r"declare\.bad\.pass_k\[1\]=8: must be in "
                                        r"\[1, samples=4\]"):
        declare(tmp_path, [good], **code)
    with pytest.raises(UserError, match=r"declare\.bad\.program='x': must hold \{completion\}"):
        declare(tmp_path, [good], **{**code, "program": "x", "pass_k": (1,)})


def test_bad_task_files(tmp_path):
    with pytest.raises(UserError, match=r"nope\.py: task file not found"):
        tasks.load_tasks([str(tmp_path / "nope.py")])
    broken = tmp_path / "broken.py"
    broken.write_text("def get_tasks():\n    return {'x': dict(base='piqa')}\n)\n")
    with pytest.raises(UserError, match=r"broken\.py:3: SyntaxError"):
        tasks.load_tasks([str(broken)])
    none = tmp_path / "none.py"
    none.write_text("def get_config():\n    return {}\n")
    with pytest.raises(UserError, match=r"none\.py: defines no get_tasks\(\)"):
        tasks.load_tasks([str(none)])
    raising = tmp_path / "raising.py"
    raising.write_text("def get_tasks():\n    return {'x': 1 / 0}\n")
    with pytest.raises(UserError, match=r"raising\.py:2: ZeroDivisionError"):
        tasks.load_tasks([str(raising)])
    cyc = tmp_path / "cyc.py"
    cyc.write_text("def get_tasks():\n    return {'a': dict(base='b'), 'b': dict(base='a')}\n")
    with pytest.raises(UserError, match=r"cyc\.py:get_tasks\(\)\.\w\.base='\w': a cycle"):
        tasks.load_tasks([str(cyc)])


# ---------------------------------------------------------------------------------------------
# metric arithmetic


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    correct = [True] * c + [False] * (n - c)
    draws = list(itertools.combinations(range(n), k))
    return sum(any(correct[i] for i in d) for d in draws) / len(draws)


def test_pass_at_k_equals_brute_force_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert metrics.pass_at_k(n, c, k) == pytest.approx(
                    brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
    assert metrics.pass_at_k(200, 1, 100) == pytest.approx(0.5, abs=1e-12)
    assert metrics.pass_at_k(1000, 0, 500) == 0.0
    assert metrics.pass_at_k(1000, 999, 1) == pytest.approx(0.999, abs=1e-12)
    assert metrics.pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c / n
    est = metrics.pass_at_k_estimate([(10, 3), (10, 0), (10, 10)], 1)
    assert (est.value, est.n) == (pytest.approx(13 / 30), 3)
    with pytest.raises(ValueError):
        metrics.pass_at_k(5, 2, 6)


def test_mean_and_stderr_against_hand_values():
    est = metrics.mean_stderr([1, 0, 1, 1])
    # mean 0.75; sample variance (3 * 0.25**2 + 0.75**2) / 3 = 0.25; stderr sqrt(0.25 / 4)
    assert (est.value, est.stderr, est.n) == (0.75, 0.25, 4)
    assert metrics.mean_stderr([2.0, 4.0]).stderr == pytest.approx(1.0)  # std sqrt(2) / sqrt(2)
    assert math.isnan(metrics.mean_stderr([0.5]).stderr)
    ppl = metrics.perplexity([1.0, 3.0])
    assert ppl.value == pytest.approx(math.e ** 2) and ppl.stderr == pytest.approx(math.e ** 2)
    assert metrics.bits_per_byte(math.log(2) * 12, 4) == pytest.approx(3.0)


def test_multiple_choice_acc_and_acc_norm():
    # choice 0 has the lowest summed NLL, choice 1 the lowest NLL per character
    assert metrics.mc_predictions([2.0, 3.0, 9.0], [2, 6, 9]) == (0, 1)
    assert metrics.mc_scores([2.0, 3.0, 9.0], [2, 6, 9], gold=1) == (0.0, 1.0)
    assert metrics.mc_predictions([1.0, 1.0], [3, 3]) == (0, 0)  # a tie: the first, as argmax
    spec = tasks.load_tasks(["arc_easy"])[0]
    e = load_examples(spec, limit=1)[0]
    assert e.choice_lengths == tuple(len(c) - 1 for c in e.choices)  # chars, no delimiter


def test_answer_extraction_and_normalisation():
    assert metrics.extract_answer("a 1 b 22 c", r"(\d+)", "last") == "22"
    assert metrics.extract_answer("a 1 b 22 c", r"(\d+)", "first") == "1"
    assert metrics.extract_answer("none", r"(\d+)") is None
    assert metrics.extract_answer(" as is ", "") == " as is "
    assert metrics.normalize_answer(" $1,234. ", ignore_patterns=(",", r"\$", r"\.$")) == "1234"
    assert metrics.exact_match("The Answer: PARIS", "paris", pattern=r"Answer: (\w+)",
                               ignore_case=True) == 1.0
    assert metrics.exact_match("Answer: Rome", "paris", pattern=r"Answer: (\w+)") == 0.0
