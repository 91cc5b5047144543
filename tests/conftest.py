import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """One JAX compilation cache for the whole session, inherited by every `gx` subprocess and
    Ray worker (train.enable_compilation_cache honours it): each test's runs root would
    otherwise compile the same tiny models again (~9 of a tiny run's 14 s)."""
    before = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax-cache"))
    yield
    if before is None:
        os.environ.pop("JAX_COMPILATION_CACHE_DIR")
    else:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def corpus_root() -> Path:
    """The shared real corpus, referenced in place (never copied into the repo)."""
    return Path(__file__).resolve().parents[2] / "shared" / "corpus"


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One data cache (tokenizers, token shards) for the tests whose runs share tokenizer
    settings: each is trained and tokenized once per session, not once per test module."""
    return tmp_path_factory.mktemp("data-cache")
