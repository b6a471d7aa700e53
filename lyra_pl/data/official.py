"""The official Lyra data format, as the released files write it, and one sample -> its shard
members (used by :mod:`lyra_pl.data.convert`).

A sample: ``id``, ``conversations`` (``{"from": "human"|"gpt", "value"}`` turns), optional
``image``, ``video``, ``speech``, ``long_speech``, ``sound`` (a path or a list of paths),
``speech_asr`` (the transcript LCMR uses), ``tgt_unit`` (speech units). What the official
code and its preparation scripts actually read and write, which this accepts unchanged:

- **Two media roots**: ``image`` and ``video`` paths are relative to ``--image_folder``;
  ``speech`` and ``long_speech`` (and ``sound``) to ``--speech_folder`` (:class:`MediaRoots`).
- **Video samples use ``<image>``** as their placeholder (the official code has no
  ``<video>`` token): a sample with videos, no images and no ``<video>`` in its text has its
  ``<image>`` placeholders read as ``<video>``. A video is a video file, a folder of frames,
  or one image holding a 4x4 grid of frames (:func:`lyra_pl.data.media.load_video`).
- **``tgt_unit``** as ``text2unit.py`` writes it: ``<sosp><12><873>...<eosp>`` (the markers
  carry no unit), or plain ``<12><873>...``, or a list of ints.
- **ASR lines** ``{"audio": path, "text": transcript}`` (the official LibriSpeech
  preparation; NeMo's ``audio_filepath`` too), without ``conversations``: an ASR sample with
  :data:`ASR_PROMPT`, its transcript also its ``speech_asr``.
- A speech or sound path may be a video file: its audio track is used.

Strict about keys: an unknown key that looks like media (``audio``, ``images``, ``wav`` ...)
is an error naming it and the known ones; other unknown keys are kept under ``extra`` and
counted in the report. Every problem raises :class:`InvalidSample` or
:class:`~lyra_pl.data.media.MediaError` naming the field or file.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from lyra_pl.data import media, shards
from lyra_pl.data.conversation import DATA_PLACEHOLDERS, _validate, check_answers_text_only

MEDIA_FIELDS = ("image", "video", "speech", "long_speech", "sound")
KNOWN_FIELDS = frozenset(("id", "conversations", "speech_asr", "tgt_unit") + MEDIA_FIELDS)
ASR_PROMPT = "Transcribe the speech."
ASR_AUDIO_KEYS = ("audio", "audio_filepath")  # the official LibriSpeech JSONL; NeMo manifests
# An unknown key holding a path with a media suffix, or a path under a name with one of these
# words, is a misspelled media field: converting without it would silently drop the media.
_MEDIA_WORDS = re.compile(r"audio|image|img|video|speech|sound|wav|voice|frame|picture|photo|"
                          r"clip|mp3|flac|movie", re.I)
_MEDIA_SUFFIX = re.compile(r"\.(wav|flac|mp3|ogg|opus|m4a|aac|webm|mp4|mov|mkv|avi|png|jpe?g|"
                           r"webp|bmp|gif)$", re.I)
_PATH_LIKE = re.compile(r"[/\\]|\.\w{2,4}$")
_UNITS = re.compile(r"\s*(?:<sosp>)?\s*((?:<\d+>\s*)+)(?:<eosp>)?\s*")

# The "length" estimate (only for length-grouped batching).
TEXT_CHARS_PER_TOKEN = 4
SPEECH_TOKENS_PER_SECOND = 10
IMAGE_PATCH = 28  # one token per 28x28 pixels (Qwen2-VL after 2x2 merging)
SOUND_TOKENS_PER_CLIP = 4


class InvalidSample(ValueError):
    """A sample (or input line) that cannot be converted; the message says why."""


class InputError(ValueError):
    """The input as a whole (a file, an argument) is unusable; the message says why."""


@dataclass(frozen=True)
class MediaRoots:
    """Where relative media paths of each field resolve (the official two roots)."""

    image: Path
    video: Path
    speech: Path

    @classmethod
    def of(cls, root: Path, image: Path | str | None = None, video: Path | str | None = None,
           speech: Path | str | None = None) -> "MediaRoots":
        image_root = Path(image) if image is not None else root
        # The official code reads videos from --image_folder too.
        video_root = Path(video) if video is not None else image_root
        return cls(image_root, video_root, Path(speech) if speech is not None else root)

    def resolve(self, field: str, path: str) -> Path:
        p = Path(path)
        if p.is_absolute():
            return p
        root = {"image": self.image, "video": self.video}.get(field, self.speech)
        return root / p

    def to_dict(self) -> dict[str, str]:
        return {k: str(Path(v).resolve()) for k, v in vars(self).items()}


@dataclass
class Built:
    """One checked sample, ready to write."""

    key: str
    members: dict[str, bytes | bytearray]
    resampled_from: list[int]
    unknown_keys: list[str]


# ----------------------------------------------------------------------------- input
def iter_samples(path: Path) -> Iterator[tuple[int, Any]]:
    """(index, sample) from a JSON array or JSON lines file, streamed: memory holds one
    sample's text, not the file. A JSON line that does not parse comes as an
    :class:`InvalidSample` in the sample's place (that line is skipped, the rest go on); a
    broken JSON array stops the run (:class:`InputError` naming the file and position)."""
    with open(path, encoding="utf-8") as f:
        head = _peek(f)
        if head == "[":
            yield from enumerate(_array_items(f, path))
        elif head == "{":
            yield from enumerate(_lines(f, path))
        elif head == "":
            raise InputError(f"{path}: empty input")
        else:
            raise InputError(f"{path}: expected a JSON list of samples or JSON lines (one "
                             f"object a line), found {head!r} at the start")


def _peek(f) -> str:
    while True:
        pos = f.tell()
        c = f.read(1)
        if not c or not c.isspace():
            f.seek(pos)
            return c


def _lines(f, path: Path) -> Iterator[Any]:
    for n, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            yield InvalidSample(f"{path.name} line {n}: invalid JSON ({e})")


def _array_items(f, path: Path, block: int = 1 << 16) -> Iterator[Any]:
    """The items of a top-level JSON array, decoded one at a time from a growing buffer."""
    decoder = json.JSONDecoder()
    buf, pos, offset = f.read(block), 0, 0
    pos = buf.index("[") + 1
    expect_item, first = True, True
    while True:
        while True:  # skip whitespace and the separating comma
            while pos < len(buf) and buf[pos].isspace():
                pos += 1
            if pos == len(buf):
                more = f.read(block)
                if not more:
                    raise InputError(f"{path}: not valid JSON (the list is not closed)")
                offset += pos
                buf, pos = buf[pos:] + more, 0
                continue
            break
        c = buf[pos]
        if c == "]" and (first or not expect_item):
            return
        if not expect_item:
            if c != ",":
                raise InputError(f"{path}: not valid JSON (expected ',' or ']' at character "
                                 f"{offset + pos})")
            pos, expect_item = pos + 1, True
            continue
        while True:
            try:
                item, end = decoder.raw_decode(buf, pos)
                break
            except json.JSONDecodeError as e:
                more = f.read(block)
                if not more:
                    raise InputError(f"{path}: not valid JSON ({e.msg} at character "
                                     f"{offset + e.pos})") from None
                offset += pos
                buf, pos = buf[pos:] + more, 0
        yield item
        pos, expect_item, first = end, False, False


def sample_key_of(sample: Any) -> str | None:
    """The shard key a sample's id gives (None: no usable id; building it says why)."""
    if not isinstance(sample, dict):
        return None
    sid = sample.get("id")
    asr = _asr_fields(sample) if "conversations" not in sample else None
    if sid is None and asr and isinstance(asr[0], str) and asr[0]:
        sid = asr_id(asr[0])
    if isinstance(sid, bool) or not isinstance(sid, (str, int)):
        return None
    try:
        return shards.sample_key(sid)
    except ValueError:
        return None


