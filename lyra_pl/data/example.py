"""`lyra-pl data example --out DIR`: a miniature of the official Lyra data release, so that
every command of docs/data.md runs offline (tests/test_docs_data.py runs them on it).

Laid out as the release is, with its two media roots (``--image-folder``, ``--speech-folder``)::

    DIR/images/       PNG images; videos/: an MP4 with an AAC audio track, a folder of
                      frames, one JPEG holding a 4x4 grid of frames
    DIR/speech/       spoken instructions (MP3 with an ID3 tag and junk before its first
                      frame, FLAC, M4A, WAV), a 60 s FLAC for long speech, an Ogg/Opus sound,
                      ASR clips in LibriSpeech's train-clean-100 layout
    DIR/LibriSpeech/test-clean/<spk>/<chap>/<utt>.flac + <spk>-<chap>.trans.txt  (eval)
    DIR/lyra_asr.jsonl          stage 1: {"audio", "text"} lines, as prepare_librispeech.py
    DIR/lyra_multimodal.json    stage 2: images, videos (<image> placeholder), spoken
                                instructions (speech + speech_asr), sound, text
    DIR/lyra_long_speech.json   stage 3: long_speech
    DIR/lyra_speech_gen.json    stage 4: tgt_unit as "<sosp><12><873>...<eosp>"

The media are real files in the release's formats, written with :mod:`lyra_pl.data.encode`;
their content is synthetic (voice-like tones, drawn shapes) and seeded, so every run writes
the same data. About 0.7 MB, written in a second or two. Files already in DIR that it does not
write are left alone.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lyra_pl.data import encode

SEED = 0
WORDS = ("THE OLD MAN WALKED SLOWLY DOWN TO THE RIVER WHERE BOATS WAITED IN MORNING LIGHT "
         "SHE SAID THAT EVERY GARDEN NEEDS WATER AND PATIENCE BEFORE IT GROWS").split()
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}
ASR_CLIPS = [("19", "198", i) for i in range(3)] + [("26", "495", i) for i in range(3)]
TEST_CLIPS = [("1089", "134686", i) for i in range(2)] + [("121", "121726", i) for i in range(2)]


# ----------------------------------------------------------------------------- media
def voice(seconds: float, rate: int, seed: int) -> np.ndarray:
    """A voice-like float32 waveform: harmonic syllables on a wavering pitch, with pauses.
    No noise, so FLAC keeps the 60 s clip small."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    envelope = np.zeros(n)
    pos = 0.05
    while pos < seconds - 0.1:
        length = rng.uniform(0.12, 0.3)
        a, b = int(pos * rate), int(min(pos + length, seconds) * rate)
        envelope[a:b] = np.sin(np.linspace(0, np.pi, b - a))
        pos += length + rng.uniform(0.03, 0.12)
    pitch = rng.uniform(100, 220) * (1 + 0.05 * np.sin(2 * np.pi * rng.uniform(2, 5) * t))
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    return (0.25 * envelope * sum(np.sin(k * phase) / k for k in (1, 2, 3, 4))
            ).astype(np.float32)


