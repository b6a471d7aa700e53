"""Evaluation metrics against hand-computed cases."""
from __future__ import annotations

import math

import pytest

from lyra_pl.eval.metrics import (caption_scores, exact_match, extract_choice, normalize_answer,
                                  vqa_accuracy, wer)


def test_normalize_answer():
    assert normalize_answer("  The Red Car. ") == "red car"
    assert normalize_answer("Two") == "2"
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer("3.5") == "3.5"
    assert normalize_answer("yes!") == "yes"
    assert normalize_answer("dont know") == "don't know"
    # EvalAI's rules: a period after a number goes; a mark inside a word becomes a space, one
    # next to a space goes; marks outside the official list stay
    assert normalize_answer("3.") == "3"
    assert normalize_answer("t-shirt") == "t shirt"
    assert normalize_answer("black / white") == "black white"
    assert normalize_answer("10:30") == "10:30" and normalize_answer("50%") == "50%"
    assert normalize_answer("the man's hat?") == "man 's hat"


def test_vqa_soft_accuracy_by_hand():
    # 10 answers, "red" given by 2: each leave-one-out set has 2 (8 sets) or 1 (2 sets) matches
    answers = ["red"] * 2 + ["blue"] * 8
    assert vqa_accuracy("Red", answers) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    # 3 or more matches in every subset: full credit
    assert vqa_accuracy("blue", answers) == 1.0
    assert vqa_accuracy("green", answers) == 0.0
    # exactly 3 of 10: the 3 sets leaving one of them out see 2 matches
    three = ["cat"] * 3 + ["dog"] * 7
    assert vqa_accuracy("a cat", three) == pytest.approx((7 * 1.0 + 3 * 2 / 3) / 10)
    assert vqa_accuracy("x", ["x"]) == 1.0
    assert vqa_accuracy("3.", ["3"] * 10) == 1.0
    assert vqa_accuracy("t shirt", ["t-shirt"] * 10) == 1.0
    # fewer than 4 answers: threshold n - 1, so unanimity scores 1 (each pair/triple subset)
    assert vqa_accuracy("x", ["x", "x"]) == 1.0
    assert vqa_accuracy("x", ["x", "x", "x"]) == 1.0
    assert vqa_accuracy("x", ["x", "y", "y"]) == pytest.approx((0 + 1 / 2 + 1 / 2) / 3)
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("x", [])


def test_exact_match():
    assert exact_match("The answer is 5", ["the answer is five"]) == 1.0
    assert exact_match("5", ["6", "five"]) == 1.0
    assert exact_match("5", ["6"]) == 0.0


def test_wer_by_hand():
    # "the cat sat" vs "the cat sat down": 1 deletion / 4 words; "a b" vs "a c": 1 sub / 2
    assert wer(["the cat sat", "a b"], ["the cat sat down", "a c"]) == pytest.approx(2 / 6)
    # Whisper normalization: case, punctuation and number words do not count as errors
    assert wer(["Twenty-one cats!"], ["21 cats"]) == 0.0
    with pytest.raises(ValueError, match="empty after normalization"):
        wer(["x"], ["uh, um!"])  # fillers only
    with pytest.raises(ValueError, match="1 predictions for 2"):
        wer(["x"], ["a", "b"])


def test_wer_with_whisper_spelling_map(tmp_path):
    import json

    from lyra_pl.eval.tasks import TASKS, with_spelling_map

    mapping = tmp_path / "normalizer.json"  # the shape of Whisper's: British -> American
    mapping.write_text(json.dumps({"colour": "color", "favourite": "favorite"}))
    pred, ref = ["my favourite colour is red"], ["my favorite color is red"]
    assert wer(pred, ref) == pytest.approx(2 / 5)  # two spelling "errors" without the map
    assert wer(pred, ref, mapping) == 0.0
    # the map comes from a Whisper checkpoint directory holding normalizer.json
    task, used = with_spelling_map(TASKS["asr"], tmp_path)
    assert used == mapping
    assert task.score([{"prediction": pred[0], "answer": ref[0]}])["all"]["wer"] == 0.0
    (tmp_path / "no_map").mkdir()  # a checkpoint without one: WER without the map
    assert with_spelling_map(TASKS["asr"], tmp_path / "no_map") == (TASKS["asr"], None)
    assert with_spelling_map(TASKS["textvqa"], tmp_path) == (TASKS["textvqa"], None)
    # by default the Whisper checkpoint's map; "none" turns it off
    assert with_spelling_map(TASKS["asr"], None, tmp_path)[1] == mapping
    assert with_spelling_map(TASKS["asr"], "none", tmp_path) == (TASKS["asr"], None)
    with pytest.raises(FileNotFoundError, match="spelling map .*missing.json"):
        with_spelling_map(TASKS["asr"], tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps(["colour", "color"]))
    with pytest.raises(ValueError, match="must be a JSON object of word -> word"):
        wer(pred, ref, tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        wer(pred, ref, tmp_path / "broken.json")


def test_extract_choice():
    opts = ["A. red", "B. blue", "C. green", "D. yellow"]
    assert extract_choice("The best answer is C.", opts) == "C"
    assert extract_choice("(B) blue", opts) == "B"
    assert extract_choice("green", opts) == "C"  # the text of one option
    assert extract_choice("Green.", opts) == "C"
    assert extract_choice("i do not know", opts) == ""
    assert extract_choice("", opts) == ""
    # a lone letter is that letter, even where an option's text is a letter too
    assert extract_choice("C", ["A. C", "B. D", "C. E"]) == "C"
    assert extract_choice("(B)", opts) == "B"


def test_caption_scores_by_hand():
    s = caption_scores(["A rising chirp."], [["a rising chirp", "a chirp"]])
    assert s == {"bleu1": pytest.approx(1.0), "bleu4": 0.0, "rougeL": pytest.approx(1.0)}
    # "the cat sat on mat" vs "the cat sat on the mat": n-gram precisions 5/5, 3/4, 2/3, 1/2,
    # brevity penalty exp(1 - 6/5)
    s = caption_scores(["the cat sat on mat"], [["the cat sat on the mat"]])
    bp = math.exp(1 - 6 / 5)
    assert s["bleu1"] == pytest.approx(bp)
    assert s["bleu4"] == pytest.approx(bp * (1 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25, rel=1e-5)
    # ROUGE-L F: LCS 5, precision 5/5, recall 5/6
    assert s["rougeL"] == pytest.approx(2 * 1 * 5 / 6 / (1 + 5 / 6), rel=1e-5)
    # best reference per caption, averaged over captions: LCS("dog barks", "a dog barks
    # loudly") = 2 -> P 1, R 1/2, F 2/3; the other caption matches exactly
    s = caption_scores(["dog barks", "a hum"], [["a dog barks loudly", "cat"], ["a hum"]])
    assert s["rougeL"] == pytest.approx((2 / 3 + 1) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="at least one reference"):
        caption_scores(["x"], [[]])
