"""The eval tasks: reading each data format, the spoken twins of typed questions, scoring rows
by hand, the shard cache, an eval task run at the end of validation during fit (the same
results as `lyra-pl eval`), and AnswerAccuracy judging answers as the eval metrics do."""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from lyra_pl.eval.runner import EvalTask, format_results, metric_dict, prepare_data, results
from lyra_pl.eval.tasks import (SPEECH, TASKS, TEXT, asr_samples, get_task, score_asr,
                                score_textvqa, score_videomme, with_spoken_twins)

ROOT = Path(__file__).resolve().parents[1]


def row(key, prediction, gold, variant=None, pair=None, **extra):
    return {"key": key, "variant": variant, "pair": pair, "prediction": prediction,
            "answer": gold, "extra": extra}


# ----------------------------------------------------------------------------- data formats
def test_librispeech_tree_and_manifest(tmp_path):
    """A LibriSpeech tree as released (FLAC, encoded here) and both JSON-lines forms."""
    from lyra_pl.data import encode

    chapter = tmp_path / "ls" / "19" / "198"
    chapter.mkdir(parents=True)
    for k, utt in enumerate(("19-198-0000", "19-198-0001")):
        encode.write_audio(chapter / f"{utt}.flac", encode.tone(0.5 + k, 16000), 16000)
    (chapter / "19-198.trans.txt").write_text("19-198-0000 HELLO WORLD\n19-198-0001 GOOD DAY\n")
    samples = asr_samples(tmp_path / "ls")
    assert [s["id"] for s in samples] == ["19-198-0000", "19-198-0001"]
    assert samples[1]["speech"] == "19/198/19-198-0001.flac"
    assert samples[1]["conversations"][-1]["value"] == "GOOD DAY"
    assert samples[0]["conversations"][0]["value"].startswith("<speech>\n")
    # The FLAC files convert into the eval's shards, each clip its full length.
    shards_dir, report = prepare_data(get_task("asr"), tmp_path / "ls", tmp_path / "cache",
                                      progress=False)
    assert report["converted"] == 2 and not report["skipped"]
    import tarfile
    from lyra_pl.data.media import audio_tensor
    from lyra_pl.data.shards import read_manifest
    clips = {}
    for url, _ in read_manifest(shards_dir):
        with tarfile.open(url) as tar:
            clips.update({m.name: tar.extractfile(m).read() for m in tar if
                          m.name.endswith(".wav")})
    assert sorted(len(audio_tensor(v)) for v in clips.values()) == [8000, 24000]

    (chapter / "19-198.trans.txt").write_text("19-198-0002 MISSING AUDIO\n")
    with pytest.raises(ValueError, match=r"19-198.trans.txt:1: no audio 19-198-0002"):
        asr_samples(tmp_path / "ls")
    with pytest.raises(ValueError, match="no \\*.trans.txt"):
        asr_samples(_empty_dir(tmp_path))

    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio_filepath": "a/x.wav", "text": "hi", "duration": 1})
                        + "\n\n" + json.dumps({"audio_filepath": "y.wav"}) + "\n")
    with pytest.raises(ValueError, match=r"m.jsonl:3: .*audio_filepath\) and text"):
        asr_samples(manifest)
    for key in ("audio_filepath", "audio"):  # NeMo's form and the official LibriSpeech one
        manifest.write_text(json.dumps({key: "a/x.wav", "text": "hi"}) + "\n")
        assert asr_samples(manifest)[0]["speech"] == "a/x.wav"
        assert asr_samples(manifest)[0]["id"] == "a_x"  # the path, not just the stem


