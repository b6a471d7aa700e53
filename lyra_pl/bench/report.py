"""What every benchmark command writes next to its table: the rows as CSV and, as JSON, the
machine and run they were measured on (so a figure can always name its machine)."""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Sequence

import torch


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine skews the timings."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine_info(devices: Sequence[torch.device], args: argparse.Namespace) -> dict[str, Any]:
    """Date, command line, CPU, cores, load, Python / torch / CUDA versions and GPU name."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = next((d for d in devices if d.type == "cuda"), None)
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "argv": sys.argv,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                 if not callable(v)},
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "load_average_at_start": load_average(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(gpu) if gpu is not None else None,
    }


def write_results(stem: Path, rows: Sequence[Any], info: dict[str, Any]) -> None:
    """``stem.csv`` (one line per dataclass row) and ``stem.json`` (``info`` plus the load
    average at the end)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[x.name for x in fields(rows[0])])
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    info = {**info, "load_average_at_end": load_average()}
    stem.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
