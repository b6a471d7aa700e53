"""The tiny corpus's evaluation sets (``data/tiny/eval/``), one per task of ``lyra-pl eval``,
in the formats the real benchmarks come in, built from the validation split only:

- ``librispeech/``: the stage-1 validation clips as a LibriSpeech-format tree
  (``<speaker>/<chapter>/<speaker>-<chapter>.trans.txt``, upper-case transcripts).
- ``textvqa.json`` / ``docvqa.json``: every validation image asked each of its questions,
  typed, with ``speech_instruction`` (the same question spoken by the held-out voice) and
  ``answers``; DocVQA's stand-in keeps the reading questions (the printed word).
- ``videomme.json``: short clips (frame directories) of validation images drifting across
  the frame, asked their color as a VideoMME-style 4-option multiple choice.
- ``sound_caption.json``: the validation sound events with their reference captions.
- ``needles.json`` + ``needles/``: every needle sentence of stage 3 spoken by the held-out
  voice, for ``lyra-pl needle``.

Media shared with the stage files are referenced (``../media/...``), not copied, except the
LibriSpeech tree, which holds its own audio as that format requires.
"""
from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from lyra_pl.data.corpus.speech import VAL_VOICE, synthesize
from lyra_pl.data.corpus.text import COLORS, IMAGE_QUESTIONS, NEEDLES, SOUND_QUESTIONS

Sample = dict[str, Any]
VIDEO_FRAMES = 4
VIDEOS = 12
LETTERS = "ABCD"
VIDEOMME_PROMPT = ("Select the best answer to the following multiple-choice question based on "
                   "the video. Respond with only the letter (A, B, C, or D) of the correct option.")
SPEAKER, CHAPTER = 100, 1


def librispeech_tree(out: Path, asr_val: list[Sample], copy: Callable[[str, str], None]) -> int:
    """Writes the stage-1 validation clips as ``librispeech/100/1/100-1-NNNN.wav`` with
    ``100-1.trans.txt``. ``copy(src, dst)`` copies a corpus file (paths relative to the
    corpus root). Returns the number of utterances."""
    chapter = f"librispeech/{SPEAKER}/{CHAPTER}"
    lines = []
    for i, s in enumerate(asr_val):
        utt = f"{SPEAKER}-{CHAPTER}-{i:04d}"
        copy(s["speech"], f"eval/{chapter}/{utt}.wav")
        text = "".join(c for c in s["speech_asr"].upper() if c.isalnum() or c in " '")
        lines.append(f"{utt} {' '.join(text.split())}")
    (out / "eval" / chapter / f"{SPEAKER}-{CHAPTER}.trans.txt").write_text("\n".join(lines) + "\n")
    return len(lines)


def vqa_sets(images: list[dict[str, Any]], clips: dict[tuple[str, str, int], list[str]]
             ) -> tuple[list[Sample], list[Sample]]:
    """(textvqa, docvqa): each validation image asked each of its questions, typed, with the
    spoken question (``speech_instruction``) for the S+I variant. The phrasing cycles with
    the image index (no randomness: the set is a fixed function of the images)."""
    textvqa, docvqa = [], []
    for i, r in enumerate(images):
        for qtype, phrasings in IMAGE_QUESTIONS.items():
            if r[qtype] is None:
                continue
            p = i % len(phrasings)
            sample = {"id": f"{Path(r['image']).stem}_{qtype}", "image": f"../{r['image']}",
                      "conversations": [{"from": "human", "value": f"<image>\n{phrasings[p]}"},
                                        {"from": "gpt", "value": r[qtype]}],
                      "speech_instruction": f"../{clips[('val', qtype, p)][0]}",
                      "answers": [r[qtype]], "question_type": qtype}
            textvqa.append(sample)
            if qtype == "word":
                docvqa.append(sample)
    return textvqa, docvqa


def _drift_frames(png: bytes, n: int) -> list[bytes]:
    """``n`` frames of an image shifting right by a few pixels per frame (wrapping)."""
    x = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    frames = []
    for t in range(n):
        buf = io.BytesIO()
        Image.fromarray(np.roll(x, 3 * t, axis=1)).save(buf, format="PNG", optimize=True)
        frames.append(buf.getvalue())
    return frames


def videomme_set(root: Path, images: list[dict[str, Any]], rng: random.Random,
                 write: Callable[[str, bytes], str]) -> list[Sample]:
    """Clips of the first ``VIDEOS`` validation images, each asked its color among 4 options
    (the answer and 3 other colors, shuffled), VideoMME's prompt and letter answers."""
    samples = []
    for i, r in enumerate(images[:VIDEOS]):
        frames = _drift_frames((root / r["image"]).read_bytes(), VIDEO_FRAMES)
        video = f"videos/{i:02d}"
        for t, data in enumerate(frames):
            write(f"eval/{video}/{t:02d}.png", data)
        options = [r["color"], *rng.sample([c for c in COLORS if c != r["color"]], 3)]
        rng.shuffle(options)
        letter = LETTERS[options.index(r["color"])]
        listed = "\n".join(f"{L}. {o}" for L, o in zip(LETTERS, options))
        samples.append({
            "id": f"video_{i:02d}", "video": video,
            "conversations": [{"from": "human", "value": f"<video>\n{VIDEOMME_PROMPT}\n"
                               f"What color is the shape in the video?\n{listed}"},
                              {"from": "gpt", "value": letter}],
            "options": [f"{L}. {o}" for L, o in zip(LETTERS, options)], "answer": letter})
    return samples


def sound_caption_set(joint_val: list[Sample]) -> list[Sample]:
    """Each validation sound clip once, asked for a caption; ``references``: its caption."""
    seen, samples = set(), []
    for s in joint_val:
        if "sound" not in s or s["sound"] in seen:
            continue
        seen.add(s["sound"])
        caption = s["conversations"][-1]["value"]
        samples.append({"id": f"sound_{len(samples):02d}", "sound": f"../{s['sound']}",
                        "conversations": [
                            {"from": "human", "value": f"<sound>\n{SOUND_QUESTIONS[0]}"},
                            {"from": "gpt", "value": caption}],
                        "references": [caption]})
    return samples


def needle_set(rate: int, wav: Callable[[str, np.ndarray], str]) -> list[dict[str, Any]]:
    """Every needle sentence of stage 3 spoken by the held-out validation voice."""
    out = []
    for kind, (template, question, answers) in NEEDLES.items():
        for value in answers:
            text = template.format(value)
            path = wav(f"eval/needles/{kind}_{value}.wav", synthesize(text, VAL_VOICE, rate))
            out.append({"kind": kind, "text": text, "question": question, "answer": value,
                        "choices": list(answers), "audio": path.removeprefix("eval/")})
    return out

