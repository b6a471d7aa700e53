"""`lyra-pl data convert`: the official Lyra JSON -> webdataset shards (format in shards.py).

The input is read as the released files are: a JSON array or JSON lines, streamed (never
loaded whole), with the official conventions (:mod:`lyra_pl.data.official`): media fields as
a path or a list, two media roots, ``<image>`` placeholders in video samples, 4x4-grid frame
images, ``<sosp>``/``<eosp>`` in ``tgt_unit``, and the ``{"audio", "text"}`` ASR lines.

Every sample is checked before it is written. A *data* error (a bad field, a missing,
truncated or undecodable file, an unknown key that looks like media) skips the sample with a
reason naming the field or file; anything else is a bug and stops the run with its traceback.
The run fails (exit 1, no manifest) when more than ``max_skipped`` of the samples were
skipped.

Conversion at dataset scale:

- The input is cut into chunks of ``samples_per_shard`` consecutive samples; chunk c becomes
  shard ``{prefix}-{c:06d}.tar``, built by one of ``workers`` processes from its samples
  alone, so the shards are byte-identical for any worker count.
- A chunk's result is recorded in ``.convert/`` when its shard is complete: a re-run with the
  same settings continues where it stopped and redoes no finished shard.
- ``part=(i, n)`` converts only the chunks c with c % n == i (a SLURM array, or machines
  sharing one output folder); :func:`merge` (``lyra-pl data merge DIR``) then writes the one
  manifest and report, equal to a whole conversion's.
- One process at a time writes a part of a folder (an ``flock`` on ``.convert/``).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from tqdm import tqdm

from lyra_pl.data import media, shards
from lyra_pl.data.official import (InputError, InvalidSample, MediaRoots, build_sample,
                                   iter_samples, sample_key_of)

REPORT = "report.json"
STATE = ".convert"  # per-chunk results, the settings stamp, part summaries, locks
VERSION = 2  # of the conversion itself: a change here invalidates resumable state


@dataclass
class ConvertReport:
    """What a conversion did. ``skipped`` entries: ``{"index", "id", "reason"}`` (every
    skipped sample, by input index); ``resampled``: source sample rate -> clips resampled
    from it; ``unknown_keys``: keys outside the official format (kept under ``extra``) ->
    samples that had them; ``shards``: the manifest's ``[{"url", "nsamples"}, ...]``."""

    converted: int = 0
    total: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    resampled: dict[int, int] = field(default_factory=dict)
    unknown_keys: dict[str, int] = field(default_factory=dict)
    shards: list[dict[str, Any]] = field(default_factory=list)
    max_skipped: float | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """No more than ``max_skipped`` (a fraction) of the samples were skipped."""
        if self.max_skipped is None:
            return True
        return len(self.skipped) <= self.max_skipped * max(self.total, 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def summary(self) -> str:
        lines = [f"converted {self.converted} of {self.total} sample(s) into "
                 f"{len(self.shards)} shard(s) in {self.seconds:.1f} s; "
                 f"skipped {len(self.skipped)}"]
        if self.resampled:
            rates = ", ".join(f"{n} from {rate} Hz" for rate, n in sorted(self.resampled.items()))
            lines.append(f"resampled to {media.SAMPLE_RATE} Hz: {rates}")
        if self.unknown_keys:
            keys = ", ".join(f"{k!r} ({n})" for k, n in sorted(self.unknown_keys.items()))
            lines.append(f"keys outside the official format, kept under 'extra': {keys}")
        if self.skipped:
            lines.append("skipped:")
            lines += [f"  [{e['index']}] id {e['id']!r}: {e['reason']}" for e in self.skipped]
        if not self.ok:
            lines.append(f"FAILED: {len(self.skipped)} of {self.total} sample(s) skipped, more "
                         f"than max_skipped={self.max_skipped:g} of them; no manifest written "
                         "(fix the data, or raise --max-skipped and run again: finished shards "
                         "are kept)")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- chunks
@dataclass(frozen=True)
class _Settings:
    """What a chunk's bytes depend on; a re-run continues only under the same settings."""

    source_sha256: str
    samples_per_shard: int
    prefix: str
    roots: dict[str, str]
    video: dict[str, Any]
    version: int = VERSION


def _chunk_state(out_dir: Path, prefix: str, chunk: int) -> Path:
    return out_dir / STATE / f"{prefix}-{chunk:06d}.json"


def convert_chunk(chunk: int, items: list[tuple[int, Any, str | None]], out_dir: Path,
                  prefix: str, roots: MediaRoots, video: media.VideoOptions) -> dict[str, Any]:
    """Converts one chunk: ``items`` are (input index, sample, reason it is already known to
    be skipped or None). Writes the chunk's shard (none when no sample converted) through a
    temporary name, then its result into ``.convert/``; returns that result."""
    import webdataset as wds

    url = f"{prefix}-{chunk:06d}.tar"
    result: dict[str, Any] = {"chunk": chunk, "url": url, "nsamples": 0, "total": len(items),
                              "skipped": [], "resampled": {}, "unknown_keys": {}}
    tmp = out_dir / f".{url}.tmp"
    writer = None
    try:
        for index, sample, reason in items:
            if reason is None:
                try:
                    built = build_sample(sample, roots, video)
                except (InvalidSample, media.MediaError) as e:
                    reason = str(e)
            if reason is not None:
                result["skipped"].append(_entry(index, sample, reason))
                continue
            if writer is None:
                # PAX: member names past ustar's 100 characters (long ids); mtime 0: the
                # bytes depend on the samples only.
                writer = wds.TarWriter(str(tmp), encoder=False, mtime=0, format="PAX_FORMAT")
            writer.write({"__key__": built.key, **built.members})
            result["nsamples"] += 1
            for rate in built.resampled_from:
                result["resampled"][str(rate)] = result["resampled"].get(str(rate), 0) + 1
            for key in built.unknown_keys:
                result["unknown_keys"][key] = result["unknown_keys"].get(key, 0) + 1
    finally:
        if writer is not None:
            writer.close()
    if writer is not None:
        os.replace(tmp, out_dir / url)
    state = _chunk_state(out_dir, prefix, chunk)
    state.write_text(json.dumps(result, ensure_ascii=False))
    return result


def _entry(index: int, sample: Any, reason: str) -> dict[str, Any]:
    sid = sample.get("id") if isinstance(sample, dict) else None
    ok = isinstance(sid, (str, int)) and not isinstance(sid, bool)
    return {"index": index, "id": sid if ok else f"#{index}", "reason": reason}


def _chunks(samples: Iterator[tuple[int, Any]], size: int, keep) -> Iterator[tuple[int, list]]:
    """Consecutive chunks of ``size`` samples, as (chunk, [(index, sample, known reason)]),
    for the chunks ``keep(chunk)`` selects. Duplicate keys are found here, over the whole
    input in order (every part sees all ids): a key belongs to the first sample with it."""
    keys: dict[str, int] = {}
    chunk, items = 0, []
    for index, sample in samples:
        reason = None
        if isinstance(sample, InvalidSample):  # a JSON line that did not parse
            reason, sample = str(sample), None
        else:
            key = sample_key_of(sample)
            if key is not None:
                if key in keys:
                    reason = (f"duplicate id/key: id {sample.get('id')!r} gives key {key!r}, "
                              f"already used by sample [{keys[key]}]")
                else:
                    keys[key] = index
        if keep(chunk):
            items.append((index, sample, reason))
        if index % size == size - 1:
            if keep(chunk):
                yield chunk, items
            chunk, items = chunk + 1, []
    if items:
        yield chunk, items


def shard_files(out_dir: Path, prefix: str) -> list[Path]:
    if not out_dir.is_dir():
        return []
    pattern = re.sub(r"([*?\[])", r"[\1]", prefix) + "-[0-9][0-9][0-9][0-9][0-9][0-9].tar"
    return sorted(out_dir.glob(pattern))


# ----------------------------------------------------------------------------- running
@contextmanager
def _lock(out_dir: Path, name: str):
    """One writer per folder part: a second conversion into it fails at once, clearly."""
    path = out_dir / STATE / f"{name}.lock"
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{out_dir}: another conversion is writing this folder "
                               f"({name}); wait for it, or choose another --out") from None
        yield


