"""The Qwen2 chat template and answer-only labels.

Labels come from the character spans of the answers in the rendered text, mapped to tokens
through the fast tokenizer's offsets, not from hard-coded token offsets (the official code's
offsets silently mask a whole sample when the template or tokenizer changes). A sample that
cannot be labelled exactly raises ValueError naming the turn; the caller skips and counts it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:  # annotations only: the converter imports this module without transformers
    from transformers import PreTrainedTokenizerFast

SYSTEM_PROMPT = "You are a helpful assistant."
IGNORE = -100  # == lyra_pl.model.assemble.IGNORE; not imported so data code needs no model code
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ROLES = {"human": "user", "gpt": "assistant"}

# Placeholders as written in the data (SPEC "Data format").
DATA_PLACEHOLDERS: dict[str, str] = {
    "image": "<image>", "video": "<video>", "speech": "<speech>", "sound": "<sound>",
}
# Token strings per modality: the tiny tokenizer uses the data's spelling; Qwen2-VL has its
# own image/video pad tokens, and <speech>/<sound> must be added to it (ids 151665/151666).
TINY_PLACEHOLDERS: dict[str, str] = dict(DATA_PLACEHOLDERS)
QWEN2VL_PLACEHOLDERS: dict[str, str] = {
    "image": "<|image_pad|>", "video": "<|video_pad|>", "speech": "<speech>", "sound": "<sound>",
}

Turn = Mapping[str, str]


@dataclass
class Tokenized:
    """One tokenized sample: one placeholder token per media item, labels = input_ids on
    answer tokens (each answer and its <|im_end|>), IGNORE elsewhere. The model shifts labels
    itself, so they are aligned with ``input_ids``."""

    input_ids: list[int]
    labels: list[int]
    placeholder_counts: dict[str, int] = field(default_factory=dict)


def _validate(conversations: Sequence[Turn], last: str) -> None:
    """Checks roles alternate human, gpt, ... and end with ``last``; names the bad turn."""
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise ValueError("conversations must be a non-empty list of turns")
    for i, turn in enumerate(conversations):
        if not isinstance(turn, Mapping):
            raise ValueError(f"turn {i}: expected a dict with 'from' and 'value', got "
                             f"{type(turn).__name__}")
        role = turn.get("from")
        if role not in ROLES:
            raise ValueError(f"turn {i}: unknown role {role!r}; expected 'human' or 'gpt'")
        expected = "human" if i % 2 == 0 else "gpt"
        if role != expected:
            raise ValueError(f"turn {i}: expected a {expected!r} turn (roles alternate, "
                             f"starting with 'human'), got {role!r}")
        if not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {i}: 'value' must be a string, got "
                             f"{type(turn.get('value')).__name__}")
    if conversations[-1]["from"] != last:
        raise ValueError(f"turn {len(conversations) - 1}: the conversation must end with a "
                         f"{last!r} turn here, got {conversations[-1]['from']!r}"
                         + (" (use prompt() for inference)" if last == "gpt" else ""))


def _header(role: str) -> str:
    return f"{IM_START}{role}\n"


def _system(system: str | None) -> str:
    return "" if system is None else f"{_header('system')}{system}{IM_END}\n"


def render(conversations: Sequence[Turn], system: str | None = SYSTEM_PROMPT,
           ) -> tuple[str, list[tuple[int, int]]]:
    """Renders a training conversation (human, gpt, ..., gpt) with the Qwen2 template.

    Returns the text and the [start, end) character span of every answer: the gpt value plus
    its <|im_end|> (the model must learn to stop), not the newline after it nor the
    ``<|im_start|>assistant\\n`` header, which the prompt already gives at inference.
    ``system=None`` leaves out the system turn.
    """
    _validate(conversations, last="gpt")
    parts = [_system(system)]
    pos = len(parts[0])
    spans: list[tuple[int, int]] = []
    for turn in conversations:
        head = _header(ROLES[turn["from"]])
        body = turn["value"] + IM_END
        if turn["from"] == "gpt":
            spans.append((pos + len(head), pos + len(head) + len(body)))
        parts += [head, body, "\n"]
        pos += len(head) + len(body) + 1
    return "".join(parts), spans


def prompt(conversations: Sequence[Turn], system: str | None = SYSTEM_PROMPT) -> str:
    """Renders a conversation ending with a human turn, plus the ``<|im_start|>assistant\\n``
    generation prefix, for inference."""
    _validate(conversations, last="human")
    text = _system(system) + "".join(
        f"{_header(ROLES[t['from']])}{t['value']}{IM_END}\n" for t in conversations)
    return text + _header("assistant")


def with_token_placeholders(value: str, placeholders: Mapping[str, str]) -> str:
    """``value`` with the data's placeholders (``<image>``, ...) rewritten to the tokenizer's
    strings (``placeholders``: modality -> string, e.g. :data:`QWEN2VL_PLACEHOLDERS`)."""
    for modality, token in placeholders.items():
        value = value.replace(DATA_PLACEHOLDERS.get(modality, token), token)
    return value


def check_answers_text_only(conversations: Sequence[Turn],
                            markers: Iterable[str] = DATA_PLACEHOLDERS.values()) -> None:
    """Raises ValueError naming the first answer (gpt turn) that holds one of ``markers``."""
    markers = set(markers)
    for i, turn in enumerate(conversations):
        if turn["from"] == "gpt":
            found = sorted(m for m in markers if m in turn["value"])
            if found:
                raise ValueError(f"turn {i}: placeholder(s) {found} inside an answer; answers "
                                 "are text only")


def span_token_mask(offsets: np.ndarray, spans: Sequence[tuple[int, int]],
                    span_names: Sequence[str] | None = None) -> np.ndarray:
    """Which tokens lie inside one of the (sorted, disjoint) character ``spans``.

    offsets: (N, 2) [start, end) character range of each token. A token that overlaps a span
    but also covers text outside it (BPE merged template text with answer text) raises
    ValueError: labelling it would train on prompt text, dropping it would silently lose part
    of the answer. A zero-width token counts as covering the character at its start.
    ``span_names`` name the spans in that error (default "answer k").
    """
    n = len(offsets)
    if not spans or n == 0:
        return np.zeros(n, dtype=bool)
    starts = offsets[:, 0]
    ends = np.maximum(offsets[:, 1], starts + 1)
    span_arr = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    # The first span ending after each token's start is the only one it can overlap.
    k = np.searchsorted(span_arr[:, 1], starts, side="right")
    kc = np.minimum(k, len(span_arr) - 1)
    a, b = span_arr[kc, 0], span_arr[kc, 1]
    overlap = (k < len(span_arr)) & (ends > a)
    inside = overlap & (starts >= a) & (ends <= b)
    straddle = overlap & ~inside
    if straddle.any():
        t = int(np.flatnonzero(straddle)[0])
        name = span_names[kc[t]] if span_names is not None else f"answer {int(kc[t])}"
        raise ValueError(
            f"{name}: token {t} (characters {int(starts[t])}..{int(offsets[t, 1])}) crosses "
            f"the boundary of the answer (characters {int(a[t])}..{int(b[t])}); the "
            "tokenizer merges template and answer text (e.g. an answer starting with a "
            "newline), so the answer tokens cannot be labelled exactly")
    return inside


def placeholder_token_ids(tokenizer: PreTrainedTokenizerFast, placeholders: Mapping[str, str],
                          expected_ids: Mapping[str, int] | None = None) -> dict[str, int]:
    """Modality -> token id of its placeholder string, checking that the string tokenizes to
    exactly one token (and to ``expected_ids[modality]``, e.g. ``LyraConfig.placeholder_ids``,
    when given), since the model finds media by that single id."""
    ids: dict[str, int] = {}
    for modality, token in placeholders.items():
        encoded = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise ValueError(f"{modality} placeholder {token!r} tokenizes to {len(encoded)} "
                             f"tokens {encoded}; it must be one special token (add it to the "
                             "tokenizer)")
        ids[modality] = encoded[0]
        if expected_ids is not None and modality in expected_ids \
                and expected_ids[modality] != encoded[0]:
            raise ValueError(f"{modality} placeholder {token!r} is token {encoded[0]} in this "
                             f"tokenizer, but the model expects {expected_ids[modality]}")
    if len(set(ids.values())) != len(ids):
        raise ValueError(f"placeholder token ids must differ, got {ids}")
    return ids


def tokenize(
    conversations: Sequence[Turn],
    tokenizer: PreTrainedTokenizerFast,
    placeholders: Mapping[str, str],
    max_length: int | None = None,
    system: str | None = SYSTEM_PROMPT,
    expected_ids: Mapping[str, int] | None = None,
) -> Tokenized:
    """Renders and tokenizes a training conversation, labelling only the answers.

    placeholders: modality -> the tokenizer's placeholder token string (``TINY_PLACEHOLDERS``
        or ``QWEN2VL_PLACEHOLDERS``). The data's ``<image>``-style placeholders
        (``DATA_PLACEHOLDERS``) in human turns are rewritten to these strings first.
    max_length: limit on the token count (one token per media item; the model expands media
        later). A longer sample raises ValueError with its length and the limit: no silent
        truncation.
    expected_ids: optional modality -> id the model uses, checked against the tokenizer.
    """
    _validate(conversations, last="gpt")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("tokenize needs a fast tokenizer (offset mappings)")
    ids_of = placeholder_token_ids(tokenizer, placeholders, expected_ids)
    check_answers_text_only(conversations, set(placeholders.values()) | {
        DATA_PLACEHOLDERS[m] for m in placeholders if m in DATA_PLACEHOLDERS})
    turns = [{"from": t["from"], "value": t["value"] if t["from"] == "gpt"
              else with_token_placeholders(t["value"], placeholders)} for t in conversations]

    text, spans = render(turns, system)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = np.asarray(enc["input_ids"], dtype=np.int64)
    if max_length is not None and len(input_ids) > max_length:
        raise ValueError(f"sample has {len(input_ids)} tokens, more than max_length "
                         f"{max_length}")
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    gpt_turns = [f"turn {i}" for i, t in enumerate(turns) if t["from"] == "gpt"]
    inside = span_token_mask(offsets, spans, gpt_turns)

    counts = {m: int((input_ids == t).sum()) for m, t in ids_of.items()}
    for modality, token in placeholders.items():
        if counts[modality] != text.count(token):
            raise ValueError(f"{modality} placeholder {token!r} appears {text.count(token)} "
                             f"time(s) in the text but gives {counts[modality]} token(s)")
    labels = np.where(inside, input_ids, IGNORE)
    return Tokenized(input_ids=input_ids.tolist(), labels=labels.tolist(),
                     placeholder_counts=counts)