def _empty_dir(tmp_path: Path) -> Path:
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_spoken_twins():
    typed = {"id": "q1", "image": "a.png", "answers": ["red"], "speech_instruction": "q.wav",
             "conversations": [{"from": "human", "value": "<image>\nWhat color is it?"},
                               {"from": "gpt", "value": "red"}]}
    plain = {"id": "q2", "image": "b.png",
             "conversations": [{"from": "human", "value": "<image>\nName it."},
                               {"from": "gpt", "value": "x"}]}
    ti, si, only = with_spoken_twins([typed, plain])
    assert (ti["id"], ti["variant"], ti["pair"]) == ("q1_ti", TEXT, "q1")
    assert "speech_instruction" not in ti and "speech" not in ti
    assert ti["conversations"] == typed["conversations"]
    assert (si["id"], si["variant"], si["pair"], si["speech"]) == ("q1_si", SPEECH, "q1", "q.wav")
    assert si["conversations"][0]["value"] == "<image>\n<speech>"
    assert si["speech_asr"] == "What color is it?"
    assert si["answers"] == ["red"] and si["conversations"][1] == typed["conversations"][1]
    assert only["id"] == "q2_ti"
    # placeholders after the text stay, in front of the spoken instruction
    late = {**typed, "conversations": [{"from": "human", "value": "What is written?\n<image>"},
                                       {"from": "gpt", "value": "red"}]}
    twin = with_spoken_twins([late])[1]
    assert twin["conversations"][0]["value"] == "<image>\n<speech>"
    assert twin["speech_asr"] == "What is written?"
    with pytest.raises(ValueError, match="its own speech"):
        with_spoken_twins([{**typed, "speech": "other.wav"}])
    with pytest.raises(ValueError, match="no typed instruction"):
        with_spoken_twins([{**typed, "conversations": [{"from": "human", "value": "<image>"},
                                                       {"from": "gpt", "value": "red"}]}])


def test_shipped_eval_sets_read():
    """Every task's tiny-corpus set loads, and the VQA sets pair each question with a spoken
    twin of the held-out voice."""
    for task in TASKS.values():
        samples = task.samples(ROOT / task.data)
        assert samples, task.name
    vqa = TASKS["textvqa"].samples(ROOT / TASKS["textvqa"].data)
    assert sum(s["variant"] == TEXT for s in vqa) == sum(s["variant"] == SPEECH for s in vqa) == 90
    with pytest.raises(ValueError, match="unknown eval task 'nope'"):
        get_task("nope")


# ----------------------------------------------------------------------------- scoring
def test_scores_by_hand():
    rows = [row("a_ti", "Red", "red", TEXT, "a", answers=["red"] * 3 + ["blue"] * 7),
            row("a_si", "blue", "red", SPEECH, "a", answers=["red"] * 3 + ["blue"] * 7),
            row("b_ti", "cat", "cat", TEXT, "b"),
            row("b_si", "dog", "cat", SPEECH, "b"),
            row("c_ti", "sun", "sun", TEXT, "c")]
    s = score_textvqa(rows)
    red = (7 * 1.0 + 3 * 2 / 3) / 10  # 3 of 10 answers say red
    assert s[TEXT] == {"n": 3, "vqa_accuracy": pytest.approx((red + 1 + 1) / 3)}
    assert s[SPEECH] == {"n": 2, "vqa_accuracy": pytest.approx((1.0 + 0) / 2)}
    assert s["all"]["n"] == 5
    # the gap is over the two questions asked both ways: (1 - red) + (0 - 1), halved
    assert s["gap S+I - T+I"] == {"n": 2, "vqa_accuracy": pytest.approx((1 - red - 1) / 2)}
    keys = metric_dict({"task": "textvqa", "scores": s})
    assert keys["eval/textvqa/speech_instruction/vqa_accuracy"] == pytest.approx(0.5)
    assert "eval/textvqa/gap_speech_minus_text/n" in keys

    opts = ["A. red", "B. blue", "C. green", "D. yellow"]
    mc = score_videomme([row("v0", "The answer is B", "B", options=opts, answer="B"),
                         row("v1", "green", "A", options=opts, answer="A"),
                         row("v2", "A", "A", options=opts[:2], answer="A")])
    assert mc["all"] == {"n": 3, "accuracy": pytest.approx(2 / 3),
                         "chance": pytest.approx((1 / 4 + 1 / 4 + 1 / 2) / 3)}
    # the held-out answer may be written "(B)" or "B. blue"; one naming no letter is an error
    assert score_videomme([row("v3", "B", "(B)", options=opts),
                           row("v4", "B", "B. blue", options=opts)])["all"]["accuracy"] == 1.0
    with pytest.raises(ValueError, match="v5: answer '' names no option letter"):
        score_videomme([row("v5", "B", "", options=opts)])

    asr = score_asr([row("u0", "the cat sat", "THE CAT SAT DOWN"), row("u1", "a b", "A C")])
    assert asr["all"] == {"n": 2, "wer": pytest.approx(2 / 6)}
    table = format_results([results(TASKS["asr"], [row("u0", "the cat", "THE CAT")])])
    assert "asr" in table and "wer" in table and "lower is better" in table


