"""gemini_core.data.media: IDX, WAV, log-mel and image readers on the shared multimodal data and
on files written here, including every malformed-input error (one UserError naming the file)."""

from __future__ import annotations

import gzip
import math
import struct
import wave
from pathlib import Path

import numpy as np
import pytest

from gemini_core.data.media import log_mel, mel_filterbank, read_idx, read_image, read_wav
from gemini_core.errors import UserError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "multimodal"
FASHION = SHARED / "fashion_mnist"
GEORGE_0 = SHARED / "spoken_digits" / "recordings" / "0_george_0.wav"

IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D,
             np.float64: 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file's bytes, written by hand from the format's definition (big-endian)."""
    header = bytes([0, 0, IDX_CODES[array.dtype.type], array.ndim])
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_wav(path: Path, pcm: bytes, *, rate: int = 8000, width: int = 2,
              channels: int = 1) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(pcm)
    return path


def htk_mel(f: float) -> float:
    return 2595 * math.log10(1 + f / 700)


def htk_hz(mel: float) -> float:
    return 700 * (10 ** (mel / 2595) - 1)


def htk_points_hz(n_mels: int, fmin: float, fmax: float) -> list[float]:
    """The n_mels + 2 filter edge/centre frequencies, evenly spaced in HTK mel."""
    lo, hi = htk_mel(fmin), htk_mel(fmax)
    return [htk_hz(lo + (hi - lo) * i / (n_mels + 1)) for i in range(n_mels + 2)]


# ----------------------------------------------------------------------------------------- IDX

def test_read_idx_fashion_mnist():
    images = read_idx(FASHION / "train-images-idx3-ubyte.gz")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert images.min() == 0 and images.max() == 255
    labels = read_idx(FASHION / "train-labels-idx1-ubyte.gz")
    assert labels.shape == (60000,) and labels.dtype == np.uint8
    assert np.bincount(labels).tolist() == [6000] * 10  # values 0..9, 6000 of each
    assert read_idx(FASHION / "t10k-images-idx3-ubyte.gz").shape == (10000, 28, 28)
    test_labels = read_idx(FASHION / "t10k-labels-idx1-ubyte.gz")
    assert test_labels.shape == (10000,) and np.bincount(test_labels).tolist() == [1000] * 10


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32,
                                   np.float64])
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, dtype, gz):
    rng = np.random.default_rng(0)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        array = rng.integers(info.min, info.max, size=(3, 5, 4), endpoint=True).astype(dtype)
    else:
        array = rng.standard_normal((3, 5, 4)).astype(dtype)
    raw = idx_bytes(array)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    assert back.shape == (3, 5, 4)
    np.testing.assert_array_equal(back, array)
    back[0, 0, 0] = 0  # a writable array of its own, not a view of the file's bytes


def test_read_idx_errors(tmp_path):
    good = idx_bytes(np.arange(60, dtype=np.uint8).reshape(3, 4, 5))

    def check(name: str, raw: bytes, pattern: str):
        path = tmp_path / name
        path.write_bytes(raw)
        with pytest.raises(UserError, match=pattern) as e:
            read_idx(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)

    check("magic.idx", b"\x01\x00" + good[2:], r"wrong IDX magic number 0x01000803 \(expected")
    check("code.idx", good[:2] + b"\x0a" + good[3:], r"wrong IDX magic number 0x00000A03")
    check("short.idx", good[:2], r"header shorter than the 4-byte IDX magic")
    check("dims.idx", good[:10], r"header shorter than announced: 3 dimensions need 16")
    check("cut.idx", good[:-7], r"truncated: header announces 3x4x5 = 60 bytes of uint8, "
                                r"file holds 53$")
    check("extra.idx", good + b"\0\0", r"2 extra bytes at the end: header announces 3x4x5 = "
                                        r"60 bytes of uint8, file holds 62$")
    compressed = gzip.compress(good)
    check("cut.gz", compressed[:-12], r"corrupt gzip stream")
    garbled = bytearray(compressed)
    garbled[20:30] = b"\xff" * 10
    check("garbled.gz", bytes(garbled), r"corrupt gzip stream")
    big = idx_bytes(np.zeros((2, 3), np.int32))
    check("cut32.idx.gz", gzip.compress(big[:-1]), r"truncated: header announces 2x3 = 24 bytes "
                                                   r"of int32, file holds 23")
    with pytest.raises(UserError, match=r"missing\.idx: no such file"):
        read_idx(tmp_path / "missing.idx")


# ----------------------------------------------------------------------------------------- WAV

def test_read_wav_real_recording():
    with wave.open(str(GEORGE_0)) as w:
        nframes = w.getnframes()
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2)
        int16 = np.frombuffer(w.readframes(nframes), "<i2")
    samples = read_wav(GEORGE_0, rate=8000)
    assert samples.dtype == np.float32 and samples.shape == (nframes,)
    assert -1 <= samples.min() and samples.max() < 1
    np.testing.assert_array_equal(samples * 32768, int16)
    with pytest.raises(UserError, match=r"0_george_0\.wav: sample rate is 8000 Hz, expected "
                                        r"16000 Hz"):
        read_wav(GEORGE_0, rate=16000)


def test_read_wav_16_and_8_bit(tmp_path):
    int16 = np.array([-32768, -1, 0, 1, 16384, 32767], np.int16)
    samples = read_wav(write_wav(tmp_path / "a.wav", int16.astype("<i2").tobytes()), rate=8000)
    assert samples.dtype == np.float32
    np.testing.assert_array_equal(samples, [-1.0, -1 / 32768, 0.0, 1 / 32768, 0.5,
                                            32767 / 32768])
    uint8 = bytes([0, 64, 127, 128, 129, 255])
    samples = read_wav(write_wav(tmp_path / "b.wav", uint8, width=1), rate=8000)
    assert samples.dtype == np.float32
    np.testing.assert_array_equal(samples, [-1.0, -0.5, -1 / 128, 0.0, 1 / 128, 127 / 128])


def test_read_wav_errors(tmp_path):
    pcm = np.arange(-500, 500, dtype="<i2").tobytes()  # 1000 frames
    stereo = write_wav(tmp_path / "stereo.wav", pcm, channels=2)
    fast = write_wav(tmp_path / "fast.wav", pcm, rate=16000)
    wide = write_wav(tmp_path / "wide.wav", pcm + pcm[:1000], width=3)
    empty = write_wav(tmp_path / "empty.wav", b"")
    cut = write_wav(tmp_path / "cut.wav", pcm)
    cut.write_bytes(cut.read_bytes()[:-100])  # the header still announces 1000 frames
    text = tmp_path / "text.wav"
    text.write_text("not audio at all\n")
    nothing = tmp_path / "nothing.wav"
    nothing.write_bytes(b"")
    # IEEE float (format 3): RIFF/WAVE, but not PCM
    fmt = struct.pack("<HHIIHH", 3, 1, 8000, 32000, 4, 32)
    data = np.zeros(4, "<f4").tobytes()
    float32 = tmp_path / "float.wav"
    float32.write_bytes(b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data)) + b"WAVE"
                        + b"fmt " + struct.pack("<I", len(fmt)) + fmt
                        + b"data" + struct.pack("<I", len(data)) + data)
    cases = [(stereo, r"is stereo \(2 channels\): expected mono"),
             (fast, r"sample rate is 16000 Hz, expected 8000 Hz \(WAVs are not resampled"),
             (wide, r"sample width is 24-bit: expected 8-bit unsigned or 16-bit"),
             (empty, r"holds no samples \(0 frames\)"),
             (cut, r"truncated: header announces 1,000 frames = 2,000 bytes of data, "
                   r"file holds 1,900$"),
             (text, r"not a PCM RIFF/WAVE file \(file does not start with RIFF id\)"),
             (nothing, r"not a PCM RIFF/WAVE file \(file ends in the header\)"),
             (float32, r"not a PCM RIFF/WAVE file \(unknown format: 3\)"),
             (tmp_path / "missing.wav", r"no such file")]
    for path, pattern in cases:
        with pytest.raises(UserError, match=pattern) as e:
            read_wav(path, rate=8000)
        assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------- mel

def test_mel_filterbank_peaks_and_centres():
    n_fft, rate, n_mels = 4096, 16000, 24
    bank = mel_filterbank(n_fft, rate, n_mels)
    assert bank.shape == (n_mels, n_fft // 2 + 1) and bank.dtype == np.float32
    assert (bank >= 0).all()
    points = htk_points_hz(n_mels, 0.0, rate / 2)
    bin_hz = rate / n_fft
    for m in range(n_mels):
        left, centre, right = points[m:m + 3]
        apex = round(centre / bin_hz)
        assert int(np.argmax(bank[m])) == apex
        assert abs(bank[m, apex] - 1.0) <= 1e-6
        # the filter is positive exactly on the bins strictly between its neighbours' centres
        inside = [k for k in range(n_fft // 2 + 1) if left < k * bin_hz < right]
        assert np.flatnonzero(bank[m]).tolist() == inside
    # HTK by hand: fmax = 1949.31 Hz is 1500 mel, so 2 filters centre on 500 and 1000 mel =
    # 700 (10^(500/2595) - 1) = 390.88 Hz and 1000.02 Hz (HTK's 1000 Hz ~ 1000 mel)
    two = mel_filterbank(n_fft, rate, 2, fmax=1949.31)
    assert [int(np.argmax(row)) for row in two] == [round(390.88 / bin_hz),
                                                    round(1000.02 / bin_hz)] == [100, 256]
    # fmin moves the first edge: no weight at or below it
    high = mel_filterbank(512, 8000, 10, fmin=300.0, fmax=3400.0)
    assert high[:, : math.floor(300 / (8000 / 512)) + 1].max() == 0
    assert high[:, math.ceil(3400 / (8000 / 512)):].max() == 0
    with pytest.raises(UserError, match=r"fmax=9000.0 Hz: expected 0 <= fmin < fmax"):
        mel_filterbank(512, 16000, 10, fmax=9000.0)


def test_log_mel_sine_frames_and_bands():
    rate, n_mels = 8000, 40
    t = np.arange(rate // 2) / rate  # 0.5 s
    features = log_mel(np.sin(2 * np.pi * 1000 * t), rate, n_mels=n_mels)
    win, hop = 200, 80  # 25 ms and 10 ms at 8 kHz
    frames = max(1, 1 + math.ceil((len(t) - win) / hop))
    assert frames == 49  # 3800 samples after the first window: 47.5 hops, the half one padded
    assert features.shape == (frames, n_mels) and features.dtype == np.float32
    centres = htk_points_hz(n_mels, 0.0, rate / 2)[1:-1]
    nearest = int(np.argmin([abs(c - 1000) for c in centres]))
    assert np.argmax(features, axis=1).tolist() == [nearest] * frames
    # an exact number of hops gives no padded frame
    assert log_mel(np.ones(win + 10 * hop), rate).shape == (11, 40)
    assert log_mel(np.ones(win + 10 * hop + 1), rate).shape == (12, 40)


def test_log_mel_silence_and_short_signal():
    silence = log_mel(np.zeros(8000), 8000, n_mels=20)
    assert silence.shape == (99, 20)
    np.testing.assert_allclose(silence, math.log(1e-6), atol=1e-4)
    short = log_mel(np.full(150, 0.5), 8000)  # shorter than one 200-sample window
    assert short.shape == (1, 40)
    assert log_mel(np.zeros(0), 8000).shape == (1, 40)
    # 16 kHz: a 400-sample window pads to n_fft 512; a 3-band bank, 1 frame
    assert log_mel(np.zeros(400), 16000, n_mels=3).shape == (1, 3)


# --------------------------------------------------------------------------------------- image

def test_read_image_formats(tmp_path):
    from PIL import Image

    image_HxW = np.random.default_rng(1).integers(0, 256, size=(7, 11), dtype=np.uint8)
    png = tmp_path / "a.png"
    Image.fromarray(image_HxW, mode="L").save(png)
    np.testing.assert_array_equal(read_image(png), image_HxW)

    pgm = tmp_path / "a.pgm"
    pgm.write_bytes(b"P5\n# a comment\n11 7\n255\n" + image_HxW.tobytes())
    back = read_image(pgm)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, image_HxW)

    npy = tmp_path / "a.npy"
    np.save(npy, image_HxW)
    np.testing.assert_array_equal(read_image(npy), image_HxW)
    np.save(npy, np.array([[0.0, 0.5], [1.0, 0.25]]))
    np.testing.assert_array_equal(read_image(npy), [[0, 128], [255, 64]])

    idx = tmp_path / "one-idx3-ubyte.gz"
    idx.write_bytes(gzip.compress(idx_bytes(image_HxW[None])))  # (1, H, W)
    np.testing.assert_array_equal(read_image(idx), image_HxW)

    rgb = tmp_path / "rgb.jpg"
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(rgb)
    assert read_image(rgb).shape == (4, 6)


def test_read_image_errors(tmp_path):
    def check(path: Path, pattern: str):
        with pytest.raises(UserError, match=pattern) as e:
            read_image(path)
        assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)

    gif = tmp_path / "a.gif"
    gif.write_bytes(b"GIF89a")
    check(gif, r"unknown image suffix '\.gif': expected one of \.png")
    check(tmp_path / "missing.png", r"no such file")
    bad_png = tmp_path / "bad.png"
    bad_png.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    check(bad_png, r"unreadable image")
    many = tmp_path / "many.idx"
    many.write_bytes(idx_bytes(np.zeros((2, 3, 3), np.uint8)))
    check(many, r"IDX array of shape \(2, 3, 3\): expected one grayscale image")
    npy = tmp_path / "big.npy"
    np.save(npy, np.array([[0.0, 1.5]]))
    check(npy, r"float image has values outside \[0, 1\]")
    np.save(npy, np.zeros((2, 2), np.int64))
    check(npy, r"array of dtype int64: expected uint8 or float")
    short_pgm = tmp_path / "short.pgm"
    short_pgm.write_bytes(b"P5 4 4 255\n" + bytes(10))
    check(short_pgm, r"truncated: P5 header announces 4x4 = 16 bytes of pixels, file holds 10")
