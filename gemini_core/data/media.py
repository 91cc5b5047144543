"""Readers for multimodal sources: IDX images/labels, PCM WAV audio, log-mel features, images.

Why here and why this way: the multimodal data (Fashion-MNIST as gzip IDX files, the Free
Spoken Digit Dataset as 8 kHz WAVs) and `gx generate --image FILE` hand us files a user chose,
so every problem with one of them -- missing, truncated, the wrong format, the wrong sample
rate -- is a single `UserError` line naming the file (and the offset where it helps), what is
wrong and what was expected, never a numpy or zlib traceback. The features are plain numpy
(no jax): they are computed once on the host while a dataset is prepared.

- `read_idx`: the IDX format (plain or .gz) -> an array of the announced shape and dtype.
- `read_wav`: a mono PCM WAV at a given rate -> float32 samples in [-1, 1).
- `mel_filterbank`, `log_mel`: HTK-mel triangular filters and log-mel frames.
- `read_image`: .png/.jpg/.pgm/.pnm/.npy/IDX -> one (H, W) uint8 grayscale image.
"""

from __future__ import annotations

import gzip
import math
import os
import wave
import zlib
from pathlib import Path

import numpy as np

from gemini_core.errors import UserError

# IDX type codes (the third magic byte) -> big-endian numpy dtype, as in the format's spec
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
IDX_TYPE_NAMES = {0x08: "uint8", 0x09: "int8", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32",
                  0x0E: "float64"}
GZIP_MAGIC = b"\x1f\x8b"
# what a corrupt or cut gzip stream raises while it is read (BadGzipFile is an OSError)
GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile, OSError)

LOG_FLOOR = 1e-6  # added to mel energies before the log, so silence is log(1e-6), not -inf
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pgm", ".pnm", ".npy", ".idx", ".gz")


def _check_file(path: Path, what: str) -> None:
    """A missing path or a folder is the user's mistake: say so before any reader trips on it."""
    if not path.exists():
        raise UserError(f"{path}: no such file (expected {what})")
    if not path.is_file():
        raise UserError(f"{path}: is not a file (expected {what})")


# ----------------------------------------------------------------------------------------- IDX

def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it is gzip (by its .gz suffix or its gzip magic)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        if path.suffix == ".gz" or head == GZIP_MAGIC:
            try:
                with gzip.open(path, "rb") as f:
                    return f.read()
            except GZIP_ERRORS as e:
                raise UserError(f"{path}: corrupt gzip stream ({e}); expected a gzip-compressed "
                                "IDX file (download it again)") from None
        return path.read_bytes()
    except UserError:
        raise
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None