# ----------------------------------------------------------------------------- shards
def test_prepare_data_converts_once(tmp_path):
    task = TASKS["docvqa"]
    shards, report = prepare_data(task, None, tmp_path / "cache", progress=False, limit=5)
    assert report["converted"] == 5 and not report["skipped"]
    stamp = (shards / "manifest.json").stat().st_mtime_ns
    again, _ = prepare_data(task, None, tmp_path / "cache", progress=False, limit=5)
    assert again == shards and (shards / "manifest.json").stat().st_mtime_ns == stamp
    more, report = prepare_data(task, None, tmp_path / "cache", progress=False, limit=6)
    assert report["converted"] == 6  # other samples: converted again
    # a shard directory is used as it is
    assert prepare_data(task, str(shards), tmp_path / "other")[0] == shards
    # the same samples with their media elsewhere: converted again
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "docvqa.json").write_text((ROOT / task.data).read_text())
    with pytest.raises(ValueError, match="no sample of .* could be converted .*file not found"):
        prepare_data(task, str(moved / "docvqa.json"), tmp_path / "cache", progress=False,
                     limit=6)
    with pytest.raises(FileNotFoundError, match="docvqa: data .* does not exist"):
        prepare_data(task, str(tmp_path / "missing.json"), tmp_path / "c2")

    # several processes: the first converts; its failure reaches the others through the
    # broadcast (here: what rank 0 would send) instead of leaving them waiting
    from lyra_pl.eval.runner import prepare_data_once

    sent = []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_data_once(task, str(tmp_path / "missing.json"), tmp_path / "c3", True,
                          lambda obj: sent.append(obj) or obj)
    assert sent and sent[0].startswith("FileNotFoundError: docvqa: data")
    with pytest.raises(RuntimeError, match="first rank could not prepare .*FileNotFoundError"):
        prepare_data_once(task, str(tmp_path / "missing.json"), tmp_path / "c3", False,
                          lambda obj: sent[0])
    assert prepare_data_once(task, None, tmp_path / "cache", False, lambda obj: None,
                             progress=False, limit=6)[0] == more


# ----------------------------------------------------------------------------- during fit
def test_eval_task_during_fit_matches_lyra_pl_eval_on_the_export(tmp_path):
    """EvalTask at the last validation of a fit and `lyra-pl eval` on that fit's export, on
    the same data: the same answers, in the same order, and the same scores (one eval path,
    runner.evaluate)."""
    from lyra_pl.data.convert import convert
    from lyra_pl.data.datamodule import LyraDataModule
    from lyra_pl.eval.cli import main
    from lyra_pl.training.callbacks import ExportModel
    from lyra_pl.training.stages import BaseVLMStage

    samples = json.loads((ROOT / "data/tiny/stage0_vlm.train.json").read_text())[:8]
    (tmp_path / "train.json").write_text(json.dumps(samples))
    convert(tmp_path / "train.json", tmp_path / "train", media_root=ROOT / "data/tiny",
            progress=False)
    data = prepare_data(TASKS["docvqa"], None, tmp_path / "docvqa", progress=False,
                        limit=6)[0]  # 3 questions, typed and spoken
    dm = LyraDataModule(train=str(tmp_path / "train"), val=str(tmp_path / "train"),
                        tokenizer="data/tiny/tokenizer", batch_size=4, max_length=512)
    callback = EvalTask("docvqa", data=str(data), batch_size=4, max_new_tokens=4)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=1, logger=False,
                        val_check_interval=2, enable_checkpointing=False,
                        enable_progress_bar=False, num_sanity_val_steps=0,
                        default_root_dir=str(tmp_path / "run"), enable_model_summary=False,
                        callbacks=[callback, ExportModel()])
    # a small lr keeps the answers near-random tokens, different per prompt (the stage's
    # 1e-3 leaves every answer empty after two steps: nothing to compare)
    trainer.fit(BaseVLMStage(preset="tiny", lr=1e-5, param_dtype=None), datamodule=dm)
    assert trainer.callback_metrics["eval/docvqa/all/n"] == 6
    during = tmp_path / "run" / "eval" / "docvqa"
    fit_result = json.loads((during / "step2.json").read_text())
    fit_rows = [json.loads(line) for line in (during / "step2.predictions.jsonl").open()]
    assert len({r["prediction"] for r in fit_rows}) > 1

    assert main(["--task", "docvqa", "--ckpt", str(tmp_path / "run" / "export"), "--data",
                 str(data), "--batch-size", "4", "--max-new-tokens", "4", "--device", "cpu",
                 "--dtype", "float32", "--no-mlflow", "--out", str(tmp_path / "eval")]) == 0
    cli_result = json.loads((tmp_path / "eval" / "docvqa" / "results.json").read_text())
    cli_rows = [json.loads(line)
                for line in (tmp_path / "eval" / "docvqa" / "predictions.jsonl").open()]
    assert [(r["key"], r["prediction"]) for r in cli_rows] == \
        [(r["key"], r["prediction"]) for r in fit_rows]
    assert cli_result["scores"] == fit_result["scores"]
    assert fit_result["scores"]["all"]["n"] == 6 and TEXT in fit_result["scores"]


