"""`lyra-pl data convert`: official Lyra JSON -> webdataset shards (format in shards.py).

The input is a JSON list of samples in the official format (``id``, ``conversations``,
optional ``image``, ``video``, ``speech``, ``long_speech``, ``sound``, ``speech_asr``,
``tgt_unit``; any other field is kept under ``extra``). Every sample is checked before it is
written: roles, placeholder counts against the media given, media files present and decodable,
``tgt_unit`` parsable. A bad sample is skipped with a reason naming the field or file, an
unexpected error on one sample is recorded as failed, and the conversion goes on; nothing is
dropped or replaced silently. ``report.json`` and :meth:`ConvertReport.summary` list them all.

Audio is stored as 16 kHz mono PCM16 WAV; clips at other rates are resampled here, once, and
counted in the report. Images keep their original bytes; video frames are stored as JPEG.
"""
from __future__ import annotations

import argparse
import io
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import webdataset as wds
from tqdm import tqdm

from lyra_pl.data import media, shards
from lyra_pl.data.conversation import DATA_PLACEHOLDERS, _validate, check_answers_text_only

REPORT = "report.json"
# Fields of the official format; any other field goes to the json member's "extra".
MEDIA_FIELDS = ("image", "video", "speech", "long_speech", "sound")
KNOWN_FIELDS = frozenset(("id", "conversations", "speech_asr", "tgt_unit") + MEDIA_FIELDS)
_UNITS = re.compile(r"\s*(?:<\d+>\s*)+")

# "length" estimate (used only for length-grouped batching).
TEXT_CHARS_PER_TOKEN = 4
SPEECH_TOKENS_PER_SECOND = 10
IMAGE_PATCH = 28  # one token per 28x28 pixels (Qwen2-VL after 2x2 merging)
SOUND_TOKENS_PER_CLIP = 4


@dataclass
class ConvertReport:
    """What a conversion did. ``skipped``/``failed`` entries: ``{"index", "id", "reason"}``;
    ``resampled``: original sample rate -> number of clips resampled from it;
    ``shards``: the manifest's ``[{"url", "nsamples"}, ...]``."""

    converted: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    resampled: dict[int, int] = field(default_factory=dict)
    shards: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    total: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"converted {self.converted} of {self.total} sample(s) into "
                 f"{len(self.shards)} shard(s) in {self.seconds:.1f} s; "
                 f"skipped {len(self.skipped)}, failed {len(self.failed)}"]
        if self.resampled:
            rates = ", ".join(f"{n} from {rate} Hz" for rate, n in sorted(self.resampled.items()))
            lines.append(f"resampled to {media.SAMPLE_RATE} Hz: {rates}")
        for title, entries in (("skipped", self.skipped), ("failed", self.failed)):
            if entries:
                lines.append(f"{title}:")
                lines += [f"  [{e['index']}] id {e['id']!r}: {e['reason']}" for e in entries]
        return "\n".join(lines)


@dataclass
class _Sample:
    """One checked sample, ready to write: its key, members and the rates it resampled."""

    key: str
    members: dict[str, bytes]
    resampled_from: list[int]


# ----------------------------------------------------------------------------- checks
def _sample_id(sample: dict[str, Any]) -> str | int:
    sid = sample.get("id")
    if sid is None:
        raise ValueError("missing 'id'")
    if isinstance(sid, bool) or not isinstance(sid, (str, int)):
        raise ValueError(f"'id' must be a string or an integer, got {type(sid).__name__}")
    return sid


def _check_conversations(conversations: Any) -> list[dict[str, Any]]:
    """Roles alternate human, gpt, ... and end with gpt (conversation._validate); answers are
    text only. Returns the conversation."""
    if not conversations:
        raise ValueError("conversations: missing or empty")
    try:
        _validate(conversations, last="gpt")
        check_answers_text_only(conversations)
    except ValueError as e:
        raise ValueError(f"conversations: {e}") from None
    return list(conversations)


def _media_paths(sample: dict[str, Any], name: str) -> list[str]:
    """A media field (a path or a list of paths, possibly absent) as a list of paths."""
    value = sample.get(name)
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ValueError(f"{name}: expected a path or a list of paths, got "
                         f"{type(value).__name__}")
    for i, p in enumerate(items):
        if not isinstance(p, str) or not p:
            raise ValueError(f"{name}[{i}]: expected a non-empty path string, got {p!r}")
    return items


