"""Reading and writing the media a sample points at: WAV audio, images, video frames.

One codec per kind, used by the converter (files -> shard members), the data module (shard
members -> tensors) and the corpus builder. Audio in shards is always 16 kHz mono PCM16 WAV;
the converter resamples other rates explicitly and reports it (the model never resamples).
WAV goes through the standard library's ``wave``; other audio formats use ``soundfile`` when it
is installed. Every failure raises :class:`MediaError` naming the file and the problem.
"""
from __future__ import annotations

import io
import wave
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SAMPLE_RATE = 16000
IMAGE_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "BMP": "bmp", "GIF": "gif"}


class MediaError(ValueError):
    """A media file that is missing, unreadable or unusable (the message names it)."""


# ----------------------------------------------------------------------------- audio
def decode_audio(data: bytes, name: str = "audio") -> tuple[np.ndarray, int]:
    """Bytes of an audio file -> (float32 mono waveform in [-1, 1], sample rate).

    WAV (PCM 8/16/24/32-bit) is read with the standard library; other formats need
    ``soundfile``. Multi-channel audio is averaged to mono. Raises MediaError when the bytes
    are not decodable audio, hold no samples, or decode to non-finite values."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        try:
            with wave.open(io.BytesIO(data)) as w:
                rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
                raw = w.readframes(w.getnframes())
        except (wave.Error, EOFError) as e:
            raise MediaError(f"{name}: corrupt WAV ({str(e) or 'truncated header'})") from None
        if width == 1:
            x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
        elif width == 2:
            x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
        elif width == 3:
            b = np.frombuffer(raw[: len(raw) // 3 * 3], np.uint8).reshape(-1, 3).astype(np.int32)
            x = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8).astype(np.float32) / 2**23
        elif width == 4:
            x = np.frombuffer(raw, "<i4").astype(np.float32) / 2**31
        else:
            raise MediaError(f"{name}: unsupported WAV sample width {width} bytes")
        x = x[: len(x) // channels * channels].reshape(-1, channels).mean(1)
    else:
        try:
            import soundfile
        except ImportError:
            raise MediaError(f"{name}: not a WAV file, and reading other audio formats needs "
                             "the soundfile package (pip install soundfile)") from None
        try:
            x, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        except Exception as e:  # soundfile raises its own LibsndfileError / RuntimeError
            raise MediaError(f"{name}: undecodable audio ({e})") from None
        x = x.mean(1)
    if rate <= 0:
        raise MediaError(f"{name}: invalid sample rate {rate}")
    if len(x) == 0:
        raise MediaError(f"{name}: no audio samples")
    if not np.isfinite(x).all():
        raise MediaError(f"{name}: audio holds NaN or inf")
    return np.ascontiguousarray(x, dtype=np.float32), int(rate)


def resample(x: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling by the FFT (the whole clip at once; exact for periodic
    signals, and the clips here are short enough for one transform)."""
    if rate == target:
        return x
    n = max(1, round(len(x) * target / rate))
    spec = torch.fft.rfft(torch.from_numpy(x).double())
    keep = min(spec.shape[0], n // 2 + 1)
    out = torch.fft.irfft(spec[:keep], n=n) * (n / len(x))
    return out.float().numpy()


def encode_wav(x: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """Float waveform -> mono PCM16 WAV bytes (clipped to [-1, 1])."""
    pcm = (np.clip(x, -1.0, 1.0) * 32767.0).round().astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """An audio file -> (float32 mono waveform, sample rate); see :func:`decode_audio`."""
    return decode_audio(read_bytes(path), str(path))


def audio_tensor(data: bytes, name: str = "audio") -> Tensor:
    """Shard WAV bytes -> 1-D float tensor at 16 kHz (refuses other rates: shards hold 16 kHz)."""
    x, rate = decode_audio(data, name)
    if rate != SAMPLE_RATE:
        raise MediaError(f"{name}: {rate} Hz in a shard; shards hold {SAMPLE_RATE} Hz audio "
                         "(re-convert with lyra-pl data convert)")
    return torch.from_numpy(x)


# ----------------------------------------------------------------------------- images
def check_image(data: bytes, name: str = "image") -> str:
    """Verifies that ``data`` is a decodable image; returns the file extension to store it
    under (png, jpg, ...). Raises MediaError otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.load()
            w, h = im.size
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise MediaError(f"{name}: not a decodable image ({e})") from None
    if w == 0 or h == 0:
        raise MediaError(f"{name}: empty image {w}x{h}")
    if fmt not in IMAGE_FORMATS:
        raise MediaError(f"{name}: unsupported image format {fmt}")
    return IMAGE_FORMATS[fmt]


def image_tensor(data: bytes, name: str = "image") -> Tensor:
    """Image bytes -> (3, H, W) uint8 RGB tensor."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise MediaError(f"{name}: not a decodable image ({e})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------- files
def read_bytes(path: str | Path) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise MediaError(f"{p}: file not found")
    try:
        return p.read_bytes()
    except OSError as e:
        raise MediaError(f"{p}: unreadable ({e.strerror})") from None


def video_frame_paths(path: str | Path) -> list[Path]:
    """A video given as a directory of frame images (sorted by name) or a list file: the
    frame files. Video containers (mp4, ...) are not decoded here: extract frames first
    (e.g. ``ffmpeg -i clip.mp4 -vf fps=1 frames/%04d.jpg``)."""
    p = Path(path)
    if p.is_dir():
        frames = sorted(f for f in p.iterdir() if f.suffix.lower() in
                        {".png", ".jpg", ".jpeg", ".webp", ".bmp"})
        if not frames:
            raise MediaError(f"{p}: video directory holds no frame images")
        return frames
    if p.is_file():
        raise MediaError(f"{p}: video files are not decoded by lyra_pl; give a directory of "
                         "frame images (e.g. ffmpeg -i clip.mp4 -vf fps=1 dir/%04d.jpg)")
    raise MediaError(f"{p}: file not found")
