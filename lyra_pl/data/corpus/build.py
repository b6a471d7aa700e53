"""Builds the tiny corpus: four stages of samples in the official Lyra JSON format.

    lyra-pl corpus build --out data/tiny [--seed 0] [--units 64] [--hubert DIR] [--force]
    python -m lyra_pl.data.corpus build --out data/tiny     (the same, without the CLI)

Speech is spoken by espeak-ng, images are drawn with PIL, sound events are synthesized with
numpy, stage-4 unit targets come from k-means over frame features. All audio is stored as
8 kHz mono PCM16 WAV to keep the corpus small (the converter resamples to 16 kHz). The same
seed gives the same files, byte for byte. Layout and contents: docs/method.md, "Data format" and the
README.md written next to the JSON files.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from lyra_pl.data.conversation import render
from lyra_pl.data.corpus import evalsets
from lyra_pl.data.corpus.images import png_bytes, render_image
from lyra_pl.data.corpus.sounds import SOUND_EVENTS, sound_event
from lyra_pl.data.corpus.speech import (ANSWER_VOICE, TRAIN_VOICES, VAL_VOICE, VOICE_NAMES,
                                        CorpusError, espeak_version, random_voice,
                                        require_espeak, synthesize)
from lyra_pl.data.corpus.text import (ASR_PROMPTS, COLORS, IMAGE_ANSWERS, IMAGE_QUESTIONS,
                                      NEEDLES, SAY_PROMPTS, SHAPES, SOUND_QUESTIONS, WORDS,
                                      asr_sentences, image_qa_answer, text_qa_pairs,
                                      vocabulary_text)
from lyra_pl.data.corpus.units import UnitExtractor
from lyra_pl.data.media import encode_wav
from lyra_pl.data.tokenizer import build_tiny_tokenizer

RATE = 8000  # stored audio
UNIT_RATE = 16000  # audio the units are computed from
SPLITS = ("train", "val")
STAGE_FILES = ("stage0_vlm", "stage1_asr", "stage2_joint", "stage3_long", "stage4_units")
Sample = dict[str, Any]


@dataclass(frozen=True)
class CorpusSizes:
    """How much of each stage to draw (train / val)."""

    asr: tuple[int, int] = (110, 22)  # stage 1 samples, one clip each
    images: tuple[int, int] = (600, 30)  # stage 2 images, each asked its color, shape, word
    word_fraction: float = 1.0  # of the images with a printed word (others: no word question)
    sound_variants: tuple[int, int] = (32, 2)  # renderings of each of the 6 sound events
    long: tuple[int, int] = (2, 1)  # stage 3 recordings, two questions each
    long_seconds: tuple[float, float] = (60.5, 61.0)  # range of a recording's target length
    qa: tuple[int, int] = (150, 30)  # stage 4 samples
    image_qa_fraction: float = 0.3  # of stage 4 samples that ask about a stage-2 image
    image_size: int = 84

    @classmethod
    def small(cls) -> CorpusSizes:
        """A few samples per stage: for tests and smoke runs (builds in seconds)."""
        return cls(asr=(6, 3), images=(12, 6), sound_variants=(1, 1), long=(1, 1),
                   qa=(24, 6))


def human(value: str) -> dict[str, str]:
    return {"from": "human", "value": value}


def gpt(value: str) -> dict[str, str]:
    return {"from": "gpt", "value": value}


def balanced(values: Sequence[Any], n: int, rng: random.Random) -> list[Any]:
    """``n`` draws from ``values``, each as often as possible (counts differ by <= 1), in
    random order."""
    out = [values[i % len(values)] for i in range(n)]
    rng.shuffle(out)
    return out


class _Media:
    """Writes media files under the corpus root and returns their relative paths."""

    def __init__(self, root: Path):
        self.root = root
        self.png_hashes: set[str] = set()

    def wav(self, rel: str, x: np.ndarray) -> str:
        return self._write(rel, encode_wav(x, RATE))

    def png(self, rel: str, data: bytes) -> str:
        return self._write(rel, data)

    def _write(self, rel: str, data: bytes) -> str:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return rel


def _bar(items, desc: str, progress: bool):
    return tqdm(items, desc=desc, disable=not progress, leave=False)


# ----------------------------------------------------------------------------- stage 1
def stage1_asr(media: _Media, questions: dict[str, list[tuple[str, str]]], sizes: CorpusSizes,
               rng: random.Random, progress: bool,
               ) -> tuple[dict[str, list[Sample]], dict[str, list[np.ndarray]]]:
    """ASR pairs: short sentences, each spoken once by a random voice, plus the stage-2
    spoken questions of the same split (``questions``: split -> [(path, text)], reused to
    save space; at most half of a split). Also returns each split's sentence clips, from
    which stage 3 builds its long recordings."""
    n_reused = [min(len(questions[s]), n // 2) for s, n in zip(SPLITS, sizes.asr)]
    n_new = [n - m for n, m in zip(sizes.asr, n_reused)]
    sentences = asr_sentences(sum(n_new), rng)
    texts = {"train": sentences[:n_new[0]], "val": sentences[n_new[0]:]}
    samples: dict[str, list[Sample]] = {}
    clips: dict[str, list[np.ndarray]] = {}
    for split, n in zip(SPLITS, n_reused):
        clips[split] = []
        pairs = rng.sample(questions[split], n)
        for i, text in enumerate(_bar(texts[split], f"stage 1 {split} speech", progress)):
            x = synthesize(text, random_voice(rng), RATE)
            clips[split].append(x)
            pairs.append((media.wav(f"media/speech/asr_{split}_{i:03d}.wav", x), text))
        rng.shuffle(pairs)
        samples[split] = [{
            "id": f"asr_{split}_{i:03d}",
            "speech": path,
            "speech_asr": text,
            "conversations": [human(f"<speech>\n{rng.choice(ASR_PROMPTS)}"), gpt(text)],
        } for i, (path, text) in enumerate(pairs)]
    return samples, clips


# ----------------------------------------------------------------------------- stage 2
def question_clips(media: _Media, progress: bool) -> dict[tuple[str, str, int], list[str]]:
    """Every image question spoken by every voice, once: (split, question type, phrasing) ->
    clip paths (one per voice; the held-out ``VAL_VOICE`` speaks the validation ones).
    Many samples share one clip."""
    jobs = [(split, qtype, p, voice)
            for split, voices in (("train", TRAIN_VOICES), ("val", (VAL_VOICE,)))
            for qtype, phrasings in IMAGE_QUESTIONS.items()
            for p in range(len(phrasings)) for voice in voices]
    out: dict[tuple[str, str, int], list[str]] = {}
    for split, qtype, p, voice in _bar(jobs, "stage 2 spoken questions", progress):
        x = synthesize(IMAGE_QUESTIONS[qtype][p], voice, RATE)
        rel = media.wav(f"media/speech/q_{qtype}{p}_{voice.file_name}.wav", x)
        out.setdefault((split, qtype, p), []).append(rel)
    return out


def draw_images(media: _Media, split: str, n: int, sizes: CorpusSizes, rng: random.Random,
                progress: bool) -> list[dict[str, Any]]:
    """``n`` images with balanced colors, shapes and words (``sizes.word_fraction`` of them
    carry one). Returns one record per image: path, color, shape, word (or None). No two
    images of the corpus are byte-identical."""
    n_words = round(n * sizes.word_fraction)
    words = balanced(WORDS, n_words, rng) + [None] * (n - n_words)
    rng.shuffle(words)
    records = []
    for i, (color, shape, word) in enumerate(_bar(
            list(zip(balanced(COLORS, n, rng), balanced(SHAPES, n, rng), words)),
            f"stage 2 {split} images", progress)):
        while True:
            data = png_bytes(render_image(color, shape, word, rng, sizes.image_size))
            digest = hashlib.sha1(data).hexdigest()
            if digest not in media.png_hashes:
                media.png_hashes.add(digest)
                break
        records.append({"image": media.png(f"media/images/{split}_{i:03d}.png", data),
                        "color": color, "shape": shape, "word": word})
    return records


def stage2_joint(media: _Media, images: dict[str, list[dict[str, Any]]],
                 clips: dict[tuple[str, str, int], list[str]], sizes: CorpusSizes,
                 rng: random.Random, g: np.random.Generator, progress: bool,
                 ) -> dict[str, list[Sample]]:
    """Questions about the images, half typed and half spoken (the same phrasings; spoken
    ones point at the shared ``clips`` of :func:`question_clips`), plus sound-event
    captions. Validation samples carry "choices": the possible answers."""
    samples: dict[str, list[Sample]] = {}
    for split in SPLITS:
        out: list[Sample] = []
        for qtype, answers in IMAGE_ANSWERS.items():
            # Alternate typed/spoken along the images sorted by answer: both balanced per answer.
            items = sorted((r for r in images[split] if r[qtype] is not None),
                           key=lambda r: answers.index(r[qtype]))
            start = rng.randrange(2)
            for j, r in enumerate(items):
                spoken = (j + start) % 2 == 1
                p = rng.randrange(len(IMAGE_QUESTIONS[qtype]))
                question = IMAGE_QUESTIONS[qtype][p]
                sample: Sample = {"id": "", "image": r["image"]}
                if spoken:
                    sample["speech"] = rng.choice(clips[(split, qtype, p)])
                    sample["speech_asr"] = question
                    sample["conversations"] = [human("<image>\n<speech>"), gpt(r[qtype])]
                else:
                    sample["conversations"] = [human(f"<image>\n{question}"), gpt(r[qtype])]
                if split == "val":
                    sample["choices"] = list(answers)
                out.append(sample)
        variants = sizes.sound_variants[SPLITS.index(split)]
        for caption in _bar(SOUND_EVENTS, f"stage 2 {split} sounds", progress):
            slug = caption.replace(" ", "_")
            for v in range(variants):
                rel = media.wav(f"media/sound/{split}_{slug}_{v}.wav", sound_event(caption, g))
                questions = SOUND_QUESTIONS if split == "train" else [rng.choice(SOUND_QUESTIONS)]
                for q in questions:
                    sample = {"id": "", "sound": rel,
                              "conversations": [human(f"<sound>\n{q}"), gpt(caption)]}
                    if split == "val":
                        sample["choices"] = list(SOUND_EVENTS)
                    out.append(sample)
        rng.shuffle(out)
        for i, s in enumerate(out):
            s["id"] = f"joint_{split}_{i:03d}"
        samples[split] = out
    return samples


def stage0_vlm(joint: dict[str, list[Sample]], rng: random.Random) -> dict[str, list[Sample]]:
    """The typed image questions of stage 2: what the tiny preset's stand-in for a pretrained
    Qwen2-VL learns first (real presets start from Qwen2-VL itself). Training also asks it to
    say each sound caption back (text only, :data:`SAY_PROMPTS`): a pretrained LLM can say any
    caption, while a base trained on one-word answers alone never learns to, and stage 2, whose
    LLM is frozen (LoRA only), could not teach it."""
    out = {}
    for split, samples in joint.items():
        typed = [dict(s) for s in samples if "image" in s and "speech" not in s]
        if split == "train":
            typed += [{"conversations": [human(p.format(c)), gpt(c)]}
                      for c in SOUND_EVENTS for p in SAY_PROMPTS]
            rng.shuffle(typed)
        for i, s in enumerate(typed):
            s["id"] = f"vlm_{split}_{i:03d}"
        out[split] = typed
    return out


# ----------------------------------------------------------------------------- stage 3
def long_recording(fillers: Sequence[np.ndarray], needles: Sequence[np.ndarray], seconds: float,
                   rng: random.Random) -> tuple[np.ndarray, list[float]]:
    """Filler clips drawn at random, each followed by 0.2-0.5 s of silence, until the
    recording is at least ``seconds`` long, with each needle clip inserted at a random place.
    Returns the audio and each needle's start time in seconds."""
    def item(clip: np.ndarray, is_needle: bool) -> tuple[np.ndarray, bool, np.ndarray]:
        return clip, is_needle, np.zeros(round(rng.uniform(0.2, 0.5) * RATE), np.float32)

    hidden = [item(n, True) for n in needles]
    pieces = []
    length = sum(len(c) + len(gap) for c, _, gap in hidden)
    while length < seconds * RATE:
        pieces.append(item(rng.choice(fillers), False))
        length += len(pieces[-1][0]) + len(pieces[-1][2])
    for h in hidden:
        pieces.insert(rng.randrange(len(pieces) + 1), h)
    starts, pos = [], 0
    for clip, is_needle, gap in pieces:
        if is_needle:
            starts.append(round(pos / RATE, 2))
        pos += len(clip) + len(gap)
    return np.concatenate([a for clip, _, gap in pieces for a in (clip, gap)]), starts


