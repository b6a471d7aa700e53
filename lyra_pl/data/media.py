"""Reading the media a sample points at, and the shard members they become.

One decoder for every container and codec: PyAV (FFmpeg's libraries inside its wheels, so
nothing to install system-wide). It reads WAV of any width, rate and channel count, FLAC,
MP3 (ID3 tags and leading junk included), Ogg/Opus, M4A/AAC and WebM audio, and
MP4/MOV/MKV/WebM/AVI video (a video's audio track too), from a path, as a stream: audio is
resampled by libswresample to 16 kHz on the fly, so memory holds the 16 kHz result and one
decoded frame, never the whole file at its source rate.

- :func:`audio_chunks` / :func:`load_audio` / :func:`audio_to_wav`: any audio (or a video's
  audio track) -> 16 kHz mono float32, checked whole: a stream that ends early, raises
  mid-way or decodes to less than its container declares is a :class:`MediaError` naming the
  file, "truncated" and both durations.
- :func:`load_video`: a video file, a directory of frame images, or one image holding a 4x4
  grid of frames -> JPEG frames at a frame rate, with a frame cap and Qwen2-VL's resize.
- Shard members are our own formats: 16 kHz mono PCM16 WAV (:func:`encode_wav`,
  :func:`audio_tensor`, read with the standard library so the training machines need no
  FFmpeg), images as their original bytes, video frames as JPEG.

Every failure raises :class:`MediaError`, one line naming the file and the problem.
"""
from __future__ import annotations

import io
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterator

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

SAMPLE_RATE = 16000
IMAGE_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "BMP": "bmp", "GIF": "gif"}
FRAME_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
# A decoded stream may fall short of its container's duration by codec framing (encoder
# delay, the last partial frame): 1% of the declared length, at least 50 ms, at most 0.5 s.
SHORTFALL_FRACTION, SHORTFALL_MIN, SHORTFALL_MAX = 0.01, 0.05, 0.5
# Qwen2-VL's video defaults (qwen-vl-utils: 2 fps; its processor's largest frame).
VIDEO_FPS = 2.0
VIDEO_MAX_FRAMES = 768
VIDEO_MAX_PIXELS = 768 * 28 * 28
GRID = 4  # a video given as one image holds GRID x GRID frames, row by row (official data)

class MediaError(ValueError):
    """A media file that is missing, unreadable or unusable (the message names it)."""


@dataclass(frozen=True)
class AudioInfo:
    """What :func:`audio_chunks` found: the source rate and channels, the seconds decoded and
    the seconds the container declares (None: it declares none)."""

    source_rate: int
    channels: int
    seconds: float
    declared: float | None


# ----------------------------------------------------------------------------- opening
def _name(source, name: str | None) -> str:
    return name or (str(source) if isinstance(source, (str, Path)) else "audio")


def _open(source, name: str):
    """``av.open`` on a path (or bytes), with FFmpeg's errors as one-line MediaErrors."""
    import av

    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise MediaError(f"{name}: empty file")
        source = io.BytesIO(source)
    else:
        p = Path(source)
        if not p.is_file():
            raise MediaError(f"{name}: file not found")
        if p.stat().st_size == 0:
            raise MediaError(f"{name}: empty file")
        source = str(p)
    try:
        return av.open(source, metadata_errors="ignore")
    except av.error.FFmpegError as e:
        raise MediaError(f"{name}: not a decodable media file ({_reason(e)})") from None


def _reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e)


