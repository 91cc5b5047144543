"""Heuristic quality rules and language identification (gemini_core/curation/{quality,langid}).

Every rule gets a hand-made document that must pass and one that must fail; per-domain defaults
are checked on real documents of the shared corpus (read in place); the vectorised n-gram
statistics and the vectorised langid feature walk are checked against plain reference code.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemini_core.data.curation import langid, quality
from gemini_core.data.curation.quality import RULES, QualityParams, params_for, quality_failures
from gemini_core.errors import UserError

GOOD = (
    "The old lighthouse stood on a rocky cape at the northern edge of the island. For more than "
    "a century its keepers had guided fishing boats through the narrow channel between reefs.\n"
    "In the winter of 1911 a violent storm destroyed the lamp, and the village was left in "
    "darkness for several weeks.\n"
    "A young engineer from the mainland arrived in early spring with a new lens and a crate of "
    "brass fittings.\n"
    "She worked through long evenings with the help of two local carpenters, who had never seen "
    "such precise instruments.\n"
    "When the light finally returned, the families who depended on the sea gathered on the "
    "cliffs to watch it turn.\n"
    "Today the building is a small museum, and visitors can climb the spiral staircase to see "
    "the restored mechanism.")
GOOD_LINES = GOOD.split("\n")
# more varied sentences, to build documents of a chosen shape without accidental repetition
EXTRA = [
    "Migrating geese rested on the frozen marsh before continuing south.",
    "Her grandfather repaired clocks in a workshop that smelled of oil and cedar.",
    "Engineers tested the bridge with loaded trucks before opening it to traffic.",
    "A quiet library can feel like a harbour during a noisy afternoon.",
    "Farmers planted barley late because the spring rains lasted into June.",
    "The orchestra rehearsed the final movement until well after midnight.",
    "Tourists rarely notice the carved stone faces above the cathedral doors.",
    "Each morning the baker opened his shutters to a line of hungry students.",
    "Volunteers counted butterflies along the river path every summer weekend.",
    "Several novels from that decade describe the harsh life of coal miners.",
]


def fails(text: str, lang: str = "en", **params) -> list[str]:
    return quality_failures(text, lang, QualityParams(**params))


def lines(*parts: str) -> str:
    return "\n".join(parts)


STOP_EN = langid.STOP_WORDS["en"]
NO_STOP_WORDS = " ".join(w for w in GOOD.split() if w.lower().strip(".,") not in STOP_EN)

# rule -> (passing document, failing document, QualityParams overrides used for both)
CASES = {
    "lorem_ipsum": (GOOD, GOOD + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.", {}),
    "min_words": (GOOD, "The cat slept on the warm windowsill all afternoon.", {}),
    "max_words": (GOOD, lines(GOOD, *EXTRA), {"max_words": 200}),
    "mean_word_len": (
        GOOD, " ".join(w + "extraordinarily" for w in GOOD.split()), {}),
    "symbol_word_ratio": (
        GOOD + " #island #history",
        " ".join(f"#{w}" if i % 5 == 0 else w for i, w in enumerate(GOOD.split())), {}),
    "ellipsis_lines": (
        lines(GOOD_LINES[0][:-1] + "...", *GOOD_LINES[1:]),
        lines(*(s[:-1] + "..." for s in GOOD_LINES[:3]), *GOOD_LINES[3:]), {}),
    "bullet_lines": (
        lines(GOOD_LINES[0], *("- " + s for s in GOOD_LINES[1:])),
        lines(*("- " + s for s in GOOD_LINES), *("• " + s for s in EXTRA)), {}),
    "alpha_words": (
        GOOD + " It cost 40 pounds in 1912.",
        GOOD + "\n" + " ".join(str(1000 + 37 * i) for i in range(60)) + ".", {}),
    "stop_words": (GOOD, NO_STOP_WORDS, {}),
    "dup_lines": (
        lines(*GOOD_LINES, *EXTRA),
        lines(*GOOD_LINES, *EXTRA[:4], *(["Read more."] * 8)), {}),
    "dup_line_chars": (
        lines(*GOOD_LINES, GOOD_LINES[2], *EXTRA),
        lines(*GOOD_LINES, *GOOD_LINES[1:4], *EXTRA[:3]), {"max_dup_line_frac": 0}),
    "dup_paras": (
        "\n\n".join(GOOD_LINES + EXTRA),
        "\n\n".join(GOOD_LINES + ["Share this story.", "Share this story."] * 3), {}),
    "dup_para_chars": (
        "\n\n".join(GOOD_LINES + EXTRA),
        "\n\n".join(GOOD_LINES + GOOD_LINES[:3]), {"max_dup_para_frac": 0}),
    "top_ngram": (
        GOOD,
        GOOD + " " + " ".join(f"{w} quarterly dividends" for w in
                             "gold silver copper nickel tin zinc lead iron cobalt lithium "
                             "platinum uranium cotton wheat coffee sugar".split()) + ".", {}),
    "dup_ngram": (lines(GOOD, *EXTRA), lines(GOOD, GOOD), {}),
    "boilerplate_lines": (
        lines(*GOOD_LINES, *EXTRA, "This site uses JavaScript for its maps."),
        lines(*GOOD_LINES, "Please enable JavaScript to view this page.",
              "Read our privacy policy and terms of use.", "This website uses cookies."), {}),
    "min_sentences": (GOOD, GOOD.replace(".", ",").replace("\n", " "), {"min_sentences": 3}),
    "line_punct": (
        GOOD,
        lines(*(s.rstrip(".") for s in GOOD_LINES), *(s.rstrip(".") for s in EXTRA)), {}),
    "short_lines": (
        lines(*GOOD_LINES, "Related articles", "Contact us"),
        lines(*GOOD_LINES[:4], *(w.capitalize() + " news" for w in "sport music film art food "
                             "travel science health money style weather".split())), {}),
    "newline_ratio": (GOOD, "\n".join(" ".join(p) for p in zip(*[iter(GOOD.split())] * 2)),
                      {"max_short_line_frac": 0}),
}


def test_every_rule_has_a_case_and_good_prose_passes():
    assert set(CASES) == set(RULES)
    assert len(set(RULES)) == len(RULES)
    assert fails(GOOD) == []
    for doc, _, params in CASES.values():  # sanity: passing docs pass everything
        assert fails(doc, **params) == [], doc


@pytest.mark.parametrize("rule", RULES)
def test_rule_passes_and_fails(rule):
    good, bad, params = CASES[rule]
    assert rule not in fails(good, **params)
    failed = fails(bad, **params)
    assert rule in failed
    assert failed == [r for r in RULES if r in failed]  # RULES order


@pytest.mark.parametrize("rule", RULES)
def test_rule_switched_off(rule):
    """Each rule's failing document is no longer failed by that rule once it is switched off."""
    _, bad, params = CASES[rule]
    off = {f.name: f.default for f in dataclasses.fields(QualityParams)}
    off = {k: (() if isinstance(v, tuple) else False if isinstance(v, bool) else 0)
           for k, v in off.items() if k != "short_line_chars"}
    assert fails(bad, **{**params, **off}) == []


