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

A dataset may also be a URL of such a folder (``https://host/ds``, ``s3://bucket/ds``,
``pipe:...``): its manifest is ``<url>/manifest.json`` and its shards ``<url>/<name>``, read by
:func:`open_url`.
"""
from __future__ import annotations

import hashlib
import json
import re
import urllib.request
from pathlib import Path
from typing import IO, Any

FORMAT = "lyra_pl-shards/1"
MANIFEST = "manifest.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
MANIFEST_TIMEOUT = 20.0  # seconds, for reading a manifest over http(s)


def is_url(path: str | Path) -> bool:
    """Whether ``path`` names a remote resource (``scheme://...`` or ``pipe:command``)."""
    s = str(path)
    return s.startswith("pipe:") or _SCHEME.match(s) is not None


def open_url(url: str, timeout: float | None = None) -> IO[bytes]:
    """A binary stream of ``url``: webdataset's ``gopen`` for the schemes it knows (http(s) and
    sftp through curl, gs through gsutil, ``pipe:``, ...), ``fsspec`` for the others (s3://,
    az://, memory://, ..., each with its backend package).

    ``timeout``: read http(s) with urllib and this timeout instead of curl, which gopen runs
    with ``--retry 30 --retry-delay 2``: right for a large shard on a flaky link, but a minute
    of waiting to report a mistyped manifest URL or a server that is down.
    """
    from webdataset.gopen import gopen, gopen_schemes

    scheme = _scheme(url)
    if timeout is not None and scheme in ("http", "https"):
        return urllib.request.urlopen(url, timeout=timeout)
    if scheme in gopen_schemes or scheme == "file":
        return gopen(url, "rb")
    return _fsspec(url).open(url, "rb").open()


def _scheme(url: str) -> str:
    return "pipe" if url.startswith("pipe:") else url.split("://", 1)[0].lower()


def _fsspec(url: str):
    """fsspec, checked to read ``url``'s scheme; its error otherwise, as one line naming it."""
    import fsspec

    try:  # an unknown scheme (ValueError) or a backend such as s3fs not installed (ImportError)
        fsspec.get_filesystem_class(_scheme(url))
    except (ImportError, ValueError) as e:
        raise type(e)(f"{url}: {' '.join(str(e).split())}") from None
    return fsspec


def cached_file(url: str, cache_dir: str | Path) -> str:
    """A local copy of the shard at ``url`` in ``cache_dir``, downloaded on first use: through
    webdataset's ``FileCache`` for gopen's schemes, fsspec's ``filecache`` for the others.
    Keyed by URL alone: a dataset re-converted under the same URL needs a fresh cache."""
    from webdataset.cache import FileCache
    from webdataset.gopen import gopen_schemes

    if _scheme(url) in gopen_schemes:
        return FileCache(str(cache_dir), url_to_name=_cache_name).get_file(url)
    return _fsspec(url).open_local(f"filecache::{url}",
                                   filecache={"cache_storage": str(cache_dir)})


def _cache_name(url: str) -> str:
    """The shard's own name behind a hash of its URL: equally named shards of different
    datasets must not share a cache file (webdataset's default name is the last part alone)."""
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", url.rstrip("/").rsplit("/", 1)[-1])
    return f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}"


def sample_key(sample_id: Any) -> str:
    """A webdataset key for an id: dots would split the key from the extension, slashes make
    paths, so every character outside [A-Za-z0-9_-] becomes '_'."""
    key = _UNSAFE.sub("_", str(sample_id))
    if not key:
        raise ValueError(f"sample id {sample_id!r} gives an empty key")
    return key


def file_sha256(path: str | Path) -> str:
    """A file's hash, read in blocks (a released JSON is gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def _read_remote(url: str) -> bytes:
    try:
        with open_url(url, timeout=MANIFEST_TIMEOUT) as f:
            return f.read()
    except (ImportError, ValueError):
        raise  # open_url's: the scheme cannot be read here at all
    except Exception as e:  # 404, refused, no such key, failed pipe, ...: all say "not there"
        msg = " ".join(str(e).split())  # one line, whatever the backend's message
        raise FileNotFoundError(f"{url}: cannot read it ({type(e).__name__}: {msg}); is its "
                                "folder a dataset written by `lyra-pl data convert`?") from None


def read_manifest(directory: str | Path) -> list[tuple[str, int]]:
    """``[(shard path or URL, nsamples), ...]`` of a converted dataset directory, checked, or
    of a dataset folder URL (whose shards are not checked: that would cost a request each)."""
    remote = is_url(directory)
    if remote:
        base = str(directory).rstrip("/")
        path: str | Path = f"{base}/{MANIFEST}"
        text = _read_remote(path)
    else:
        d = Path(directory)
        path = d / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{d}: no {MANIFEST}; is this a directory written by "
                                    "`lyra-pl data convert`?")
        text = path.read_bytes()
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}")
    out = []
    for i, shard in enumerate(data.get("shards", [])):
        url, n = shard.get("url"), shard.get("nsamples")
        if not isinstance(url, str) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{path}: shard entry {i} needs 'url' (str) and 'nsamples' (int >= 0)")
        if remote:
            out.append((url if is_url(url) else f"{base}/{url}", n))
            continue
        full = d / url
        if not full.is_file():
            raise FileNotFoundError(f"{path}: shard {full} is listed but missing")
        out.append((str(full), n))
    if not out:
        raise ValueError(f"{path}: lists no shards")
    return out
