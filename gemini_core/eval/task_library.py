"""The shipped task declarations: the public benchmarks in ../shared/benchmarks, as data.

Each follows its README's conventional scoring (lm-evaluation-harness's prompts, so figures are
comparable), with paths relative to the benchmarks root (gemini_core.eval.tasks). Records per
task on the shipped files, from SOURCES.md:

| task | kind | records | shots (default) |
|---|---|---:|---|
| gsm8k | generate | 1,319 test | 5, from the other test questions (no train split here) |
| humaneval | code | 164 | 0 |
| mbpp | code | 500 test (task_id 11-510) | 3: prompt-split tasks 2, 3, 4 (paper, lm-eval) |
| arc_easy | multiple_choice | 2,376 test | 0 |
| arc_challenge | multiple_choice | 1,172 test | 0 |
| piqa | multiple_choice | 1,838 validation | 0 |
| lambada | last_word | 5,153 test (OpenAI's) | 0 |
| xcopa | multiple_choice | 5,500: test, all 11 languages | 0 (shots: same language, validation) |
| xcopa_<lang> | multiple_choice | 500 each (et ht id it qu sw ta th tr vi zh) | as xcopa |

XCOPA is declared both ways: `xcopa` is one figure over all languages (every language has 500
test questions, so its accuracy is the mean of the per-language accuracies, and a mixture sweep
gets one multilingual column), and `xcopa_<lang>` gives the per-language accuracy lm-eval
reports. The prompt is lm-eval's (premise without its final period, the language's "because" /
"therefore", each choice with a lower-cased first letter) with one deliberate difference:
lm-eval drops the premise's last character unconditionally, which cuts a letter off every Thai
premise and 598 of the 600 Tamil ones (they end without a period); `drop_period` drops a final
period only.

acc_norm divides each choice's NLL by the choice's length in characters, without the target
delimiter: lm-eval's `acc_norm` (OLMo's `acc_per_char`), so the figures mean what published
ones do and an lm-eval run on the same model gives the same numbers (32 PIQA and 19 ARC
questions have a non-ASCII choice, where bytes would differ). `norm_length="bytes"` divides by
UTF-8 bytes instead.
"""

from __future__ import annotations

import copy

XCOPA_LANGS = ("et", "ht", "id", "it", "qu", "sw", "ta", "th", "tr", "vi", "zh")

# lm-eval's xcopa connectors: the word for "because" (question "cause") and "therefore" ("effect")
XCOPA_CONNECTORS = {
    "et": ("sest", "seetõttu"), "ht": ("poukisa", "donk sa"), "id": ("karena", "maka"),
    "it": ("perché", "quindi"), "qu": ("imataq", "chaymi"), "sw": ("kwa sababu", "kwa hiyo"),
    "ta": ("காரணமாக", "எனவே"), "th": ("เพราะ", "ดังนั้น"), "tr": ("çünkü", "bu yüzden"),
    "vi": ("bởi vì", "vì vậy"), "zh": ("因为", "所以"),
}

_ARC = dict(
    kind="multiple_choice",
    prompt="Question: {question[stem]}\nAnswer:",
    choices_from="question.choices",
    choice_template="{choice[text]}",
    label="answerKey",  # "A".."E" or "1".."5": matched against each choice's own label
    label_type="match",
    choice_label="{choice[label]}",
    id_field="id",
)

_DECLARATIONS: dict[str, dict] = {
    "gsm8k": dict(
        path="gsm8k/data.jsonl.gz",
        kind="generate",
        prompt="Question: {question}\nAnswer:",
        gold="{answer}",  # the worked solution, calculator annotations and "#### N" included
        target_pattern=r"#### (\-?[0-9\.\,]+)",
        # lm-eval's "flexible-extract": the last number the model writes
        answer_pattern=r"(-?[$0-9.,]{2,})|(-?[0-9]+)",
        answer_select="last",
        ignore_patterns=(",", r"\$", r"\.$"),
        stop=("\n\n", "Question:"),
        max_new_tokens=256,
        num_fewshot=5,
    ),
    "humaneval": dict(
        path="humaneval/data.jsonl.gz",
        kind="code",
        prompt="{prompt}",
        gold="{canonical_solution}",
        target_delimiter="",  # the completion continues the function body
        program="{prompt}{completion}\n{test}\ncheck({entry_point})\n",  # as human-eval runs it
        entry_point="{entry_point}",
        stop=("\nclass", "\ndef", "\n#", "\nif", "\nprint"),  # Codex paper's
        max_new_tokens=512,
        id_field="task_id",
    ),
    "mbpp": dict(
        path="mbpp/data.jsonl.gz",
        kind="code",
        filter={"split": "test"},
        prompt=("You are an expert Python programmer, and here is your task: {text} Your code "
                "should pass these tests:\n\n{test_list|join_lines}\n[BEGIN]\n"),
        gold="{code}",
        fewshot_answer="{code}\n[DONE]",
        target_delimiter="",
        # the code before the setup: the one record with setup code (task 367) uses a class
        # its own reference code defines
        program="{completion}\n{test_setup_code}\n{test_list|join_lines}\n",
        stop=("[DONE]",),
        max_new_tokens=512,
        num_fewshot=3,
        fewshot_filter={"task_id": [2, 3, 4]},
        fewshot_sampler="first_n",
        id_field="task_id",
    ),
    "arc_easy": dict(path="arc_easy/data.jsonl.gz", **_ARC),
    "arc_challenge": dict(path="arc_challenge/data.jsonl.gz", **_ARC),
    "piqa": dict(
        path="piqa/data.jsonl.gz",
        kind="multiple_choice",
        prompt="Question: {goal}\nAnswer:",
        choices=("{sol1}", "{sol2}"),
        label="label",
    ),
    "lambada": dict(
        path="lambada/data.jsonl.gz",
        kind="last_word",
        prompt="{text}",  # split at its last space (as lm-eval): 7 targets span a line break
    ),
    "xcopa": dict(
        path="xcopa/data.jsonl.gz",
        kind="multiple_choice",
        filter={"split": "test"},
        fields={"lang_question": "{lang}/{question}"},
        tables={"connector": {f"{lang}/{q}": word
                              for lang, words in XCOPA_CONNECTORS.items()
                              for q, word in zip(("cause", "effect"), words)}},
        prompt="{premise|strip|drop_period} {lang_question|connector}",
        choices=("{choice1|lower_first}", "{choice2|lower_first}"),
        label="label",
        fewshot_filter={"split": "validation"},
        fewshot_match=("lang",),
    ),
}

# zero-shot classification by caption ranking (gemini_core.data.modality's held-out items)
_DECLARATIONS["fashion_mnist"] = dict(path="", kind="media_choice", domain="image_caption")
_DECLARATIONS["spoken_digits"] = dict(path="", kind="media_choice", domain="audio_transcript")

for _lang in XCOPA_LANGS:
    _DECLARATIONS[f"xcopa_{_lang}"] = dict(base="xcopa", filter={"split": "test", "lang": _lang})


def declarations() -> dict[str, dict]:
    """Task name -> declaration (a fresh copy: callers may change theirs)."""
    return copy.deepcopy(_DECLARATIONS)
