"""Modality domains' data: their sources read into media tables and token streams, built once
into the data cache (`prepare_media`), and read back (`load_media`). What a modality domain is,
and the token layout, is gemini_core.data.modality.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from gemini_core.data import media
from gemini_core.data.modality import (
    AUDIO_RATE,
    BEGIN_END,
    FORMAT,
    FSDD_NAME,
    FSDD_TEST_TAKES,
    MARKERS,
    ModalityDomain,
)
from gemini_core.data.sources import file_sha256
from gemini_core.data.tokenizer import build_once, write_json
from gemini_core.errors import UserError
from gemini_core.model.options import EncoderConfig, MediaTable
from gemini_core.runs.rundir import fingerprint

Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# reading the sources: items as features, with labels


@dataclasses.dataclass(frozen=True)
class Items:
    features_NxSxF: np.ndarray  # uint8 patches or float16 log-mel stacks, padded to S slots
    used_N: np.ndarray  # soft tokens each item fills (images: all S)
    labels_N: np.ndarray


def source_files(name: str, spec: ModalityDomain) -> dict[str, list[Path]]:
    """The files each split reads, in order ("train", "valid")."""
    root = Path(spec.source)
    if not root.is_dir():
        raise UserError(f"config.data.modalities.{name}.source={spec.source!r}: no such folder")
    if spec.kind == "image_caption":
        out = {}
        for split, stem in (("train", "train"), ("valid", "t10k")):
            pair = [root / f"{stem}-images-idx3-ubyte.gz", root / f"{stem}-labels-idx1-ubyte.gz"]
            for path in pair:
                if not path.is_file():
                    raise UserError(f"{path}: missing (an image_caption source holds the four "
                                    "Fashion-MNIST IDX files)")
            out[split] = pair
        return out
    folder = root / "recordings" if (root / "recordings").is_dir() else root
    wavs = sorted(folder.glob("*.wav"))
    if not wavs:
        raise UserError(f"{folder}: no .wav files (an audio_transcript source holds FSDD's "
                        "recordings/<digit>_<speaker>_<take>.wav)")
    splits: dict[str, list[Path]] = {"train": [], "valid": []}
    for path in wavs:
        match = FSDD_NAME.match(path.name)
        if not match:
            raise UserError(f"{path}: name is not <digit>_<speaker>_<take>.wav")
        splits["valid" if int(match[3]) in FSDD_TEST_TAKES else "train"].append(path)
    return splits


def image_items(images_path: Path, labels_path: Path, encoder: EncoderConfig,
                n_labels: int, encoder_name: str) -> Items:
    images_NxHxW = media.read_idx(images_path)
    labels_N = media.read_idx(labels_path)
    if images_NxHxW.ndim != 3 or images_NxHxW.dtype != np.uint8:
        raise UserError(f"{images_path}: expected uint8 images (N, H, W), got "
                        f"{images_NxHxW.dtype} {images_NxHxW.shape}")
    if labels_N.shape != images_NxHxW.shape[:1]:
        raise UserError(f"{labels_path}: {labels_N.shape} labels for {len(images_NxHxW):,} "
                        f"images in {images_path.name}")
    _check_labels(labels_N, n_labels, labels_path)
    patches = patchify(images_NxHxW, encoder.patch, str(images_path),
                       f"config.model.encoders.{encoder_name}.patch")
    return Items(patches, np.full(len(patches), patches.shape[1], np.int32),
                 labels_N.astype(np.int32))


def patchify(images_NxHxW: np.ndarray, patch: int, where: str,
             key: str = "the encoder's patch") -> np.ndarray:
    """(N, H, W) -> (N, (H/p)·(W/p), p·p), patches in row-major order."""
    N, H, W = images_NxHxW.shape
    if H % patch or W % patch:
        raise UserError(f"{where}: image shape {H}x{W} is not divided by the patch size {patch} "
                        f"({key})")
    if H != W:
        raise UserError(f"{where}: image shape {H}x{W}: the encoder's 2-D positions need square "
                        "images")
    g = H // patch
    x = images_NxHxW.reshape(N, g, patch, g, patch).transpose(0, 1, 3, 2, 4)
    return np.ascontiguousarray(x.reshape(N, g * g, patch * patch))


def audio_features(samples_T: np.ndarray, encoder: EncoderConfig) -> tuple[np.ndarray, int, bool]:
    """(S, k·n_mels) float16 soft-token features of one recording (zero-padded to S =
    encoder.max_tokens), the tokens it fills, and whether it was cut to fit."""
    mel_TxM = media.log_mel(samples_T, AUDIO_RATE, n_mels=encoder.n_mels)
    # one mean and scale per recording, over all its frames and bands: loudness differs by
    # speaker and take. Not per band (CMVN): a spoken digit is one short word, and its average
    # spectrum (the vowel's formants) is much of what tells the digits apart
    mel_TxM = (mel_TxM - mel_TxM.mean()) / (mel_TxM.std() + 1e-3)
    k, S = encoder.frames_per_token, encoder.max_tokens
    used = -(-len(mel_TxM) // k)
    cut = used > S
    used = min(used, S)
    frames = np.zeros((S * k, mel_TxM.shape[1]), np.float32)
    take = min(len(mel_TxM), S * k)
    frames[:take] = mel_TxM[:take]
    return frames.reshape(S, k * mel_TxM.shape[1]).astype(np.float16), used, cut


def audio_items(paths: Sequence[Path], encoder: EncoderConfig, n_labels: int,
                encoder_name: str, log: Log) -> Items:
    feats, used, labels, cut = [], [], [], 0
    for path in paths:
        f, u, was_cut = audio_features(media.read_wav(path, rate=AUDIO_RATE), encoder)
        feats.append(f)
        used.append(u)
        labels.append(int(FSDD_NAME.match(path.name)[1]))
        cut += was_cut
    labels_N = np.array(labels, np.int32)
    _check_labels(labels_N, n_labels, paths[0].parent)
    if cut:
        log(f"data: {cut} of {len(paths)} recordings in {paths[0].parent} are longer than "
            f"{encoder.max_tokens} soft tokens x {encoder.frames_per_token} frames of 10 ms: "
            f"cut (config.model.encoders.{encoder_name}.max_tokens)")
    return Items(np.stack(feats), np.array(used, np.int32), labels_N)


def _check_labels(labels_N: np.ndarray, n_labels: int, where: Path) -> None:
    if len(labels_N) and (labels_N.min() < 0 or labels_N.max() >= n_labels):
        raise UserError(f"{where}: labels span {labels_N.min()}..{labels_N.max()}, but "
                        f"{n_labels} label names are declared (config.data.modalities labels)")


def read_items(name: str, spec: ModalityDomain, encoder: EncoderConfig, log: Log
               ) -> dict[str, Items]:
    files = source_files(name, spec)
    n = len(spec.label_names())
    if spec.kind == "image_caption":
        return {split: image_items(*paths, encoder, n, spec.encoder)
                for split, paths in files.items()}
    return {split: audio_items(paths, encoder, n, spec.encoder, log)
            for split, paths in files.items()}


# ---------------------------------------------------------------------------------------------
# token streams


def table_layout(domain: str, spec: ModalityDomain, items: Items, n_items: int,
                 first_id: int) -> MediaTable:
    """The table of `n_items` items shaped like `items`, and a scratch row, from `first_id`."""
    S, F = items.features_NxSxF.shape[1:]
    grid = int(round(S ** 0.5)) if spec.modality == "image" else 0
    return MediaTable(domain=domain, encoder=spec.encoder, modality=spec.modality,
                      first_id=first_id, items=n_items + 1, slots=S, features=F, grid=grid)


def stream(items: Items, first_item: int, table: MediaTable, captions: Sequence[list[int]],
           text_vocab: int, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens uint32, start of each example) of the examples of `items`, whose table rows
    start at `first_item`: markers, references, caption, EOS."""
    begin, end = (text_vocab + o for o in BEGIN_END[table.modality])
    pieces, starts, at = [], [], 0
    for i, (used, caption) in enumerate(zip(items.used_N.tolist(), captions)):
        refs = table.first_id + (first_item + i) * table.slots + np.arange(used)
        example = np.concatenate([[begin], refs, [end], caption, [eos]]).astype(np.uint32)
        pieces.append(example)
        starts.append(at)
        at += len(example)
    return np.concatenate(pieces), np.array(starts, np.int64)