def stage3_long(media: _Media, fillers: dict[str, list[np.ndarray]], sizes: CorpusSizes,
                rng: random.Random, progress: bool,
                ) -> tuple[dict[str, list[Sample]], dict[str, Any]]:
    """Long recordings of stage-1 sentences (of the same split) hiding two needle sentences
    (a code word, a magic number); one question per needle. Returns the samples and, per
    recording, its length and needles (for build_info.json)."""
    n_total = sum(sizes.long)
    values = {kind: rng.sample(answers, n_total) for kind, (_, _, answers) in NEEDLES.items()}
    samples: dict[str, list[Sample]] = {s: [] for s in SPLITS}
    info: dict[str, Any] = {}
    jobs = [(split, i) for split, n in zip(SPLITS, sizes.long) for i in range(n)]
    for r, (split, i) in enumerate(_bar(jobs, "stage 3 long recordings", progress)):
        kinds = list(NEEDLES)
        rng.shuffle(kinds)
        texts = [NEEDLES[k][0].format(values[k][r]) for k in kinds]
        needles = [synthesize(t, random_voice(rng), RATE) for t in texts]
        x, starts = long_recording(fillers[split], needles, rng.uniform(*sizes.long_seconds), rng)
        rel = media.wav(f"media/long/{split}_{i}.wav", x)
        info[rel] = {"seconds": round(len(x) / RATE, 2),
                     "needles": [{"text": t, "start_s": s} for t, s in zip(texts, starts)]}
        for kind in NEEDLES:
            _, question, answers = NEEDLES[kind]
            sample: Sample = {"id": f"long_{split}_{i}_{kind}", "long_speech": rel,
                              "conversations": [human(f"<speech>\n{question}"),
                                                gpt(values[kind][r])]}
            if split == "val":
                sample["choices"] = list(answers)
            samples[split].append(sample)
    return samples, info