def _prepare(out_dir: Path, settings: _Settings, overwrite: bool) -> None:
    """A new folder, a folder to continue (same settings), or an error; ``overwrite``
    removes an earlier conversion's files first (only the ones it wrote)."""
    stamp = out_dir / STATE / "settings.json"
    ours = [out_dir / shards.MANIFEST, out_dir / REPORT]
    existing = stamp.is_file() or any(p.exists() for p in ours) or \
        bool(shard_files(out_dir, settings.prefix))
    if existing and overwrite:
        _remove_conversion(out_dir, settings.prefix)
    elif existing:
        if not stamp.is_file():
            raise FileExistsError(f"{out_dir} already holds a converted dataset; pass "
                                  "overwrite=True (--overwrite) to replace it, or choose "
                                  "another directory")
        before = json.loads(stamp.read_text())
        changed = sorted(k for k, v in asdict(settings).items() if before.get(k) != v)
        if changed:
            raise FileExistsError(f"{out_dir} holds a conversion made with other settings "
                                  f"({', '.join(changed)} differ); pass overwrite=True "
                                  "(--overwrite) to replace it, or choose another directory")
    (out_dir / STATE).mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(asdict(settings), indent=1))


def _remove_conversion(out_dir: Path, prefix: str) -> None:
    listed: list[Path] = []
    try:
        manifest = json.loads((out_dir / shards.MANIFEST).read_text())
        listed = [out_dir / s["url"] for s in manifest["shards"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no or an unreadable old manifest: the shards named like ours go
    root = out_dir.resolve()
    state = out_dir / STATE
    files = {*listed, *shard_files(out_dir, prefix), out_dir / shards.MANIFEST,
             out_dir / REPORT, *(state.glob("*") if state.is_dir() else [])}
    for p in files:
        if p.resolve().parent in (root, state.resolve()) and p.is_file() and \
                not p.name.endswith(".lock"):
            p.unlink()


def convert(json_path: str | Path, out_dir: str | Path, media_root: str | Path | None = None,
            samples_per_shard: int = 256, shard_prefix: str = "shard", progress: bool = True,
            overwrite: bool = False, *, image_folder: str | Path | None = None,
            video_folder: str | Path | None = None, speech_folder: str | Path | None = None,
            workers: int = 1, part: tuple[int, int] | None = None,
            max_skipped: float | None = None,
            video: media.VideoOptions = media.VideoOptions()) -> ConvertReport:
    """Converts an official Lyra JSON (array or lines) into ``out_dir``: shards,
    ``manifest.json`` and ``report.json`` (the report is also returned).

    Media paths resolve as in the official code: ``image``/``video`` against
    ``image_folder``/``video_folder``, ``speech``/``long_speech``/``sound`` against
    ``speech_folder``; each defaults to ``media_root``, which defaults to the JSON file's
    directory. ``part=(i, n)``: only this part's chunks, then :func:`merge` writes the
    manifest. ``max_skipped``: the fraction of skipped samples above which the conversion
    fails (report written, no manifest); None: no limit."""
    start = time.perf_counter()
    json_path, out_dir = Path(json_path), Path(out_dir)
    if samples_per_shard < 1:
        raise InputError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if not shard_prefix or "/" in shard_prefix or shard_prefix.startswith("."):
        raise InputError(f"shard_prefix must be a plain file name part, got {shard_prefix!r}")
    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}")
    index, count = part or (0, 1)
    if not 0 <= index < count:
        raise InputError(f"part must be (i, n) with 0 <= i < n, got {part}")
    if not json_path.is_file():
        raise FileNotFoundError(f"{json_path}: input JSON not found")
    root = Path(media_root) if media_root is not None else json_path.parent
    roots = MediaRoots.of(root, image_folder, video_folder, speech_folder)
    settings = _Settings(shards.file_sha256(json_path), samples_per_shard, shard_prefix,
                         roots.to_dict(), asdict(video))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / STATE).mkdir(exist_ok=True)
    with _lock(out_dir, f"part-{index}-of-{count}"):
        _prepare(out_dir, settings, overwrite)
        results = _run(json_path, out_dir, settings, roots, video, workers,
                       lambda c: c % count == index, progress)
        _part_path(out_dir, index, count).write_text(json.dumps(
            {"settings": asdict(settings), "source": str(json_path), "chunks": results}))
    if part is not None and count > 1:
        report = _report(results, max_skipped)
        report.seconds = round(time.perf_counter() - start, 3)
        return report
    return _finish(out_dir, json_path, settings, results, max_skipped, start)