def prompt_ids(table: MediaTable, item: int, used: int, text_vocab: int, eos: int) -> list[int]:
    """A document start holding item `item`'s media: EOS, begin, references, end."""
    begin, end = (text_vocab + o for o in BEGIN_END[table.modality])
    refs = table.first_id + item * table.slots + np.arange(used)
    return [eos, begin, *refs.tolist(), end]


@dataclasses.dataclass(frozen=True)
class MediaData:
    """What the modality domains add to a run's data: token arrays per split, tables, the
    held-out items' labels (for the modality tasks) and the manifest entries."""
    tables: tuple[MediaTable, ...]
    train: dict[str, np.ndarray]
    valid: dict[str, np.ndarray]
    features: dict[str, np.ndarray]  # domain -> (items, slots, F), scratch row included
    valid_labels: dict[str, np.ndarray]
    valid_used: dict[str, np.ndarray]
    valid_first_item: dict[str, int]  # table row of the first held-out item
    captions: dict[str, list[str]]  # domain -> the evaluation caption of each label
    entries: dict[str, dict]  # domain -> {"train": entry, "valid": entry}, tokens.py's form
    dir: Path


def prepare_media(modalities: Mapping[str, ModalityDomain], encoders: Mapping[str, EncoderConfig],
                  tokenizer, cache_root: Path, log: Log = print) -> MediaData | None:
    """Token arrays and media tables of every modality domain, built once into
    `<cache>/media/<hash>` (keyed by the sources' content, the tokenizer and the encoders)."""
    if not modalities:
        return None
    V = tokenizer.vocab_size
    key = {"format": FORMAT, "tokenizer": tokenizer.fingerprint, "domains": {
        name: {"spec": dataclasses.asdict(spec), "encoder": dataclasses.asdict(
            encoders[spec.encoder]),
               "files": {s: [file_sha256(p) for p in ps]
                         for s, ps in source_files(name, spec).items()}}
        for name, spec in modalities.items()}}
    final = Path(cache_root) / "media" / fingerprint(key)[:16]

    def build(tmp: Path) -> None:
        first_id = V + MARKERS
        manifest = {"format": FORMAT, "text_vocab": V, "domains": {}}
        for name, spec in modalities.items():
            t0 = time.perf_counter()
            encoder = encoders[spec.encoder]
            items = read_items(name, spec, encoder, log)
            n_train, n_valid = len(items["train"].labels_N), len(items["valid"].labels_N)
            table = table_layout(name, spec, items["train"], n_train + n_valid, first_id)
            first_id += table.items * table.slots
            features = np.concatenate([items["train"].features_NxSxF,
                                       items["valid"].features_NxSxF,
                                       np.zeros_like(items["train"].features_NxSxF[:1])])
            np.save(tmp / f"{name}.table.npy", features)
            entry = {"table": dataclasses.asdict(table), "splits": {},
                     "captions": [spec.eval_caption(y) for y in range(len(spec.label_names()))]}
            rng = np.random.default_rng(spec.seed)
            for split, first_item in (("train", 0), ("valid", n_train)):
                entry["splits"][split] = write_split(name, spec, table, items[split], split,
                                                     first_item, rng, tokenizer, tmp)
            manifest["domains"][name] = entry
            tr = entry["splits"]["train"]
            log(f"data: {name}: {n_train:,} train + {n_valid:,} held-out {spec.modality} items "
                f"-> {tr['tokens']:,} tokens ({tr['tokens'] - tr['text_tokens']:,} media and "
                f"markers), table {features.shape} {features.dtype} in "
                f"{time.perf_counter() - t0:.1f}s")
        write_json(tmp / "manifest.json", manifest, sort_keys=False)

    built = build_once(final, lambda p: (p / "manifest.json").is_file(), build)
    if not built:
        log(f"data: reusing media arrays {final}")
    return load_media(final)


