"""Writing real-format media with PyAV (the decoder's own FFmpeg): what the tests, the data
benchmark and the docs' example release use, so each is fed files like the ones users have.

- :func:`write_audio`: a waveform (or a stream of blocks: :func:`long_tone`) as WAV (any PCM
  width or float), FLAC, MP3, Opus, M4A/AAC or WebM, at any rate and channel count, chosen
  by the file's suffix.
- :func:`write_video`: moving frames (and a tone as the audio track) as MP4/MOV/MKV/WebM/AVI.
- :func:`with_junk`: an MP3 with an ID3v2 tag and bytes of junk before its first frame.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

# suffix -> (container format, audio codec) and (format, video codec, pixel format)
AUDIO = {".wav": ("wav", "pcm_s16le"), ".flac": ("flac", "flac"), ".mp3": ("mp3", "libmp3lame"),
         ".opus": ("ogg", "libopus"), ".ogg": ("ogg", "libopus"), ".m4a": ("ipod", "aac"),
         ".webm": ("webm", "libopus")}
VIDEO = {".mp4": ("mp4", "libx264", "aac"), ".mov": ("mov", "libx264", "aac"),
         ".mkv": ("matroska", "libx264", "aac"), ".webm": ("webm", "libvpx", "libopus"),
         ".avi": ("avi", "mpeg4", "libmp3lame")}
PCM = {8: "pcm_u8", 16: "pcm_s16le", 24: "pcm_s24le", 32: "pcm_s32le", "float": "pcm_f32le"}


def tone(seconds: float, rate: int, channels: int = 1, freq: float = 440.0,
         level: float = 0.3, seed: int = 0) -> np.ndarray:
    """(channels, samples) float32: a tone with a little noise, a different phase per
    channel."""
    t = np.arange(int(round(seconds * rate))) / rate
    rng = np.random.default_rng(seed)
    x = [level * np.sin(2 * np.pi * freq * t + 0.1 * c) + 0.01 * rng.standard_normal(len(t))
         for c in range(channels)]
    return np.asarray(x, dtype=np.float32)


def long_tone(seconds: float, rate: int, block_seconds: float = 60.0) -> Iterator[np.ndarray]:
    """:func:`tone` of any length as (1, samples) blocks, for files too long to hold."""
    done = 0.0
    while done < seconds:
        n = min(block_seconds, seconds - done)
        yield tone(n, rate, freq=220.0 + 20.0 * (int(done) % 10), seed=int(done))
        done += n


def write_audio(path: str | Path, x: np.ndarray | Iterable[np.ndarray], rate: int,
                bits: int | str = 16, bitrate: int | None = None,
                title: str | None = None) -> Path:
    """Writes ``x`` ((channels, samples) or (samples,) float in [-1, 1], or an iterable of
    such blocks) to ``path``; the suffix picks the format (WAV: ``bits`` 8, 16, 24, 32 or
    "float"). ``title``: a metadata tag (an ID3v2 tag in MP3)."""
    import av

    path = Path(path)
    blocks = iter([x] if isinstance(x, np.ndarray) else x)
    first = np.atleast_2d(np.asarray(next(blocks), dtype=np.float32))
    fmt, codec = AUDIO[path.suffix.lower()]
    if fmt == "wav":
        codec = PCM[bits]
    layout = {1: "mono", 2: "stereo"}.get(len(first), f"{len(first)}c")
    with av.open(str(path), "w", format=fmt) as container:
        if title:
            container.metadata["title"] = title
        stream = container.add_stream(codec, rate=rate, layout=layout)
        if bitrate:
            stream.bit_rate = bitrate
        pts = 0
        for block in itertools.chain([first], blocks):
            pts = _encode_audio(container, stream, np.atleast_2d(block), rate, layout, pts)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def _encode_audio(container, stream, x: np.ndarray, rate: int, layout: str, pts: int = 0,
                  block: int = 4096) -> int:
    import av

    for i in range(0, x.shape[1], block):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[:, i:i + block],
                                                                dtype=np.float32),
                                           format="fltp", layout=layout)
        frame.sample_rate, frame.pts = rate, pts + i
        for packet in stream.encode(frame):
            container.mux(packet)
    return pts + x.shape[1]


def write_video(path: str | Path, seconds: float = 2.0, fps: int = 25,
                size: tuple[int, int] = (160, 120), audio_rate: int | None = 44100) -> Path:
    """A clip whose frames brighten over time (frame k is grey level 3k mod 256, plus a
    horizontal gradient in green), with a tone as its audio track unless ``audio_rate`` is
    None."""
    import av

    path = Path(path)
    fmt, vcodec, acodec = VIDEO[path.suffix.lower()]
    w, h = size
    with av.open(str(path), "w", format=fmt) as container:
        video = container.add_stream(vcodec, rate=fps)
        video.width, video.height, video.pix_fmt = w, h, "yuv420p"
        video.bit_rate = 4_000_000  # high: frames decode close to what was drawn
        audio = None
        if audio_rate:
            audio_rate = 48000 if acodec == "libopus" else audio_rate
            audio = container.add_stream(acodec, rate=audio_rate, layout="mono")
        for k in range(int(round(seconds * fps))):
            img = np.full((h, w, 3), 3 * k % 256, np.uint8)
            img[..., 1] = np.linspace(0, 255, w, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = k
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode(None):
            container.mux(packet)
        if audio is not None:
            _encode_audio(container, audio, tone(seconds, audio_rate), audio_rate, "mono")
            for packet in audio.encode(None):
                container.mux(packet)
    return path


def with_junk(path: str | Path, junk: int = 1024, seed: int = 0) -> Path:
    """Inserts ``junk`` random bytes between an MP3's ID3v2 tag and its first frame, as some
    real files have (write it with ``title=`` for the tag)."""
    path = Path(path)
    data = path.read_bytes()
    tag = 0
    if data[:3] == b"ID3":
        size = data[6:10]
        tag = 10 + ((size[0] << 21) | (size[1] << 14) | (size[2] << 7) | size[3])
    noise = np.random.default_rng(seed).integers(0, 256, junk, dtype=np.uint8).tobytes()
    path.write_bytes(data[:tag] + noise.replace(b"\xff", b"\x00") + data[tag:])
    return path
