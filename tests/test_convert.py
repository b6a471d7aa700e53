"""lyra_pl.data.convert on what users have: real-format media encoded here with PyAV, the
official JSON conventions (two media roots, <image> in video samples, 4x4 grids, <sosp>
units, ASR lines), every bad sample reported by id and reason with the good ones kept, and
conversion at scale (workers, resume, parts) giving the same shards."""
import fcntl
import io
import json
import tarfile
import wave

import numpy as np
import pytest
from PIL import Image

from lyra_pl.data import convert as cv
from lyra_pl.data import encode, media, shards
from lyra_pl.data.official import InputError, parse_units

LONG_ID = "long-" + "x" * 150  # member names past ustar's 100 characters


def _turns(question, answer="ok"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _png(path, w, h, color=(200, 30, 30)):
    Image.new("RGB", (w, h), color).save(path, format="PNG")
    return path.name


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """An official-layout release: images/ (+ videos) and speech/ roots, real codecs."""
    root = tmp_path_factory.mktemp("release")
    img, sp = root / "images", root / "speech"
    (img / "frames").mkdir(parents=True)
    sp.mkdir()
    for f in range(3):
        _png(img / "frames" / f"{f:03d}.png", 28, 28, (f * 80, 0, 0))
    _png(img / "pic.png", 56, 28)
    grid = Image.new("RGB", (4 * 28, 4 * 28), (0, 90, 0))
    grid.save(img / "grid.jpg")
    encode.write_video(img / "clip.mp4", seconds=2.0, size=(96, 64))
    encode.write_video(img / "clip.mov", seconds=1.0, size=(64, 48))
    encode.write_video(img / "clip.webm", seconds=1.0, size=(64, 48), audio_rate=None)
    tone = encode.tone
    encode.write_audio(sp / "q.mp3", tone(1.0, 44100, 2), 44100, title="question one")
    encode.with_junk(sp / "q.mp3", 1024)
    encode.write_audio(sp / "a.flac", tone(0.8, 16000), 16000)
    encode.write_audio(sp / "a.opus", tone(0.6, 48000), 48000)
    encode.write_audio(sp / "a.m4a", tone(0.7, 44100, 2), 44100)
    encode.write_audio(sp / "a24.wav", tone(0.5, 22050, 2), 22050, bits=24)
    encode.write_audio(sp / "a8.wav", tone(0.25, 8000), 8000)
    encode.write_audio(sp / "long.flac", tone(3.0, 16000), 16000)
    encode.write_audio(sp / "dog.ogg", tone(0.4, 48000, freq=900), 48000)
    full = encode.write_audio(sp / "full.mp3", tone(4.3, 44100, 2), 44100)
    (sp / "cut.mp3").write_bytes(full.read_bytes()[: full.stat().st_size * 3 // 10])
    (sp / "text.mp3").write_text("this is not audio\n" * 40)
    (sp / "empty.wav").write_bytes(media.encode_wav(np.zeros(0, np.float32)))
    (img / "broken.png").write_bytes(b"\x89PNG not really")
    return {"root": root, "images": img, "speech": sp}


GOOD = [
    {"id": "s.0", "conversations": _turns("<image> what is said in <speech>?"),
     "image": "pic.png", "speech": "q.mp3", "speech_asr": "question one",
     "tgt_unit": "<sosp><1><22><333><eosp>", "choices": ["a", "b"], "source": "test"},
    {"id": "s1", "conversations": _turns("<speech>"), "speech": ["a8.wav"]},
    {"id": "s2", "conversations": _turns("<video> and <sound>"), "video": "frames",
     "sound": "dog.ogg", "video_title": "a dog", "image_id": 5},  # media-like names, no paths
    {"id": 7, "conversations": _turns("<speech> then <speech>", "two") + _turns("more?"),
     "speech": "a.flac", "long_speech": "long.flac", "speech_asr": ["first", "second"]},
    {"id": LONG_ID, "conversations": _turns("text only")},
    # The official video convention: <image> placeholders, a video file or a 4x4 grid.
    {"id": "vid", "conversations": _turns("<image>\nWhat happens?"), "video": "clip.mp4"},
    {"id": "grid", "conversations": _turns("<image> describe"), "video": "grid.jpg"},
    {"id": "mov", "conversations": _turns("<video> and <speech>"), "video": "clip.mov",
     "speech": "a.opus"},
    {"id": "webm", "conversations": _turns("<video>"), "video": ["clip.webm"]},
    {"id": "m4a", "conversations": _turns("<speech>"), "speech": "a.m4a"},
    {"id": "w24", "conversations": _turns("<speech>"), "speech": "a24.wav"},
    # A video's audio track as the speech clip (the path is under --speech-folder).
    {"id": "track", "conversations": _turns("<speech>"), "speech": "../images/clip.mp4"},
    {"audio": "a.flac", "text": "an asr line"},  # the official LibriSpeech JSONL form
]
BAD = [  # sample, words its reason must contain
    ({"id": "cut", "conversations": _turns("<speech>"), "speech": "cut.mp3"},
     ["speech", "cut.mp3", "truncated", "of the 4.30 s"]),
    ({"id": "textmp3", "conversations": _turns("<speech>"), "speech": "text.mp3"},
     ["text.mp3", "not a decodable media file"]),
    ({"id": "audiokey", "conversations": _turns("what is said?"), "audio": "a.flac"},
     ["unknown key 'audio'", "looks like media", "speech"]),
    ({"id": "imageskey", "conversations": _turns("<image>"), "images": ["pic.png"]},
     ["unknown key 'images'", "image, video, speech"]),
    ({"id": "noplace", "conversations": _turns("no placeholder"), "speech": "a.flac"},
     ["speech", "0 <speech> placeholder", "1 speech item"]),
    ({"id": "missing", "conversations": _turns("<speech>"), "speech": "nope.wav"},
     ["speech", "nope.wav", "not found"]),
    ({"id": "emptywav", "conversations": _turns("<speech>"), "speech": "empty.wav"},
     ["speech", "empty.wav", "no audio samples"]),
    ({"id": "count", "conversations": _turns("<image><image>"), "image": "pic.png"},
     ["image", "2", "1"]),
    ({"id": "ambig", "conversations": _turns("<image> <image>"), "image": "pic.png",
      "video": "clip.mp4"}, ["ambiguous", "<video>"]),
    ({"id": "noconv", "conversations": []}, ["conversations", "empty"]),
    ({"id": "order", "conversations": [{"from": "gpt", "value": "hi"},
                                       {"from": "human", "value": "hey"}]},
     ["conversations", "turn 0"]),
    ({"id": "answer", "conversations": _turns("look", "<image> here"), "image": "pic.png"},
     ["turn 1", "<image>", "answer"]),
    ({"id": "units", "conversations": _turns("hi"), "tgt_unit": "<sosp><1><x2>"},
     ["tgt_unit", "malformed"]),
    ({"id": "s_0", "conversations": _turns("dup")}, ["duplicate id/key", "[0]"]),
    ("not a sample", ["not a JSON object"]),
    ({"conversations": _turns("no id")}, ["id"]),
    ({"id": "badimg", "conversations": _turns("<image>"), "image": "broken.png"},
     ["image", "broken.png"]),
    ({"id": "fieldtype", "conversations": _turns("<image>"), "image": {"path": "pic.png"}},
     ["image", "expected a path", "dict"]),
]
ROOTS = lambda r: {"image_folder": r["images"], "speech_folder": r["speech"]}  # noqa: E731


def _write(path, samples, jsonl=False):
    if jsonl:
        path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    else:
        path.write_text(json.dumps(samples, indent=1))
    return path


def _members(out):
    members = {}
    for url, _ in shards.read_manifest(out):
        with tarfile.open(url) as tar:
            for info in tar.getmembers():
                members[info.name] = tar.extractfile(info).read()
    return members


def _shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}


def test_real_files_and_official_conventions(release, tmp_path):
    samples = [*GOOD, *(s for s, _ in BAD)]
    src = _write(tmp_path / "data.json", samples)
    out = tmp_path / "out"
    report = cv.convert(src, out, samples_per_shard=4, progress=False, **ROOTS(release))

    assert report.total == len(samples) and report.converted == len(GOOD), report.summary()
    reasons = {e["index"]: e["reason"] for e in report.skipped}
    assert set(reasons) == set(range(len(GOOD), len(samples)))
    for i, (_, words) in enumerate(BAD):
        for word in words:
            assert word in reasons[len(GOOD) + i], (i, reasons[len(GOOD) + i])
    assert report.resampled == {8000: 1, 44100: 3, 48000: 2, 22050: 1}
    assert report.unknown_keys == {"choices": 1, "source": 1, "video_title": 1, "image_id": 1}

    members = _members(out)
    keys = {name.split(".", 1)[0] for name in members}
    assert keys == {"s_0", "s1", "s2", "7", LONG_ID, "vid", "grid", "mov", "webm", "m4a",
                    "w24", "track", "a"}
    records = {k: json.loads(members[f"{k}.json"]) for k in keys}
    r0 = records["s_0"]
    assert r0["tgt_unit"] == [1, 22, 333] and r0["extra"] == {"choices": ["a", "b"],
                                                                 "source": "test"}
    assert members["s_0.image0.png"] == (release["images"] / "pic.png").read_bytes()
    assert r0["audio_seconds"] == pytest.approx(1.0, abs=0.05)
    # Videos with <image> placeholders read as <video>: 2 s at 2 fps, the grid's 16 frames.
    assert records["vid"]["conversations"][0]["value"] == "<video>\nWhat happens?"
    assert records["vid"]["media"]["video"] == [4] and records["grid"]["media"]["video"] == [16]
    assert records["mov"]["media"] == {"image": 0, "video": [2], "speech": 1, "sound": 0}
    assert records["s2"]["media"] == {"image": 0, "video": [3], "speech": 0, "sound": 1}
    assert records["7"]["media"]["speech"] == 2
    assert records["7"]["audio_seconds"] == pytest.approx(3.8, abs=0.02)
    assert records["track"]["audio_seconds"] == pytest.approx(2.0, abs=0.1)
    asr = records["a"]
    assert asr["speech_asr"] == "an asr line" and asr["conversations"][1]["value"] == \
        "an asr line" and asr["conversations"][0]["value"].startswith("<speech>")
    with Image.open(io.BytesIO(members["vid.video0.0001.jpg"])) as im:
        assert im.format == "JPEG" and im.size == (96, 64)
    # Every clip is 16 kHz mono PCM16 of the source's length.
    for name, data in members.items():
        if name.endswith(".wav"):
            with wave.open(io.BytesIO(data)) as w:
                assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
    assert len(media.audio_tensor(members["s1.speech0.wav"])) == 4000

    saved = json.loads((out / cv.REPORT).read_text())
    assert saved["converted"] == len(GOOD) and len(saved["skipped"]) == len(BAD)
    assert saved["ok"] is True and json.loads((out / shards.MANIFEST).read_text())["report"][
        "skipped"] == len(BAD)
    assert all(repr(e["id"]) in report.summary() for e in report.skipped)


def test_every_converted_sample_reaches_a_batch(release, tmp_path):
    """The shards stream through LyraDataModule: each converted sample is in one batch."""
    from lyra_pl.data.datamodule import LyraDataModule
    from lyra_pl.data.tokenizer import build_tiny_tokenizer

    src = _write(tmp_path / "data.jsonl", GOOD, jsonl=True)
    report = cv.convert(src, tmp_path / "out", samples_per_shard=3, progress=False,
                        **ROOTS(release))
    assert report.converted == len(GOOD) and not report.skipped, report.summary()
    text = [t["value"] for s in GOOD for t in s.get("conversations", [])]
    build_tiny_tokenizer(text * 20 + [
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
        "abcdefghijklmnopqrstuvwxyz " * 30, " ".join(str(k) for k in range(300))],
        tmp_path / "tok")
    dm = LyraDataModule(train=str(tmp_path / "out"), tokenizer=str(tmp_path / "tok"),
                        batch_size=3, max_length=None)
    keys = [k for batch in dm.train_dataloader() for k in batch["keys"]]
    assert sorted(keys) == sorted({n.split(".", 1)[0] for n in _members(tmp_path / "out")})
    assert len(keys) == len(GOOD)


def test_array_and_lines_give_identical_shards(release, tmp_path):
    samples = [*GOOD, *(s for s, _ in BAD)]
    for name, jsonl in (("a", False), ("b", True)):
        src = _write(tmp_path / f"d{name}.json{'l' if jsonl else ''}", samples, jsonl)
        cv.convert(src, tmp_path / name, samples_per_shard=5, progress=False, **ROOTS(release))
    assert _shard_bytes(tmp_path / "a") == _shard_bytes(tmp_path / "b")


def test_workers_resume_and_parts_give_the_same_shards(release, tmp_path):
    samples = [*GOOD, *(s for s, _ in BAD)] * 1
    src = _write(tmp_path / "d.json", samples)
    one = cv.convert(src, tmp_path / "one", samples_per_shard=3, progress=False,
                     **ROOTS(release))
    two = cv.convert(src, tmp_path / "two", samples_per_shard=3, progress=False, workers=2,
                     **ROOTS(release))
    expected = _shard_bytes(tmp_path / "one")
    assert len(expected) > 3 and _shard_bytes(tmp_path / "two") == expected
    strip = lambda r: {k: v for k, v in r.to_dict().items() if k != "seconds"}  # noqa: E731
    assert strip(one) == strip(two)

    # Resume: a run that stopped after some shards redoes only the missing ones.
    out = tmp_path / "two"
    victim = sorted((out / cv.STATE).glob("shard-*.json"))[1]
    (out / victim.stem).with_suffix(".tar").unlink()
    victim.unlink()
    (out / shards.MANIFEST).unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    again = cv.convert(src, out, samples_per_shard=3, progress=False, **ROOTS(release))
    assert strip(again) == strip(one) and _shard_bytes(out) == expected
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in before.items())
    # Other settings: refused, not mixed.
    with pytest.raises(FileExistsError, match="samples_per_shard"):
        cv.convert(src, out, samples_per_shard=4, progress=False, **ROOTS(release))

    # Two parts into one folder, merged: the same shards, samples and report.
    parts = tmp_path / "parts"
    with pytest.raises(FileNotFoundError, match="no converted parts"):
        cv.merge(parts)
    for i in range(2):
        cv.convert(src, parts, samples_per_shard=3, progress=False, part=(i, 2),
                   **ROOTS(release))
        assert not (parts / shards.MANIFEST).exists()
        if i == 0:
            with pytest.raises(InputError, match="part\\(s\\) 1/2 of 2 not converted yet"):
                cv.merge(parts)
    merged = cv.merge(parts)
    assert strip(merged) == strip(one) and _shard_bytes(parts) == expected
    names = lambda d: [(u.rsplit("/", 1)[1], n) for u, n in shards.read_manifest(d)]  # noqa
    assert names(parts) == names(tmp_path / "one")


def test_a_bug_is_a_traceback_not_a_skipped_sample(release, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(cv.media, "check_image", broken)
    src = _write(tmp_path / "d.json", GOOD[:1])
    with pytest.raises(KeyError, match="a bug"):
        cv.convert(src, tmp_path / "out", progress=False, **ROOTS(release))


def test_exit_status_max_skipped_and_lock(release, tmp_path, capsys):
    samples = [*GOOD, *(s for s, _ in BAD)]
    src = _write(tmp_path / "d.json", samples)
    out = tmp_path / "out"
    argv = [str(src), "--out", str(out), "--image-folder", str(release["images"]),
            "--speech-folder", str(release["speech"]), "--samples-per-shard", "4",
            "--no-progress", "--workers", "1"]
    assert cv.main(argv) == 1  # far more than 1% skipped
    printed = capsys.readouterr().out
    assert "FAILED" in printed and "'noconv'" in printed and "'cut'" in printed
    assert (out / cv.REPORT).is_file() and not (out / shards.MANIFEST).exists()
    assert cv.main(argv + ["--max-skipped", "0.9"]) == 0  # continues: same shards
    assert (out / shards.MANIFEST).is_file()
    assert f"converted {len(GOOD)} of {len(samples)}" in capsys.readouterr().out

    # One writer at a time.
    with open(out / cv.STATE / "part-0-of-1.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        assert cv.main(argv) == 1
        assert "another conversion is writing" in capsys.readouterr().err
    assert cv.main(argv + ["--overwrite", "--max-skipped", "1"]) == 0

    bad = _write(tmp_path / "bad.json", [{"id": "x", "conversations": []}, 3])
    assert cv.main([str(bad), "--out", str(tmp_path / "o2"), "--no-progress"]) == 1
    assert "converted 0 of 2" in capsys.readouterr().out
    assert cv.main([str(tmp_path / "missing.json"), "--out", str(tmp_path / "o3")]) == 1
    assert "missing.json: input JSON not found" in capsys.readouterr().err


def test_bad_input_files(tmp_path):
    (tmp_path / "bad.json").write_text('[{"id": 1, "conversations": []}, {not json')
    with pytest.raises(InputError, match="bad.json: not valid JSON"):
        cv.convert(tmp_path / "bad.json", tmp_path / "out", progress=False)
    (tmp_path / "x.json").write_text('"just a string"')
    with pytest.raises(InputError, match="x.json: expected a JSON list of samples or JSON "
                                         "lines"):
        cv.convert(tmp_path / "x.json", tmp_path / "out2", progress=False)
    # A JSON-lines file with one broken line: that line is skipped, the others kept.
    lines = tmp_path / "l.jsonl"
    lines.write_text('{"id": "a", "conversations": [{"from": "human", "value": "q"}, '
                     '{"from": "gpt", "value": "r"}]}\n{broken\n')
    report = cv.convert(lines, tmp_path / "out3", progress=False)
    assert report.converted == 1 and "l.jsonl line 2: invalid JSON" in \
        report.skipped[0]["reason"]


def test_units_forms():
    assert parse_units("<sosp><5> <6><eosp>") == [5, 6] == parse_units("<5> <6>")
    assert parse_units([3, 4]) == [3, 4] and parse_units(None) is None
    for bad in ("", "12 13", "<1><-2>", "<sosp><eosp>", [1, "2"], [], 5):
        with pytest.raises(ValueError, match="tgt_unit"):
            parse_units(bad)
