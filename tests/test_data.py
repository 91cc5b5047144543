"""Sources, tokenizer and token arrays on the real corpus (../shared/corpus), plus small corpora
built in tmp_path from real documents for the cache, identity and bad-data cases."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from gemini_core.config import DEFAULT_DOMAINS, DataConfig, TokenizerConfig
from gemini_core.data.sources import BadRecords, iter_documents
from gemini_core.data.tokenizer import CHUNK_CHARS, build_once, chunks, train_or_load_tokenizer
from gemini_core.data.tokens import encode_split, prepare_data, resolve_sample_weights
from gemini_core.errors import UserError

SPLITS = ("train", "valid")


class Log(list):
    def __call__(self, line: str) -> None:
        self.append(line)

    def has(self, text: str) -> bool:
        return any(text in line for line in self)


def read_texts(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def data_config(root: Path, **kw) -> DataConfig:
    tok = TokenizerConfig(vocab_size=kw.pop("vocab_size", 512),
                          sample_chars=kw.pop("sample_chars", 300_000))
    return DataConfig(root=str(root), seq_len=64, tokenizer=tok, **kw)


# ---------------------------------------------------------------------------------------------
# the real corpus, prepared once


@pytest.fixture(scope="module")
def real(corpus_root, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    cfg = data_config(corpus_root)
    log = Log()
    return cfg, cache, prepare_data(cfg, "natural", cache, log=log), log


@pytest.fixture(scope="module")
def valid_texts(corpus_root) -> dict[str, list[str]]:
    return {d: read_texts(corpus_root / d / "valid.jsonl.gz") for d in DEFAULT_DOMAINS}


def test_round_trip_and_exact_bytes_every_domain(real, valid_texts):
    _, _, data, _ = real
    tok, token_bytes = data.tokenizer, data.token_bytes
    for domain, texts in valid_texts.items():
        for text, ids in zip(texts, tok.encode_batch(texts)):
            assert tok.decode(ids) == text, domain
            assert int(token_bytes[ids].sum()) == len(text.encode("utf-8")), domain


def test_token_bytes_of_special_and_byte_pieces(real):
    tok = real[2].tokenizer
    tb = tok.token_bytes()
    assert tb.shape == (tok.vocab_size,) and tb.dtype == np.int32
    assert tb[tok.eos_id] == 0 and tb[0] == 0  # EOS, padding
    assert tb[tok.encode("\u4e00\U0001f600")].sum() == len("\u4e00\U0001f600".encode())
    byte_ids = [i for i in range(tok.vocab_size) if tok.piece(i).startswith("<0x")]
    assert len(byte_ids) == 256 and set(tb[byte_ids]) == {1}


def test_arrays_hold_documents_separated_by_eos(real, valid_texts):
    cfg, _, data, _ = real
    eos = data.tokenizer.eos_id
    for domain in cfg.domains:
        for split, arrays in (("train", data.train), ("valid", data.valid)):
            array = arrays[domain]
            entry = data.manifest["domains"][domain][split]
            assert array.dtype == np.uint16 and array.ndim == 1
            assert len(array) == entry["tokens"]
            assert int((array == eos).sum()) == entry["documents"] and array[-1] == eos
    # exact content: every document's ids, then EOS
    ids = data.tokenizer.encode_batch(valid_texts["code"])
    expected = np.concatenate([np.array(x + [eos]) for x in ids])
    np.testing.assert_array_equal(data.valid["code"], expected)


def test_manifest_counts_match_the_corpus(real, corpus_root):
    cfg, _, data, _ = real
    stats = json.loads((corpus_root / "stats.json").read_text())["splits"]
    m = data.manifest
    assert m["tokenizer"] == {"fingerprint": data.tokenizer.fingerprint, "vocab_size": 512}
    assert m["dtype"] == "uint16" and m["eos_id"] == data.tokenizer.eos_id
    assert list(m["domains"]) == list(cfg.domains)
    for domain in cfg.domains:
        for split in SPLITS:
            entry = m["domains"][domain][split]
            source = corpus_root / domain / f"{split}.jsonl.gz"
            assert entry["file"] == source.name
            assert entry["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
            assert entry["documents"] == stats[domain][split]["docs"]
            assert entry["bytes"] == stats[domain][split]["bytes"]
            assert entry["bad_records"] == {} and entry["token_bytes_mismatch"] == 0
            tokens = (data.train if split == "train" else data.valid)[domain]
            assert int(data.token_bytes[tokens].sum()) == entry["bytes"]
            assert 1.0 < entry["bytes_per_token"] < 6
    assert str(corpus_root) not in json.dumps(m)  # content identity, no paths


def test_tokenizer_sample_follows_the_weights(real, corpus_root):
    cfg, cache, data, _ = real
    weights = data.sample_weights
    # "natural" = each domain's share of training-text bytes
    train_bytes = {d: data.manifest["domains"][d]["train"]["bytes"] for d in cfg.domains}
    total = sum(train_bytes.values())
    assert weights == pytest.approx({d: n / total for d, n in train_bytes.items()}, abs=1e-12)
    assert resolve_sample_weights(cfg, "natural", cache) == weights
    per_domain = data.tokenizer.meta["sample_chars_per_domain"]
    for d, w in weights.items():
        assert 0 <= per_domain[d] - round(300_000 * w) < CHUNK_CHARS
    assert resolve_sample_weights(cfg, "uniform", cache) == {d: 1 / 6 for d in cfg.domains}
    with pytest.raises(UserError, match=r"sample_weights\.nope: unknown domain"):
        resolve_sample_weights(cfg, {"nope": 1.0}, cache)
    with pytest.raises(UserError, match="sum to 0.5"):
        resolve_sample_weights(cfg, {"web": 0.5}, cache)


def test_second_call_reuses_the_cache(real):
    cfg, cache, data, _ = real
    files = [data.dir / "manifest.json", data.tokenizer.path / "spm.model"]
    files += [data.dir / e["array"] for s in data.manifest["domains"].values()
              for e in s.values()]
    before = {f: f.stat().st_mtime_ns for f in files}
    log = Log()
    again = prepare_data(cfg, "natural", cache, log=log)
    assert log.has("tokenizer: reusing") and log.has("data: reusing token arrays")
    assert not log.has("train/books")  # nothing re-encoded
    assert {f: f.stat().st_mtime_ns for f in files} == before
    assert again.manifest == data.manifest and again.manifest_hash == data.manifest_hash


def test_encode_split_tokenizes_another_folder_with_an_existing_tokenizer(real, corpus_root,
                                                                         tmp_path):
    data = real[2]
    out = encode_split(data.tokenizer, corpus_root, ["wiki", "math"], "valid.jsonl.gz",
                       tmp_path, split="heldout", log=Log())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["math.heldout.bin", "wiki.heldout.bin"]
    for d in ("wiki", "math"):
        np.testing.assert_array_equal(out[d].tokens, data.valid[d])
        assert out[d].entry["tokens"] == data.manifest["domains"][d]["valid"]["tokens"]


def test_report_names_tokens_and_throughput(real):
    log = real[3]
    assert log.has("tokenizer: trained bpe vocab 512") and log.has("MB/s")
    assert log.has("train/multilingual") and log.has("valid tokens")


# ---------------------------------------------------------------------------------------------
# small corpora made of real documents


def write_jsonl(path: Path, lines: list[bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = b"".join(line + b"\n" for line in lines)
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)


def record(text: str, i: int = 0) -> bytes:
    return json.dumps({"id": i, "text": text, "source": "test"}).encode()


@pytest.fixture(scope="module")
def snippets(valid_texts) -> dict[str, list[str]]:
    # a few kilobytes of real text per domain, split into short documents
    return {d: [t[:600] for t in texts[:12]] for d, texts in valid_texts.items()}


def make_corpus(root: Path, snippets, domains=("wiki", "code"), ext=".jsonl.gz") -> Path:
    for d in domains:
        docs = snippets[d]
        write_jsonl(root / d / f"train{ext}", [record(t, i) for i, t in enumerate(docs[:9])])
        write_jsonl(root / d / f"valid{ext}", [record(t, i) for i, t in enumerate(docs[9:])])
    return root


def small_config(root: Path, domains=("wiki", "code"), ext=".jsonl.gz", **kw) -> DataConfig:
    return data_config(root, domains=tuple(domains), train_file=f"train{ext}",
                       valid_file=f"valid{ext}", vocab_size=320, sample_chars=8_000, **kw)


def test_moved_corpus_gives_the_identical_manifest(tmp_path, snippets):
    a = make_corpus(tmp_path / "a" / "corpus", snippets)
    b = tmp_path / "elsewhere" / "copy"
    shutil.copytree(a, b)
    first = prepare_data(small_config(a), "uniform", tmp_path / "cache1", log=Log())
    second = prepare_data(small_config(b), "uniform", tmp_path / "cache2", log=Log())
    assert first.manifest == second.manifest and first.manifest_hash == second.manifest_hash
    assert (first.tokenizer.path / "spm.model").read_bytes() == \
        (second.tokenizer.path / "spm.model").read_bytes()  # training is deterministic
    log = Log()
    third = prepare_data(small_config(b), "uniform", tmp_path / "cache1", log=log)
    assert log.has("tokenizer: reusing") and log.has("data: reusing token arrays")
    assert third.manifest_hash == first.manifest_hash


def test_sample_weights_change_the_tokenizer(tmp_path, snippets):
    root = make_corpus(tmp_path / "corpus", snippets)
    cfg = small_config(root)
    fps = {train_or_load_tokenizer(cfg, w, tmp_path / "cache", log=Log()).fingerprint
           for w in ({"wiki": 0.5, "code": 0.5}, {"wiki": 0.9, "code": 0.1}, {"code": 1.0})}
    assert len(fps) == 3
    same = train_or_load_tokenizer(cfg, {"wiki": 0.5, "code": 0.5}, tmp_path / "cache", Log())
    assert same.fingerprint in fps


def test_chunks_cover_the_text_in_bounded_pieces():
    text = ("word " * 3000) + "x" * 9000 + "\nline\n" * 500
    pieces = list(chunks(text))
    assert "".join(pieces) == text and max(map(len, pieces)) <= CHUNK_CHARS
    assert list(chunks("")) == [] and list(chunks("short")) == ["short"]


def test_an_interrupted_build_leaves_no_entry(tmp_path):
    final = tmp_path / "entry"

    def crash(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"12")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_once(final, lambda p: True, crash)
    assert not final.exists() and not list(tmp_path.glob(".tmp-*"))
    assert build_once(final, lambda p: True, lambda tmp: (tmp / "ok").write_text("1"))
    assert not build_once(final, lambda p: True, crash)  # complete: reused, never rebuilt
    assert (final / "ok").read_text() == "1"


# ---------------------------------------------------------------------------------------------
# bad data: one UserError naming file and line, or counted with on_bad_record="skip"


def good_lines(snippets, n=9) -> list[bytes]:
    return [record(t, i) for i, t in enumerate(snippets["wiki"][:n])]


BAD_LINES = {  # kind, the bad line, what the message must say besides file:line
    "invalid_utf8": (b'{"id": 3, "text": "caf\xc3 \xff"}', "invalid UTF-8"),
    "surrogate": (b'{"id": 3, "text": "a \\ud800 b"}', "lone surrogate"),
    "invalid_json": (b'{"id": 3, "text": "unterminated', "not valid JSON"),
    "missing_field": (b'{"id": 3, "body": "no text here"}', "no 'text' field"),
    "not_a_string": (b'{"id": 3, "text": 42}', "field 'text' is int"),
    "not_an_object": (b'["text", "in a list"]', "expected a JSON object"),
}
KIND = {"surrogate": "invalid_utf8", "missing_field": "invalid_record",
        "not_a_string": "invalid_record", "not_an_object": "invalid_record"}


def corpus_with_bad_train(root: Path, snippets, bad_line: bytes, at: int = 3) -> Path:
    make_corpus(root, snippets, ext=".jsonl")
    lines = good_lines(snippets)
    lines.insert(at - 1, bad_line)  # becomes line `at`
    write_jsonl(root / "wiki" / "train.jsonl", lines)
    return root / "wiki" / "train.jsonl"


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_a_bad_record_is_an_error_naming_file_and_line(tmp_path, snippets, case):
    line, says = BAD_LINES[case]
    path = corpus_with_bad_train(tmp_path / "corpus", snippets, line)
    with pytest.raises(UserError) as e:
        prepare_data(small_config(tmp_path / "corpus", ext=".jsonl"), "uniform",
                     tmp_path / "cache", log=Log())
    assert f"{path}:3" in str(e.value) and says in str(e.value)
    assert "on_bad_record='skip'" in str(e.value)


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_a_bad_record_is_counted_when_skipping(tmp_path, snippets, case):
    path = corpus_with_bad_train(tmp_path / "corpus", snippets, BAD_LINES[case][0])
    log = Log()
    data = prepare_data(small_config(tmp_path / "corpus", ext=".jsonl", on_bad_record="skip"),
                        "uniform", tmp_path / "cache", log=log)
    entry = data.manifest["domains"]["wiki"]["train"]
    assert entry["documents"] == 9
    assert entry["bad_records"] == {"counts": {KIND.get(case, case): 1}, "first_lines": [3]}
    assert log.has(f"skipped 1 bad records in {path}")
    assert data.manifest["domains"]["code"]["train"]["bad_records"] == {}
    # the same data asked for with "error" must not pass through the cache silently
    with pytest.raises(UserError, match=re.escape(f"{path}:3")):
        prepare_data(small_config(tmp_path / "corpus", ext=".jsonl"), "uniform",
                     tmp_path / "cache", log=Log())


def truncated_corpus(root: Path, snippets) -> tuple[Path, int]:
    make_corpus(root, snippets)
    lines = [record(t, i) for i, t in enumerate(snippets["books"] * 3)]
    path = root / "wiki" / "train.jsonl.gz"
    write_jsonl(path, lines)
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * 0.6)])
    return path, len(lines)


def test_a_truncated_gz_is_an_error_naming_the_last_good_line(tmp_path, snippets):
    path, _ = truncated_corpus(tmp_path / "corpus", snippets)
    with pytest.raises(UserError, match=r"truncated or corrupt after line \d+") as e:
        prepare_data(small_config(tmp_path / "corpus"), "uniform", tmp_path / "cache", Log())
    assert str(path) in str(e.value)


def test_a_truncated_gz_keeps_what_was_read_when_skipping(tmp_path, snippets):
    path, n_lines = truncated_corpus(tmp_path / "corpus", snippets)
    bad = BadRecords()
    texts = list(iter_documents(path, "text", "skip", bad))
    assert 0 < len(texts) < n_lines
    data = prepare_data(small_config(tmp_path / "corpus", on_bad_record="skip"), "uniform",
                        tmp_path / "cache", log=Log())
    entry = data.manifest["domains"]["wiki"]["train"]
    assert entry["documents"] == len(texts)
    assert entry["bad_records"] == {"counts": {"truncated": 1}, "first_lines": [len(texts) + 1]}


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_an_empty_domain_file_is_always_an_error(tmp_path, snippets, mode):
    root = make_corpus(tmp_path / "corpus", snippets)
    empty = root / "code" / "valid.jsonl.gz"
    empty.write_bytes(gzip.compress(b"", mtime=0))
    with pytest.raises(UserError, match=re.escape(f"{empty}: no documents")):
        prepare_data(small_config(root, on_bad_record=mode), "uniform", tmp_path / "cache", Log())


def test_a_file_of_only_bad_records_is_an_error_even_when_skipping(tmp_path, snippets):
    root = make_corpus(tmp_path / "corpus", snippets, ext=".jsonl")
    write_jsonl(root / "code" / "valid.jsonl", [b"not json", b'{"id": 1}'])
    with pytest.raises(UserError, match=r"valid.jsonl: no documents \(2 bad records skipped\)"):
        prepare_data(small_config(root, ext=".jsonl", on_bad_record="skip"), "uniform",
                     tmp_path / "cache", Log())


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_a_missing_domain_or_file_is_always_an_error(tmp_path, snippets, mode):
    root = make_corpus(tmp_path / "corpus", snippets)
    cfg = small_config(root, domains=("wiki", "code", "math"), on_bad_record=mode)
    with pytest.raises(UserError, match=re.escape(f"domain 'math': no folder {root / 'math'} "
                                                  f"(domains found in {root}: code, wiki")):
        prepare_data(cfg, "uniform", tmp_path / "cache", Log())
    (root / "wiki" / "valid.jsonl.gz").unlink()
    with pytest.raises(UserError, match=re.escape(f"domain 'wiki': missing file "
                                                  f"{root / 'wiki' / 'valid.jsonl.gz'}")):
        prepare_data(small_config(root, on_bad_record=mode), "uniform", tmp_path / "cache",
                     Log())


def test_parquet_files_read_like_jsonl(tmp_path, snippets):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    jsonl = make_corpus(tmp_path / "jsonl", snippets)
    for d in ("wiki", "code"):
        for split, docs in (("train", snippets[d][:9]), ("valid", snippets[d][9:])):
            (tmp_path / "pq" / d).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}),
                           tmp_path / "pq" / d / f"{split}.parquet")
    a = prepare_data(small_config(jsonl), "uniform", tmp_path / "cache", Log())
    b = prepare_data(small_config(tmp_path / "pq", ext=".parquet"), "uniform", tmp_path / "cache",
                     Log())
    for d in ("wiki", "code"):
        np.testing.assert_array_equal(a.train[d], b.train[d])
    bad_file = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": ["fine", None, "also fine"]}), bad_file)
    with pytest.raises(UserError, match=re.escape(f"{bad_file}:2: field 'text' is NoneType")):
        list(iter_documents(bad_file, "text", "error", BadRecords()))
    bad = BadRecords()
    assert list(iter_documents(bad_file, "text", "skip", bad)) == ["fine", "also fine"]
    assert bad.for_file(bad_file) == {"counts": {"invalid_record": 1}, "first_lines": [2]}
