"""Metrics of the speech-centric evaluation, each on plain strings.

- :func:`wer`: word error rate after Whisper's English text normalization (transformers'
  ``EnglishTextNormalizer``: case, punctuation, numbers, fillers, contractions), computed by
  torchmetrics; with ``spelling``, also Whisper's British-to-American spelling map (the
  ``normalizer.json`` that Whisper checkpoints carry beside their tokenizer). Without it,
  "colour" vs "color" counts as an error.
- :func:`vqa_accuracy`: the VQA / TextVQA soft accuracy: an answer scores
  ``min(1, matches / 3)`` against each set of 9 of the 10 human answers, averaged over the 10
  sets, after the official answer normalization (punctuation, number words, articles,
  common contractions).
- :func:`exact_match`: DocVQA/ChartQA-style exact match after the same normalization.
- :func:`extract_choice`: the option letter a multiple-choice answer gives (VideoMME's rule).
- :func:`caption_scores`: BLEU-1/4 and ROUGE-L (F) of captions against several references,
  computed by torchmetrics after lower-casing and removing punctuation.
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Sequence

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't",
                 "cant": "can't", "wont": "won't", "didnt": "didn't", "im": "i'm",
                 "ive": "i've", "youre": "you're", "thats": "that's", "whats": "what's"}
_PUNCT = ";/[]\"{}()=+\\_-><@`,?!"  # the official list; other marks are kept
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("2.5" stays)


def normalize_answer(text: str) -> str:
    """The VQA / TextVQA (EvalAI) answer normalization: lower case; commas and question marks
    dropped ("1,000" -> "1000"); "'s" split off; each other mark of the official list deleted
    where the text has it next to a space, else made a space ("t-shirt" -> "t shirt");
    periods not followed by a digit removed ("3." -> "3", "2.5" stays); number words to
    digits; articles dropped; common apostrophe-less contractions restored (a subset of the
    official table)."""
    text = text.lower()
    text = text.replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCT:
        spaced = f"{p} " in text or f" {p}" in text
        out = out.replace(p, "" if spaced else " ")
    words = [_NUMBERS.get(w, w) for w in _PERIOD.sub("", out).split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Soft accuracy of one prediction against the human answers: with the 10 answers of
    VQA/TextVQA, the official average over the 10 leave-one-out subsets of
    ``min(1, matches / 3)``. Other counts: one answer is exact match; with n < 4 answers the
    threshold is n - 1 instead of 3, so that a unanimous correct answer still scores 1."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_answer(prediction)
    gold = [normalize_answer(a) for a in answers]
    if len(gold) == 1:
        return float(pred == gold[0])
    scores = []
    for i in range(len(gold)):
        others = gold[:i] + gold[i + 1:]
        scores.append(min(1.0, sum(a == pred for a in others) / min(3, len(others))))
    return sum(scores) / len(scores)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalized prediction equals one of the normalized answers."""
    if not answers:
        raise ValueError("exact_match needs at least one reference answer")
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def spelling_map(path: str | Path) -> dict[str, str]:
    """Whisper's spelling map (``normalizer.json``: ``{"colour": "color", ...}``), checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"spelling map {str(path)!r} does not exist")
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"spelling map {path} is not valid JSON: {e}") from None
    if not isinstance(mapping, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise ValueError(f"spelling map {path} must be a JSON object of word -> word strings "
                         "(Whisper's normalizer.json)")
    return mapping


@functools.lru_cache(maxsize=4)
def _normalizer(spelling: str | None):
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer(spelling_map(spelling) if spelling else {})


def whisper_normalize(text: str, spelling: str | Path | None = None) -> str:
    """Whisper's English text normalization (numbers, punctuation, fillers), with the
    spelling map at ``spelling`` when given."""
    return _normalizer(str(Path(spelling).resolve()) if spelling else None)(text)


def wer(predictions: Sequence[str], references: Sequence[str],
        spelling: str | Path | None = None) -> float:
    """Corpus word error rate (errors summed over all utterances / reference words) after
    :func:`whisper_normalize` (with ``spelling``, Whisper's spelling map file). A reference
    that normalizes to nothing raises, since it has no words to count errors against."""
    from torchmetrics.functional.text import word_error_rate

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    preds = [whisper_normalize(p, spelling) for p in predictions]
    refs = [whisper_normalize(r, spelling) for r in references]
    empty = [i for i, r in enumerate(refs) if not r.split()]
    if empty:
        raise ValueError(f"reference {empty[0]} ({references[empty[0]]!r}) is empty after "
                         "normalization")
    return float(word_error_rate(preds, refs))


_ANSWER_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                    "The best option is", "The correct option is", "Best answer:", "Best option:")


def extract_choice(prediction: str, options: Sequence[str] = (), letters: str = "ABCD") -> str:
    """The option letter of a multiple-choice answer, or "" when it gives none.

    A lone letter ("C", "(C)", "C.") is that letter, whatever the options' texts. An answer
    that is exactly one option's text (``options`` like ``"B. blue"``, compared after
    :func:`normalize_answer`) gives that option's letter. Otherwise VideoMME's official rule:
    drop the usual answer prefixes, then the first capital option letter in the text."""
    lone = re.fullmatch(rf"\(?([{letters}])[.):]?", prediction.strip())
    if lone:
        return lone[1]
    pred = normalize_answer(prediction)
    for option in options:
        letter, _, text = option.partition(".")
        if text and pred == normalize_answer(text):
            return letter.strip()
    s = prediction.strip()
    for prefix in _ANSWER_PREFIXES:
        s = s.replace(prefix, "")
    found = re.search(f"[{letters}]", s)
    return "" if found is None else found[0]


_CAPTION_PUNCT = re.compile(r"[^\w\s']")


def _caption_tokens(text: str) -> str:
    return " ".join(_CAPTION_PUNCT.sub(" ", text.lower()).split())


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]
                   ) -> dict[str, float]:
    """Corpus BLEU-1 and BLEU-4 (brevity penalty included, no smoothing) and mean ROUGE-L F-measure
    (best reference per caption) from torchmetrics, on lower-cased text without
    punctuation."""
    from torchmetrics.functional.text import bleu_score, rouge_score

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} captions for {len(references)} reference sets")
    if any(not refs for refs in references):
        raise ValueError("every caption needs at least one reference")
    preds = [_caption_tokens(p) for p in predictions]
    refs = [[_caption_tokens(r) for r in rs] for rs in references]
    rouge = rouge_score(preds, refs, rouge_keys=("rougeL",), accumulate="best")
    return {"bleu1": float(bleu_score(preds, refs, n_gram=1)),
            "bleu4": float(bleu_score(preds, refs, n_gram=4)),
            "rougeL": float(rouge["rougeL_fmeasure"])}
