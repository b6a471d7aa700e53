"""The tiny corpus: the committed data/tiny is valid and consistent, the builder's parts work,
and a small build is deterministic (that one needs espeak-ng and is skipped without it)."""
import hashlib
import json
import random
import shutil
import wave
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from lyra_pl.data.conversation import render
from lyra_pl.data.corpus import CorpusSizes, build_corpus, main
from lyra_pl.data.corpus.build import RATE, STAGE_FILES, balanced, long_recording
from lyra_pl.data.corpus.images import BACKGROUNDS, RGB, render_image
from lyra_pl.data.corpus.sounds import SOUND_EVENTS, sound_event
from lyra_pl.data.corpus.speech import CorpusError
from lyra_pl.data.corpus.text import (COLORS, IMAGE_ANSWERS, SHAPES, WORDS, asr_sentences,
                                      text_qa_pairs)
from lyra_pl.data.corpus.units import dedup, kmeans, parse_units, units_to_string
from lyra_pl.data.media import load_audio
from lyra_pl.data.tokenizer import TINY_SPECIAL_BASE, TINY_SPECIAL_TOKENS, check_round_trip

CORPUS = Path(__file__).resolve().parents[1] / "data" / "tiny"
HAS_ESPEAK = shutil.which("espeak-ng") is not None


def load(name: str, split: str) -> list[dict]:
    return json.loads((CORPUS / f"{name}.{split}.json").read_text())


def all_samples():
    for name in STAGE_FILES:
        for split in ("train", "val"):
            for s in load(name, split):
                yield name, split, s


def media_paths(sample: dict) -> list[str]:
    images = sample.get("image", [])
    paths = [images] if isinstance(images, str) else list(images)
    return paths + [sample[k] for k in ("speech", "long_speech", "sound") if k in sample]


# ----------------------------------------------------------------------------- data/tiny
def test_build_info_matches_files():
    info = json.loads((CORPUS / "build_info.json").read_text())
    assert info["sample_rate"] == 8000 and info["espeak_ng"]
    for name in STAGE_FILES:
        for split in ("train", "val"):
            assert info["samples"][f"{name}.{split}.json"] == len(load(name, split))
    shards = CORPUS / "shards"  # converted on first use, not committed
    # What git stores: identical files once (the LibriSpeech-format eval tree copies clips).
    blobs = {hashlib.sha1(p.read_bytes()).hexdigest(): p.stat().st_size
             for p in CORPUS.rglob("*") if p.is_file() and shards not in p.parents}
    total = sum(blobs.values())
    # 8 MiB: 7.8 since stage 2 has 32 renderings of each sound event (192 short clips, 1.5 MiB)
    assert total <= 8 * 2**20, f"data/tiny holds {total / 2**20:.2f} MiB, the budget is 8"
    assert info["eval"] == {"textvqa": 90, "docvqa": 30, "videomme": 12, "sound_caption": 12,
                            "librispeech": 22, "needles": 14}


def test_samples_are_well_formed():
    ids = set()
    for name, split, s in all_samples():
        assert s["id"] not in ids, f"duplicate id {s['id']}"
        ids.add(s["id"])
        render(s["conversations"])  # roles alternate human, gpt and end with gpt
        text = "".join(t["value"] for t in s["conversations"])
        n_images = len(media_paths({"image": s["image"]})) if "image" in s else 0
        assert text.count("<image>") == n_images, s["id"]
        assert text.count("<speech>") == ("speech" in s) + ("long_speech" in s), s["id"]
        assert text.count("<sound>") == ("sound" in s), s["id"]
        assert "<video>" not in text and "video" not in s
        for path in media_paths(s):
            assert not Path(path).is_absolute() and (CORPUS / path).is_file(), (s["id"], path)
        if "speech" in s:
            assert s["speech_asr"].strip(), s["id"]
        if split == "val" and name in ("stage2_joint", "stage3_long"):
            assert s["conversations"][-1]["value"] in s["choices"], s["id"]


def test_audio_is_8khz_mono_pcm16():
    wavs = sorted((CORPUS / "media").rglob("*.wav"))
    assert len(wavs) > 100
    for path in wavs:
        with wave.open(str(path)) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2), path
        x, info = load_audio(path)
        assert info.source_rate == 8000 and len(x) > 0 and np.abs(x).max() > 0.01, path


def test_stage1_transcripts():
    for split in ("train", "val"):
        for s in load("stage1_asr", split):
            assert s["conversations"][-1]["value"] == s["speech_asr"]
            assert s["conversations"][0]["value"].startswith("<speech>\n")