def test_empty_and_degenerate_documents():
    assert fails("") == ["min_words", "stop_words"]
    assert fails("   \n\n  ") == ["min_words", "stop_words"]
    assert quality_failures("", "und", QualityParams(min_words=0)) == []
    assert "min_words" in fails("... --- !!! ???")


def test_stop_words_follow_the_language():
    german = ("Der alte Leuchtturm stand auf einem felsigen Kap am nördlichen Rand der Insel, "
              "und seit mehr als einem Jahrhundert führten seine Wärter die Fischerboote durch "
              "den schmalen Kanal zwischen den Riffen. Im Winter zerstörte ein heftiger Sturm "
              "die Lampe, und das Dorf blieb für mehrere Wochen im Dunkeln. Eine junge "
              "Ingenieurin kam im Frühling mit einer neuen Linse auf die Insel.")
    assert "stop_words" not in fails(german, "de")
    assert "stop_words" in fails(german, "en")  # judged by the English list it has none
    assert "stop_words" not in fails(NO_STOP_WORDS, "xx")  # no list: rule skipped


def test_scripts_without_spaces_count_characters():
    zh = ("灯塔矗立在岛屿北端的岩石海角上。一个多世纪以来，守塔人引导渔船穿过礁石之间的狭窄航道。"
          "一九一一年冬天，一场猛烈的风暴摧毁了灯塔，村庄陷入了数周的黑暗。"
          "第二年春天，一位来自大陆的年轻工程师带着新的透镜和一箱黄铜配件来到岛上。")
    assert fails(zh, "zh") == []
    s = quality.stats(zh, "zh")
    assert s["words"] == pytest.approx(len(zh.replace("，", "").replace("。", "")) / 2, abs=30)
    assert "min_words" in fails(zh[:40], "zh")
    assert "dup_ngram" in fails(zh * 2, "zh")
    thai = ("ประภาคารเก่าตั้งอยู่บนแหลมหินทางตอนเหนือของเกาะ เป็นเวลากว่าหนึ่งศตวรรษที่ผู้ดูแลได้นำทางเรือประมง"
            "ผ่านช่องแคบระหว่างแนวปะการัง ในฤดูหนาวปีหนึ่งพายุรุนแรงได้ทำลายตะเกียง และหมู่บ้านตกอยู่ในความมืด"
            "เป็นเวลาหลายสัปดาห์ วิศวกรหนุ่มจากแผ่นดินใหญ่เดินทางมาพร้อมเลนส์ใหม่และอุปกรณ์ทองเหลือง")
    assert quality.stats(thai, "th")["alpha_word_frac"] > 0.95  # vowel and tone marks attach
    assert fails(thai, "th") == []