class _Says(L.LightningModule):
    """A stand-in for a stage's predict_step: answers every prompt with the text its batch
    carries (``say``), as token ids, with the batch's keys and reference answers."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tok = tokenizer

    def predict_step(self, batch, batch_idx):
        return {"tokens": [self.tok.encode(t, add_special_tokens=False) for t in batch["say"]],
                "instruction": ["text"] * len(batch["say"]), "keys": batch["keys"],
                "answers": batch["answers"], "choices": [None] * len(batch["say"])}


def test_answer_accuracy_judges_answers_as_the_eval_metrics_do(tmp_path):
    """AnswerAccuracy (lyra-pl predict) marks right exactly what the eval's exact match
    (EvalAI normalization) does: case, punctuation, articles, number words, contractions."""
    from lyra_pl.data.decode import load_tokenizer
    from lyra_pl.eval.metrics import exact_match
    from lyra_pl.training.callbacks import AnswerAccuracy

    cases = [("The Red car.", "red car", True), ("two", "2", True), ("an Apple", "apple", True),
             ("yes!", "Yes", True), ("t-shirt", "t shirt", True),
             ("dont know", "don't know", True), ("1,000", "1000", True), ("blue", "red", False),
             ("3.5", "35", False), ("cats", "cat", False)]
    batches = [{"say": [c[0] for c in part], "answers": [c[1] for c in part],
                "keys": [f"q{i}_{j}" for j in range(len(part))]}
               for i, part in enumerate((cases[:4], cases[4:]))]
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[AnswerAccuracy(tokenizer="data/tiny/tokenizer")])
    trainer.predict(_Says(load_tokenizer(ROOT / "data/tiny/tokenizer")),
                    torch.utils.data.DataLoader(batches, batch_size=None))
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").open()]
    assert [(r["prediction"], r["answer"], r["correct"]) for r in rows] == cases
    assert all(r["correct"] == bool(exact_match(r["prediction"], [r["answer"]])) for r in rows)
    summary = json.loads((tmp_path / "eval" / "accuracy.json").read_text())
    assert summary["overall"]["accuracy"] == pytest.approx(0.7)
    assert TASKS["docvqa"].score(rows)["all"]["exact_match"] == pytest.approx(0.7)


def test_eval_cli_checks_the_spelling_map_before_loading(tmp_path):
    from lyra_pl.eval.cli import main

    with pytest.raises(FileNotFoundError, match="spelling map .*nope.json' does not exist"):
        main(["--task", "asr", "--ckpt", str(tmp_path), "--spelling-map",
              str(tmp_path / "nope.json")])


# ----------------------------------------------------------------------------- needle
def test_needle_haystack_and_scoring(tmp_path):
    import numpy as np

    from lyra_pl.eval.needle import GAP_S, answered, audio_files, haystack, insert

    clips = [np.full(16000, 0.5, np.float32), np.full(8000, -0.5, np.float32)]
    hay = haystack(clips, 4.0)
    assert len(hay) == 4 * 16000
    gap = int(GAP_S * 16000)
    # clip 0, gap, clip 1, gap, clip 0 again (cut)
    assert hay[0] == 0.5 and hay[16000] == 0 and hay[16000 + gap] == -0.5
    assert hay[16000 + gap + 8000 + gap] == 0.5
    needle = np.ones(1600, np.float32)
    for depth, at in ((0.0, 0), (0.5, 32000), (1.0, 64000)):
        out, start = insert(hay, needle, depth)
        assert start == at and len(out) == len(hay) + 1600
        assert (out[at:at + 1600] == 1).all()
    with pytest.raises(ValueError, match="outside"):
        insert(hay, needle, 1.5)
    assert answered("The code word is Cherry.", "cherry")
    assert answered("seven", "seven") and not answered("seventy", "seven")
    assert not answered("", "seven")
    (tmp_path / "b.wav").write_bytes(b"")
    (tmp_path / "a.wav").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    assert [f.name for f in audio_files([tmp_path])] == ["a.wav", "b.wav"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        audio_files([tmp_path / "missing"])