def test_stage2_balanced_and_held_out():
    for split in ("train", "val"):
        samples = load("stage2_joint", split)
        for qtype, answers in IMAGE_ANSWERS.items():
            mine = [s for s in samples if s["conversations"][-1]["value"] in answers]
            counts = Counter(s["conversations"][-1]["value"] for s in mine)
            assert set(counts) == set(answers), (split, qtype, counts)
            assert max(counts.values()) - min(counts.values()) <= 1, (split, qtype, counts)
            spoken = sum("speech" in s for s in mine)
            assert abs(2 * spoken - len(mine)) <= 1, (split, qtype, spoken, len(mine))
            for s in mine:
                prompt = s["conversations"][0]["value"]
                assert prompt == "<image>\n<speech>" if "speech" in s else "<speech>" not in prompt
        sounds = [s for s in samples if "sound" in s]
        assert {s["conversations"][-1]["value"] for s in sounds} == set(SOUND_EVENTS)
        # several renderings of every event, so that stage 2 learns the event, not one clip
        clips = {s["sound"]: s["conversations"][-1]["value"] for s in sounds}
        renderings = CorpusSizes().sound_variants[("train", "val").index(split)]
        assert Counter(clips.values()) == {c: renderings for c in SOUND_EVENTS}
    train, val = load("stage2_joint", "train"), load("stage2_joint", "val")
    for key in ("image", "speech", "sound"):  # validation media never seen in training
        assert not {s[key] for s in train if key in s} & {s[key] for s in val if key in s}
    digest = lambda p: hashlib.sha1((CORPUS / p).read_bytes()).hexdigest()  # noqa: E731
    assert not ({digest(s["image"]) for s in train if "image" in s}
                & {digest(s["image"]) for s in val if "image" in s})
    assert all(s["choices"] for s in val)


def test_stage2_spoken_questions_are_shared():
    uses = Counter(s["speech"] for s in load("stage2_joint", "train") if "speech" in s)
    assert len(uses) <= 27 and max(uses.values()) > 2


def test_stage3_long_recordings_hold_the_needles():
    info = json.loads((CORPUS / "build_info.json").read_text())["long_speech"]
    for split, n_files in (("train", 2), ("val", 1)):
        samples = load("stage3_long", split)
        assert len({s["long_speech"] for s in samples}) == n_files
        for s in samples:
            with wave.open(str(CORPUS / s["long_speech"])) as w:
                seconds = w.getnframes() / w.getframerate()
            assert seconds > 60, (s["long_speech"], seconds)
            assert s["conversations"][0]["value"].startswith("<speech>\n")
            needles = " ".join(n["text"] for n in info[s["long_speech"]]["needles"])
            assert f" {s['conversations'][-1]['value']}." in needles


def test_stage4_units():
    k = json.loads((CORPUS / "build_info.json").read_text())["units"]["k"]
    used = set()
    for split in ("train", "val"):
        for s in load("stage4_units", split):
            ids = parse_units(s["tgt_unit"])
            assert all(0 <= u < k <= 1000 for u in ids), s["id"]
            assert all(a != b for a, b in zip(ids, ids[1:])), "duplicates are collapsed"
            used.update(ids)
    assert len(used) > k // 2


def test_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(CORPUS / "tokenizer"))
    for i, token in enumerate(TINY_SPECIAL_TOKENS):
        assert tok(token, add_special_tokens=False)["input_ids"] == [TINY_SPECIAL_BASE + i]
    assert TINY_SPECIAL_TOKENS[:4] == ("<image>", "<video>", "<speech>", "<sound>")
    assert TINY_SPECIAL_BASE == 500 and TINY_SPECIAL_TOKENS[-1] == "<|endoftext|>"
    texts = [render(s["conversations"])[0] for _, _, s in all_samples()]
    check_round_trip(tok, texts[::25])
    assert max(max(tok(t)["input_ids"]) for t in texts[::25]) < 512


# ----------------------------------------------------------------------------- builder parts
def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    x = torch.cat([m + 0.5 * torch.randn(50, 2, generator=g, dtype=torch.float64) for m in means])
    centers = kmeans(x, 3, seed=1)
    assert torch.equal(centers, kmeans(x, 3, seed=1))
    order = torch.cdist(means, centers).argmin(1)
    assert sorted(order.tolist()) == [0, 1, 2]
    torch.testing.assert_close(centers[order], means, atol=0.3, rtol=0)
    with pytest.raises(ValueError, match="at least k"):
        kmeans(x[:2], 3)


