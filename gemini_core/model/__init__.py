"""The decoder and decoding.

  transformer  multi-query attention, RoPE, RMSNorm, gated MLP, logical axis names on every
               parameter; a KV-cache path (prefill, extend) beside the training forward
  generate     jitted prefill and one-token decode over a preallocated KV cache; sampling
"""
