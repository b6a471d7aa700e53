"""The media layer on real files encoded here with PyAV: every audio container and codec users
have decodes to the right length and level at 16 kHz, videos decode at a frame rate, and a
truncated, fake or empty file is a one-line MediaError naming the file."""
import wave

import numpy as np
import pytest

from lyra_pl.data import encode, media

SECONDS = 1.5


def _check(x, info, seconds, rate=None, tol=0.05):
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) / media.SAMPLE_RATE - seconds) < tol, len(x) / media.SAMPLE_RATE
    assert abs(info.seconds - seconds) < tol
    if rate:
        assert info.source_rate == rate
    # Level of the 0.3 tone, from the samples themselves: RMS of a sine is amplitude / sqrt 2.
    rms = float(np.sqrt(np.mean(x[len(x) // 4: -len(x) // 4] ** 2)))
    assert 0.15 < rms < 0.26, rms


@pytest.mark.parametrize("suffix,rate,channels", [
    (".flac", 44100, 2), (".mp3", 44100, 2), (".mp3", 22050, 1), (".opus", 48000, 1),
    (".m4a", 44100, 2), (".webm", 48000, 2), (".wav", 8000, 1), (".wav", 48000, 6)])
def test_audio_formats(tmp_path, suffix, rate, channels):
    path = encode.write_audio(tmp_path / f"a{suffix}", encode.tone(SECONDS, rate, channels),
                              rate)
    x, info = media.load_audio(path)
    _check(x, info, SECONDS, rate)
    assert info.channels == channels


@pytest.mark.parametrize("bits", [8, 16, 24, 32, "float"])
def test_wav_widths(tmp_path, bits):
    """24-bit and float WAV are WAVE_FORMAT_EXTENSIBLE / IEEE float, which the standard
    library's wave refuses."""
    path = encode.write_audio(tmp_path / "a.wav", encode.tone(SECONDS, 44100, 2), 44100, bits)
    if bits in (24, "float"):
        with pytest.raises(wave.Error):
            wave.open(str(path)).close()
    _check(*media.load_audio(path), SECONDS, 44100)


def test_mp3_with_id3_tag_and_leading_junk(tmp_path):
    path = encode.write_audio(tmp_path / "tagged.mp3", encode.tone(3.0, 44100, 2), 44100,
                              title="x" * 300)
    assert path.read_bytes()[:3] == b"ID3"
    encode.with_junk(path, 1024)
    _check(*media.load_audio(path), 3.0, 44100, tol=0.08)


def test_stereo_is_averaged_not_downmixed_louder(tmp_path):
    left = encode.tone(1.0, 16000, 1)[0]
    x = np.stack([left, np.zeros_like(left)])
    got, _ = media.load_audio(encode.write_audio(tmp_path / "s.wav", x, 16000, "float"))
    np.testing.assert_allclose(got, left / 2, atol=1e-6)


def test_resampling_matches_an_independent_computation(tmp_path):
    """44.1 kHz -> 16 kHz of a 1 kHz tone: the result is the same tone sampled at 16 kHz."""
    rate = 44100
    t = np.arange(rate * 2) / rate
    x = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    got, _ = media.load_audio(encode.write_audio(tmp_path / "t.wav", x, rate, "float"))
    ref = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(len(got)) / media.SAMPLE_RATE)
    mid = slice(1000, len(got) - 1000)
    assert len(got) == 32000
    assert np.abs(got[mid] - ref[mid]).max() < 0.02


def test_audio_to_wav_is_the_shard_format(tmp_path):
    path = encode.write_audio(tmp_path / "a.flac", encode.tone(SECONDS, 44100, 2), 44100)
    wav, info = media.audio_to_wav(path)
    with wave.open(__import__("io").BytesIO(bytes(wav))) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        assert w.getnframes() == (len(wav) - 44) // 2
    x, _ = media.load_audio(path)
    t = media.audio_tensor(bytes(wav)).numpy()
    np.testing.assert_allclose(t, x, atol=1 / 32767 + 1e-6)


def test_truncated_mp3_is_rejected_with_both_durations(tmp_path):
    path = encode.write_audio(tmp_path / "full.mp3", encode.tone(4.3, 44100, 2), 44100)
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(path.read_bytes()[:len(path.read_bytes()) * 3 // 10])
    with pytest.raises(media.MediaError, match=r"cut\.mp3: truncated: decoded 1\.\d+ s of the "
                                               r"4\.30 s"):
        media.load_audio(cut)
    stub = tmp_path / "stub.mp3"
    stub.write_bytes(path.read_bytes()[:300])
    with pytest.raises(media.MediaError, match=r"stub\.mp3: (truncated|not a decodable|no audio)"):
        media.load_audio(stub)


@pytest.mark.parametrize("content,words", [
    (b"this is a text file, not audio\n" * 20, "not a decodable media file"),
    (b"", "empty file")])
def test_not_audio(tmp_path, content, words):
    path = tmp_path / "fake.mp3"
    path.write_bytes(content)
    with pytest.raises(media.MediaError, match=f"fake.mp3: {words}"):
        media.load_audio(path)
    with pytest.raises(media.MediaError, match="nope.flac: file not found"):
        media.load_audio(tmp_path / "nope.flac")


def test_no_samples_and_nan(tmp_path):
    empty = tmp_path / "e.wav"
    empty.write_bytes(media.encode_wav(np.zeros(0, np.float32)))  # a header, no frames
    with pytest.raises(media.MediaError, match="e.wav: no audio samples"):
        media.load_audio(empty)
    x = encode.tone(0.5, 16000)
    x[0, 100] = np.nan
    with pytest.raises(media.MediaError, match="n.wav: audio holds NaN"):
        media.load_audio(encode.write_audio(tmp_path / "n.wav", x, 16000, "float"))


@pytest.mark.parametrize("suffix", [".mp4", ".mov", ".webm", ".mkv", ".avi"])
def test_video_files_decode_at_the_frame_rate(tmp_path, suffix):
    path = encode.write_video(tmp_path / f"v{suffix}", seconds=3.0, fps=25, size=(160, 120))
    frames = media.load_video(path, media.VideoOptions(fps=2.0))
    assert len(frames) == 6
    from PIL import Image
    import io
    reds = []
    for data, w, h in frames:
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "JPEG" and im.size == (w, h) == (160, 120)
            reds.append(np.asarray(im.convert("RGB"))[..., 0].mean())
    # Frame k is grey 3k: the ticks at 0, 0.5, ... 2.5 s are frames 0, 13, 25, 38, 50, 63.
    np.testing.assert_allclose(reds, [3 * k for k in (0, 13, 25, 38, 50, 63)], atol=5)
    # Its audio track, as speech or sound.
    x, info = media.load_audio(path)
    assert abs(len(x) / media.SAMPLE_RATE - 3.0) < 0.1


def test_video_frame_cap_and_resize(tmp_path):
    path = encode.write_video(tmp_path / "v.mp4", seconds=4.0, fps=10, size=(640, 480),
                              audio_rate=None)
    frames = media.load_video(path, media.VideoOptions(fps=10, max_frames=5,
                                                       max_pixels=100 * 28 * 28))
    assert len(frames) == 5
    w, h = frames[0][1:]
    assert w % 28 == 0 and h % 28 == 0 and w * h <= 100 * 28 * 28 and abs(w / h - 4 / 3) < 0.1
    with pytest.raises(media.MediaError, match="v.mp4: no audio stream"):
        media.load_audio(path)


def test_grid_image_is_sixteen_frames(tmp_path):
    from PIL import Image
    grid = Image.new("RGB", (4 * 56, 4 * 42))
    for k in range(16):
        grid.paste((k * 15, 0, 0), (k % 4 * 56, k // 4 * 42, k % 4 * 56 + 56, k // 4 * 42 + 42))
    grid.save(tmp_path / "grid.jpg")
    frames = media.load_video(tmp_path / "grid.jpg")
    assert len(frames) == 16 and all((w, h) == (56, 42) for _, w, h in frames)
    import io
    reds = [np.asarray(Image.open(io.BytesIO(d)))[..., 0].mean() for d, _, _ in frames]
    np.testing.assert_allclose(reds, [k * 15 for k in range(16)], atol=3)


def test_truncated_video_is_rejected(tmp_path):
    path = encode.write_video(tmp_path / "v.webm", seconds=3.0)
    cut = tmp_path / "cut.webm"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(media.MediaError, match="cut.webm: (truncated|not a decodable)"):
        media.load_video(cut)
