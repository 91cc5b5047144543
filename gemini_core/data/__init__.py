"""Data: sources, tokenizer, token arrays, mixture schedule and sampler."""