def _parse_idx_header(path: Path, raw: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    """(big-endian dtype, shape, header length) from an IDX header; UserError if malformed."""
    if len(raw) < 4:
        raise UserError(f"{path}: header shorter than the 4-byte IDX magic number "
                        f"(file holds {len(raw)} bytes)")
    code, ndims = raw[2], raw[3]
    if raw[0] != 0 or raw[1] != 0 or code not in IDX_DTYPES:
        magic = int.from_bytes(raw[:4], "big")
        known = ", ".join(f"0x{c:02X} {n}" for c, n in IDX_TYPE_NAMES.items())
        raise UserError(f"{path}: wrong IDX magic number 0x{magic:08X} (expected 0x0000 then a "
                        f"type code ({known}) then the number of dimensions)")
    if ndims == 0:
        raise UserError(f"{path}: IDX header announces 0 dimensions (expected at least 1)")
    header_len = 4 + 4 * ndims
    if len(raw) < header_len:
        raise UserError(f"{path}: header shorter than announced: {ndims} dimensions need "
                        f"{header_len} header bytes, file holds {len(raw)}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndims))
    return IDX_DTYPES[code], shape, header_len


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (MNIST/Fashion-MNIST format, plain or .gz) as an array of its announced shape.

    The array is a fresh, writable copy in native byte order (the file is big-endian), so a
    caller may normalise it in place without touching a read-only buffer.
    """
    path = Path(path)
    _check_file(path, "an IDX file")
    raw = _read_bytes(path)
    dtype_be, shape, header_len = _parse_idx_header(path, raw)
    # Python ints: a hostile header's dims must not overflow a fixed-width product
    expected = math.prod(shape) * dtype_be.itemsize
    held = len(raw) - header_len
    if held != expected:
        dims = "x".join(str(d) for d in shape)
        what = "truncated" if held < expected else f"{held - expected:,} extra bytes at the end"
        raise UserError(f"{path}: {what}: header announces {dims} = {expected:,} bytes of "
                        f"{IDX_TYPE_NAMES[raw[2]]}, file holds {held:,}")
    data = np.frombuffer(raw, dtype=dtype_be, count=math.prod(shape), offset=header_len)
    return data.reshape(shape).astype(dtype_be.newbyteorder("="))


# ----------------------------------------------------------------------------------------- WAV

def read_wav(path: str | os.PathLike, *, rate: int) -> np.ndarray:
    """A mono PCM WAV as float32 samples in [-1, 1), shape (T,).

    Declared behaviour (each other case is a UserError naming the file):
    - the file's sample rate must equal `rate`: a different rate is an error that says both
      rates; the file is never resampled (a silent resample would change what the model hears);
    - exactly 1 channel (stereo is an error, not a downmix);
    - sample width 1 byte (unsigned 8-bit, 128 = silence) or 2 bytes (signed int16); 8-bit
      is scaled as (x - 128) / 128, 16-bit as x / 32768;
    - a file that is not RIFF/WAVE PCM, one with 0 frames, or one whose data chunk is shorter
      than its header announces ("truncated") is an error.
    """
    path = Path(path)
    _check_file(path, "a WAV file")
    try:
        with wave.open(str(path), "rb") as w:
            channels, width = w.getnchannels(), w.getsampwidth()
            file_rate, nframes = w.getframerate(), w.getnframes()
            _check_wav_format(path, channels, width, file_rate, nframes, rate)
            pcm = w.readframes(nframes)
    except (wave.Error, EOFError) as e:
        # wave raises these for a non-RIFF file, a missing fmt/data chunk, a non-PCM format
        why = str(e) or "file ends in the header"
        raise UserError(f"{path}: not a PCM RIFF/WAVE file ({why}); expected a mono 8- or "
                        "16-bit PCM WAV") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(pcm) != nframes * width:
        raise UserError(f"{path}: truncated: header announces {nframes:,} frames = "
                        f"{nframes * width:,} bytes of data, file holds {len(pcm):,}")
    if width == 1:
        return ((np.frombuffer(pcm, np.uint8).astype(np.float32) - 128.0) / 128.0)
    return np.frombuffer(pcm, "<i2").astype(np.float32) / 32768.0


def _check_wav_format(path: Path, channels: int, width: int, file_rate: int, nframes: int,
                      rate: int) -> None:
    if channels != 1:
        kind = "stereo" if channels == 2 else "multi-channel"
        raise UserError(f"{path}: is {kind} ({channels} channels): expected mono")
    if width not in (1, 2):
        raise UserError(f"{path}: sample width is {width * 8}-bit: expected 8-bit unsigned or "
                        "16-bit signed PCM")
    if file_rate != rate:
        raise UserError(f"{path}: sample rate is {file_rate} Hz, expected {rate} Hz (WAVs are not "
                        f"resampled: convert the file, e.g. sox IN.wav -r {rate} OUT.wav)")
    if nframes == 0:
        raise UserError(f"{path}: holds no samples (0 frames): expected audio")


# ----------------------------------------------------------------------------------------- mel

def hz_to_mel(f_hz):
    """HTK mel scale: mel = 2595 log10(1 + f / 700)."""
    return 2595.0 * np.log10(1.0 + np.asarray(f_hz, dtype=np.float64) / 700.0)


def mel_to_hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def mel_centres_hz(rate: int, n_mels: int, fmin: float = 0.0,
                   fmax: float | None = None) -> np.ndarray:
    """The n_mels filter centres (Hz): the interior points of n_mels + 2 evenly spaced mels."""
    fmax = rate / 2 if fmax is None else fmax
    return mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))[1:-1]


def mel_filterbank(n_fft: int, rate: int, n_mels: int, fmin: float = 0.0,
                   fmax: float | None = None) -> np.ndarray:
    """Triangular HTK-mel filters, shape (n_mels, n_fft // 2 + 1) float32, peak 1 (not area-
    normalised).

    Filter m rises from the (m-1)-th mel point to its centre (the m-th) and falls to the
    (m+1)-th, the n_mels + 2 points evenly spaced in mel from fmin to fmax (default rate / 2).
    The apex sits on the FFT bin nearest the centre frequency, so every filter reaches exactly
    1 there: a low filter narrower than a bin would otherwise fall between bins and read (near)
    nothing. The slopes stay linear in Hz between the apex bin and the neighbouring mel points.
    """
    fmax = rate / 2 if fmax is None else float(fmax)
    if n_fft < 2 or n_mels < 1 or rate <= 0:
        raise UserError(f"mel filterbank: n_fft={n_fft}, n_mels={n_mels}, rate={rate}: expected "
                        "n_fft >= 2, n_mels >= 1 and a positive rate")
    if not 0.0 <= fmin < fmax <= rate / 2:
        raise UserError(f"mel filterbank: fmin={fmin} Hz, fmax={fmax} Hz: expected "
                        f"0 <= fmin < fmax <= rate / 2 = {rate / 2}")
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    left_M1, centre_M1, right_M1 = (edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None])
    bins_hz_F = np.arange(n_fft // 2 + 1) * rate / n_fft
    apex_M1 = np.round(centre_M1 * n_fft / rate) * rate / n_fft  # the bin nearest the centre
    # np.maximum guards the divisions: an apex on or beyond an edge makes that slope empty
    rise_MxF = (bins_hz_F - left_M1) / np.maximum(apex_M1 - left_M1, 1e-12)
    fall_MxF = (right_M1 - bins_hz_F) / np.maximum(right_M1 - apex_M1, 1e-12)
    weights_MxF = np.where(bins_hz_F <= apex_M1, rise_MxF, fall_MxF)
    weights_MxF = np.clip(weights_MxF, 0.0, 1.0)
    weights_MxF[np.isclose(bins_hz_F, apex_M1, rtol=0, atol=1e-9)] = 1.0  # the apex itself
    return weights_MxF.astype(np.float32)


def frame_count(n_samples: int, win: int, hop: int) -> int:
    """Frames of `win` every `hop` samples, the last partial one included (zero-padded)."""
    if n_samples <= win:
        return 1
    return 1 + -(-(n_samples - win) // hop)


def log_mel(samples_T: np.ndarray, rate: int, *, n_mels: int = 40, win_ms: float = 25.0,
            hop_ms: float = 10.0) -> np.ndarray:
    """Log-mel energies of a mono signal, shape (frames, n_mels) float32.

    Windows of round(rate * win_ms / 1000) samples every round(rate * hop_ms / 1000), a
    periodic Hann window, zero-padded to n_fft (the next power of two >= the window), the
    power spectrum |rfft|^2 through `mel_filterbank`, then log(energy + 1e-6). The signal is
    zero-padded at the end so its tail is a frame too: frames = max(1, 1 + ceil((T - win) /
    hop)); a signal shorter than one window gives one frame.
    """
    samples_T = np.asarray(samples_T)
    if samples_T.ndim != 1:
        raise UserError(f"log_mel: samples have shape {samples_T.shape}: expected one mono "
                        "channel, shape (T,)")
    win, hop = round(rate * win_ms / 1000), round(rate * hop_ms / 1000)
    if win < 1 or hop < 1:
        raise UserError(f"log_mel: win_ms={win_ms}, hop_ms={hop_ms} at {rate} Hz give a window "
                        f"of {win} and a hop of {hop} samples: expected at least 1 each")
    n_fft = 1 << (win - 1).bit_length()
    frames = frame_count(len(samples_T), win, hop)
    padded_P = np.zeros((frames - 1) * hop + win, dtype=np.float64)
    padded_P[:len(samples_T)] = samples_T
    # a strided view, not a copy per frame: (frames, win) rows start every hop samples
    frames_NxW = np.lib.stride_tricks.sliding_window_view(padded_P, win)[::hop]
    hann_W = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)  # periodic
    power_NxF = np.abs(np.fft.rfft(frames_NxW * hann_W, n=n_fft, axis=1)) ** 2
    energy_NxM = power_NxF @ mel_filterbank(n_fft, rate, n_mels).T.astype(np.float64)
    return np.log(energy_NxM + LOG_FLOOR).astype(np.float32)


# --------------------------------------------------------------------------------------- image

def read_image(path: str | os.PathLike) -> np.ndarray:
    """One grayscale image, shape (H, W) uint8, for `gx generate --image FILE`.

    .png/.jpg/.jpeg through Pillow (converted to grayscale "L"); .pgm/.pnm binary P5 parsed
    here (other PNM kinds through Pillow); .npy a uint8 array or a float array in [0, 1]
    (scaled by 255 and rounded); .idx/.gz (or a name ending idxN-ubyte) an IDX file holding
    exactly one image. .npy and IDX may be (H, W) or (1, H, W).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    is_idx = suffix in (".idx", ".gz") or path.name.endswith(tuple(f"idx{n}-ubyte"
                                                                   for n in range(1, 4)))
    if suffix not in IMAGE_SUFFIXES and not is_idx:
        raise UserError(f"{path}: unknown image suffix {suffix or '(none)'!r}: expected one of "
                        f"{', '.join(IMAGE_SUFFIXES)}")
    _check_file(path, "an image file")
    if is_idx:
        image = _one_image(path, read_idx(path), "IDX")
    elif suffix == ".npy":
        image = _one_image(path, _load_npy(path), ".npy")
    elif suffix in (".pgm", ".pnm") and path.read_bytes()[:2] == b"P5":
        image = _read_p5(path)
    else:
        image = _read_with_pil(path)
    if image.size == 0:
        raise UserError(f"{path}: empty image {image.shape[0]}x{image.shape[1]}: expected at "
                        "least 1x1 pixels")
    return image


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{path}: not a readable .npy array ({e})") from None


def _one_image(path: Path, array: np.ndarray, kind: str) -> np.ndarray:
    """(H, W) or (1, H, W) uint8, or float in [0, 1] scaled to uint8; UserError otherwise."""
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise UserError(f"{path}: {kind} array of shape {array.shape}: expected one grayscale "
                        "image, shape (H, W) or (1, H, W)")
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if np.issubdtype(array.dtype, np.floating):
        if array.size and not (np.isfinite(array).all() and 0 <= array.min()
                               and array.max() <= 1):
            raise UserError(f"{path}: {kind} float image has values outside [0, 1] (min "
                            f"{np.nanmin(array):g}, max {np.nanmax(array):g}, or not finite): "
                            "expected [0, 1]")
        return np.round(array * 255.0).astype(np.uint8)
    raise UserError(f"{path}: {kind} array of dtype {array.dtype}: expected uint8 or float in "
                    "[0, 1]")


def _read_p5(path: Path) -> np.ndarray:
    """A binary PGM (P5): header tokens 'P5 width height maxval' separated by whitespace and
    '#' comments, one whitespace byte, then the raster (1 byte a pixel, 2 big-endian bytes when
    maxval > 255); values are scaled to 0..255 when maxval is not 255."""
    raw = path.read_bytes()
    if not raw[2:3].isspace():
        raise UserError(f"{path}: malformed P5 PGM header: expected whitespace after 'P5'")
    tokens, pos = [], 2
    while len(tokens) < 3:
        while pos < len(raw) and raw[pos:pos + 1].isspace():
            pos += 1
        if raw[pos:pos + 1] == b"#":  # a comment runs to the end of its line
            while pos < len(raw) and raw[pos] not in b"\r\n":
                pos += 1
            continue
        start = pos
        while pos < len(raw) and not raw[pos:pos + 1].isspace():
            pos += 1
        if start == pos or not raw[start:pos].isdigit():
            raise UserError(f"{path}: malformed P5 PGM header at byte {start}: expected "
                            "'P5 <width> <height> <maxval>'")
        tokens.append(int(raw[start:pos]))
    width, height, maxval = tokens
    if not 0 < maxval < 65536:
        raise UserError(f"{path}: P5 PGM maxval {maxval}: expected 1..65535")
    dtype = np.dtype(">u2") if maxval > 255 else np.dtype("u1")
    start, expected = pos + 1, width * height * dtype.itemsize  # one whitespace after maxval
    held = len(raw) - start
    if held < expected:
        raise UserError(f"{path}: truncated: P5 header announces {width}x{height} = "
                        f"{expected:,} bytes of pixels, file holds {max(held, 0):,}")
    pixels_HxW = np.frombuffer(raw, dtype, count=width * height, offset=start)
    pixels_HxW = pixels_HxW.reshape(height, width)
    if maxval == 255:
        return pixels_HxW.copy()
    return np.round(np.minimum(pixels_HxW, maxval) * (255.0 / maxval)).astype(np.uint8)


def _read_with_pil(path: Path) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        raise UserError(f"{path}: reading {path.suffix} images needs Pillow "
                        "(pip install pillow)") from None
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"), dtype=np.uint8).copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # Pillow raises these for an unidentified, truncated or oversized image
        raise UserError(f"{path}: unreadable image ({e}); expected a valid "
                        f"{path.suffix.lstrip('.').upper()} file") from None