# ----------------------------------------------------------------------------- stage 4
def stage4_units(images: dict[str, list[dict[str, Any]]], sizes: CorpusSizes,
                 rng: random.Random, extractor: UnitExtractor, progress: bool,
                 ) -> dict[str, list[Sample]]:
    """Text questions (plain facts and arithmetic, or about a stage-2 image of the same
    split) with short sentence answers; "tgt_unit" holds the spoken answer's units (the
    audio itself is not stored). k-means is fitted on the training answers only."""
    pairs = text_qa_pairs()
    rng.shuffle(pairs)
    n_image = [round(n * sizes.image_qa_fraction) for n in sizes.qa]
    n_text = [n - m for n, m in zip(sizes.qa, n_image)]
    if sum(n_text) > len(pairs):
        raise ValueError(f"stage 4 asks for {sum(n_text)} text questions, {len(pairs)} exist")
    text_pairs = {"val": pairs[:n_text[1]], "train": pairs[n_text[1]:n_text[1] + n_text[0]]}
    rows: dict[str, list[tuple[str | None, str, str]]] = {}
    for split, n in zip(SPLITS, n_image):
        rows[split] = [(None, q, a) for q, a in text_pairs[split]]
        for r in rng.sample(images[split], min(n, len(images[split]))):
            qtype = rng.choice([t for t in IMAGE_QUESTIONS if r[t] is not None])
            question = rng.choice(IMAGE_QUESTIONS[qtype])
            rows[split].append((r["image"], f"<image>\n{question}",
                                image_qa_answer(qtype, r[qtype])))
        rng.shuffle(rows[split])

    answers = sorted({a for split in SPLITS for _, _, a in rows[split]})
    audio = {a: synthesize(a, ANSWER_VOICE, UNIT_RATE)
             for a in _bar(answers, "stage 4 answers", progress)}
    frames = dict(zip(answers, extractor.frames([audio[a] for a in answers])))
    extractor.fit([frames[a] for a in sorted({a for _, _, a in rows["train"]})])
    units = dict(zip(answers, extractor.units([frames[a] for a in answers])))
    samples: dict[str, list[Sample]] = {}
    for split in SPLITS:
        samples[split] = []
        for i, (image, question, answer) in enumerate(rows[split]):
            sample: Sample = {"id": f"units_{split}_{i:03d}"}
            if image is not None:
                sample["image"] = image
            sample["conversations"] = [human(question), gpt(answer)]
            sample["tgt_unit"] = units[answer]
            samples[split].append(sample)
    return samples


