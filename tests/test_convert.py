"""lyra_pl.data.convert: official JSON -> shards, every bad sample reported by id and reason."""
import io
import json
import tarfile
import wave

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from lyra_pl.data import convert as cv
from lyra_pl.data import media, shards

LONG_ID = "long-" + "x" * 150  # member names past ustar's 100 characters


def _wav(path, seconds, rate):
    t = np.arange(int(seconds * rate)) / rate
    path.write_bytes(media.encode_wav((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32),
                                      rate))
    return path.name


def _png(path, w, h, color=(200, 30, 30)):
    Image.new("RGB", (w, h), color).save(path, format="PNG")
    return path.name


def _turns(question, answer="ok"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture
def dataset(tmp_path):
    """A JSON file with 5 good samples and 14 bad ones, media made here."""
    m = tmp_path / "media"
    m.mkdir()
    (m / "frames").mkdir()
    for f in range(3):
        _png(m / "frames" / f"{f:03d}.png", 28, 28, (f * 80, 0, 0))
    a16 = _wav(m / "a16.wav", 0.5, 16000)
    a8 = _wav(m / "a8.wav", 0.25, 8000)
    snd = _wav(m / "snd.wav", 0.1, 16000)
    longa = _wav(m / "long.wav", 1.0, 16000)
    img = _png(m / "img.png", 56, 28)
    (m / "random.wav").write_bytes(np.random.default_rng(0).bytes(500))
    (m / "trunc.wav").write_bytes((m / a16).read_bytes()[:30])
    (m / "empty.wav").write_bytes(media.encode_wav(np.zeros(0, np.float32)))
    (m / "broken.png").write_bytes(b"\x89PNG not really")
    samples = [
        # good
        {"id": "s.0", "conversations": _turns("<image> what is said in <speech>?"),
         "image": f"media/{img}", "speech": f"media/{a16}", "speech_asr": "hello there",
         "tgt_unit": "<1><22><333>", "choices": ["a", "b"], "source": "test"},
        {"id": "s1", "conversations": _turns("<speech>"), "speech": [f"media/{a8}"]},
        {"id": "s2", "conversations": _turns("<video> and <sound>"),
         "video": "media/frames", "sound": f"media/{snd}"},
        {"id": 7, "conversations": _turns("<speech> then <speech>", "two") + _turns("more?"),
         "speech": f"media/{a16}", "long_speech": f"media/{longa}",
         "speech_asr": ["first", "second"]},
        {"id": LONG_ID, "conversations": _turns("text only")},
        # bad (skipped)
        {"id": "missing", "conversations": _turns("<speech>"), "speech": "media/nope.wav"},
        {"id": "random", "conversations": _turns("<speech>"), "speech": "media/random.wav"},
        {"id": "trunc", "conversations": _turns("<sound>"), "sound": "media/trunc.wav"},
        {"id": "count", "conversations": _turns("<image><image>"), "image": f"media/{img}"},
        {"id": "noconv", "conversations": []},
        {"id": "order", "conversations": [{"from": "gpt", "value": "hi"},
                                          {"from": "human", "value": "hey"}]},
        {"id": "answer", "conversations": _turns("look", "<image> here"),
         "image": f"media/{img}"},
        {"id": "units", "conversations": _turns("hi"), "tgt_unit": "<1><x2>"},
        {"id": "s_0", "conversations": _turns("dup")},
        "not a sample",
        {"conversations": _turns("no id")},
        {"id": "badimg", "conversations": _turns("<image>"), "image": "media/broken.png"},
        {"id": "emptywav", "conversations": _turns("<speech>"), "speech": "media/empty.wav"},
        {"id": "fieldtype", "conversations": _turns("<image>"), "image": {"path": img}},
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(samples))
    return path


EXPECTED_SKIPS = {  # id in the report -> words its reason must contain
    "missing": ["speech", "nope.wav", "not found"],
    "random": ["speech", "random.wav"],
    "trunc": ["sound", "trunc.wav", "corrupt"],
    "count": ["image", "2", "1"],
    "noconv": ["conversations", "empty"],
    "order": ["conversations", "turn 0"],
    "answer": ["turn 1", "<image>", "answer"],
    "units": ["tgt_unit", "malformed"],
    "s_0": ["duplicate id/key", "[0]"],
    "#14": ["not a JSON object"],
    "#15": ["id"],
    "badimg": ["image", "broken.png"],
    "emptywav": ["speech", "empty.wav", "no audio samples"],
    "fieldtype": ["image", "expected a path", "dict"],
}


def _tar_members(urls):
    members = {}
    for url in urls:
        with tarfile.open(url) as tar:
            for info in tar.getmembers():
                members[info.name] = tar.extractfile(info).read()
    return members


def test_convert_good_and_bad(dataset, tmp_path):
    out = tmp_path / "out"
    report = cv.convert(dataset, out, samples_per_shard=2, progress=False)

    assert report.total == 19 and report.converted == 5 and report.failed == []
    reasons = {e["id"]: e["reason"] for e in report.skipped}
    assert set(reasons) == set(EXPECTED_SKIPS), report.summary()
    for sid, words in EXPECTED_SKIPS.items():
        for word in words:
            assert word in reasons[sid], (sid, reasons[sid])
    assert {e["id"]: e["index"] for e in report.skipped}["#14"] == 14
    assert report.resampled == {8000: 1}

    # Manifest: counts per shard equal the tar contents, samples_per_shard respected.
    listed = shards.read_manifest(out)
    assert [n for _, n in listed] == [2, 2, 1]
    manifest = json.loads((out / shards.MANIFEST).read_text())
    assert manifest["source"] == str(dataset)
    assert manifest["report"]["converted"] == 5 and manifest["report"]["skipped"] == 14
    for url, n in listed:
        with tarfile.open(url) as tar:
            assert sum(name.endswith(".json") for name in tar.getnames()) == n

    # Members and json fields exactly as shards.py describes.
    members = _tar_members(u for u, _ in listed)
    keys = {name.split(".", 1)[0] for name in members}
    assert keys == {"s_0", "s1", "s2", "7", LONG_ID}
    assert sorted(n for n in members if n.startswith("s_0.")) == \
        ["s_0.image0.png", "s_0.json", "s_0.speech0.wav"]
    assert sorted(n for n in members if n.startswith("s2.")) == \
        ["s2.json", "s2.sound0.wav", "s2.video0.0000.jpg", "s2.video0.0001.jpg",
         "s2.video0.0002.jpg"]
    assert sorted(n for n in members if n.startswith("7.")) == \
        ["7.json", "7.speech0.wav", "7.speech1.wav"]
    assert members["s_0.image0.png"] == (dataset.parent / "media" / "img.png").read_bytes()
    with Image.open(io.BytesIO(members["s2.video0.0001.jpg"])) as im:
        assert im.format == "JPEG" and im.size == (28, 28)

    records = {k: json.loads(members[f"{k}.json"]) for k in keys}
    fields = {"id", "conversations", "speech_asr", "tgt_unit", "media", "audio_seconds",
              "length", "extra"}
    assert all(set(r) == fields for r in records.values())
    r0 = records["s_0"]
    assert r0["id"] == "s.0" and r0["tgt_unit"] == [1, 22, 333]
    assert r0["speech_asr"] == "hello there"
    assert r0["extra"] == {"choices": ["a", "b"], "source": "test"}
    assert r0["media"] == {"image": 1, "video": [], "speech": 1, "sound": 0}
    assert r0["audio_seconds"] == pytest.approx(0.5)
    text = len("<image> what is said in <speech>?") + len("ok")
    assert r0["length"] == round(text // 4 + 10 * 0.5 + 56 * 28 / 784)
    assert records["s2"]["media"] == {"image": 0, "video": [3], "speech": 0, "sound": 1}
    assert records["s2"]["length"] == round(len("<video> and <sound>ok") // 4 + 4 + 3 * 0.5)
    r7 = records["7"]
    assert r7["id"] == 7 and r7["speech_asr"] == ["first", "second"]
    assert r7["media"]["speech"] == 2 and r7["audio_seconds"] == pytest.approx(1.5)
    assert records[LONG_ID]["tgt_unit"] is None and records[LONG_ID]["extra"] == {}

    # All audio is 16 kHz; the 8 kHz clip was resampled (same duration).
    for name, data in members.items():
        if name.endswith(".wav"):
            with wave.open(io.BytesIO(data)) as w:
                assert w.getframerate() == 16000 and w.getnchannels() == 1
    x, rate = media.decode_audio(members["s1.speech0.wav"])
    assert rate == 16000 and len(x) == 4000

    # report.json and the summary name every skipped sample.
    saved = json.loads((out / cv.REPORT).read_text())
    assert saved["converted"] == 5 and len(saved["skipped"]) == 14
    assert saved["resampled"] == {"8000": 1}
    summary = report.summary()
    assert "converted 5 of 19" in summary and "8000 Hz" in summary
    assert all(repr(e["id"]) in summary for e in report.skipped)


def test_webdataset_reads_shards(dataset, tmp_path):
    out = tmp_path / "out"
    cv.convert(dataset, out, samples_per_shard=3, progress=False)
    urls = [u for u, _ in shards.read_manifest(out)]
    samples = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}
    assert set(samples) == {"s_0", "s1", "s2", "7", LONG_ID}
    assert {"json", "video0.0000.jpg", "video0.0002.jpg", "sound0.wav"} <= set(samples["s2"])
    assert json.loads(samples["s_0"]["json"])["id"] == "s.0"


def test_unexpected_error_is_failed_and_run_goes_on(dataset, tmp_path, monkeypatch):
    real = media.check_image

    def flaky(data, name="image"):
        if name.endswith("img.png"):
            raise RuntimeError("boom")
        return real(data, name)

    monkeypatch.setattr(cv.media, "check_image", flaky)
    report = cv.convert(dataset, tmp_path / "out", progress=False)
    assert report.failed == [{"index": 0, "id": "s.0", "reason": "RuntimeError: boom"}]
    assert "failed:" in report.summary()
    # The key of a sample that did not convert stays free: the later "s_0" is written.
    assert report.converted == 5 and "s_0" not in {e["id"] for e in report.skipped}


def test_overwrite(dataset, tmp_path):
    out = tmp_path / "out"
    cv.convert(dataset, out, samples_per_shard=1, progress=False)
    assert len(list(out.glob("shard-*.tar"))) == 5
    with pytest.raises(FileExistsError, match="overwrite"):
        cv.convert(dataset, out, progress=False)
    cv.convert(dataset, out, samples_per_shard=10, progress=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == \
        ["manifest.json", "report.json", "shard-000000.tar"]
    assert shards.read_manifest(out)[0][1] == 5


def test_bad_input_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        cv.convert(tmp_path / "nope.json", tmp_path / "out", progress=False)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
        cv.convert(tmp_path / "bad.json", tmp_path / "out", progress=False)
    (tmp_path / "dict.json").write_text('{"id": "x"}')
    with pytest.raises(ValueError, match="dict.json.*JSON list"):
        cv.convert(tmp_path / "dict.json", tmp_path / "out", progress=False)


def test_media_root_and_units_list(tmp_path):
    root = tmp_path / "elsewhere"
    root.mkdir()
    _wav(root / "a.wav", 0.2, 16000)
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"id": "a", "conversations": _turns("<speech>"),
                                 "speech": "a.wav", "tgt_unit": [3, 4]}]))
    report = cv.convert(path, tmp_path / "out", media_root=root, progress=False)
    assert report.converted == 1 and report.resampled == {}
    assert cv.parse_units("<5> <6>") == [5, 6]
    for bad in ("", "12 13", "<1><-2>", [1, "2"], [], 5):
        with pytest.raises(ValueError, match="tgt_unit"):
            cv.parse_units(bad)


def test_cli_exit_codes(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [str(dataset), "--out", str(out), "--samples-per-shard", "4", "--prefix", "part",
            "--no-progress"]
    assert cv.main(argv) == 0
    printed = capsys.readouterr().out
    assert "converted 5 of 19" in printed and "'noconv'" in printed
    assert [p.name for p in sorted(out.glob("part-*.tar"))] == \
        ["part-000000.tar", "part-000001.tar"]

    assert cv.main(argv) == 1  # refuses to write over it
    assert "--overwrite" in capsys.readouterr().err
    assert cv.main(argv + ["--overwrite"]) == 0

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "x", "conversations": []}, 3]))
    assert cv.main([str(bad), "--out", str(tmp_path / "o2"), "--no-progress"]) == 1
    assert "converted 0 of 2" in capsys.readouterr().out
    assert cv.main([str(tmp_path / "missing.json"), "--out", str(tmp_path / "o3")]) == 1