def _part_path(out_dir: Path, index: int, count: int) -> Path:
    return out_dir / STATE / f"part-{index}-of-{count}.json"


def _run(json_path: Path, out_dir: Path, settings: _Settings, roots: MediaRoots,
         video: media.VideoOptions, workers: int, keep, progress: bool) -> list[dict]:
    """Converts the selected chunks not finished before; returns every selected chunk's
    result, finished ones read back."""
    prefix = settings.prefix
    results: list[dict[str, Any]] = []
    bar = tqdm(desc="convert", unit="sample", disable=not progress)

    def done(result: dict[str, Any]) -> None:
        results.append(result)
        bar.update(result["total"])

    def todo() -> Iterator[tuple[int, list]]:
        for chunk, items in _chunks(iter_samples(json_path), settings.samples_per_shard, keep):
            state = _chunk_state(out_dir, prefix, chunk)
            if state.is_file():  # finished by an earlier run of these settings
                done(json.loads(state.read_text()))
            else:
                yield chunk, items

    try:
        if workers == 1:
            for chunk, items in todo():
                done(convert_chunk(chunk, items, out_dir, prefix, roots, video))
        else:
            _run_pool(todo(), workers, done, (out_dir, prefix, roots, video))
    finally:
        bar.close()
    return sorted(results, key=lambda r: r["chunk"])


