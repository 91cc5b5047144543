"""Modality domains end to end: images with captions and recordings with transcripts as mixture
domains (gemini_core.data.modality, gemini_core.model.media).

Small synthetic sources in the real formats (gzip IDX images, PCM WAVs named as FSDD names
them) whose two classes are easy to tell apart, beside two real text domains: the runs are
seconds long and the model can learn the classes, so caption ranking, the loss mask, the media
tables in checkpoints, generation, sharding and every bad-input path are checked on behaviour.
The real datasets' readers are tested in tests/test_media.py, and the real-data run is
experiments/multimodal.py (bench/results).
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from gemini_core.data import media_data
from gemini_core.model.options import EncoderConfig, MediaTable

REPO = Path(__file__).resolve().parents[1]
TRAIN_IMAGES, TEST_IMAGES, TAKES = 96, 16, 30


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_wav(path: Path, samples: np.ndarray, rate: int = 8000, channels: int = 1) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32000).astype("<i2").tobytes())


def images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class 0 dark, class 1 bright, with noise: 28x28 uint8, alternating labels."""
    rng = np.random.default_rng(seed)
    labels_N = np.arange(n) % 2
    base_N = np.where(labels_N == 1, 200, 30)
    images_NxHxW = base_N[:, None, None] + rng.integers(-25, 25, (n, 28, 28))
    return images_NxHxW.astype(np.uint8), labels_N.astype(np.uint8)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multimodal_sources")
    fashion = root / "fashion"
    fashion.mkdir()
    for stem, n, seed in (("train", TRAIN_IMAGES, 0), ("t10k", TEST_IMAGES, 1)):
        x, y = images(n, seed)
        write_idx(fashion / f"{stem}-images-idx3-ubyte.gz", x)
        write_idx(fashion / f"{stem}-labels-idx1-ubyte.gz", y)
    digits = root / "digits" / "recordings"
    digits.mkdir(parents=True)
    t = np.arange(2400) / 8000  # 0.3 s
    rng = np.random.default_rng(2)
    # a low and a high tone: their spectra differ (the per-recording normalisation keeps the
    # spectrum's shape)
    for digit, hz in ((0, 400.0), (1, 2500.0)):  # "low", "high"
        for take in range(TAKES):
            tone = 0.5 * np.sin(2 * np.pi * hz * t) + 0.02 * rng.standard_normal(len(t))
            write_wav(digits / f"{digit}_synth_{take}.wav", tone)
    return root


def config_file(tmp: Path, sources: Path, corpus: Path, cache: Path, **extra) -> Path:
    """An experiment file: two text domains and the two modality domains."""
    cfg = dict(
        name="mm", seed=0,
        model=dict(d_model=32, num_layers=2, num_heads=2, mlp_dim=64,
                   encoders=dict(image=dict(modality="image", patch=7),
                                 audio=dict(modality="audio", n_mels=16, frames_per_token=4,
                                            max_tokens=8))),
        data=dict(root=str(corpus), cache_dir=str(cache), seq_len=64, document_mask=True,
                  domains=("wiki", "code", "image_caption", "audio_transcript"),
                  tokenizer=dict(vocab_size=384, sample_chars=200_000, sample_weights="natural"),
                  modalities=dict(
                      image_caption=dict(kind="image_caption", source=str(sources / "fashion"),
                                         encoder="image", labels=("dark", "bright")),
                      audio_transcript=dict(kind="audio_transcript",
                                            source=str(sources / "digits"), encoder="audio",
                                            labels=("low", "high")))),
        mixture=dict(stages=dict(base=dict(start=0.0, weights=dict(
            wiki=0.1, code=0.1, image_caption=0.35, audio_transcript=0.45)))),
        optimizer=dict(lr=1e-2, warmup_steps=5),
        train=dict(steps=120, batch_size=8, log_every=10, eval_every=60, eval_batches=1,
                   checkpoint_every=60),
        tracking=dict(wandb=False),
        eval=dict(downstream=dict(tasks=("fashion_mnist", "spoken_digits"), limit=0)),
    )
    for key, value in extra.items():  # "data.seq_len" -> value
        *parents, leaf = key.split(".")
        section = cfg
        for p in parents:
            section = section[p]
        section[leaf] = value
    path = tmp / "mm_experiment.py"
    path.write_text(f"import ml_collections\n\ndef get_config(arg=None):\n"
                    f"    return ml_collections.ConfigDict({cfg!r})\n")
    return path


