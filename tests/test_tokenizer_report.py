"""`gx data tokenizer-report` on the real corpus (../shared/corpus) at a small vocabulary."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gemini_core.config import DEFAULT_DOMAINS, DataConfig, TokenizerConfig
from gemini_core.data.curation.tokenizer_report import format_report, tokenizer_report
from gemini_core.errors import UserError

REPO = Path(__file__).resolve().parents[1]


class Log(list):
    def __call__(self, line: str) -> None:
        self.append(line)

    def count(self, text: str) -> int:  # type: ignore[override]
        return sum(text in line for line in self)


def data_config(root, vocab_size=1024, sample_chars=300_000) -> DataConfig:
    return DataConfig(root=str(root), seq_len=64,
                      tokenizer=TokenizerConfig(vocab_size=vocab_size, sample_chars=sample_chars))


@pytest.fixture(scope="module")
def built(corpus_root, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    data = data_config(corpus_root)
    log = Log()
    return data, cache, tokenizer_report(data, cache_root=cache, log=log), log


def test_mix_tokenizer_beats_single_domain_one_off_its_domain(built):
    _, _, report, log = built
    assert log.count("tokenizer: trained") == 2
    assert report["columns"] == ["raw", "mix", "single:web"]
    assert list(report["domains"]) == list(DEFAULT_DOMAINS)
    for d, e in report["domains"].items():
        bpt = e["bytes_per_token"]
        assert bpt["raw"] == 1.0
        assert bpt["mix"] > 1.3 and bpt["single:web"] > 1.0, d
        assert e["bytes"] > 0 and e["documents"] > 0 and e["bad_records"] == {}
        assert e["single_over_mix"] == pytest.approx(e["tokens"]["single:web"] /
                                                     e["tokens"]["mix"])
    for d in ("code", "multilingual"):
        bpt = report["domains"][d]["bytes_per_token"]
        assert bpt["mix"] > 1.1 * bpt["single:web"], d  # measured: about 1.3x and 1.4x
    web = report["domains"]["web"]["bytes_per_token"]
    assert web["single:web"] > web["mix"]  # on its own domain the specialist wins
    assert report["pooled"]["bytes_per_token"]["mix"] > \
        report["pooled"]["bytes_per_token"]["single:web"]
    assert report["tokenizers"]["single:web"]["sample_weights"] == {"web": 1.0}
    assert report["tokenizers"]["mix"]["sample_weights"] == pytest.approx(
        {d: 1 / 6 for d in DEFAULT_DOMAINS})


def test_second_call_reuses_the_cached_tokenizers(built):
    data, cache, report, _ = built
    log = Log()
    again = tokenizer_report(data, cache_root=cache, log=log)
    assert log.count("tokenizer: trained") == 0 and log.count("tokenizer: reusing") == 2
    assert again == report


def test_format_report_table(built):
    _, _, report, _ = built
    text = format_report(report)
    lines = text.splitlines()
    assert "| domain | valid bytes | raw bytes | mix | web-only | tokens web-only / mix |" in lines
    code = next(line for line in lines if line.startswith("| code |"))
    cells = [c.strip() for c in code.strip("|").split("|")]
    e = report["domains"]["code"]
    assert cells == ["code", f"{e['bytes']:,}", "1.00", f"{e['bytes_per_token']['mix']:.2f}",
                     f"{e['bytes_per_token']['single:web']:.2f}",
                     f"{e['single_over_mix']:.2f}x"]
    assert any(line.startswith("| all (pooled) |") for line in lines)


def test_unknown_single_domain(corpus_root, tmp_path):
    with pytest.raises(UserError, match="single_domain='news'"):
        tokenizer_report(data_config(corpus_root), single_domain="news", cache_root=tmp_path)


def test_gx_data_tokenizer_report_prints_the_table(built, corpus_root, tmp_path):
    """Through the CLI, with the quickstart experiment set to the fixture's tokenizer settings and
    cache: the command finds both tokenizers cached and prints the same table."""
    _, cache, report, _ = built
    base = [sys.executable, "-m", "gx", "--runs-root", str(tmp_path), "data", "tokenizer-report",
            "experiments/quickstart.py", f"--config.data.root={corpus_root}",
            f"--config.data.cache_dir={cache}", "--config.data.tokenizer.vocab_size=1024",
            "--config.data.tokenizer.sample_chars=300000"]
    proc = subprocess.run(base, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("tokenizer: reusing") == 2
    assert format_report(report) in proc.stdout
    bad = subprocess.run([*base, "--single-domain=news"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "gx: error: single_domain='news': not one of config.data.domains" in bad.stderr