def _run_pool(chunks: Iterator[tuple[int, list]], workers: int, done, args: tuple) -> None:
    """Chunks over ``workers`` processes, at most two each in flight (the input streams:
    memory holds a few chunks, not the dataset). A worker's exception is re-raised here."""
    import multiprocessing as mp

    with mp.get_context("fork").Pool(workers) as pool:
        pending = []
        for chunk, items in chunks:
            pending.append(pool.apply_async(convert_chunk, (chunk, items, *args)))
            while len(pending) >= 2 * workers or (pending and pending[0].ready()):
                done(pending.pop(0).get())
        for job in pending:
            done(job.get())


def _report(results: list[dict[str, Any]], max_skipped: float | None) -> ConvertReport:
    report = ConvertReport(max_skipped=max_skipped)
    for r in sorted(results, key=lambda r: r["chunk"]):
        report.total += r["total"]
        report.converted += r["nsamples"]
        report.skipped += r["skipped"]
        for rate, n in r["resampled"].items():
            report.resampled[int(rate)] = report.resampled.get(int(rate), 0) + n
        for key, n in r["unknown_keys"].items():
            report.unknown_keys[key] = report.unknown_keys.get(key, 0) + n
        if r["nsamples"]:
            report.shards.append({"url": r["url"], "nsamples": r["nsamples"]})
    return report


def _finish(out_dir: Path, json_path: Path, settings: _Settings, results: list[dict],
            max_skipped: float | None, start: float) -> ConvertReport:
    """report.json always; manifest.json only when the report is ok."""
    report = _report(results, max_skipped)
    report.seconds = round(time.perf_counter() - start, 3)
    (out_dir / REPORT).write_text(json.dumps(report.to_dict(), indent=1, ensure_ascii=False))
    manifest = out_dir / shards.MANIFEST
    if report.ok:
        counts = {"converted": report.converted, "skipped": len(report.skipped),
                  "resampled": report.resampled}
        shards.write_manifest(out_dir, report.shards, source=str(json_path),
                              source_sha256=settings.source_sha256, report=counts)
    else:
        manifest.unlink(missing_ok=True)
    return report