def test_unit_strings():
    units = dedup(torch.tensor([3, 3, 7, 7, 7, 3, 999]))
    assert units.tolist() == [3, 7, 3, 999]
    assert parse_units(units_to_string(units)) == [3, 7, 3, 999]
    assert units_to_string([12, 873]) == "<12><873>"
    for bad in ("", "12", "<12>x", "<a>"):
        with pytest.raises(ValueError):
            parse_units(bad)


def test_render_image():
    for i, (color, shape) in enumerate((c, s) for c in COLORS for s in SHAPES):
        word = WORDS[i % len(WORDS)] if i % 2 else None
        img = render_image(color, shape, word, random.Random(i))
        assert img.size == (84, 84) and img.mode == "RGB"
        assert np.array_equal(np.asarray(img), np.asarray(render_image(color, shape, word,
                                                                       random.Random(i))))
        px = np.asarray(img).reshape(-1, 3).astype(int)
        shape_px = px[np.abs(px - np.array(RGB[color])).max(1) <= 20]
        assert len(shape_px) > 150, (color, shape)  # the shape is drawn in its color
        dark = (px.max(1) < 90).sum()
        assert (dark > 10) if word else (dark == 0), (color, shape, word)
        corners = {tuple(px[j]) for j in (0, 83, 84 * 83, 84 * 84 - 1)}
        assert corners & set(BACKGROUNDS)


def test_sound_events():
    g = np.random.default_rng(0)
    for caption in SOUND_EVENTS:
        x = sound_event(caption, g, 8000)
        assert x.dtype == np.float32 and 0.2 * 8000 < len(x) < 1.0 * 8000
        assert 0.3 <= np.abs(x).max() <= 0.8 + 1e-6


def test_long_recording_places_needles():
    rng = random.Random(0)
    fillers = [np.full(4000, 0.1 * (i + 1), np.float32) for i in range(3)]
    needles = [np.full(2000, 0.9, np.float32), np.full(3000, -0.9, np.float32)]
    x, starts = long_recording(fillers, needles, 30.0, rng)
    assert len(x) >= 30 * RATE and len(starts) == 2
    for needle, start in zip(needles, starts):  # start times are rounded to 10 ms
        found = np.flatnonzero(x == needle[0])
        assert len(found) == len(needle) and abs(found[0] / RATE - start) <= 0.005
        assert np.array_equal(x[found[0]:found[0] + len(needle)], needle)


def test_text_generators():
    rng = random.Random(0)
    first = asr_sentences(50, rng)
    second = asr_sentences(20, rng, exclude=set(first))
    assert len(set(first + second)) == 70
    pairs = text_qa_pairs()
    assert len({q for q, _ in pairs}) == len(pairs) >= 126
    counts = Counter(balanced("abc", 10, rng))
    assert sorted(counts.values()) == [3, 3, 4]


def test_missing_espeak_is_explained(tmp_path, monkeypatch):
    monkeypatch.setattr("lyra_pl.data.corpus.speech.shutil.which", lambda name: None)
    with pytest.raises(CorpusError, match="apt-get install espeak-ng"):
        build_corpus(tmp_path / "c")
    assert main(["build", "--out", str(tmp_path / "c"), "--quiet"]) == 1


# ----------------------------------------------------------------------------- a real build
@pytest.mark.skipif(not HAS_ESPEAK, reason="espeak-ng is not installed")
def test_small_build_is_deterministic(tmp_path):
    info = build_corpus(tmp_path / "a", seed=3, sizes=CorpusSizes.small(), progress=False)
    assert main(["build", "--out", str(tmp_path / "b"), "--seed", "3", "--small",
                 "--quiet"]) == 0
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*")
                     if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*")
                     if p.is_file())
    assert files_a == files_b and len(files_a) > 50
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert info["samples"]["stage1_asr.train.json"] == CorpusSizes.small().asr[0]
    assert not (tmp_path / ".a.building").exists()
    # An existing corpus is replaced only with --force; anything else is never touched.
    assert main(["build", "--out", str(tmp_path / "a"), "--small", "--quiet"]) == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    assert main(["build", "--out", str(tmp_path / "other"), "--small", "--quiet"]) == 1
    assert main(["build", "--out", str(tmp_path / "a"), "--small", "--quiet", "--force"]) == 0
    assert json.loads((tmp_path / "a" / "build_info.json").read_text())["seed"] == 0