def gx(*args: str, runs: Path, devices: int = 0) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GX_")}
    env["WANDB_MODE"] = "offline"
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.run([sys.executable, "-m", "gx", "--runs-root", str(runs), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def only_run(runs: Path):
    from gemini_core.runs.rundir import iter_runs
    found = list(iter_runs(runs))
    assert len(found) == 1, found
    return found[0]


# ---------------------------------------------------------------------------------------------
# layout (no jax)


def test_patches_are_the_images_blocks_in_row_major_order():
    x_NxHxW = np.arange(2 * 28 * 28, dtype=np.int64).reshape(2, 28, 28) % 251
    p = media_data.patchify(x_NxHxW.astype(np.uint8), 7, "here")
    assert p.shape == (2, 16, 49)
    for n, slot in ((0, 0), (1, 5), (1, 15)):
        r, c = divmod(slot, 4)
        np.testing.assert_array_equal(p[n, slot], x_NxHxW[n, 7 * r:7 * r + 7, 7 * c:7 * c + 7]
                                      .reshape(-1))


def test_stream_holds_markers_references_caption_and_eos():
    table = MediaTable(domain="d", encoder="audio", modality="audio", first_id=1004, items=5,
                       slots=8, features=64)
    items = media_data.Items(np.zeros((2, 8, 64), np.float16), np.array([3, 8]), np.array([0, 1]))
    tokens, starts = media_data.stream(items, 2, table, [[7, 8], [9]], text_vocab=1000, eos=1)
    first = [1002, 1004 + 2 * 8, 1004 + 2 * 8 + 1, 1004 + 2 * 8 + 2, 1003, 7, 8, 1]
    assert tokens[:len(first)].tolist() == first
    assert starts.tolist() == [0, len(first)]
    second = tokens[len(first):]
    assert second[0] == 1002 and second[-2:].tolist() == [9, 1]
    assert second[1:9].tolist() == list(range(1004 + 3 * 8, 1004 + 4 * 8))
    assert media_data.prompt_ids(table, 2, 3, 1000, 1) == [1, *first[:5]]


def test_audio_features_stack_frames_and_mark_long_recordings_cut():
    enc = EncoderConfig(modality="audio", n_mels=16, frames_per_token=4, max_tokens=8)
    t = np.arange(8000) / 8000  # 1 s: 99 frames of 10 ms -> 25 tokens, more than 8
    feats, used, cut = media_data.audio_features(np.sin(2 * np.pi * 440 * t).astype(np.float32),
                                               enc)
    assert feats.shape == (8, 64) and feats.dtype == np.float16 and used == 8 and cut
    short, used, cut = media_data.audio_features(np.zeros(800, np.float32) + 0.1, enc)
    assert (used, cut) == (3, False)  # 0.1 s: 9 frames -> 3 tokens, the rest zero padding
    assert not np.any(short[3:])


# ---------------------------------------------------------------------------------------------
# the model


def small_model(seed: int = 0):
    from flax import nnx

    from gemini_core.config import ModelConfig
    from gemini_core.model.transformer import Transformer
    tables = (MediaTable("img", "image", "image", first_id=104, items=3, slots=4, features=4,
                         grid=2),)
    cfg = ModelConfig(d_model=16, num_layers=1, num_heads=2, mlp_dim=32, vocab_size=100,
                      media=tables)
    return Transformer(cfg, rngs=nnx.Rngs(params=seed)), tables[0]


def test_a_reference_embeds_as_its_patch_through_the_encoder_and_markers_have_their_own():
    import jax.numpy as jnp

    from gemini_core.model import media
    model, table = small_model()
    rng = np.random.default_rng(0)
    feats = rng.integers(0, 256, (3, 4, 4)).astype(np.uint8)
    model.media.tables[0][...] = jnp.asarray(feats)
    ids = np.array([[5, 100, 104 + 1 * 4 + 3, 101, 7]], np.int32)  # text, BOI, item 1 slot 3
    x_NxD = np.asarray(model.embed(jnp.asarray(ids)))
    enc = model.media.encoders["image"]
    want = ((feats[1, 3].astype(np.float32) / 255 - media.PIXEL_MEAN) / media.PIXEL_STD
            @ np.asarray(enc.proj_FxD[...]) + np.asarray(enc.row_GxD[...])[1]
            + np.asarray(enc.col_GxD[...])[1])
    np.testing.assert_allclose(x_NxD[2], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x_NxD[1], np.asarray(model.media.markers_4xD[...])[0], rtol=1e-6)
    np.testing.assert_allclose(x_NxD[0], np.asarray(model.embed_VxD[...])[5] * 4.0, rtol=1e-6)


def test_parameter_counts_include_the_encoders_and_leave_the_tables_out():
    from gemini_core.config import OptimizerConfig
    from gemini_core.scale import flops
    from gemini_core.train import step_fns
    model, table = small_model()
    _, state = step_fns.init_state(model.cfg, OptimizerConfig(lr=1e-3), 10, 0)
    counts = flops.param_counts(model.cfg)
    # markers 4·D, the image encoder's F·D map and its rows and columns (2·grid·D)
    assert counts["media"] == 4 * 16 + 4 * 16 + 2 * 2 * 16
    assert step_fns.count_params(state) == counts["total"]
    assert state["model"]["media"]["tables"][0][...].size == 3 * 4 * 4  # state, not counted


def test_loss_counts_text_targets_only_and_training_leaves_the_tables_alone():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from gemini_core.train.step_fns import mean_nll
    model, _ = small_model()
    model.media.tables[0][...] = jnp.full((3, 4, 4), 77, jnp.uint8)
    tokens = jnp.asarray([[1, 100, 104, 105, 106, 107, 101, 9, 12, 1],
                          [1, 5, 6, 7, 8, 9, 10, 11, 12, 1]], jnp.int32)
    nll = np.asarray(model.token_nll(tokens[:, :-1], tokens[:, 1:]))
    targets = np.asarray(tokens[:, 1:])
    assert np.all(nll[targets >= 100] == 0) and np.all(nll[targets < 100] > 0)
    loss, row = mean_nll(model, tokens)
    np.testing.assert_allclose(float(loss), nll.sum() / (targets < 100).sum(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(row), nll.sum(1) / (targets < 100).sum(1), rtol=1e-6)
    grads = nnx.grad(lambda m: mean_nll(m, tokens)[0])(model)
    leaves = jax.tree_util.tree_flatten_with_path(grads)[0]
    assert not any("tables" in jax.tree_util.keystr(k) for k, _ in leaves)
    enc_grad = grads["media"]["encoders"]["image"]["proj_FxD"]
    assert float(jnp.abs(enc_grad[...]).sum()) > 0  # the captions' loss reaches the encoder


# ---------------------------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sources, corpus_root, data_cache):
    tmp = tmp_path_factory.mktemp("mm_run")
    exp = config_file(tmp, sources, corpus_root, data_cache)
    proc = gx("run", str(exp), runs=tmp / "runs")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, exp, only_run(tmp / "runs"), proc.stdout


def test_a_multimodal_run_learns_both_modalities_and_reports_them_beside_text(trained):
    _, _, run, out = trained
    summary = run.summary()
    for domain in ("wiki", "code", "image_caption", "audio_transcript"):
        assert summary[f"eval/{domain}/bpb"] > 0
        assert domain in out  # the per-domain table
    # two trivially separable classes per modality, held-out items
    assert summary["downstream/fashion_mnist/acc"] == 1.0
    assert summary["downstream/spoken_digits/acc"] == 1.0
    # captions are learned: the held-out caption loss is far below the text domains'
    assert summary["eval/image_caption/loss"] < 0.5 * summary["eval/wiki/loss"]
    cfg = run.config()
    assert [t["domain"] for t in cfg["model"]["media"]] == ["image_caption", "audio_transcript"]


def test_the_media_sources_content_is_part_of_the_run_identity(trained, sources, tmp_path,
                                                               corpus_root, data_cache):
    import shutil

    from gemini_core.experiment import load_experiment
    from gemini_core.train import trainer
    _, exp, run, _ = trained
    changed = tmp_path / "changed"
    shutil.copytree(sources, changed)
    wav = changed / "digits" / "recordings" / "1_synth_7.wav"
    write_wav(wav, np.zeros(2400))  # one recording silent: same names, other content
    other = config_file(tmp_path, changed, corpus_root, data_cache)
    quiet = lambda _: None  # noqa: E731
    same = trainer.prepare(load_experiment(str(exp), []).config, tmp_path / "r", quiet)
    moved = trainer.prepare(load_experiment(str(other), []).config, tmp_path / "r", quiet)
    assert same.fingerprint == run.config()["fingerprint"]
    assert moved.fingerprint != same.fingerprint
    assert moved.identity["data"]["manifest"] != same.identity["data"]["manifest"]


def test_the_checkpoint_holds_the_media_tables_and_gx_eval_reproduces_the_accuracy(trained):
    from gemini_core.data.media_data import load_media
    from gemini_core.eval.loaded_run import load_run
    tmp, _, run, _ = trained
    loaded = load_run(run, log=lambda _: None)
    data = load_media(Path(run.config()["paths"]["media_cache"]))
    for i, table in enumerate(loaded.model.media.tables):
        np.testing.assert_array_equal(np.asarray(table[...]),
                                      np.asarray(data.features[data.tables[i].domain]))
    proc = gx("eval", run.run_id, "--tasks", "fashion_mnist,spoken_digits", runs=tmp / "runs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((run.path / "downstream.json").read_text())
    assert saved["metrics"]["downstream/fashion_mnist/acc"] == 1.0
    assert saved["metrics"]["downstream/spoken_digits/acc"] == 1.0


def test_gx_generate_describes_an_image_and_a_recording(trained, sources, tmp_path):
    from PIL import Image
    tmp, _, run, _ = trained
    bright = np.full((28, 28), 210, np.uint8)
    Image.fromarray(bright).save(tmp_path / "bright.png")
    proc = gx("generate", run.run_id, "--image", str(tmp_path / "bright.png"),
              "--max-new-tokens", "24", "--stop", ".", runs=tmp / "runs")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "bright" in proc.stdout and "dark" not in proc.stdout, proc.stdout
    proc = gx("generate", run.run_id, "--audio",
              str(sources / "digits" / "recordings" / "0_synth_1.wav"), "--max-new-tokens", "24",
              "--stop", ".",
              runs=tmp / "runs")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "low" in proc.stdout and "high" not in proc.stdout, proc.stdout
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "small.png")
    proc = gx("generate", run.run_id, "--image", str(tmp_path / "small.png"), runs=tmp / "runs")
    assert proc.returncode == 2 and "20x20" in proc.stderr and "28x28" in proc.stderr


def test_a_multimodal_step_under_fsdp_on_8_devices_gives_the_one_device_curve(trained):
    from gemini_core.runs.metrics import read_metrics
    tmp, exp, run, _ = trained
    proc = gx("run", str(exp), "--config.mesh.preset=fsdp", runs=tmp / "fsdp", devices=8)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    one = {r["step"]: r["train/loss"] for r in read_metrics(run.path)}
    eight = {r["step"]: r["train/loss"] for r in read_metrics(only_run(tmp / "fsdp").path)}
    assert one.keys() == eight.keys() and len(one) >= 8
    np.testing.assert_allclose([eight[s] for s in one], list(one.values()), rtol=2e-4)


# ---------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing half-written


def broken_sources(root: Path, sources: Path, what: str) -> Path:
    import shutil
    out = root / f"src_{what}"
    shutil.copytree(sources, out)
    images_path = out / "fashion" / "train-images-idx3-ubyte.gz"
    recordings = out / "digits" / "recordings"
    if what == "magic":
        data = gzip.decompress(images_path.read_bytes())
        images_path.write_bytes(gzip.compress(b"\x01\x02" + data[2:]))
    elif what == "truncated":
        data = gzip.decompress(images_path.read_bytes())
        images_path.write_bytes(gzip.compress(data[:-100]))
    elif what == "stereo":
        write_wav(recordings / "1_synth_3.wav", np.zeros(1600), channels=2)
    elif what == "rate":
        write_wav(recordings / "1_synth_3.wav", np.zeros(1600), rate=16000)
    return out


@pytest.mark.parametrize("what, extra, message", [
    ("magic", {}, "train-images-idx3-ubyte.gz: wrong IDX magic number"),
    ("truncated", {}, "train-images-idx3-ubyte.gz: truncated"),
    ("stereo", {}, "1_synth_3.wav: is stereo (2 channels): expected mono"),
    ("rate", {}, "1_synth_3.wav: sample rate is 16000 Hz, expected 8000 Hz"),
    ("ok", {"model.encoders.image.patch": 5}, "image shape 28x28 is not divided by the patch"),
    ("ok", {"data.modalities.image_caption.encoder": "vision"},
     "config.data.modalities.image_caption.encoder='vision': no such encoder"),
    ("ok", {"data.domains": ("wiki", "code", "audio_transcript")},
     "config.data.modalities.image_caption: 'image_caption' is not in config.data.domains"),
    ("ok", {"model.encoders.image.modality": "audio"},
     "config.data.modalities.image_caption.encoder='image': that encoder reads audio"),
])
def test_bad_media_input_is_one_clear_line_and_exit_2(tmp_path, sources, corpus_root, data_cache,
                                                      what, extra, message):
    src = sources if what == "ok" else broken_sources(tmp_path, sources, what)
    exp = config_file(tmp_path, src, corpus_root, data_cache, **extra)
    runs = tmp_path / "runs"
    proc = gx("run", str(exp), runs=runs)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("gx: error")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not list(runs.glob("mm/*"))  # no run directory was started
