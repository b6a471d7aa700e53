"""`lyra-pl bench data`: the converter at dataset scale, measured as users run it.

Two measurements, each conversion a fresh `lyra-pl data convert` process (its wall time, and
its peak RSS as the kernel's high-water mark of that process, ``VmHWM``):

1. **Long speech.** A synthetic recording of ``--long-hours`` hours (default 2: the paper's
   long-speech case) is encoded as an MP3 (``--long-rate`` Hz mono, so it must be resampled)
   and converted as one ``long_speech`` sample. Decoding streams, so peak memory is the
   16 kHz PCM16 result plus the libraries, not a function of the source file.
2. **Many small samples.** ``--samples`` spoken-question samples (1-3 s clips in MP3, FLAC,
   M4A and WAV, each sample its own clip file) converted with 1 and with ``--workers`` (default 2)
   processes: wall time, the speed-up, and whether the shards are byte-identical.

The inputs are written under ``--work`` (kept, so a rerun skips encoding them); results go
to ``--out`` as CSV and JSON beside the printed table.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lyra_pl.bench.report import machine_info, write_results


@dataclass
class Row:
    case: str
    samples: int
    workers: int
    audio_hours: float
    seconds: float
    peak_rss_mib: float
    converted: int
    skipped: int
    shards_sha256: str
    note: str = ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--long-hours", type=float, default=2.0)
    parser.add_argument("--long-rate", type=int, default=22050,
                        help="sample rate of the long MP3 (resampled to 16 kHz)")
    parser.add_argument("--samples", type=int, default=3000, help="small samples")
    parser.add_argument("--workers", type=int, default=2, help="compared with 1 worker")
    parser.add_argument("--skip", nargs="*", default=[], choices=["long", "small"])
    parser.add_argument("--work", type=Path, default=Path("bench_results/data_inputs"))
    parser.add_argument("--out", type=Path, default=Path("bench_results"))


# ----------------------------------------------------------------------------- inputs
def long_input(work: Path, hours: float, rate: int) -> Path:
    """One long_speech sample over a ``hours``-long MP3 (encoded once, then reused)."""
    from lyra_pl.data import encode

    audio = work / f"long_{hours:g}h_{rate}.mp3"
    if not audio.is_file():
        print(f"encoding a {hours:g}-hour MP3 at {rate} Hz -> {audio} ...", flush=True)
        tmp = audio.with_suffix(".tmp.mp3")
        encode.write_audio(tmp, encode.long_tone(hours * 3600, rate), rate, bitrate=48000)
        tmp.rename(audio)
    src = work / f"long_{hours:g}h_{rate}.json"
    src.write_text(json.dumps([{
        "id": "long0", "long_speech": audio.name, "speech_asr": "a long recording",
        "conversations": [{"from": "human", "value": "<speech>\nWhat is said?"},
                          {"from": "gpt", "value": "a tone"}]}]))
    return src


def small_input(work: Path, n: int) -> tuple[Path, float]:
    """``n`` samples, each with its own 1-3 s clip (MP3, FLAC, M4A or WAV, 44.1/22.05 kHz),
    and their hours of audio."""
    from lyra_pl.data import encode

    clips = work / "small"
    clips.mkdir(parents=True, exist_ok=True)
    suffixes = (".mp3", ".flac", ".m4a", ".wav")
    samples = []
    for i in range(n):
        name = f"q{i:05d}{suffixes[i % 4]}"
        if not (clips / name).is_file():
            rate = 44100 if i % 2 else 22050
            encode.write_audio(clips / name, encode.tone(1 + (i % 5) / 2, rate, 1 + i % 2,
                                                         freq=200 + i % 300, seed=i), rate)
        samples.append({"id": f"q{i:05d}", "speech": f"small/{name}",
                        "speech_asr": f"question number {i}",
                        "conversations": [{"from": "human", "value": "<speech>"},
                                          {"from": "gpt", "value": f"answer {i}"}]})
    src = work / f"small_{n}.json"
    src.write_text(json.dumps(samples))
    return src, sum(1 + (i % 5) / 2 for i in range(n)) / 3600


# ----------------------------------------------------------------------------- runs
# The converter run as `lyra-pl data convert` would be, printing its own peak RSS at exit:
# VmHWM of the process after exec (getrusage's ru_maxrss would also count the benchmark
# process it was forked from).
_CHILD = """import sys
from lyra_pl.data import convert
code = convert.main(sys.argv[1:])
with open("/proc/self/status") as f:
    print(next(line for line in f if line.startswith("VmHWM")), file=sys.stderr)
sys.exit(code)
"""


def convert_once(src: Path, out: Path, workers: int) -> tuple[float, float, dict]:
    """One `lyra-pl data convert` process: (wall seconds, peak RSS MiB, report). With
    workers, the peak is the main process's (each worker is a fork holding one chunk)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-c", _CHILD, str(src), "--out", str(out), "--workers",
           str(workers), "--no-progress", "--samples-per-shard", "64"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"converting {src} failed:\n{proc.stderr}")
    hwm = next(line for line in proc.stderr.splitlines() if line.startswith("VmHWM"))
    return seconds, int(hwm.split()[1]) / 1024, json.loads((out / "report.json").read_text())


def shards_digest(out: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(out.glob("shard-*.tar")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def row(case: str, src: Path, out: Path, workers: int, hours: float) -> Row:
    seconds, rss, report = convert_once(src, out, workers)
    return Row(case, report["total"], workers, hours, round(seconds, 2), round(rss, 1),
               report["converted"], len(report["skipped"]), shards_digest(out))


def format_table(rows: list[Row]) -> str:
    head = f"{'case':<8} {'samples':>7} {'workers':>7} {'audio h':>7} {'seconds':>8} " \
           f"{'peak RSS MiB':>12} {'converted':>9} {'skipped':>7}  shards sha256    note"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.case:<8} {r.samples:>7} {r.workers:>7} {r.audio_hours:>7.2f} "
                     f"{r.seconds:>8.2f} {r.peak_rss_mib:>12.1f} {r.converted:>9} "
                     f"{r.skipped:>7}  {r.shards_sha256} {r.note}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    args.work.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    if "long" not in args.skip:
        src = long_input(args.work, args.long_hours, args.long_rate)
        rows.append(row("long", src, args.work / "out_long", 1, args.long_hours))
        print(format_table(rows[-1:]), flush=True)
    if "small" not in args.skip:
        src, hours = small_input(args.work, args.samples)
        one = row("small", src, args.work / "out_small_1", 1, hours)
        many = row("small", src, args.work / f"out_small_{args.workers}", args.workers, hours)
        same = one.shards_sha256 == many.shards_sha256
        many.note = f"{one.seconds / many.seconds:.2f}x vs 1 worker; shards " + \
            ("byte-identical" if same else "DIFFER")
        rows += [one, many]
    print()
    print(format_table(rows))
    stem = args.out / f"data_{datetime.date.today().isoformat()}"
    info = {**machine_info([], args), "rows": [asdict(r) for r in rows]}
    write_results(stem, rows, info)
    print(f"\nwrote {stem}.csv, {stem}.json")
    return 0