# ----------------------------------------------------------------------------- ASR lines
def asr_sample(key: str, audio: str, text: str, prompt: str = ASR_PROMPT) -> dict[str, Any]:
    """An ASR pair as an official sample: ``<speech>`` and the prompt; the transcript is the
    answer and ``speech_asr``."""
    return {"id": key, "speech": audio, "speech_asr": text,
            "conversations": [{"from": "human", "value": f"<speech>\n{prompt}"},
                              {"from": "gpt", "value": text}]}


def _asr_fields(sample: dict[str, Any]) -> tuple[Any, Any] | None:
    for key in ASR_AUDIO_KEYS:
        if key in sample and "text" in sample:
            return sample[key], sample["text"]
    return None


def asr_id(audio: str) -> str:
    """The id of an ASR line without one: its audio path, not just the stem (two speakers'
    folders may hold equally named files)."""
    return str(Path(audio).with_suffix("")).replace("/", "_")


def from_asr_line(sample: dict[str, Any]) -> dict[str, Any]:
    """``{"audio", "text"}`` (or ``audio_filepath``) -> an official ASR sample."""
    audio, text = _asr_fields(sample)
    if not isinstance(audio, str) or not audio:
        raise InvalidSample(f"audio: expected a path string, got {audio!r}")
    if not isinstance(text, str) or not text.strip():
        raise InvalidSample("text: missing or empty transcript")
    extra = {k: v for k, v in sample.items() if k not in (*ASR_AUDIO_KEYS, "text", "id")}
    return {**asr_sample(sample.get("id", asr_id(audio)), audio, text), **extra}