def merge(out_dir: str | Path, max_skipped: float | None = None) -> ConvertReport:
    """Joins the parts that ``convert(..., part=(i, n))`` wrote into ``out_dir`` into one
    manifest and report. Every part 0..n-1 must be there, made with the same settings."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    found = sorted((out_dir / STATE).glob("part-*-of-*.json"))
    if not found:
        raise FileNotFoundError(f"{out_dir}: no converted parts (.convert/part-I-of-N.json); "
                                "run lyra-pl data convert --part I/N --out this folder first")
    counts = {int(p.stem.rsplit("-", 1)[1]) for p in found}
    if len(counts) != 1:
        raise InputError(f"{out_dir}: parts of different splits {sorted(counts)}; convert "
                         "again with one --part I/N split")
    n = counts.pop()
    parts = {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in found}
    missing = sorted(set(range(n)) - set(parts))
    if missing:
        raise InputError(f"{out_dir}: part(s) {', '.join(f'{i}/{n}' for i in missing)} of {n} "
                         "not converted yet")
    settings = {json.dumps(p["settings"], sort_keys=True) for p in parts.values()}
    if len(settings) != 1:
        raise InputError(f"{out_dir}: the parts were converted with different settings or "
                         "inputs; convert them again alike")
    s = _Settings(**json.loads(settings.pop()))
    results = [r for p in parts.values() for r in p["chunks"]]
    with _lock(out_dir, "merge"):
        return _finish(out_dir, Path(parts[0]["source"]), s, results, max_skipped, start)


# ----------------------------------------------------------------------------- CLI
def _part(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--part takes I/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--part I/N needs 0 <= I < N, got {text!r}")
    return i, n


def main(argv: Sequence[str] | None = None) -> int:
    """``lyra-pl data convert INPUT.json --out DIR ...``: 0 when the conversion finished with
    no more than --max-skipped of the samples skipped, 1 otherwise (the summary says why)."""
    parser = argparse.ArgumentParser(
        prog="lyra-pl data convert",
        description="Convert an official Lyra JSON (array or JSON lines) into webdataset "
                    "shards.")
    parser.add_argument("input", type=Path, help="JSON list or JSON lines (official format)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--media-root", type=Path, default=None,
                        help="default root of relative media paths (default: the JSON file's "
                             "directory)")
    parser.add_argument("--image-folder", type=Path, default=None,
                        help="root of 'image' paths (the official --image_folder)")
    parser.add_argument("--video-folder", type=Path, default=None,
                        help="root of 'video' paths (default: --image-folder, as officially)")
    parser.add_argument("--speech-folder", type=Path, default=None,
                        help="root of 'speech', 'long_speech' and 'sound' paths (the official "
                             "--speech_folder)")
    parser.add_argument("--samples-per-shard", type=int, default=256,
                        help="consecutive input samples per shard (default: 256)")
    parser.add_argument("--prefix", default="shard", help="shard file name prefix")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes (default: the cores); shards are identical for any")
    parser.add_argument("--part", type=_part, default=None,
                        help="I/N: convert the I-th of N interleaved slices of the input "
                             "(then lyra-pl data merge DIR)")
    parser.add_argument("--max-skipped", type=float, default=0.01,
                        help="fail (exit 1, no manifest) when more than this fraction of "
                             "the samples is skipped (default: 0.01)")
    parser.add_argument("--video-fps", type=float, default=media.VIDEO_FPS,
                        help="frames a second taken from video files (default: 2, Qwen2-VL's)")
    parser.add_argument("--video-max-frames", type=int, default=media.VIDEO_MAX_FRAMES,
                        help="at most this many frames a video, spread over it (default: 768)")
    parser.add_argument("--video-max-pixels", type=int, default=media.VIDEO_MAX_PIXELS,
                        help="larger frames are scaled down to this many pixels (default: "
                             "768*28*28, Qwen2-VL's)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier conversion in --out (default: continue it)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        video = media.VideoOptions(args.video_fps, args.video_max_frames, args.video_max_pixels)
        report = convert(args.input, args.out, media_root=args.media_root,
                         samples_per_shard=args.samples_per_shard, shard_prefix=args.prefix,
                         progress=not args.no_progress, overwrite=args.overwrite,
                         image_folder=args.image_folder, video_folder=args.video_folder,
                         speech_folder=args.speech_folder, workers=args.workers,
                         part=args.part, max_skipped=args.max_skipped, video=video)
    except (InputError, FileNotFoundError, FileExistsError) as e:  # not a bug: say it in a line
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    if args.part is not None and args.part[1] > 1:
        print(f"part {args.part[0]}/{args.part[1]} done; when every part is, run: "
              f"lyra-pl data merge {args.out}")
        return 0
    print(f"wrote {args.out / REPORT}" + (f" and {args.out / shards.MANIFEST}" if report.ok
                                          else ""))
    return 0 if report.ok and report.converted > 0 else 1


def merge_main(argv: Sequence[str] | None = None) -> int:
    """``lyra-pl data merge DIR``: the manifest and report of a conversion done in parts."""
    parser = argparse.ArgumentParser(prog="lyra-pl data merge",
                                     description="Join the parts of a --part conversion.")
    parser.add_argument("out", type=Path, help="the --out folder every part wrote into")
    parser.add_argument("--max-skipped", type=float, default=0.01)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        report = merge(args.out, args.max_skipped)
    except (InputError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0 if report.ok and report.converted > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