def _declared_seconds(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1e6  # av.time_base: microseconds
    return None


def _check_complete(name: str, decoded: float, declared: float | None) -> None:
    if declared is None or declared <= 0:
        return
    allowed = min(max(SHORTFALL_FRACTION * declared, SHORTFALL_MIN), SHORTFALL_MAX)
    if decoded < declared - allowed:
        raise MediaError(f"{name}: truncated: decoded {decoded:.2f} s of the {declared:.2f} s "
                         "its container declares")


# ----------------------------------------------------------------------------- audio
def audio_chunks(source: str | Path | bytes | BinaryIO, name: str | None = None,
                 rate: int = SAMPLE_RATE, info: list | None = None) -> Iterator[np.ndarray]:
    """Streams the first audio stream of ``source`` (a path, or the bytes of a file) as 16 kHz
    mono float32 chunks in [-1, 1]. Channels are averaged (not FFmpeg's -3 dB downmix, which
    would raise a stereo clip's level). The last chunk comes only after the whole stream
    decoded and passed the checks: no samples, NaN/inf, truncation. ``info``: a list that
    gets the clip's :class:`AudioInfo` appended at the end."""
    import av

    name = _name(source, name)
    with _open(source, name) as container:
        if not container.streams.audio:
            raise MediaError(f"{name}: no audio stream")
        stream = container.streams.audio[0]
        declared = _declared_seconds(container, stream)
        resampler, channels, src_samples, src_rate, out = None, 0, 0, stream.rate or 0, 0
        try:
            for frame in container.decode(stream):
                if resampler is None:
                    channels, src_rate = len(frame.layout.channels), frame.sample_rate
                    resampler = av.AudioResampler(format="flt", layout=frame.layout, rate=rate)
                src_samples += frame.samples
                for x in _resampled(resampler, frame, channels, name):
                    out += len(x)
                    yield x
        except av.error.FFmpegError as e:
            at = src_samples / src_rate if src_rate else 0.0
            raise MediaError(f"{name}: truncated or corrupt: decoding failed after {at:.2f} s"
                             + (f" of {declared:.2f} s" if declared else "")
                             + f" ({_reason(e)})") from None
        if resampler is None or src_samples == 0:
            raise MediaError(f"{name}: no audio samples")
        for x in _resampled(resampler, None, channels, name):
            out += len(x)
            yield x
    seconds = src_samples / src_rate
    _check_complete(name, seconds, declared)
    if info is not None:
        info.append(AudioInfo(src_rate, channels, seconds, declared))


def _resampled(resampler, frame, channels: int, name: str) -> Iterator[np.ndarray]:
    for out in resampler.resample(frame):
        x = out.to_ndarray().reshape(-1, channels)  # packed flt: interleaved channels
        x = x.mean(1, dtype=np.float32) if channels > 1 else x[:, 0]
        if not np.isfinite(x).all():
            raise MediaError(f"{name}: audio holds NaN or inf")
        yield x


def load_audio(source: str | Path | bytes, name: str | None = None,
               rate: int = SAMPLE_RATE) -> tuple[np.ndarray, AudioInfo]:
    """The whole clip as one 16 kHz mono float32 array, and its :class:`AudioInfo`."""
    info: list[AudioInfo] = []
    chunks = list(audio_chunks(source, name, rate, info))
    return np.concatenate(chunks), info[0]


def audio_to_wav(source: str | Path | bytes, name: str | None = None
                 ) -> tuple[bytearray, AudioInfo]:
    """A clip as 16 kHz mono PCM16 WAV bytes for a shard, built chunk by chunk: memory holds
    the PCM16 result (2 bytes a sample), not a float copy of the whole clip."""
    info: list[AudioInfo] = []
    out = bytearray(_wav_header(0))
    for x in audio_chunks(source, name, SAMPLE_RATE, info):
        out += _pcm16(x).tobytes()
    out[:44] = _wav_header(len(out) - 44)
    return out, info[0]


def _pcm16(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, -1.0, 1.0) * 32767.0).round().astype("<i2")


