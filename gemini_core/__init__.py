"""gemini_core: declarative LLM pretraining on JAX/Flax NNX — data, tokenizer, mixture, model, training."""