# ----------------------------------------------------------------------------- eval sets
def eval_sets(out: Path, media: _Media, val_images: list[dict[str, Any]],
              questions: dict[tuple[str, str, int], list[str]],
              stages: dict[str, dict[str, list[Sample]]]) -> dict[str, int]:
    """``eval/``: the evaluation sets of ``lyra-pl eval`` and ``lyra-pl needle``, from the
    validation split (:mod:`lyra_pl.data.corpus.evalsets`). Their own random stream, drawn
    after everything else: adding them changed no other file of the corpus."""
    rng = random.Random("eval")
    textvqa, docvqa = evalsets.vqa_sets(val_images, questions)
    sets = {"textvqa": textvqa, "docvqa": docvqa,
            "videomme": evalsets.videomme_set(out, val_images, rng, media._write),
            "sound_caption": evalsets.sound_caption_set(stages["stage2_joint"]["val"])}
    for name, samples in sets.items():
        (out / "eval" / f"{name}.json").write_text(dump_samples(samples))
    counts = {name: len(s) for name, s in sets.items()}
    counts["librispeech"] = evalsets.librispeech_tree(
        out, stages["stage1_asr"]["val"],
        lambda src, dst: media._write(dst, (out / src).read_bytes()))
    needles = evalsets.needle_set(RATE, media.wav)
    (out / "eval" / "needles.json").write_text(dump_samples(needles))
    counts["needles"] = len(needles)
    return counts