def _wav_header(nbytes: int, rate: int = SAMPLE_RATE) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.setnframes(nbytes // 2)
        w.writeframes(b"")
    header = bytearray(buf.getvalue())
    header[4:8] = (36 + nbytes).to_bytes(4, "little")  # RIFF size
    header[40:44] = nbytes.to_bytes(4, "little")  # data size
    return bytes(header)


def encode_wav(x: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """Float waveform -> mono PCM16 WAV bytes (clipped to [-1, 1]): the shard format."""
    pcm = _pcm16(np.asarray(x, dtype=np.float32)).tobytes()
    return _wav_header(len(pcm), rate) + pcm


def audio_tensor(data: bytes, name: str = "audio") -> "Tensor":
    """A shard's WAV member -> 1-D float tensor at 16 kHz. Shards hold only the mono PCM16
    WAV that :func:`encode_wav` writes, so the standard library reads them (no FFmpeg needed
    where training runs)."""
    import torch

    try:
        with wave.open(io.BytesIO(data)) as w:
            rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as e:
        raise MediaError(f"{name}: not a shard WAV member ({str(e) or 'truncated header'}); "
                         "re-convert with lyra-pl data convert") from None
    if (rate, channels, width) != (SAMPLE_RATE, 1, 2):
        raise MediaError(f"{name}: {rate} Hz, {channels} channel(s), {8 * width}-bit in a "
                         f"shard; shards hold {SAMPLE_RATE} Hz mono PCM16 (re-convert with "
                         "lyra-pl data convert)")
    x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    if len(x) == 0:
        raise MediaError(f"{name}: no audio samples")
    return torch.from_numpy(x)


# ----------------------------------------------------------------------------- images
def check_image(data: bytes, name: str = "image") -> tuple[str, int, int]:
    """Verifies that ``data`` is a decodable image; returns the file extension to store it
    under (png, jpg, ...) and its width and height. Raises MediaError otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.load()
            w, h = im.size
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise MediaError(f"{name}: not a decodable image ({_image_reason(e)})") from None
    if w == 0 or h == 0:
        raise MediaError(f"{name}: empty image {w}x{h}")
    if fmt not in IMAGE_FORMATS:
        raise MediaError(f"{name}: unsupported image format {fmt}")
    return IMAGE_FORMATS[fmt], w, h


def _image_reason(e: Exception) -> str:
    from PIL import UnidentifiedImageError

    # PIL's own message names an object address, which would make reports differ run to run.
    return "unrecognized image data" if isinstance(e, UnidentifiedImageError) else str(e)


def image_tensor(data: bytes, name: str = "image") -> "Tensor":
    """Image bytes -> (3, H, W) uint8 RGB tensor."""
    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise MediaError(f"{name}: not a decodable image ({_image_reason(e)})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------- video
@dataclass(frozen=True)
class VideoOptions:
    """How a video file becomes frames: ``fps`` frames a second (spread evenly over the whole
    clip when that would exceed ``max_frames``). Frames above ``max_pixels`` are scaled down
    by Qwen2-VL's ``smart_resize``; smaller ones keep their size, since the data module's
    processor applies the training run's own pixel bounds."""

    fps: float = VIDEO_FPS
    max_frames: int = VIDEO_MAX_FRAMES
    max_pixels: int = VIDEO_MAX_PIXELS

    def __post_init__(self):
        if not self.fps > 0 or self.max_frames < 1 or self.max_pixels < 28 * 28:
            raise ValueError(f"bad video options {self}: need fps > 0, max_frames >= 1 and "
                             "max_pixels >= 784")

    def size(self, width: int, height: int) -> tuple[int, int]:
        if width * height <= self.max_pixels:
            return width, height
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        h, w = smart_resize(height, width, factor=28, min_pixels=28 * 28,
                            max_pixels=self.max_pixels)
        return w, h


Frame = tuple[bytes, int, int]  # JPEG bytes, width, height


def load_video(path: str | Path, options: VideoOptions = VideoOptions(),
               name: str | None = None) -> list[Frame]:
    """A video -> its frames as JPEG: a video file (decoded at ``options.fps``), a directory
    of frame images (sorted by name, each one frame; JPEG files keep their bytes), or one
    image file holding a 4x4 grid of frames (the official data's form), cut row by row into
    16 frames."""
    p = Path(path)
    name = name or str(p)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in FRAME_SUFFIXES)
        if not files:
            raise MediaError(f"{name}: video directory holds no frame images")
        return [_frame_file(f, f"{name}/{f.name}", options) for f in files]
    if p.suffix.lower() in FRAME_SUFFIXES and p.is_file():
        grid = _read_image(read_bytes(p), name)
        w, h = grid.size
        if w < GRID or h < GRID:
            raise MediaError(f"{name}: a {w}x{h} image cannot hold a {GRID}x{GRID} frame grid")
        fw, fh = w // GRID, h // GRID
        return [_frame(grid.crop((c * fw, r * fh, (c + 1) * fw, (r + 1) * fh)), options)
                for r in range(GRID) for c in range(GRID)]
    return _decode_video(p, name, options)


def _decode_video(path: Path, name: str, options: VideoOptions) -> list[Frame]:
    import av

    frames: list[Frame] = []
    with _open(path, name) as container:
        if not container.streams.video:
            raise MediaError(f"{name}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        declared = _declared_seconds(container, stream)
        width, height = options.size(stream.codec_context.width, stream.codec_context.height)
        n = max(1, min(options.max_frames, round((declared or 0) * options.fps)))
        step = declared / n if declared else 1.0 / options.fps
        start = float(stream.start_time * stream.time_base) if stream.start_time else 0.0
        last = 0.0
        try:
            for frame in container.decode(stream):
                last = (frame.time or 0.0) - start
                # The first frame at or after each tick (tick k at k * step seconds).
                if len(frames) < n and last + 1e-6 >= len(frames) * step:
                    image = frame.to_image(width=width, height=height, interpolation="BICUBIC")
                    frames.append((jpeg(image), width, height))
        except av.error.FFmpegError as e:
            raise MediaError(f"{name}: truncated or corrupt: decoding failed after "
                             f"{last:.2f} s ({_reason(e)})") from None
        rate = float(stream.average_rate or 0)
    if not frames:
        raise MediaError(f"{name}: no video frames")
    _check_complete(name, last + (1.0 / rate if rate else 0.0), declared)
    return frames


def _read_image(data: bytes, name: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise MediaError(f"{name}: not a decodable image ({_image_reason(e)})") from None


def _frame_file(path: Path, name: str, options: VideoOptions) -> Frame:
    data = read_bytes(path)
    ext, w, h = check_image(data, name)
    if ext == "jpg" and options.size(w, h) == (w, h):
        return data, w, h  # already a JPEG of a usable size: no second decode or encoding
    return _frame(_read_image(data, name), options)


def _frame(image, options: VideoOptions) -> Frame:
    from PIL import Image

    w, h = options.size(*image.size)
    if (w, h) != image.size:
        image = image.resize((w, h), Image.BICUBIC)
    return jpeg(image), w, h


def jpeg(image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ----------------------------------------------------------------------------- files
def read_bytes(path: str | Path) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise MediaError(f"{p}: file not found")
    try:
        return p.read_bytes()
    except OSError as e:
        raise MediaError(f"{p}: unreadable ({e.strerror})") from None
