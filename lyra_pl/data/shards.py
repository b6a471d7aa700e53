"""The shard format: what `lyra-pl data convert` writes and the data module reads.

A dataset is a directory of webdataset tar shards plus ``manifest.json``::

    {"format": "lyra_pl-shards/1",
     "shards": [{"url": "shard-000000.tar", "nsamples": 512}, ...]}

The manifest's sample counts let every rank and worker know, before reading anything, how many
batches it will produce, which keeps ranks in step and makes positions resumable.

One sample = the members sharing its key (the sample's ``id`` with unsafe characters replaced):

- ``json``: ``{"id", "conversations", "speech_asr" (str|null), "tgt_unit" ([int]|null),
  "media": {"image": n, "video": [frames per video], "speech": n, "sound": n},
  "audio_seconds": float, "length": int}``. ``length`` is an estimate of the sample's
  token count (text characters / 4 + media tokens) used only for length-grouped batching.
- ``image{i}.{png,jpg,...}``: the i-th image, its original encoded bytes (verified decodable).
- ``video{i}.{f:04d}.jpg``: frame f of the i-th video.
- ``speech{i}.wav`` / ``sound{i}.wav``: 16 kHz mono PCM16 WAV (``long_speech`` is a speech clip).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

FORMAT = "lyra_pl-shards/1"
MANIFEST = "manifest.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def sample_key(sample_id: Any) -> str:
    """A webdataset key for an id: dots would split the key from the extension, slashes make
    paths, so every character outside [A-Za-z0-9_-] becomes '_'."""
    key = _UNSAFE.sub("_", str(sample_id))
    if not key:
        raise ValueError(f"sample id {sample_id!r} gives an empty key")
    return key


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def manifest_source_sha256(directory: str | Path) -> str | None:
    """The hash of the JSON a dataset was converted from (None: unknown or no manifest)."""
    path = Path(directory) / MANIFEST
    try:
        return json.loads(path.read_text()).get("source_sha256")
    except (OSError, json.JSONDecodeError):
        return None


def write_manifest(directory: str | Path, shards: list[dict[str, Any]], **extra: Any) -> Path:
    path = Path(directory) / MANIFEST
    path.write_text(json.dumps({"format": FORMAT, "shards": shards, **extra}, indent=1))
    return path


def read_manifest(directory: str | Path) -> list[tuple[str, int]]:
    """``[(shard path, nsamples), ...]`` of a converted dataset directory, checked."""
    d = Path(directory)
    path = d / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{d}: no {MANIFEST}; is this a directory written by "
                                "`lyra-pl data convert`?")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}")
    out = []
    for i, shard in enumerate(data.get("shards", [])):
        url, n = shard.get("url"), shard.get("nsamples")
        if not isinstance(url, str) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{path}: shard entry {i} needs 'url' (str) and 'nsamples' (int >= 0)")
        full = d / url
        if not full.is_file():
            raise FileNotFoundError(f"{path}: shard {full} is listed but missing")
        out.append((str(full), n))
    if not out:
        raise ValueError(f"{path}: lists no shards")
    return out