# ---------------------------------------------------------------------------------------------
# n-gram statistics against a plain reference


def ngram_stats(words, top_ns, dup_ns):
    got = {}
    lens = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    quality.ngram_stats(words, lens, top_ns, dup_ns, got)
    return got


def reference_ngrams(words, top_ns, dup_ns):
    out, total = {}, sum(map(len, words))
    for n in top_ns:
        counts = collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        most = max(counts.values(), default=0)
        chars = max((sum(map(len, g)) for g, c in counts.items() if c == most), default=0)
        out[f"top_{n}gram_char_frac"] = most * chars / total if most >= 2 else 0.0
    for n in dup_ns:
        seen, covered = set(), [False] * len(words)
        for i in range(len(words) - n + 1):
            gram = tuple(words[i:i + n])
            if gram in seen:
                covered[i:i + n] = [True] * n
            seen.add(gram)
        out[f"dup_{n}gram_char_frac"] = (
            sum(len(w) for w, c in zip(words, covered) if c) / total if total else 0.0)
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(["a", "bb", "ccc", "the", "of", "x" * 9]), max_size=80))
def test_ngram_stats_match_reference(words):
    got = ngram_stats(words, (2, 3, 4), (5, 6, 7, 8, 9, 10))
    want = reference_ngrams(words, (2, 3, 4), (5, 6, 7, 8, 9, 10))
    assert got == pytest.approx(want)


def test_ngram_stats_match_reference_on_real_text(corpus_root):
    docs = read(corpus_root, "web")[:40]
    for doc in docs:
        words = doc.lower().split()
        got = ngram_stats(words, (2, 3, 4), (5, 7, 10))
        assert got == pytest.approx(reference_ngrams(words, (2, 3, 4), (5, 7, 10)))


# ---------------------------------------------------------------------------------------------
# per-domain defaults on the real corpus


