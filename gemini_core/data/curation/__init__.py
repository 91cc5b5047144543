"""Data curation (`gx data ...`): filters, dedup and reports that turn raw domain files into a
cleaned data root that `gx run` reads like any other.

Modules (the per-document ones pure logic with no Ray in it), composed by `pipeline`:
  sources      raw records from local files (jsonl/jsonl.gz/parquet/txt globs) or a HF dataset
  normalize    NFC, control characters, whitespace
  quality      Gopher / C4 / FineWeb-style heuristic rules with per-domain overrides
  langid       language identification per document (py3langid; its model ships in the wheel)
  classifier   hashed n-gram linear quality classifier: train, save, load, score
  safety       the multilingual word blocklist, word-boundary aware, per language
  pii          masks e-mail addresses, IP addresses and phone numbers
  dedup        exact (normalized-text hash) and near-duplicate (MinHash LSH) detection
  contamination  13-word n-gram overlap of benchmark examples with a data root
               (`gx data contamination`), and the decontamination rule's benchmark index
  pipeline     `gx data prepare`: plans the shards, runs the two passes, reuses or writes output
  filter_pass  phase 1, in Ray workers: one shard through the per-document stages above
  dedup_pass   phase 2, on the driver: dedup in the global order, then the output files
  ray_map      one Ray Data map over work items, with a progress line per item
  report       report.json and its table; whether an output can be used or reused
  classifier_train  the classifier prepare uses: configured, or trained on a sample and cached
  tokenizer_report  bytes/token of tokenizers trained on the mix, on one domain, and raw bytes
"""