# ----------------------------------------------------------------------------- checks
def _sample_id(sample: dict[str, Any]) -> str | int:
    sid = sample.get("id")
    if sid is None:
        raise InvalidSample("missing 'id'")
    if isinstance(sid, bool) or not isinstance(sid, (str, int)):
        raise InvalidSample(f"'id' must be a string or an integer, got {type(sid).__name__}")
    return sid


def _check_keys(sample: dict[str, Any]) -> list[str]:
    """Unknown keys; one that looks like a media field is an error: a path with a media
    suffix, or a path-like string under a media-like name (``audio``, ``images``, ...)."""
    unknown = sorted(k for k in sample if k not in KNOWN_FIELDS)
    for k in unknown:
        value = sample[k]
        paths = [v.strip() for v in (value if isinstance(value, list) else [value])
                 if isinstance(v, str)]
        if any(_MEDIA_SUFFIX.search(v) for v in paths) or (
                _MEDIA_WORDS.search(k) and any(_PATH_LIKE.search(v) for v in paths)):
            raise InvalidSample(f"unknown key {k!r} looks like media; the media keys are "
                                f"{', '.join(MEDIA_FIELDS)} (rename it, or the media would be "
                                "dropped)")
    return unknown


def _check_conversations(conversations: Any) -> list[dict[str, Any]]:
    if not conversations:
        raise InvalidSample("conversations: missing or empty")
    try:
        _validate(conversations, last="gpt")
        check_answers_text_only(conversations)
    except ValueError as e:
        raise InvalidSample(f"conversations: {e}") from None
    return [dict(t) for t in conversations]


def _media_paths(sample: dict[str, Any], name: str) -> list[str]:
    value = sample.get(name)
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise InvalidSample(f"{name}: expected a path or a list of paths, got "
                            f"{type(value).__name__}")
    for i, p in enumerate(items):
        if not isinstance(p, str) or not p:
            raise InvalidSample(f"{name}[{i}]: expected a non-empty path string, got {p!r}")
    return items


def _count(conversations: list[dict[str, Any]], token: str) -> int:
    return sum(t["value"].count(token) for t in conversations if t["from"] == "human")


def _video_placeholders(conversations: list[dict[str, Any]], n_image: int, n_video: int
                        ) -> None:
    """The official video samples' ``<image>`` placeholders become ``<video>`` (in place)."""
    image, video = DATA_PLACEHOLDERS["image"], DATA_PLACEHOLDERS["video"]
    if not n_video or _count(conversations, video):
        return
    if n_image:
        raise InvalidSample(f"video: {n_video} video(s) and {n_image} image(s) but no {video} "
                            f"placeholder: which {image} is a video is ambiguous; write "
                            f"{video} for the videos")
    for t in conversations:
        if t["from"] == "human":
            t["value"] = t["value"].replace(image, video)


def _check_placeholders(conversations: list[dict[str, Any]], given: dict[str, int]) -> None:
    """Each modality's placeholders in the human turns must number its items: media without
    a placeholder would be silently dropped."""
    for modality, token in DATA_PLACEHOLDERS.items():
        n = _count(conversations, token)
        if n != given[modality]:
            raise InvalidSample(f"{modality}: {n} {token} placeholder(s) in the human turns but "
                                f"{given[modality]} {modality} item(s) given")


def _check_speech_asr(value: Any, n_speech: int) -> str | list[str] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        if len(value) != n_speech:
            raise InvalidSample(f"speech_asr: a list of {len(value)} transcript(s) for "
                                f"{n_speech} speech clip(s)")
        return value
    raise InvalidSample("speech_asr: expected a string or a list of strings, got "
                        f"{type(value).__name__}")


