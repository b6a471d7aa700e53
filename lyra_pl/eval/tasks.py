"""The tasks of ``lyra-pl eval``: where their data comes from and how answers are scored.

| task | data | score |
|---|---|---|
| ``asr`` | LibriSpeech tree (``*.trans.txt``), NeMo-style JSONL manifest, or official JSON | WER after Whisper normalization (and its spelling map: :func:`with_spelling_map`) |
| ``textvqa`` | official JSON + ``answers``; ``speech_instruction`` adds the S+I twin | VQA soft accuracy, T+I and S+I |
| ``docvqa`` | the same | exact match, T+I and S+I (ChartQA: the same task on its data) |
| ``videomme`` | official JSON with a video, ``options`` and the ``answer`` letter | multiple-choice accuracy |
| ``sound_caption`` | official JSON with a sound clip and ``references`` | BLEU-4 and ROUGE-L (torchmetrics) |

Every task reads official-format samples (docs/method.md, "Data format"; extra fields are kept), which
``lyra-pl eval`` converts into the training shard format before running the model. A row to
score is ``{"key", "variant", "prediction", "answer", "extra"}``: ``answer`` the held-out last
turn, ``extra`` the sample's extra fields.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from lyra_pl.data.official import ASR_AUDIO_KEYS, ASR_PROMPT, asr_id, asr_sample
from lyra_pl.eval import metrics

Sample = dict[str, Any]
Row = dict[str, Any]
Scores = dict[str, dict[str, float]]  # group -> metric -> value (every group has "n")

TEXT, SPEECH = "T+I", "S+I"
_MEDIA = re.compile(r"<(?:image|video|sound)>")


# ----------------------------------------------------------------------------- loading
def read_json_samples(path: Path) -> list[Sample]:
    try:
        samples = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(samples, list):
        raise ValueError(f"{path}: expected a JSON list of samples, got {type(samples).__name__}")
    return samples


def asr_samples(path: Path, prompt: str = ASR_PROMPT) -> list[Sample]:
    """ASR samples from a LibriSpeech-format directory (every ``<spk>-<chap>.trans.txt`` below
    it: ``UTTERANCE-ID TRANSCRIPT`` lines, audio ``UTTERANCE-ID.{flac,wav}`` beside it), a
    JSON-lines manifest (``audio`` and ``text``, as the official LibriSpeech preparation writes
    it, or NeMo's ``audio_filepath``; paths relative to the manifest), or an official JSON list (returned as is). Media paths are relative to
    ``path`` (its directory for a file)."""
    if path.is_dir():
        samples = []
        for trans in sorted(path.rglob("*.trans.txt")):
            for n, line in enumerate(trans.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                utt, _, text = line.strip().partition(" ")
                audio = [trans.parent / f"{utt}{ext}" for ext in (".flac", ".wav")]
                found = next((a for a in audio if a.is_file()), None)
                if found is None or not text:
                    raise ValueError(f"{trans}:{n}: " + ("no transcript" if not text else
                                     f"no audio {utt}.flac or {utt}.wav beside it"))
                samples.append(asr_sample(utt, str(found.relative_to(path)), text, prompt))
        if not samples:
            raise ValueError(f"{path}: no *.trans.txt files (a LibriSpeech-format tree)")
        return samples
    if path.suffix == ".jsonl":
        samples = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                audio = next(entry[k] for k in ASR_AUDIO_KEYS if k in entry)
                samples.append(asr_sample(asr_id(audio), audio, entry["text"], prompt))
            except (json.JSONDecodeError, StopIteration, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: a manifest line needs JSON with audio (or "
                                 f"audio_filepath) and text ({type(e).__name__}: {e})") from None
        return samples
    return read_json_samples(path)


def with_spoken_twins(samples: list[Sample]) -> list[Sample]:
    """Each sample as its T+I variant (typed instruction, as given) and, when it has a
    ``speech_instruction`` (the instruction spoken), its S+I twin: the media placeholders of
    the first human turn (wherever they were) followed by ``<speech>`` instead of the typed
    text, which becomes ``speech_asr``. Both carry ``variant`` and ``pair`` (the original id)."""
    out = []
    for s in samples:
        base = {k: v for k, v in s.items() if k != "speech_instruction"}
        sid = str(s.get("id", len(out)))
        out.append({**base, "id": f"{sid}_ti", "variant": TEXT, "pair": sid})
        spoken = s.get("speech_instruction")
        if not spoken:
            continue
        if "speech" in s or "long_speech" in s:
            raise ValueError(f"sample {sid}: has speech_instruction and its own speech; the "
                             "S+I twin needs the speech slot for the instruction")
        turns = s["conversations"]
        first = turns[0]["value"]
        media = _MEDIA.findall(first)  # kept, in order, wherever the typed text put them
        question = " ".join(_MEDIA.sub(" ", first).split())
        if not question:
            raise ValueError(f"sample {sid}: speech_instruction given but the first human turn "
                             "has no typed instruction to replace")
        convo = [{**turns[0], "value": "\n".join([*media, "<speech>"])}, *turns[1:]]
        out.append({**base, "id": f"{sid}_si", "variant": SPEECH, "pair": sid,
                    "speech": spoken, "speech_asr": question, "conversations": convo})
    return out


# ----------------------------------------------------------------------------- scoring
def _groups(rows: Sequence[Row]) -> dict[str, list[Row]]:
    """"all" plus one group per variant (when the rows have more than one)."""
    groups: dict[str, list[Row]] = {"all": list(rows)}
    variants = sorted({r["variant"] for r in rows if r.get("variant")})
    if len(variants) > 1:
        for v in variants:
            groups[v] = [r for r in rows if r.get("variant") == v]
    return groups


def _per_row(score: Callable[[Row], float], name: str, rows: Sequence[Row]) -> Scores:
    """Mean of a per-row score over each group, plus the paired S+I - T+I gap on the samples
    asked both ways."""
    out: Scores = {}
    values = {id(r): score(r) for r in rows}
    for group, rs in _groups(rows).items():
        if rs:
            out[group] = {"n": len(rs), name: sum(values[id(r)] for r in rs) / len(rs)}
    pairs: dict[str, dict[str, Row]] = {}
    for r in rows:
        if r.get("pair") is not None:
            pairs.setdefault(r["pair"], {})[r["variant"]] = r
    both = [p for p in pairs.values() if TEXT in p and SPEECH in p]
    if both:
        gap = sum(values[id(p[SPEECH])] - values[id(p[TEXT])] for p in both) / len(both)
        out["gap S+I - T+I"] = {"n": len(both), name: gap}
    return out


def references(row: Row, field: str) -> list[str]:
    """The row's reference answers: its ``extra[field]`` list, else the held-out answer."""
    refs = row["extra"].get(field) or [row["answer"]]
    if isinstance(refs, str):
        refs = [refs]
    return [str(r) for r in refs]


def score_asr(rows: Sequence[Row], spelling: str | Path | None = None) -> Scores:
    return {"all": {"n": len(rows), "wer": metrics.wer([r["prediction"] for r in rows],
                                                        [r["answer"] for r in rows], spelling)}}


def score_textvqa(rows: Sequence[Row]) -> Scores:
    return _per_row(lambda r: metrics.vqa_accuracy(r["prediction"], references(r, "answers")),
                    "vqa_accuracy", rows)


def score_docvqa(rows: Sequence[Row]) -> Scores:
    return _per_row(lambda r: metrics.exact_match(r["prediction"], references(r, "answers")),
                    "exact_match", rows)


def score_videomme(rows: Sequence[Row]) -> Scores:
    def correct(r: Row) -> float:
        options = r["extra"].get("options") or []
        letter = re.match(r"\s*\(?([A-Za-z])\b", r["extra"].get("answer") or r["answer"])
        if letter is None:  # "B", "(B)" or "B. blue"
            raise ValueError(f"videomme sample {r['key']}: answer {r['answer']!r} names no "
                             "option letter")
        return float(metrics.extract_choice(r["prediction"], options) == letter[1].upper())

    out = _per_row(correct, "accuracy", rows)
    for group, rs in _groups(rows).items():
        chance = [1 / len(r["extra"]["options"]) for r in rs if r["extra"].get("options")]
        if chance and group in out:
            out[group]["chance"] = sum(chance) / len(chance)
    return out


def score_sound_caption(rows: Sequence[Row]) -> Scores:
    preds = [r["prediction"] for r in rows]
    refs = [references(r, "references") for r in rows]
    return {"all": {"n": len(rows), **metrics.caption_scores(preds, refs)}}


# ----------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Task:
    """An evaluation task. ``data``: its tiny-corpus default (relative to the repository);
    ``load(path)``: official-format samples (media relative to ``path``'s directory, or to
    ``path`` for a directory); ``score(rows)``: group -> metric -> value; ``headline``: the
    metric the summary table leads with; ``lower_is_better`` for it."""

    name: str
    data: str
    load: Callable[[Path], list[Sample]]
    score: Callable[..., Scores]
    headline: str
    max_new_tokens: int
    lower_is_better: bool = False

    def samples(self, path: Path) -> list[Sample]:
        if not path.exists():
            raise FileNotFoundError(f"{self.name}: data {str(path)!r} does not exist")
        samples = self.load(path)
        if not samples:
            raise ValueError(f"{self.name}: {path} holds no samples")
        return samples


def _vqa_load(path: Path) -> list[Sample]:
    return with_spoken_twins(read_json_samples(path))


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("asr", "data/tiny/eval/librispeech", asr_samples, score_asr, "wer", 48,
         lower_is_better=True),
    Task("textvqa", "data/tiny/eval/textvqa.json", _vqa_load, score_textvqa, "vqa_accuracy", 8),
    Task("docvqa", "data/tiny/eval/docvqa.json", _vqa_load, score_docvqa, "exact_match", 8),
    Task("videomme", "data/tiny/eval/videomme.json", read_json_samples, score_videomme,
         "accuracy", 4),
    Task("sound_caption", "data/tiny/eval/sound_caption.json", read_json_samples,
         score_sound_caption, "rougeL", 16),
)}


SPELLING_FILE = "normalizer.json"  # what Whisper checkpoints name their spelling map


def with_spelling_map(task: Task, spelling: str | Path | None,
                      whisper: str | Path | None = None) -> tuple[Task, Path | None]:
    """The ASR task scored with Whisper's spelling map at ``spelling`` (a file, or a Whisper
    checkpoint directory holding ``normalizer.json``; default: the ``whisper`` checkpoint
    directory; ``"none"``: no map) and the file used; any other task, or no such file in a
    directory, as it is and ``None``. A named file that is missing raises."""
    spelling = None if spelling == "none" else spelling or whisper
    if task.name != "asr" or spelling is None:
        return task, None
    path = Path(spelling)
    if path.is_dir():
        path = path / SPELLING_FILE
        if not path.is_file():
            return task, None
    metrics.whisper_normalize("", path)  # loads and checks the map now (cached for scoring)
    return replace(task, score=functools.partial(score_asr, spelling=path)), path


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown eval task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name]
