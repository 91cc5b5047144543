"""Records of the local lm-eval task piqa_local, read in place from the shared benchmarks."""

import gzip
import json
from pathlib import Path

import datasets

# <repo>/tests/data/lm_eval/ -> <repo>/../shared/benchmarks
SHARED = Path(__file__).resolve().parents[3].parent / "shared"
DATA = SHARED / "benchmarks" / "piqa" / "data.jsonl.gz"


def load(**_metadata) -> datasets.DatasetDict:
    """lm-eval calls this with its metadata (the model_args among them), which it ignores."""
    with gzip.open(DATA, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(records)})
