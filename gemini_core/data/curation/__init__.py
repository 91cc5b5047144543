"""Data curation (`gx data ...`): filters, dedup and reports that turn raw domain files into a
cleaned data root that `gx run` reads like any other.

Modules, each pure per-document logic with no Ray in it, composed by `pipeline`:
  sources      raw records from local files (jsonl/jsonl.gz/parquet/txt globs) or a HF dataset
  normalize    NFC, control characters, whitespace
  quality      Gopher / C4 / FineWeb-style heuristic rules with per-domain overrides
  langid       language identification per document (py3langid; its model ships in the wheel)
  classifier   hashed n-gram linear quality classifier: train, save, load, score
  safety       the multilingual word blocklist, word-boundary aware, per language
  pii          masks e-mail addresses, IP addresses and phone numbers
  dedup        exact (normalized-text hash) and near-duplicate (MinHash LSH) detection
  pipeline     the stages as Ray Data map_batches over the input files, dedup, output, report
  tokenizer_report  bytes/token of tokenizers trained on the mix, on one domain, and raw bytes
"""