def _check_placeholders(conversations: list[dict[str, Any]], given: dict[str, int]) -> None:
    """The number of <image>/<video>/<speech>/<sound> in the human turns must equal the number
    of items of that modality."""
    for modality, token in DATA_PLACEHOLDERS.items():
        n = sum(t["value"].count(token) for t in conversations if t["from"] == "human")
        if n != given[modality]:
            raise ValueError(f"{modality}: {n} {token} placeholder(s) in the human turns but "
                             f"{given[modality]} {modality} item(s) given")


def _check_speech_asr(value: Any, n_speech: int) -> str | list[str] | None:
    """``speech_asr``: a transcript string, or one string per speech clip; stored as given."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        if len(value) != n_speech:
            raise ValueError(f"speech_asr: a list of {len(value)} transcript(s) for "
                             f"{n_speech} speech clip(s)")
        return value
    raise ValueError("speech_asr: expected a string or a list of strings, got "
                     f"{type(value).__name__}")


def parse_units(value: Any) -> list[int] | None:
    """``tgt_unit`` as written in the data (``"<12><873>..."``, or already a list of
    non-negative ints) -> list of ints; None stays None. Raises ValueError otherwise."""
    if value is None:
        return None
    if isinstance(value, str):
        if not _UNITS.fullmatch(value):
            shown = value if len(value) <= 40 else value[:40] + "..."
            raise ValueError(f"tgt_unit: malformed {shown!r}; expected units like "
                             "'<12><873>...'")
        return [int(u) for u in re.findall(r"<(\d+)>", value)]
    if isinstance(value, list) and value and all(
            isinstance(u, int) and not isinstance(u, bool) and u >= 0 for u in value):
        return list(value)
    raise ValueError(f"tgt_unit: malformed ({type(value).__name__}); expected a string of "
                     "units like '<12><873>...'")


# ----------------------------------------------------------------------------- media
def _read(path: Path, name: str) -> bytes:
    try:
        data = media.read_bytes(path)
    except media.MediaError as e:
        raise media.MediaError(f"{name}: {e}") from None
    if not data:
        raise media.MediaError(f"{name}: {path}: empty file")
    return data


def _load_audio(path: Path, name: str) -> tuple[bytes, float, int]:
    """-> (16 kHz WAV bytes, seconds, original sample rate)."""
    data = _read(path, name)
    try:
        x, rate = media.decode_audio(data, str(path))
    except media.MediaError as e:
        raise media.MediaError(f"{name}: {e}") from None
    x = media.resample(x, rate)
    return media.encode_wav(x), len(x) / media.SAMPLE_RATE, rate


def _image_tokens(data: bytes) -> float:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
    return w * h / IMAGE_PATCH**2


def _load_image(path: Path, name: str) -> tuple[bytes, str, float]:
    """-> (original bytes, extension, token estimate)."""
    data = _read(path, name)
    try:
        ext = media.check_image(data, str(path))
    except media.MediaError as e:
        raise media.MediaError(f"{name}: {e}") from None
    return data, ext, _image_tokens(data)


def _to_jpeg(data: bytes, ext: str) -> bytes:
    if ext == "jpg":  # already JPEG: keep the bytes (no second lossy encoding)
        return data
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _load_video(path: Path, name: str) -> tuple[list[bytes], float]:
    """A directory of frames -> (JPEG bytes per frame, token estimate)."""
    try:
        frame_paths = media.video_frame_paths(path)
    except media.MediaError as e:
        raise media.MediaError(f"{name}: {e}") from None
    frames, tokens = [], 0.0
    for f in frame_paths:
        data, ext, t = _load_image(f, name)
        frames.append(_to_jpeg(data, ext))
        tokens += t / 2
    return frames, tokens


def _resolve(path: str, root: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else root / p


# ----------------------------------------------------------------------------- one sample
def build_sample(sample: Any, root: Path, used_keys: Mapping[str, int] | None = None
                 ) -> _Sample:
    """Checks one sample of the official format and builds its shard members. Raises
    ValueError (MediaError included) naming the field or file when the sample is unusable.
    ``used_keys``: keys already written -> their sample's index (duplicates are refused before
    any media is read)."""
    if not isinstance(sample, dict):
        raise ValueError(f"not a JSON object (got {type(sample).__name__})")
    sid = _sample_id(sample)
    key = shards.sample_key(sid)
    if used_keys and key in used_keys:
        raise ValueError(f"duplicate id/key: id {sid!r} gives key {key!r}, already used by "
                         f"sample [{used_keys[key]}]")
    conversations = _check_conversations(sample.get("conversations"))
    paths = {name: _media_paths(sample, name) for name in MEDIA_FIELDS}
    speech = [("speech", p) for p in paths["speech"]] + \
             [("long_speech", p) for p in paths["long_speech"]]
    _check_placeholders(conversations, {"image": len(paths["image"]),
                                        "video": len(paths["video"]),
                                        "speech": len(speech), "sound": len(paths["sound"])})
    speech_asr = _check_speech_asr(sample.get("speech_asr"), len(speech))
    tgt_unit = parse_units(sample.get("tgt_unit"))

    members: dict[str, bytes] = {}
    rates: list[int] = []
    tokens = float(sum(len(t["value"]) for t in conversations) // TEXT_CHARS_PER_TOKEN)
    audio_seconds = 0.0
    for i, (name, p) in enumerate(speech):
        wav, seconds, rate = _load_audio(_resolve(p, root), f"{name} {p!r}")
        members[f"speech{i}.wav"] = wav
        audio_seconds += seconds
        tokens += SPEECH_TOKENS_PER_SECOND * seconds
        rates.append(rate)
    for i, p in enumerate(paths["sound"]):
        wav, seconds, rate = _load_audio(_resolve(p, root), f"sound {p!r}")
        members[f"sound{i}.wav"] = wav
        audio_seconds += seconds
        tokens += SOUND_TOKENS_PER_CLIP
        rates.append(rate)
    for i, p in enumerate(paths["image"]):
        data, ext, t = _load_image(_resolve(p, root), f"image {p!r}")
        members[f"image{i}.{ext}"] = data
        tokens += t
    frames_per_video = []
    for i, p in enumerate(paths["video"]):
        frames, t = _load_video(_resolve(p, root), f"video {p!r}")
        members.update({f"video{i}.{f:04d}.jpg": b for f, b in enumerate(frames)})
        frames_per_video.append(len(frames))
        tokens += t

    record = {
        "id": sid,
        "conversations": conversations,
        "speech_asr": speech_asr,
        "tgt_unit": tgt_unit,
        "media": {"image": len(paths["image"]), "video": frames_per_video,
                  "speech": len(speech), "sound": len(paths["sound"])},
        "audio_seconds": audio_seconds,
        "length": int(round(tokens)),
        "extra": {k: v for k, v in sample.items() if k not in KNOWN_FIELDS},
    }
    members["json"] = json.dumps(record, ensure_ascii=False).encode("utf-8")
    return _Sample(key, members, [r for r in rates if r != media.SAMPLE_RATE])


# ----------------------------------------------------------------------------- writing
class _ShardSink:
    """Writes samples into ``{prefix}-%06d.tar`` shards of at most ``per_shard`` samples,
    opening a shard only when a sample goes into it, and records each shard's count."""

    def __init__(self, out_dir: Path, prefix: str, per_shard: int):
        self.out_dir, self.prefix, self.per_shard = out_dir, prefix, per_shard
        self.shards: list[dict[str, Any]] = []
        self._writer: wds.TarWriter | None = None

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if self._writer is None or self.shards[-1]["nsamples"] >= self.per_shard:
            self.close()
            url = f"{self.prefix}-{len(self.shards):06d}.tar"
            # PAX: member names past ustar's 100 characters (long ids); mtime 0: reproducible.
            self._writer = wds.TarWriter(str(self.out_dir / url), encoder=False, mtime=0,
                                         format="PAX_FORMAT")
            self.shards.append({"url": url, "nsamples": 0})
        self._writer.write({"__key__": key, **members})
        self.shards[-1]["nsamples"] += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _shard_files(out_dir: Path, prefix: str) -> list[Path]:
    return sorted(out_dir.glob(f"{_glob_escape(prefix)}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _prepare_out_dir(out_dir: Path, prefix: str, overwrite: bool) -> None:
    """Refuses to write over an earlier conversion unless ``overwrite``; then removes its
    manifest, report and shards (those it lists and those named like ours)."""
    manifest = out_dir / shards.MANIFEST
    ours = _shard_files(out_dir, prefix) if out_dir.is_dir() else []
    if not manifest.exists() and not ours:
        out_dir.mkdir(parents=True, exist_ok=True)
        return
    if not overwrite:
        found = shards.MANIFEST if manifest.exists() else f"{len(ours)} {prefix}-*.tar shard(s)"
        raise FileExistsError(f"{out_dir} already holds a converted dataset ({found}); pass "
                              "overwrite=True (--overwrite) to replace it, or choose another "
                              "directory")
    listed: list[Path] = []
    try:
        listed = [out_dir / s["url"] for s in json.loads(manifest.read_text())["shards"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # an unreadable old manifest: remove it and the shards named like ours
    root = out_dir.resolve()
    for p in {*listed, *ours, manifest, out_dir / REPORT}:
        if p.resolve().parent == root and p.is_file():  # never outside out_dir
            p.unlink()


def _load_samples(json_path: Path) -> list[Any]:
    if not json_path.is_file():
        raise FileNotFoundError(f"{json_path}: input JSON not found")
    try:
        samples = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{json_path}: not valid JSON ({e})") from None
    if not isinstance(samples, list):
        raise ValueError(f"{json_path}: expected a JSON list of samples at the top level, got "
                         f"{type(samples).__name__}")
    return samples


def _entry(index: int, sample: Any, reason: str) -> dict[str, Any]:
    sid = sample.get("id") if isinstance(sample, dict) else None
    ok = isinstance(sid, (str, int)) and not isinstance(sid, bool)
    return {"index": index, "id": sid if ok else f"#{index}", "reason": reason}


def convert(json_path: str | Path, out_dir: str | Path, media_root: str | Path | None = None,
            samples_per_shard: int = 256, shard_prefix: str = "shard", progress: bool = True,
            overwrite: bool = False) -> ConvertReport:
    """Converts an official Lyra JSON file into shards + ``manifest.json`` + ``report.json``
    in ``out_dir``. Relative media paths resolve against ``media_root`` (default: the JSON
    file's directory). Returns the report (also written as ``out_dir/report.json``)."""
    start = time.perf_counter()
    json_path, out_dir = Path(json_path), Path(out_dir)
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if not shard_prefix or "/" in shard_prefix:
        raise ValueError(f"shard_prefix must be a non-empty file name part, got {shard_prefix!r}")
    root = Path(media_root) if media_root is not None else json_path.parent
    samples = _load_samples(json_path)
    _prepare_out_dir(out_dir, shard_prefix, overwrite)

    report = ConvertReport(total=len(samples))
    keys: dict[str, int] = {}  # key -> index of the converted sample that holds it
    sink = _ShardSink(out_dir, shard_prefix, samples_per_shard)
    try:
        for index, sample in enumerate(tqdm(samples, desc="convert", unit="sample",
                                            disable=not progress)):
            try:
                built = build_sample(sample, root, keys)
            except ValueError as e:  # MediaError included: a bad sample, reported by name
                report.skipped.append(_entry(index, sample, str(e)))
                continue
            except Exception as e:  # anything else: recorded, and the conversion goes on
                report.failed.append(_entry(index, sample, f"{type(e).__name__}: {e}"))
                continue
            sink.write(built.key, built.members)  # write errors (disk full) stop the run
            keys[built.key] = index
            report.converted += 1
            for rate in built.resampled_from:
                report.resampled[rate] = report.resampled.get(rate, 0) + 1
    finally:
        sink.close()

    report.shards = sink.shards
    report.seconds = round(time.perf_counter() - start, 3)
    counts = {"converted": report.converted, "skipped": len(report.skipped),
              "failed": len(report.failed), "resampled": report.resampled}
    shards.write_manifest(out_dir, report.shards, source=str(json_path),
                          source_sha256=shards.file_sha256(json_path), report=counts)
    (out_dir / REPORT).write_text(json.dumps(report.to_dict(), indent=1, ensure_ascii=False))
    return report


# ----------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """``lyra-pl data convert INPUT.json --out DIR ...``: 0 when at least one sample was
    converted (some may have been skipped: see the summary), 1 otherwise."""
    parser = argparse.ArgumentParser(
        prog="lyra-pl data convert",
        description="Convert an official Lyra JSON file into webdataset shards.")
    parser.add_argument("input", type=Path, help="JSON list of samples (official Lyra format)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--media-root", type=Path, default=None,
                        help="directory relative media paths resolve against "
                             "(default: the JSON file's directory)")
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument("--prefix", default="shard", help="shard file name prefix")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier conversion in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        report = convert(args.input, args.out, media_root=args.media_root,
                         samples_per_shard=args.samples_per_shard, shard_prefix=args.prefix,
                         progress=not args.no_progress, overwrite=args.overwrite)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    print(f"wrote {args.out / shards.MANIFEST} and {args.out / REPORT}")
    return 0 if report.converted > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