# ----------------------------------------------------------------------------- corpus
MANAGED = ("media", "eval", "tokenizer", "build_info.json", "README.md",
           *(f"{name}.{split}.json" for name in STAGE_FILES for split in SPLITS))


def _check_out(out: Path, force: bool) -> None:
    """``out`` must be new, empty, or (with ``force``) an earlier build of this command."""
    if out.exists() and any(out.iterdir()):
        if not (out / "build_info.json").is_file():
            raise CorpusError(f"{out} is not empty and holds no corpus built by this command; "
                              "choose a new or empty directory")
        if not force:
            raise CorpusError(f"{out} already holds a corpus; pass --force to rebuild it")


def _replace(out: Path, built: Path) -> None:
    """Moves a finished build into ``out``, removing the files of an earlier build there."""
    out.mkdir(parents=True, exist_ok=True)
    for name in MANAGED:
        old = out / name
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
        if (built / name).exists():
            (built / name).rename(old)
    built.rmdir()


def tokenizer_texts(stages: dict[str, dict[str, list[Sample]]]) -> list[str]:
    """Every sample rendered with the chat template, its transcript, and the vocabulary."""
    texts = [vocabulary_text()]
    for per_split in stages.values():
        for split in SPLITS:
            for s in per_split[split]:
                texts.append(render(s["conversations"])[0])
                if "speech_asr" in s:
                    texts.append(s["speech_asr"])
    return texts


