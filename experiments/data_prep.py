"""Data curation: the six-domain corpus through quality, language, classifier, safety and PII
filters and exact + near-duplicate removal, into a cleaned data root for `gx run`.

    gx data prepare experiments/data_prep.py --config.data.root=../shared/corpus
    gx run experiments/quickstart.py --config.data.root=<the printed output dir>

Every stage can be switched off (`--config.safety.enabled=false`) or tuned; per-domain
quality rules on top of the built-in ones go under `quality.overrides.<domain>`.
"""

import ml_collections


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.name = "data_prep"
    c.data = dict(root="", domains=("books", "wiki", "math", "code", "web", "multilingual"),
                  files=dict(train="train.jsonl.gz", valid="valid.jsonl.gz"), text_field="text")
    c.quality = dict(enabled=True, params={}, overrides={})
    c.langid = dict(enabled=True)
    c.classifier = dict(enabled=True, positives=("wiki", "books"), negatives=("web",),
                        apply_to=("web",), drop_fraction=0.1)
    c.safety = dict(enabled=True, blocklist_dir="", max_matches=2, exempt=("code",))
    c.pii = dict(enabled=True)
    c.dedup = dict(exact=True, near=True, ngram=5, num_perm=128, bands=16, threshold=0.8)
    c.workers = 0
    return c