def parse_units(value: Any) -> list[int] | None:
    """``tgt_unit`` (``"<sosp><12><873>...<eosp>"``, ``"<12><873>..."`` or a list of
    non-negative ints) -> list of ints; None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        m = _UNITS.fullmatch(value)
        if not m:
            shown = value if len(value) <= 40 else value[:40] + "..."
            raise InvalidSample(f"tgt_unit: malformed {shown!r}; expected units like "
                                "'<sosp><12><873>...<eosp>'")
        return [int(u) for u in re.findall(r"<(\d+)>", m.group(1))]
    if isinstance(value, list) and value and all(
            isinstance(u, int) and not isinstance(u, bool) and u >= 0 for u in value):
        return list(value)
    raise InvalidSample(f"tgt_unit: malformed ({type(value).__name__}); expected a string of "
                        "units like '<sosp><12><873>...<eosp>'")


# ----------------------------------------------------------------------------- media
def _named(name: str, fn, *args):
    try:
        return fn(*args)
    except media.MediaError as e:
        raise media.MediaError(f"{name}: {e}") from None


def _image(path: Path, name: str) -> tuple[bytes, str, float]:
    """-> (original bytes, extension, token estimate)."""
    data = _named(name, media.read_bytes, path)
    if not data:
        raise media.MediaError(f"{name}: {path}: empty file")
    ext, w, h = _named(name, media.check_image, data, str(path))
    return data, ext, w * h / IMAGE_PATCH**2


# ----------------------------------------------------------------------------- one sample
def build_sample(sample: Any, roots: MediaRoots,
                 video_options: media.VideoOptions = media.VideoOptions()) -> Built:
    """Checks one official sample and builds its shard members (format in shards.py)."""
    if not isinstance(sample, dict):
        raise InvalidSample(f"not a JSON object (got {type(sample).__name__})")
    if "conversations" not in sample and _asr_fields(sample):
        sample = from_asr_line(sample)
    sid = _sample_id(sample)
    try:
        key = shards.sample_key(sid)
    except ValueError as e:
        raise InvalidSample(str(e)) from None
    unknown = _check_keys(sample)
    conversations = _check_conversations(sample.get("conversations"))
    paths = {name: _media_paths(sample, name) for name in MEDIA_FIELDS}
    _video_placeholders(conversations, len(paths["image"]), len(paths["video"]))
    speech = [("speech", p) for p in paths["speech"]] + \
             [("long_speech", p) for p in paths["long_speech"]]
    _check_placeholders(conversations, {"image": len(paths["image"]),
                                        "video": len(paths["video"]),
                                        "speech": len(speech), "sound": len(paths["sound"])})
    speech_asr = _check_speech_asr(sample.get("speech_asr"), len(speech))
    tgt_unit = parse_units(sample.get("tgt_unit"))

    members: dict[str, bytes | bytearray] = {}
    rates: list[int] = []
    tokens = float(sum(len(t["value"]) for t in conversations) // TEXT_CHARS_PER_TOKEN)
    audio_seconds = 0.0
    clips = [(f"speech{i}.wav", name, p) for i, (name, p) in enumerate(speech)] + \
            [(f"sound{i}.wav", "sound", p) for i, p in enumerate(paths["sound"])]
    for member, name, p in clips:
        path = roots.resolve(name, p)
        wav, info = _named(f"{name} {p!r}", media.audio_to_wav, path)
        seconds = (len(wav) - 44) / 2 / media.SAMPLE_RATE
        members[member] = wav
        audio_seconds += seconds
        tokens += SOUND_TOKENS_PER_CLIP if name == "sound" else SPEECH_TOKENS_PER_SECOND * seconds
        rates.append(info.source_rate)
    for i, p in enumerate(paths["image"]):
        data, ext, t = _image(roots.resolve("image", p), f"image {p!r}")
        members[f"image{i}.{ext}"] = data
        tokens += t
    frames_per_video = []
    for i, p in enumerate(paths["video"]):
        frames = _named(f"video {p!r}", media.load_video, roots.resolve("video", p),
                        video_options)
        members.update({f"video{i}.{f:04d}.jpg": b for f, (b, _, _) in enumerate(frames)})
        frames_per_video.append(len(frames))
        tokens += sum(w * h for _, w, h in frames) / IMAGE_PATCH**2 / 2

    record = {
        "id": sid,
        "conversations": conversations,
        "speech_asr": speech_asr,
        "tgt_unit": tgt_unit,
        "media": {"image": len(paths["image"]), "video": frames_per_video,
                  "speech": len(speech), "sound": len(paths["sound"])},
        "audio_seconds": audio_seconds,
        "length": int(round(tokens)),
        "extra": {k: sample[k] for k in unknown},
    }
    members["json"] = json.dumps(record, ensure_ascii=False).encode("utf-8")
    return Built(key, members, [r for r in rates if r != media.SAMPLE_RATE], unknown)