def write_split(name: str, spec: ModalityDomain, table: MediaTable, items: Items, split: str,
                first_item: int, rng: np.random.Generator, tokenizer, out: Path) -> dict:
    """One split's token stream, labels and used slots into `out`; its manifest entry (the
    form of gemini_core.data.tokens' entries). Training items draw a caption template each;
    held-out items get the first, the one the tasks rank."""
    labels = items.labels_N.tolist()
    templates, names = spec.caption_templates(), spec.label_names()
    if split == "train":
        drawn = rng.integers(0, len(templates), len(labels)).tolist()
        texts = [templates[t].format(label=names[y]) for t, y in zip(drawn, labels)]
    else:
        texts = [spec.eval_caption(y) for y in labels]
    captions = tokenizer.encode_batch(texts, os.cpu_count() or 1)
    tokens, _ = stream(items, first_item, table, captions, tokenizer.vocab_size, tokenizer.eos_id)
    tokens.tofile(out / f"{name}.{split}.bin")
    np.save(out / f"{name}.{split}.labels.npy", items.labels_N)
    np.save(out / f"{name}.{split}.used.npy", items.used_N)
    caption_bytes = sum(len(t.encode("utf-8")) for t in texts)
    text_tokens = sum(map(len, captions))
    return {"file": spec.kind, "array": f"{name}.{split}.bin", "documents": len(labels),
            "tokens": int(len(tokens)), "bytes": caption_bytes,
            "bytes_per_token": round(caption_bytes / max(text_tokens, 1), 4),
            "text_tokens": text_tokens, "first_item": first_item, "bad_records": {}}


