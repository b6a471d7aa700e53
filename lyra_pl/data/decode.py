"""A shard sample (the members of :mod:`lyra_pl.data.shards`) -> the model's per-sample inputs.

Tokenization follows the chat template with answer-only labels found from character spans
(:mod:`lyra_pl.data.conversation`); media decode through :mod:`lyra_pl.data.media`. Anything
that cannot be decoded raises :class:`SampleError` naming the field or member, which the
stream turns into a skipped-and-counted sample (never a silent replacement).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lyra_pl.data import conversation as conv
from lyra_pl.data.media import MediaError, audio_tensor, image_tensor
from lyra_pl.model.inputs import Sample

_MEMBER = re.compile(r"^(image|speech|sound)(\d+)\.\w+$|^video(\d+)\.(\d+)\.\w+$")


class SampleError(ValueError):
    """A sample that cannot be turned into model inputs (the message says why)."""


@dataclass
class Decoded:
    """One decoded sample: model inputs plus what evaluation and stage 4 need."""

    key: str
    sample: Sample
    units: list[int] | None = None
    answer: str | None = None
    choices: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A local Hugging Face tokenizer directory (never the hub)."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"tokenizer directory {str(p)!r} does not exist")
    tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    if not getattr(tok, "is_fast", False):
        raise TypeError(f"{p}: a fast tokenizer is needed (offset mappings for the labels)")
    return tok


def placeholders_for(tokenizer: PreTrainedTokenizerFast) -> dict[str, str]:
    """Qwen2-VL's placeholder strings when the tokenizer has them, else the data's."""
    vocab = tokenizer.get_vocab()
    return conv.QWEN2VL_PLACEHOLDERS if "<|image_pad|>" in vocab else conv.TINY_PLACEHOLDERS


def sample_meta(raw: dict[str, Any]) -> dict[str, Any]:
    """The parsed ``json`` member of a raw shard sample."""
    data = raw.get("json")
    if data is None:
        raise SampleError(f"sample {raw.get('__key__')!r} has no json member")
    if isinstance(data, (bytes, bytearray)):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as e:
            raise SampleError(f"json member: invalid JSON ({e})") from None
    return data


def _media_members(raw: dict[str, Any]) -> dict[str, list[bytes]]:
    """Members by modality, in index order (videos as lists of frames)."""
    found: dict[str, dict[int, Any]] = {"image": {}, "speech": {}, "sound": {}, "video": {}}
    for name, value in raw.items():
        m = _MEMBER.match(name)
        if m is None:
            continue
        if m.group(1):
            found[m.group(1)][int(m.group(2))] = (name, value)
        else:
            found["video"].setdefault(int(m.group(3)), {})[int(m.group(4))] = (name, value)
    out = {}
    for kind, items in found.items():
        idx = sorted(items)
        if idx != list(range(len(idx))):
            raise SampleError(f"{kind} members are not numbered 0..{len(idx) - 1}: {idx}")
        out[kind] = [items[i] for i in idx]
    return out


class SampleDecoder:
    """Decodes raw shard samples for training (``mode="train"``: whole conversation, labels
    on answers) or generation (``mode="prompt"``: the conversation up to its last human turn
    with the generation prefix; the last answer becomes ``Decoded.answer``)."""

    def __init__(self, tokenizer: str | Path, mode: str = "train", max_length: int | None = None,
                 system_prompt: str | None = conv.SYSTEM_PROMPT, units: bool = False,
                 transcripts: bool = True, expected_ids: dict[str, int] | None = None):
        if mode not in ("train", "prompt"):
            raise ValueError(f"mode must be 'train' or 'prompt', got {mode!r}")
        self.tokenizer_path = tokenizer
        self.mode = mode
        self.max_length = max_length
        self.system_prompt = system_prompt
        self.units = units
        self.transcripts = transcripts
        self.expected_ids = expected_ids
        # Loaded or derived lazily, once per DataLoader worker (not pickled): the tokenizer,
        # its placeholder strings (a scan of the vocabulary) and their checked ids.
        self._tok: PreTrainedTokenizerFast | None = None
        self._placeholders: dict[str, str] | None = None
        self._ids: dict[str, int] | None = None

    @property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        if self._tok is None:
            self._tok = load_tokenizer(self.tokenizer_path)
        return self._tok

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tok": None, "_placeholders": None, "_ids": None}

    @property
    def placeholders(self) -> dict[str, str]:
        if self._placeholders is None:
            self._placeholders = placeholders_for(self.tokenizer)
        return self._placeholders

    def placeholder_ids(self) -> dict[str, int]:
        if self._ids is None:
            self._ids = conv.placeholder_token_ids(self.tokenizer, self.placeholders,
                                                   self.expected_ids)
        return self._ids

    def __call__(self, raw: dict[str, Any]) -> Decoded:
        key = raw.get("__key__", "?")
        meta = sample_meta(raw)
        turns = meta.get("conversations")
        media = _media_members(raw)
        try:
            text, labels, answer = self._tokenize(turns)
        except ValueError as e:
            raise SampleError(f"conversation: {e}") from None
        try:
            images = [image_tensor(v, n) for n, v in media["image"]]
            videos = [torch.stack([image_tensor(v, n) for n, v in (frames[f] for f in
                                   sorted(frames))]) for frames in media["video"]]
            speech = [audio_tensor(v, n) for n, v in media["speech"]]
            sound = [audio_tensor(v, n) for n, v in media["sound"]]
        except MediaError as e:
            raise SampleError(str(e)) from None
        sample = Sample(input_ids=text, labels=labels, images=images, videos=videos,
                        speech=speech, sound=sound, transcripts=self._transcripts(meta, len(speech)))
        units = None
        if self.units:
            units = meta.get("tgt_unit")
            if not units:
                raise SampleError("tgt_unit: no unit targets (stage 4 needs them)")
        extra = meta.get("extra") or {}
        return Decoded(key=key, sample=sample, units=units, answer=answer,
                       choices=extra.get("choices"), meta=meta)

    def _tokenize(self, turns: Any) -> tuple[list[int], list[int] | None, str | None]:
        if self.mode == "train":
            t = conv.tokenize(turns, self.tokenizer, self.placeholders, self.max_length,
                              self.system_prompt, self.expected_ids)
            return t.input_ids, t.labels, None
        if not isinstance(turns, list) or len(turns) < 2 or turns[-1].get("from") != "gpt":
            raise ValueError("a prompt needs a conversation ending with an answer to hold out")
        prompt_turns = [{**t, "value": conv.with_token_placeholders(t["value"], self.placeholders)}
                        for t in turns[:-1]]
        text = conv.prompt(prompt_turns, self.system_prompt)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.max_length is not None and len(ids) > self.max_length:
            raise ValueError(f"prompt has {len(ids)} tokens, more than max_length {self.max_length}")
        return ids, None, turns[-1]["value"]

    def _transcripts(self, meta: dict[str, Any], n_speech: int) -> list[list[int] | None] | None:
        if not self.transcripts or n_speech == 0:
            return None
        asr = meta.get("speech_asr")
        if asr is None:
            return None
        if isinstance(asr, str):
            asr = [asr] + [None] * (n_speech - 1)
        if not isinstance(asr, list) or len(asr) != n_speech:
            raise SampleError(f"speech_asr: {len(asr) if isinstance(asr, list) else asr!r} "
                              f"transcript(s) for {n_speech} speech clip(s)")
        return [None if t is None else self.tokenizer(t, add_special_tokens=False)["input_ids"]
                for t in asr]
