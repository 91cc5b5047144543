"""Self-training beyond human data: ReST^EM (gemini_core.selftrain.loop) over verifiable
problems (problems), sampled in shards on Ray (sampling), fine-tuned with a masked loss
(finetune), reported per iteration (report). Entry point: `gx run experiments/rest_em.py`."""