def load_media(path: Path) -> MediaData:
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    tables, out = [], {k: {} for k in ("train", "valid", "features", "labels", "used", "first",
                                       "captions")}
    entries = {}
    for name, entry in manifest["domains"].items():
        table = MediaTable(**entry["table"])
        tables.append(table)
        for split in ("train", "valid"):
            e = entry["splits"][split]
            out[split][name] = np.memmap(Path(path) / e["array"], np.uint32, "r",
                                         shape=(e["tokens"],))
        out["features"][name] = np.load(Path(path) / f"{name}.table.npy", mmap_mode="r")
        out["labels"][name] = np.load(Path(path) / f"{name}.valid.labels.npy")
        out["used"][name] = np.load(Path(path) / f"{name}.valid.used.npy")
        out["first"][name] = entry["splits"]["valid"]["first_item"]
        out["captions"][name] = entry["captions"]
        entries[name] = entry["splits"]
    return MediaData(tuple(tables), out["train"], out["valid"], out["features"], out["labels"],
                     out["used"], out["first"], out["captions"], entries, Path(path))


def file_features(table: MediaTable, encoder: EncoderConfig, path: Path) -> tuple[np.ndarray, int]:
    """(slots, F) features of a user's image or recording for `table`, and the soft tokens it
    fills: what `gx generate --image/--audio` writes into the table's scratch row."""
    if table.modality == "image":
        image_HxW = media.read_image(path)
        side = table.grid * encoder.patch
        if image_HxW.shape != (side, side):
            raise UserError(f"{path}: image is {image_HxW.shape[0]}x{image_HxW.shape[1]} pixels; "
                            f"the model's {table.domain} images are {side}x{side} grayscale")
        return patchify(image_HxW[None], encoder.patch, str(path))[0], table.slots
    features, used, cut = audio_features(media.read_wav(path, rate=AUDIO_RATE), encoder)
    if cut:
        ms = encoder.max_tokens * encoder.frames_per_token * 10
        raise UserError(f"{path}: longer than the {ms} ms the model's {table.domain} encoder "
                        "reads")
    return features, used