def _shape_image(color: str, shape: str, size: tuple[int, int] = (96, 64)):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    w, h = size
    box = (w // 3, h // 4, 2 * w // 3, 3 * h // 4)
    if shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    elif shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    else:
        draw.polygon([(w // 2, h // 4), (w // 3, 3 * h // 4), (2 * w // 3, 3 * h // 4)],
                     fill=COLORS[color])
    return image


def _ball_frames(n: int, color: str, size: tuple[int, int]):
    """A ball moving left to right over ``n`` frames."""
    from PIL import Image, ImageDraw

    w, h = size
    r = h // 4
    frames = []
    for k in range(n):
        image = Image.new("RGB", size, (250, 250, 235))
        x = r + (w - 2 * r) * k // max(n - 1, 1)
        ImageDraw.Draw(image).ellipse((x - r, h // 2 - r, x + r, h // 2 + r), fill=COLORS[color])
        frames.append(image)
    return frames


def _grid(frames, grid: int = 4):
    """One image holding ``grid`` x ``grid`` frames row by row, as the official data ships
    some videos."""
    from PIL import Image

    w, h = frames[0].size
    image = Image.new("RGB", (grid * w, grid * h))
    for i, frame in enumerate(frames[:grid * grid]):
        image.paste(frame, ((i % grid) * w, (i // grid) * h))
    return image


def _sentence(rng: np.random.Generator) -> str:
    start = int(rng.integers(0, len(WORDS) - 7))
    return " ".join(WORDS[start:start + int(rng.integers(4, 8))])


def _units(rng: np.random.Generator, n: int) -> str:
    return "<sosp>" + "".join(f"<{u}>" for u in rng.integers(0, 1000, n)) + "<eosp>"


def _turns(*values: str) -> list[dict[str, str]]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


# ----------------------------------------------------------------------------- the release
def write_media(out: Path) -> None:
    images, speech = out / "images", out / "speech"
    for d in (images / "videos" / "frames" / "ball", speech / "instructions", speech / "long",
              speech / "sound"):
        d.mkdir(parents=True, exist_ok=True)
    for name, (color, shape) in {"scene0": ("red", "square"), "scene1": ("green", "circle"),
                                 "scene2": ("blue", "triangle")}.items():
        _shape_image(color, shape).save(images / f"{name}.png")
    for k, frame in enumerate(_ball_frames(6, "red", (64, 48))):
        frame.save(images / "videos" / "frames" / "ball" / f"{k:04d}.png")
    _grid(_ball_frames(16, "blue", (32, 24))).save(images / "videos" / "grid.jpg", quality=90)
    encode.write_video(images / "videos" / "clip.mp4", seconds=2.0, fps=10, size=(64, 48),
                       audio_rate=22050)

    q = speech / "instructions"
    x = voice(1.5, 44100, 1)
    encode.write_audio(q / "q0.mp3", np.stack([x, 0.9 * x]), 44100, title="question 0")
    encode.with_junk(q / "q0.mp3", 1024, seed=SEED)  # as some real MP3s have
    encode.write_audio(q / "q1.flac", voice(1.5, 16000, 2), 16000)
    encode.write_audio(q / "q2.m4a", voice(1.5, 22050, 3), 22050)
    encode.write_audio(q / "q3.wav", voice(1.5, 16000, 4), 16000)
    encode.write_audio(speech / "long" / "lecture.flac", voice(60.0, 16000, 5), 16000)
    encode.write_audio(speech / "sound" / "beep.ogg", encode.tone(1.0, 48000, freq=900.0,
                                                                   seed=SEED), 48000)


def write_asr(out: Path, rng: np.random.Generator) -> int:
    """Training clips under speech/ with lyra_asr.jsonl, and the test-clean eval tree."""
    lines = []
    for spk, chap, i in ASR_CLIPS:
        rel = f"train-clean-100/{spk}/{chap}/{spk}-{chap}-{i:04d}.flac"
        (out / "speech" / rel).parent.mkdir(parents=True, exist_ok=True)
        encode.write_audio(out / "speech" / rel, voice(1.2, 16000, 100 + len(lines)), 16000)
        lines.append({"audio": rel, "text": _sentence(rng)})
    with open(out / "lyra_asr.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)

    chapters: dict[Path, list[str]] = {}
    for n, (spk, chap, i) in enumerate(TEST_CLIPS):
        d = out / "LibriSpeech" / "test-clean" / spk / chap
        d.mkdir(parents=True, exist_ok=True)
        utt = f"{spk}-{chap}-{i:04d}"
        encode.write_audio(d / f"{utt}.flac", voice(1.2, 16000, 200 + n), 16000)
        chapters.setdefault(d / f"{spk}-{chap}.trans.txt", []).append(f"{utt} {_sentence(rng)}")
    for path, utts in chapters.items():
        path.write_text("\n".join(utts) + "\n")
    return len(lines)


def multimodal_samples() -> list[dict[str, Any]]:
    """Stage 2, as the official file writes it: paths relative to the two media roots, video
    samples with ``<image>``, spoken instructions as ``<speech>`` plus their transcript."""
    def spoken(sid, image, clip, question, answer):
        return {"id": sid, "image": image, "speech": f"instructions/{clip}",
                "speech_asr": question, "conversations": _turns("<image>\n<speech>", answer)}

    return [
        {"id": "mm-image-0", "image": "scene0.png",
         "conversations": _turns("<image>\nWhat color is the square?", "The square is red.",
                                 "And the background?", "White.")},
        spoken("mm-spoken-mp3", "scene0.png", "q0.mp3", "What shape is in the picture?",
               "A square."),
        spoken("mm-spoken-flac", "scene1.png", "q1.flac", "What color is the circle?", "Green."),
        spoken("mm-spoken-m4a", "scene2.png", "q2.m4a", "How many triangles are there?", "One."),
        spoken("mm-spoken-wav", "scene1.png", "q3.wav", "Is the background white?", "Yes."),
        {"id": "mm-video-mp4", "video": "videos/clip.mp4",
         "conversations": _turns("<image>\nDoes the video get brighter or darker?",
                                 "Brighter.")},
        {"id": "mm-video-frames", "video": "videos/frames/ball",
         "conversations": _turns("<image>\nWhich way does the ball move?", "Left to right.")},
        {"id": "mm-video-grid", "video": "videos/grid.jpg",
         "conversations": _turns("<image>\nWhat color is the ball?", "Blue.")},
        {"id": "mm-sound", "sound": "sound/beep.ogg",
         "conversations": _turns("<sound>\nWhat is this sound?", "A short high beep.")},
        # The video's own audio track: `sound` points at the video file (from the speech root).
        {"id": "mm-video-audio", "video": "videos/clip.mp4", "sound": "../images/videos/clip.mp4",
         "conversations": _turns("<image>\n<sound>\nWhat do you hear in this video?",
                                 "A steady tone.")},
        {"id": "mm-text", "conversations": _turns("Name a primary color.", "Red.")},
    ]


def long_speech_samples() -> list[dict[str, Any]]:
    questions = [("What is the recording about?", "A walk down to the river."),
                 ("Who speaks in the recording?", "One speaker."),
                 ("How does the recording end?", "With a word about gardens.")]
    return [{"id": f"long-{i}", "long_speech": "long/lecture.flac",
             "conversations": _turns(f"<speech>\n{q}", a)} for i, (q, a) in enumerate(questions)]


def speech_gen_samples(rng: np.random.Generator) -> list[dict[str, Any]]:
    """Stage 4: answers with their speech units (``tgt_unit``), after spoken or typed
    instructions."""
    samples = []
    for i, (clip, question, answer) in enumerate([
            ("q1.flac", "Say hello.", "Hello there."),
            ("q2.m4a", "What comes after one?", "Two."),
            ("q0.mp3", "Name a color.", "Blue.")]):
        samples.append({"id": f"gen-{i}", "speech": f"instructions/{clip}",
                        "speech_asr": question, "conversations": _turns("<speech>", answer),
                        "tgt_unit": _units(rng, 40)})
    samples.append({"id": "gen-typed", "conversations": _turns("Count to three.",
                                                               "One, two, three."),
                    "tgt_unit": _units(rng, 60)})
    return samples


def build(out: str | Path) -> dict[str, int]:
    """Writes the example release into ``out``; returns JSON file name -> samples."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    write_media(out)
    counts = {"lyra_asr.jsonl": write_asr(out, rng)}
    for name, samples in (("lyra_multimodal.json", multimodal_samples()),
                          ("lyra_long_speech.json", long_speech_samples()),
                          ("lyra_speech_gen.json", speech_gen_samples(rng))):
        (out / name).write_text(json.dumps(samples, indent=1) + "\n")
        counts[name] = len(samples)
    return counts


# ----------------------------------------------------------------------------- CLI
DESCRIPTIONS = {
    "lyra_asr.jsonl": "stage 1: ASR lines {\"audio\", \"text\"}, audio under speech/",
    "lyra_multimodal.json": "stage 2: images, videos, spoken instructions, sound, text",
    "lyra_long_speech.json": "stage 3: long_speech (speech/long/lecture.flac, 60 s)",
    "lyra_speech_gen.json": "stage 4: tgt_unit speech units",
    "images": "PNG, MP4 with AAC audio, frames folder, 4x4-grid JPEG",
    "speech": "MP3 (ID3 tag + junk), FLAC, M4A, WAV, Ogg/Opus",
    "LibriSpeech": "eval: test-clean tree, FLAC + trans.txt",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lyra-pl data example",
        description="Write a small offline stand-in for the official Lyra data release "
                    "(the input of docs/data.md).")
    parser.add_argument("--out", type=Path, required=True, help="directory to write into")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.out.exists() and not args.out.is_dir():
        print(f"error: --out {args.out} exists and is not a directory", file=sys.stderr)
        return 1
    counts = build(args.out)
    files = [p for p in args.out.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    print(f"wrote {args.out}/ ({size / 1e6:.1f} MB, {len(files)} files), laid out like the "
          "official Lyra data release:")
    for name, n in counts.items():
        print(f"  {name:24s}{n:3d} samples  {DESCRIPTIONS[name]}")
    for name in ("images", "speech", "LibriSpeech"):
        n = sum(1 for p in (args.out / name).rglob("*") if p.is_file())
        print(f"  {name + '/':24s}{n:3d} files    {DESCRIPTIONS[name]}")
    print(f"media roots: --image-folder {args.out / 'images'} --speech-folder "
          f"{args.out / 'speech'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