def dump_samples(samples: list[Sample]) -> str:
    """A JSON list with one sample per line: compact, readable, and diffs line by line."""
    return "[\n" + ",\n".join(json.dumps(s) for s in samples) + "\n]\n"


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build_corpus(out_dir: str | Path, seed: int = 0, sizes: CorpusSizes = CorpusSizes(),
                 k: int = 64, hubert: str | Path | None = None, force: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Builds the tiny corpus into ``out_dir`` and returns its build_info (also written to
    ``out_dir/build_info.json``). Deterministic for a seed. ``k``: number of speech units;
    ``hubert``: a local HuBERT checkpoint directory for the unit features (default log-mel).
    Needs espeak-ng (raises CorpusError saying how to install it)."""
    require_espeak()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small FFTs: threads only add overhead (10x on 2 cores)
    try:
        return _build(Path(out_dir), seed, sizes, k, hubert, force, progress)
    finally:
        torch.set_num_threads(threads)


def _build(final: Path, seed: int, sizes: CorpusSizes, k: int, hubert: str | Path | None,
           force: bool, progress: bool) -> dict[str, Any]:
    _check_out(final, force)
    # Build next to the target and move into place at the end: a failed build leaves the
    # previous corpus intact (and its own partial files in .NAME.building for inspection).
    out = final.parent / f".{final.name}.building"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    media = _Media(out)
    rngs = {name: random.Random(f"{seed}/{name}") for name in STAGE_FILES + ("images",)}
    g = np.random.default_rng(seed)

    images = {split: draw_images(media, split, n, sizes, rngs["images"], progress)
              for split, n in zip(SPLITS, sizes.images)}
    questions = question_clips(media, progress)
    spoken = {split: [(path, IMAGE_QUESTIONS[qtype][p])
                      for (s, qtype, p), paths in questions.items() if s == split
                      for path in paths] for split in SPLITS}
    asr, clips = stage1_asr(media, spoken, sizes, rngs["stage1_asr"], progress)
    stages = {
        "stage1_asr": asr,
        "stage2_joint": stage2_joint(media, images, questions, sizes, rngs["stage2_joint"], g,
                                     progress),
    }
    stages["stage0_vlm"] = stage0_vlm(stages["stage2_joint"], rngs["stage0_vlm"])
    stages["stage3_long"], long_info = stage3_long(media, clips, sizes, rngs["stage3_long"],
                                                   progress)
    extractor = UnitExtractor(k, seed, hubert)
    stages["stage4_units"] = stage4_units(images, sizes, rngs["stage4_units"], extractor,
                                          progress)

    eval_counts = eval_sets(out, media, images["val"], questions, stages)
    counts = {}
    for name, per_split in stages.items():
        for split in SPLITS:
            file = f"{name}.{split}.json"
            (out / file).write_text(dump_samples(per_split[split]))
            counts[file] = len(per_split[split])
    build_tiny_tokenizer(tokenizer_texts(stages), out / "tokenizer")

    media_files = Counter(p.parent.name for p in (out / "media").rglob("*") if p.is_file())
    info = {
        "seed": seed,
        "command": command(seed, sizes, k, hubert),
        "espeak_ng": espeak_version(),
        "sample_rate": RATE,
        "samples": counts,
        "eval": eval_counts,
        "media_files": dict(sorted(media_files.items())),
        "media_bytes": {d.name: _dir_bytes(d) for d in sorted((out / "media").iterdir())},
        "image_size": sizes.image_size,
        "voices": {"train_questions": [v.tag for v in TRAIN_VOICES], "stage1_and_3": (
                       f"{', '.join(VOICE_NAMES)}; speed 150-190 wpm, pitch 30-70"),
                   "val_questions": VAL_VOICE.tag, "answers": ANSWER_VOICE.tag},
        "units": {"k": k, "features": extractor.feature_name, "dedup": True,
                  "fitted_on": "stage-4 training answers", "voice": ANSWER_VOICE.tag},
        "long_speech": long_info,
        "sizes": asdict(sizes),
    }
    (out / "build_info.json").write_text(json.dumps(info, indent=1) + "\n")
    (out / "README.md").write_text(readme(info))
    _replace(final, out)
    return info


def command(seed: int, sizes: CorpusSizes, k: int, hubert: str | Path | None) -> str:
    """The command line that rebuilds a corpus with these settings."""
    flags = [f"--seed {seed}"] if seed else []
    flags += [f"--units {k}"] if k != 64 else []
    flags += ["--hubert DIR"] if hubert else []
    flags += ["--small"] if sizes == CorpusSizes.small() else []
    if sizes not in (CorpusSizes(), CorpusSizes.small()):
        flags.append("(custom CorpusSizes: see build_info.json)")
    return " ".join(["lyra-pl corpus build --out data/tiny --force", *flags])


def readme(info: dict[str, Any]) -> str:
    """The corpus README: what is in it and how it was built, numbers from ``info``."""
    s, v, e = info["samples"], info["voices"], info["eval"]
    rows = "\n".join(f"| {name} | {s[f'{name}.train.json']} | {s[f'{name}.val.json']} |"
                     for name in STAGE_FILES)
    media = "\n".join(f"| media/{d}/ | {info['media_files'][d]} | {b / 1e6:.2f} MB |"
                      for d, b in info["media_bytes"].items())
    longs = "\n".join(f"  - `{rel}`: {r['seconds']} s; needles "
                      + ", ".join(f"\"{n['text']}\" at {n['start_s']} s" for n in r["needles"])
                      for rel, r in info["long_speech"].items())
    sv = info["sizes"]["sound_variants"]
    words = info["sizes"]["word_fraction"]
    words = "each with" if words == 1 else f"{words:.0%} of them with"
    return f"""# The tiny Lyra corpus

A small synthetic corpus in the official Lyra JSON format (docs/method.md, "Data format") for the
four training stages of the `tiny` preset. Generated, not collected: rebuild it byte for byte
(same espeak-ng version) with

    {info['command']}

(seed {info['seed']}, espeak-ng {info['espeak_ng']}; the code is `lyra_pl/data/corpus/`).
Media paths in the JSON files are relative to this directory.

| stage file | train | val |
|---|---|---|
{rows}

| media | files | size |
|---|---|---|
{media}

## What each stage holds
- **stage0_vlm**: the typed image questions of stage2_joint, for the tiny preset's base
  vision-language model (the stand-in for a pretrained Qwen2-VL, which the other presets
  load instead), plus, in training, each sound caption asked to be said back
  (`Say: low hum` -> "low hum", {len(SAY_PROMPTS)} phrasings, text only): a pretrained LLM
  can say any caption; this one learns to say these, so that stage 2 (LLM frozen, LoRA only)
  has only to learn which sound is which.
- **stage1_asr**: short phrases from small word lists (numbers, colors, shapes, objects),
  each spoken by espeak-ng with a random voice ({v['stage1_and_3']}), plus the spoken
  stage-2 questions of the same split (shared clips); human `<speech>` + an instruction,
  gpt = transcript = `speech_asr`.
- **stage2_joint**: {info['image_size']}x{info['image_size']} PNG images of one colored shape
  ({", ".join(COLORS)}; {", ".join(SHAPES)}) on a plain background, {words} a printed word
  ({", ".join(WORDS)}). Each image is asked its color, its shape and its word, either typed
  (`<image>\\nWhat color is the shape?`) or spoken (`<image>\\n<speech>`, the question's text
  in `speech_asr`), half and half; answers are one word, balanced. Spoken questions are
  shared clips (question type x phrasing x voice): training voices
  {", ".join(v['train_questions'])}; validation uses only {v['val_questions']} (held out)
  and images not in training. Plus
  sound events synthesized with numpy (`<sound>\\nWhat do you hear?` -> "rising chirp"):
  {len(SOUND_EVENTS)} events ({", ".join(SOUND_EVENTS)}),
  each rendered {sv[0]} times for training (pitch, length and loudness drawn anew, each
  rendering asked {len(SOUND_QUESTIONS)} ways) and {sv[1]} more times for validation; stage 2
  trains the sound projector and the `sound` LoRA adapter on them.
  **Every validation sample has a `choices` field**: the possible answers of its question
  type, for an exact-match accuracy eval (chance = 1 / len(choices)).
- **stage3_long**: recordings longer than two 30 s Whisper windows: stage-1 phrases of the
  same split separated by 0.2-0.5 s of silence, hiding two needle sentences; one typed
  question per needle (`long_speech`), validation samples with `choices`.
{longs}
- **stage4_units**: typed questions (facts, arithmetic, or about a stage-2 image of the same
  split) with short sentence answers; `tgt_unit` is the answer spoken by espeak-ng
  ({v['answers']}) as k-means units: k = {info['units']['k']} over {info['units']['features']}
  frames, fitted on the training answers, consecutive duplicates collapsed. The answer
  audio is not stored.

## Evaluation sets (`eval/`, for `lyra-pl eval` and `lyra-pl needle`)
Built from the validation split only (held-out voice, images not in training):
- `eval/librispeech/`: the {e['librispeech']} stage-1 validation clips as a LibriSpeech-format
  tree (`100/1/100-1-NNNN.wav`, `100-1.trans.txt`, upper-case transcripts): task `asr`.
- `eval/textvqa.json` ({e['textvqa']}): every validation image asked its color, shape and word,
  typed, with `speech_instruction` (the question spoken) and `answers`: task `textvqa`, T+I
  and S+I. `eval/docvqa.json` ({e['docvqa']}): its reading questions: task `docvqa`.
- `eval/videomme.json` ({e['videomme']}): {evalsets.VIDEO_FRAMES}-frame clips (`eval/videos/`) of a
  validation image drifting sideways, asked its color as a 4-option multiple choice
  answered by letter: task `videomme`.
- `eval/sound_caption.json` ({e['sound_caption']}): the validation sound events with
  `references` captions: task `sound_caption`.
- `eval/needles.json` + `eval/needles/` ({e['needles']}): every stage-3 needle sentence spoken by
  the held-out voice.

## Format notes
- Audio: {info['sample_rate']} Hz mono PCM16 WAV, leading/trailing silence trimmed (the
  converter resamples to 16 kHz).
- `tokenizer/`: the tiny byte-level BPE (500 tokens + `<image>` 500, `<video>` 501,
  `<speech>` 502, `<sound>` 503, `<|im_start|>` 504, `<|im_end|>` 505, `<|endoftext|>` 506),
  trained on every conversation rendered with the chat template, the transcripts, and the
  word lists. Load with `AutoTokenizer.from_pretrained("data/tiny/tokenizer")`.
- `build_info.json`: seed, sample counts per file, media counts and sizes, voices, unit
  settings, and the needles of each long recording.
"""


def main(argv: list[str] | None = None) -> int:
    """``lyra-pl corpus build ...`` (argv after "corpus")."""
    parser = argparse.ArgumentParser(prog="lyra-pl corpus",
                                     description="The tiny synthetic corpus (needs espeak-ng).")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the tiny corpus into a directory")
    b.add_argument("--out", type=Path, required=True, help="output directory, e.g. data/tiny")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--units", type=int, default=64, metavar="K",
                   help="number of k-means speech units (< 1000; default 64)")
    b.add_argument("--hubert", type=Path, default=None, metavar="DIR",
                   help="local HuBERT checkpoint directory for unit features (default log-mel)")
    b.add_argument("--small", action="store_true", help="a few samples per stage (smoke runs)")
    b.add_argument("--force", action="store_true", help="replace a corpus already in --out")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    sizes = CorpusSizes.small() if args.small else CorpusSizes()
    try:
        info = build_corpus(args.out, args.seed, sizes, args.units, args.hubert, args.force,
                            progress=not args.quiet)
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    total = sum(_dir_bytes(Path(args.out) / name) if (Path(args.out) / name).is_dir()
                else (Path(args.out) / name).stat().st_size
                for name in MANAGED if (Path(args.out) / name).exists())  # not shards/
    for file, n in info["samples"].items():
        print(f"{file:28s} {n:4d} samples")
    print(f"{args.out}: {total / 1e6:.2f} MB in {time.perf_counter() - start:.1f} s "
          f"(espeak-ng {info['espeak_ng']}, seed {args.seed})")
    return 0

