from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def corpus_root() -> Path:
    """The shared real corpus, referenced in place (never copied into the repo)."""
    return Path(__file__).resolve().parents[2] / "shared" / "corpus"