def read(corpus_root, domain, split="valid"):
    with gzip.open(corpus_root / domain / f"{split}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def drop_rate(docs, params, langs=None):
    langs = langs or ["en"] * len(docs)
    return sum(bool(quality_failures(d, lg, params)) for d, lg in zip(docs, langs)) / len(docs)


@pytest.mark.parametrize("domain,max_kept_drop,min_prose_drop",
                         [("code", 0.05, 0.3), ("math", 0.05, 0.3)])
def test_domain_defaults_keep_code_and_math(corpus_root, domain, max_kept_drop, min_prose_drop):
    docs = read(corpus_root, domain)
    assert drop_rate(docs, params_for(domain, QualityParams())) <= max_kept_drop
    assert drop_rate(docs, QualityParams()) >= min_prose_drop  # prose rules would gut them


def test_multilingual_survives_and_web_loses_some(corpus_root):
    docs = read(corpus_root, "multilingual")
    langs = [lang for lang, _ in langid.detect_batch(docs)]
    assert len(set(langs)) >= 8
    assert drop_rate(docs, params_for("multilingual", QualityParams()), langs) <= 0.05
    web = read(corpus_root, "web", "train")[:400]
    params = params_for("web", QualityParams())
    first_failures = [quality_failures(d, "en", params)[:1] for d in web]
    # what the rules are known to drop of these 400 real pages (13%): short pages mostly, then
    # repetitive ones; a change here changes prepared outputs (bump curation.filter_pass.FORMAT)
    assert collections.Counter(f[0] for f in first_failures if f) == {
        "min_words": 37, "dup_ngram": 9, "top_ngram": 5, "alpha_words": 2}
    assert drop_rate(web, params) == 53 / 400


# ---------------------------------------------------------------------------------------------
# params_for


def test_params_for_layers_domain_defaults_and_user_overrides():
    base = QualityParams(min_words=40)
    code = params_for("code", base)
    assert code.min_stop_words == 0 and code.min_alpha_word_frac == 0
    assert params_for("web", base) == base  # prose: no built-in overrides
    user = {"code": {"min_words": 7, "max_top_ngram_char_frac": {"2": 0.3, 3: 0.25}},
            "web": {"min_stop_words": None, "max_words": 5000.0}}
    code = params_for("code", base, user)
    assert code.min_words == 7 and code.max_top_ngram_char_frac == ((2, 0.3), (3, 0.25))
    assert code.min_stop_words == 0  # domain default kept where the user says nothing
    web = params_for("web", base, user)
    assert web.min_stop_words == 0 and web.max_words == 5000 and isinstance(web.max_words, int)
    assert web.min_words == 40


@pytest.mark.parametrize("override,message", [
    ({"min_wordz": 3}, "config.quality.overrides.code.min_wordz"),
    ({"min_words": "many"}, "config.quality.overrides.code.min_words"),
    ({"min_words": 2.5}, "config.quality.overrides.code.min_words"),
    ({"max_dup_line_frac": -0.1}, "config.quality.overrides.code.max_dup_line_frac"),
    ({"drop_lorem_ipsum": 1}, "config.quality.overrides.code.drop_lorem_ipsum"),
    ({"max_dup_ngram_char_frac": [(0, 0.1)]},
     "config.quality.overrides.code.max_dup_ngram_char_frac"),
    ({"max_dup_ngram_char_frac": 0.1}, "config.quality.overrides.code.max_dup_ngram_char_frac"),
])
def test_params_for_rejects_bad_overrides(override, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        params_for("code", QualityParams(), {"code": override})


def test_domain_defaults_name_real_params():
    for domain in quality.DOMAIN_DEFAULTS:
        params_for(domain, QualityParams())  # raises on a misspelt name


# ---------------------------------------------------------------------------------------------
# langid

SAMPLES = {
    "en": "The committee will publish its final report on the new railway line next month.",
    "de": "Die Regierung hat beschlossen, die Steuern für kleine Unternehmen im nächsten Jahr "
          "zu senken.",
    "fr": "Le gouvernement a décidé de réduire les impôts des petites entreprises l'année "
          "prochaine.",
    "ru": "Правительство решило снизить налоги для малого бизнеса в следующем году.",
    "zh": "政府决定明年为小型企业减税，以促进地方经济的发展。",
    "ja": "政府は来年、中小企業の税金を引き下げることを決定しました。",
}


@pytest.mark.parametrize("lang", sorted(SAMPLES))
def test_langid_identifies_samples(lang):
    code, conf = langid.detect(SAMPLES[lang])
    assert code == lang
    assert 0.5 < conf <= 1.0


def test_langid_empty_and_batch():
    assert langid.detect("") == ("und", 0.0)
    assert langid.detect(" \n\t ") == ("und", 0.0)
    assert langid.detect_batch([SAMPLES["de"], ""]) == [langid.detect(SAMPLES["de"]),
                                                        ("und", 0.0)]
    code, conf = langid.detect("12345 !!! 678")
    assert 0.0 <= conf <= 1.0


def test_vectorised_langid_matches_py3langid(corpus_root):
    """The vectorised automaton walk gives py3langid's own answer (label and probability)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier
    ident = langid.identifier()
    assert isinstance(ident, langid.VectorIdentifier)  # the fast path is active
    reference = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    rng = random.Random(0)
    docs = rng.sample(read(corpus_root, "multilingual"), 25) + rng.sample(read(corpus_root, "web"), 10)
    docs += ["a", "ß", "日本", "\U0001F600 ok", "x" * 3000]
    for doc in docs:
        code, conf = langid.detect(doc)
        want_code, want_conf = reference.classify(doc[:langid.PREFIX_CHARS])
        assert code == want_code
        assert conf == pytest.approx(want_conf, abs=1e-3)


def test_stop_word_lists_cover_the_corpus_languages():
    for lang in ("en", "de", "fr", "es", "it", "pt", "nl", "ru", "zh", "ja", "ko", "ar", "el",
                 "hi", "ro", "th", "tr", "vi"):
        assert len(langid.STOP_WORDS[lang]) >= 15, lang


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab #.…-•\n\t 1_日本ก่Ω")), max_size=300),
       st.sampled_from(["en", "ja", "th", "ko", "und"]))
def test_any_text_gets_a_verdict(text, lang):
    failed = quality_failures(text, lang, QualityParams(min_sentences=2))
    assert failed == [r for r in RULES if r in failed]
    assert set(quality.stats(text, lang)) >= {"words", "mean_word_len", "top_2gram_char_frac"}
