"""One decoder trained on text, images and audio: Fashion-MNIST images with captions and spoken
digits with transcripts are mixture domains beside the six text domains (early fusion: a small
encoder turns each patch or stack of log-mel frames into a soft token in the sequence).

    gx run experiments/multimodal.py --config.data.root=../shared/corpus
    gx eval RUN --tasks fashion_mnist,spoken_digits
    gx generate RUN --image shirt.png

`arg` picks the size: "" (the default run, ~40 min on 2 cores without AVX-512), "text" (the same
text tokens without the modality domains: the text-only baseline of the same text data), "tiny"
(a smoke run for tests). Images and audio take 25% of the tokens together.
"""

from pathlib import Path

import ml_collections

# beside the repository, like the corpus (../shared), wherever the command is run from
MULTIMODAL = str(Path(__file__).resolve().parents[1].parent / "shared" / "multimodal")
TEXT = ("books", "wiki", "math", "code", "web", "multilingual")
TEXT_WEIGHTS = dict(books=0.2, wiki=0.15, math=0.15, code=0.15, web=0.2, multilingual=0.15)
MEDIA_WEIGHTS = dict(image_caption=0.17, audio_transcript=0.08)


def get_config(arg=None):
    size = arg or "default"
    sizes = {"default": (3000, 32), "text": (2250, 32), "tiny": (6, 4)}
    if size not in sizes:
        raise ValueError(f"multimodal: size {size!r}: expected one of {', '.join(sizes)}")
    steps, batch = sizes[size]
    c = ml_collections.ConfigDict()
    c.name = "multimodal" if size != "tiny" else "multimodal_tiny"
    c.seed = 0
    encoders = dict(image=dict(modality="image", patch=7),
                    audio=dict(modality="audio", n_mels=40, frames_per_token=4, max_tokens=32))
    c.model = dict(d_model=128, num_layers=4, num_heads=4, num_kv_heads=1, mlp_dim=512,
                   tie_embeddings=True, encoders=encoders if size != "text" else {})
    modalities = dict(
        image_caption=dict(kind="image_caption", source=f"{MULTIMODAL}/fashion_mnist",
                           encoder="image"),
        audio_transcript=dict(kind="audio_transcript", source=f"{MULTIMODAL}/spoken_digits",
                              encoder="audio"))
    text_only = size == "text"
    c.data = dict(root="", seq_len=128, max_epochs=20.0, document_mask=True,
                  domains=TEXT if text_only else TEXT + tuple(modalities),
                  modalities={} if text_only else modalities,
                  tokenizer=dict(vocab_size=4096, model_type="bpe", sample_chars=2_000_000,
                                 sample_weights="natural"))
    # the text-only baseline trains on the multimodal run's text tokens: 75% of its steps at
    # the same text weights
    weights = (TEXT_WEIGHTS if text_only else
               {**{d: w * 0.75 for d, w in TEXT_WEIGHTS.items()}, **MEDIA_WEIGHTS})
    c.mixture = dict(stages=dict(base=dict(start=0.0, weights=weights)))
    c.optimizer = dict(lr=3e-3, warmup_steps=min(60, steps // 4), schedule="wsd",
                       decay_fraction=0.2, weight_decay=0.1, clip_norm=1.0)
    c.train = dict(steps=steps, batch_size=batch, log_every=max(1, steps // 40),
                   eval_every=max(1, steps // 4), eval_batches=4 if size != "tiny" else 1,
                   checkpoint_every=max(1, steps // 4))
    tasks = () if text_only else ("fashion_mnist", "spoken_digits")
    # in training: 500 held-out items per task at each eval; at the end: every one of them
    c.eval = dict(downstream=dict(tasks=tasks, every_steps=0 if size == "tiny" or text_only
                                  else steps // 4,
                                  limit=500 if size != "tiny" else 20,
                                  final_limit=0 if size != "tiny" else 20))
    c.tracking = dict(wandb=True, project="gemini-core", job_type="multimodal")
    return c
