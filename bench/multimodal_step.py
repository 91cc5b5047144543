"""Multimodal training step: the encoders' share of the step time, and whether the input
pipeline keeps up (experiments/multimodal.py's model and data).

Three timings on the same batches (the run's mixture: 75% text, 17% image captions, 8% audio
transcripts), each the median of `--steps` steps after a warm-up:
  step      the full train step (forward, backward, AdamW) of the multimodal model;
  encoders  forward and backward of the media embedding alone (markers, both encoders and their
            table gathers) on the same token ids, its output reduced to a scalar;
  text      the same model's train step on the same batches with every media id replaced by a
            text id, so the encoders compute nothing for it (its `jnp.where` still runs).
Encoders' share = encoders / step; the step's excess over `text` is a second estimate of it.

The input pipeline: the sampler's `batch(step)` (which sequences, copied out of the memory-mapped
token arrays) timed for the same steps. The training loop dispatches a step and then builds the
next batch while it runs (JAX's asynchronous dispatch), so training waits on its input only when
a batch takes longer than a step: the wait per step is max(0, batch - step).

usage: python bench/multimodal_step.py [--steps 20] [--out F]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from machine import describe  # noqa: E402

from gemini_core.data.sampler import Sampler  # noqa: E402
from gemini_core.experiment import load_experiment  # noqa: E402
from gemini_core.model import media  # noqa: E402
from gemini_core.train import step_fns, trainer  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--runs-root", default=str(REPO / "runs"))
    p.add_argument("--corpus", default=str(REPO.parent / "shared" / "corpus"))
    p.add_argument("--out", default="")
    return p.parse_args()


def median_s(fn, n: int) -> float:
    times = []
    for i in range(n + 2):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(i))
        if i >= 2:  # the first two: compile and warm caches
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    args = parse()
    exp = load_experiment(str(REPO / "experiments" / "multimodal.py"),
                          [f"--config.data.root={args.corpus}"]).config
    p = trainer.prepare(exp, Path(args.runs_root), log=lambda _: None)
    cfg, tc = p.cfg, p.cfg.train
    sampler = Sampler(p.schedule, cfg.data.domains, p.data.train, total_steps=tc.steps,
                      batch_size=tc.batch_size, seq_len=cfg.data.seq_len, seed=cfg.seed)
    batches = [sampler.batch(s)[0] for s in range(args.steps + 2)]
    V = cfg.model.vocab_size
    text_batches = [np.where(b >= V, b % V, b) for b in batches]
    media_share = float(np.mean([(b[:, 1:] >= V).mean() for b in batches]))

    graphdef, state = step_fns.init_state(cfg.model, cfg.optimizer, tc.steps, cfg.seed)
    state = media.with_tables(graphdef, state, p.data.media.features)
    train = step_fns.make_train_step(graphdef)
    holder = {"state": state}

    def step(i):
        holder["state"], metrics = train(holder["state"], jnp.asarray(batches[i]))
        return metrics["loss"]

    def text_step(i):
        holder["state"], metrics = train(holder["state"], jnp.asarray(text_batches[i]))
        return metrics["loss"]

    model = nnx.merge(graphdef, holder["state"]).model
    # copies: the train steps donate (and so delete) the state's own buffers
    embed_def, params, tables = nnx.split(model.media, nnx.Param, ...)
    params, tables = jax.tree.map(jnp.copy, (params, tables))

    @jax.jit
    def encoders(params, tables, ids):
        def f(params):
            return jnp.sum(nnx.merge(embed_def, params, tables)(ids) ** 2)
        return jax.grad(f)(params)

    def encoder_step(i):
        return encoders(params, tables, jnp.asarray(batches[i][:, :-1].reshape(-1)))

    t_step = median_s(step, args.steps)
    t_text = median_s(text_step, args.steps)
    t_enc = median_s(encoder_step, args.steps)
    t_batch = median_s(lambda i: sampler.batch(i)[0], args.steps)
    tokens = tc.batch_size * cfg.data.seq_len
    rows = [("train step (multimodal)", t_step), ("train step, media ids as text", t_text),
            ("encoders: forward + backward", t_enc), ("sampler.batch", t_batch)]
    lines = [f"# multimodal step ({describe()})", "",
             f"`python bench/multimodal_step.py --steps {args.steps}`; experiments/multimodal.py "
             f"model (d={cfg.model.d_model}, {cfg.model.num_layers} layers), batch "
             f"{tc.batch_size} x {cfg.data.seq_len} = {tokens:,} tokens, "
             f"{media_share:.1%} of the targets media or markers", "",
             "| what | median ms | share of the step |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {t * 1e3:.1f} | {t / t_step:.1%} |" for name, t in rows]
    lines += ["", f"- encoders' share of the step: **{t_enc / t_step:.1%}** (target <= 15%); "
              f"step minus the text-only step: {(t_step - t_text) / t_step:.1%}",
              f"- input wait per step: **{max(0.0, t_batch - t_step) * 1e3:.1f} ms** (batch "
              f"{t_batch * 1e3:.1f} ms built while a {t_step * 1e3:.0f} ms step runs), "
              f"{tokens / t_step:,.0f} tokens/s"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
