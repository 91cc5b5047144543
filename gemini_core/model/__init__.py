"""The decoder: multi-query attention, RoPE, RMSNorm, SwiGLU, with logical axis names on every parameter."""
