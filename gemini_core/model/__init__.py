"""The decoder and decoding.

  transformer  multi-query attention, RMSNorm, gated MLP, logical axis names on every
               parameter; a KV-cache path (prefill, extend) beside the training forward;
               document masking, a scanned and rematerialised layer stack
  attention    the attention kernels (dense, blockwise flash attention, cuDNN) behind one
               signature, and `model.attention`'s choice among them
  rope         rotary position tables, scaled for a longer context (linear, NTK, YaRN)
  generate     jitted prefill and one-token decode over a preallocated KV cache; sampling
"""
