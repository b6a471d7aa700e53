"""`python -m lyra_pl.bench kernels`: time our soft-DTW and token-pruning ops.

Compares, at Lyra-like sizes, our ops (`lyra_pl.ops`, CPU and CUDA) with the plain-PyTorch
references (`lyra_pl.reference`) and with peer soft-DTW libraries when installed (see peers.py).
Prints a table and writes a CSV, a JSON with machine info and a PNG plot under --out.
Methodology and measured numbers: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import importlib
import math
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch

from lyra_pl.bench import peers, report

GAMMA = 0.1  # official LCMR gamma
KEEP_RATIO, MIN_KEEP = 0.7, 32  # LMME(4, 0.7)
HQ, HKV, DH = 28, 4, 128  # Qwen2-VL-7B attention (Lyra-Base)
SYSTEM_TOKENS, INSTRUCTION_TOKENS = 16, 256
# --contention: seconds of ours in each state (quiet, busy) before timing it; longer than the
# 2.7 s ours takes to go back to its threads after the load (csrc/soft_dtw/soft_dtw_cpu.cpp).
SETTLE_S = 3.0
CPU_MAX_N = 2**14  # the naive path needs Hq * T * N * 4 bytes per materialized tensor

# (B, L, S): speech tokens (10/s) x transcript tokens of the LCMR cost matrix.
SOFT_DTW_SIZES = [(16, 300, 60), (4, 1500, 300), (1, 4500, 1000)]  # 30 s, 2.5 min, 7.5 min
SOFT_DTW_CUDA_SIZES = [(32, 300, 60)]  # a bigger batch, inside the numba CUDA 1024-token limit
SOFT_DTW_CUDA_OURS_ONLY = [(1, 20_000, 4_000)]  # 33 min of speech: beyond what peers handle
PRUNE_NS = [2**p for p in range(11, 18)]
QUICK_SOFT_DTW_SIZES, QUICK_PRUNE_NS = [(4, 64, 16), (1, 256, 64)], [2**9, 2**10]


@dataclass
class Row:
    device: str
    op: str
    size: str
    dtype: str
    impl: str
    median_ms: float | None = None
    ours_speedup: float | None = None  # median_ms / ours' median_ms: how many times ours is faster
    max_err: float | None = None  # soft-DTW: max |grad - fp64 grad|; prune: keep decisions != fp64
    peak_extra_mb: float | None = None
    repeats: int | None = None  # timed runs behind the median (fewer than asked: --budget)
    note: str = ""


@dataclass
class Measurement:
    median_ms: float
    peak_extra_mb: float
    repeats: int
    result: Any


# ---------------------------------------------------------------------------- timing


def measure(step: Callable[[], Any], device: torch.device, repeats: int, warmup: int,
            budget_s: float) -> Measurement:
    """Median wall time of `step()` over `repeats` runs after `warmup` runs, plus the peak extra
    memory of one more run (kept apart so the memory probe never disturbs the timings).
    When that run shows `repeats` runs would exceed `budget_s`, fewer (at least one) are timed."""
    return measure_side_by_side({"step": step}, device, repeats, warmup, budget_s)["step"]


def measure_side_by_side(steps: dict[str, Callable[[], Any]], device: torch.device, repeats: int,
                         warmup: int, budget_s: float) -> dict[str, Measurement]:
    """`measure` for steps compared with each other: timed in rounds of one run of each, so a
    change in the machine's load (the host, a busy neighbour's scheduling) falls on all of
    them alike, not on whichever happened to run then. Repeats follow the slowest step."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    probes, slowest = {}, 0.0
    for name, step in steps.items():
        t0 = time.perf_counter()
        probes[name] = _peak_extra_mb(step, device)
        slowest = max(slowest, time.perf_counter() - t0)
    n = max(1, min(repeats, int(budget_s / max(slowest, 1e-9))))
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(n):
        for name, step in steps.items():
            times[name].append(_time_once(step, device))
    return {name: Measurement(statistics.median(times[name]), probes[name][0], n,
                              probes[name][1]) for name in steps}


def _time_once(step: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3


def _peak_extra_mb(step: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Peak memory above what was allocated before the call (inputs excluded), in MiB.
    CUDA: torch's allocator statistics. CPU: the process' peak resident set size (VmHWM,
    reset through /proc/self/clear_refs), which also sees numpy/numba buffers of the peers."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, result
    try:
        _malloc_trim()
        base = _proc_status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:  # not Linux: no probe
        return math.nan, step()
    result = step()
    return (_proc_status_kib("VmHWM") - base) / 1024, result


def _malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so a step that reuses it shows up in RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


# ---------------------------------------------------------------------------- cases


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _impl(module: str, name: str) -> Callable | str:
    """`module.name`, or a string saying why it cannot be imported."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        return f"unavailable: {type(e).__name__}: {e}"


def _run_impls(device: torch.device, op: str, size: str, dtype: torch.dtype,
               impls: dict[str, Callable[[], Any] | str], error: Callable[[Any], float],
               timing: dict[str, Any], side_by_side: bool = False) -> list[Row]:
    """Time each impl's step (a string is the reason it is skipped); the first is ours.
    `side_by_side`: all of them in rounds (measure_side_by_side), else one after another."""
    rows = {name: Row(device.type, op, size, _dtype_name(dtype), name) for name in impls}
    steps = {name: step for name, step in impls.items() if callable(step)}
    for name, step in impls.items():
        if isinstance(step, str):
            rows[name].note = step
    groups = [steps] if side_by_side else [{name: step} for name, step in steps.items()]
    for group in groups:
        try:
            measured = measure_side_by_side(group, device, **timing)
            for name, m in measured.items():
                row = rows[name]
                row.median_ms, row.peak_extra_mb, row.repeats = m.median_ms, m.peak_extra_mb, m.repeats
                row.max_err = error(m.result)
        except torch.OutOfMemoryError:
            for name in group:
                rows[name].note = "OOM"
        except Exception as e:  # a broken impl must not lose the other rows; reported, not hidden
            traceback.print_exc()
            for name in group:
                rows[name].note = (f"failed: {type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else ''}")
        finally:
            measured = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for name in group:
            row = rows[name]
            result = f"{row.median_ms:10.2f} ms" if row.median_ms is not None else row.note
            print(f"  {row.device:4} {op:8} {size:22} {name:10} {result}", flush=True)
    out = list(rows.values())
    _speedups(out, out[0])
    return out


def _speedups(rows: list[Row], ours: Row) -> None:
    """Each row's median over ours': how many times ours is faster."""
    for row in rows:
        if ours.median_ms and row.median_ms:
            row.ours_speedup = row.median_ms / ours.median_ms


def _float64_truth(fns: dict[str, Callable | str], run: Callable[[Callable], Any]) -> Any:
    """`run(fn)` in float64 with the first implementation that manages it: ours, else the
    reference. None (and a printed reason) when none does; the error column is then nan."""
    for name, fn in fns.items():
        if callable(fn):
            try:
                return run(fn)
            except Exception as e:  # e.g. no CUDA kernel built: try the next one
                print(f"  float64 run of {name} failed ({type(e).__name__}: {e})")
    return None


def lcmr_cost(B: int, L: int, S: int, device: torch.device) -> torch.Tensor:
    """A cost matrix like the LCMR's: -log softmax over the transcript tokens of random logits."""
    g = torch.Generator().manual_seed(B * 1_000_003 + L * 1_009 + S)
    logits = 3.0 * torch.randn(B, L, S, generator=g)
    return (-torch.log_softmax(logits, dim=-1)).to(device)


def _fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], D: torch.Tensor) -> torch.Tensor:
    D.grad = None
    fn(D).sum().backward()
    grad, D.grad = D.grad, None
    return grad


@contextlib.contextmanager
def busy_process():
    """One other process spinning on a core while the block runs: the load DataLoader workers
    put beside training on a small machine."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # scheduled and spinning before the first timed run
        yield
    finally:
        proc.kill()
        proc.wait()


def _threads(n: int, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run with torch's intra-op threads (which our ops use) set to ``n``."""

    def step():
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)

    return step


def bench_soft_dtw(device: torch.device, size: tuple[int, int, int], ours_only: bool,
                   timing: dict[str, Any], contention: bool = False) -> list[Row]:
    """Soft-DTW forward + backward of the sum on full-length float32 batches. ``contention``
    (CPU): ours also with one thread, and both again beside a busy process."""
    B, L, S = size
    D = lcmr_cost(B, L, S, device).requires_grad_()
    x_len = torch.full((B,), L, dtype=torch.int64, device=device)
    y_len = torch.full((B,), S, dtype=torch.int64, device=device)
    fns: dict[str, Callable | str] = {"ours": _impl("lyra_pl.ops", "soft_dtw")}
    if not ours_only:
        fns["reference"] = _impl("lyra_pl.reference", "soft_dtw")
    for name, fn in list(fns.items()):
        if callable(fn):
            fns[name] = lambda D, fn=fn: fn(D, x_len, y_len, gamma=GAMMA)
    if not ours_only:
        for name, adapter in peers.SOFT_DTW_PEERS.items():
            try:
                fns[name] = adapter(GAMMA, device)
            except peers.Unavailable as e:
                fns[name] = f"skipped: {e}"
                print(f"  {name}: {fns[name]}")

    D64 = D.detach().double().requires_grad_()
    truth = _float64_truth(fns, lambda fn: _fwd_bwd(fn, D64))

    def error(grad: torch.Tensor) -> float:
        return math.nan if truth is None else (grad.double() - truth).abs().max().item()

    steps = {n: (lambda fn=fn: _fwd_bwd(fn, D)) if callable(fn) else fn for n, fn in fns.items()}
    name = f"B={B} L={L} S={S}"
    if contention and device.type == "cpu" and callable(steps["ours"]):
        # Ours with all threads against ours with one, quiet and beside a busy process, each
        # pair side by side; the peers one after another as always. Load in training comes and
        # lasts (DataLoader workers): each state is timed after SETTLE_S of ours in it, what
        # ours settles into (its first calls beside the load try threads and back off; after
        # the load, it tries them again), and the row's note sums up those settling calls.
        threads = torch.get_num_threads()
        one = _threads(1, steps["ours"])
        settling = _settle(steps["ours"], device)
        quiet = _run_impls(device, "softdtw", name, D.dtype,
                           {"ours": steps["ours"], "ours 1 thread": one}, error, timing,
                           side_by_side=True)
        _note_settling(quiet[0], settling, "quiet")
        others = _run_impls(device, "softdtw", name, D.dtype,
                            {n: s for n, s in steps.items() if n != "ours"}, error, timing)
        with busy_process():
            settling = _settle(steps["ours"], device)
            busy = _run_impls(device, "softdtw", name, D.dtype,
                              {f"ours {threads} threads + busy": steps["ours"],
                               "ours 1 thread + busy": one}, error, timing, side_by_side=True)
        _note_settling(busy[0], settling, "beside the load")
        rows = quiet + others + busy
        _speedups(rows, quiet[0])  # all against ours without the busy process
        return rows
    return _run_impls(device, "softdtw", name, D.dtype, steps, error, timing)


def _settle(step: Callable[[], Any], device: torch.device) -> list[float]:
    """Runs `step` for SETTLE_S seconds; each run's time in ms."""
    times, deadline = [], time.perf_counter() + SETTLE_S
    while time.perf_counter() < deadline:
        times.append(_time_once(step, device))
    return times


def _note_settling(row: Row, times: list[float], state: str) -> None:
    if row.median_ms:
        slow = sum(t > 2 * row.median_ms for t in times)
        row.note = (f"timed after {len(times)} calls in {SETTLE_S:g} s {state}: mean "
                    f"{statistics.fmean(times):.2f} ms, {slow} over 2x the median")


def prune_inputs(N: int, device: torch.device, dtype: torch.dtype):
    """B=1 prefill: 16 system tokens, context tokens, then 256 instruction tokens (the queries)."""
    g = torch.Generator().manual_seed(N)
    q = torch.randn(1, HQ, N, DH, generator=g).to(device, dtype)
    k = torch.randn(1, HKV, N, DH, generator=g).to(device, dtype)
    pos = torch.arange(N, device=device)[None]
    query_mask = pos >= N - INSTRUCTION_TOKENS
    context_mask = (pos >= SYSTEM_TOKENS) & ~query_mask
    key_mask = torch.ones_like(query_mask)
    return q, k, query_mask, context_mask, key_mask


def bench_prune(device: torch.device, N: int, timing: dict[str, Any],
                max_n: int | None) -> list[Row]:
    """prune_tokens (scores + top-k selection), causal, LMME(4, 0.7)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = f"N={N}"
    if max_n is not None and N > max_n:
        gb = HQ * INSTRUCTION_TOKENS * N * 4 / 1e9
        note = f"skipped: N > --max-n {max_n} (naive path: {gb:.1f} GB per materialized tensor)"
        return [Row(device.type, "prune", size, _dtype_name(dtype), "all", note=note)]
    q, k, qm, cm, km = prune_inputs(N, device, dtype)
    fns = {"ours": _impl("lyra_pl.ops", "prune_tokens"),
           "reference": _impl("lyra_pl.reference", "prune_tokens")}
    q64, k64 = q.double(), k.double()
    truth = _float64_truth(fns, lambda fn: fn(q64, k64, qm, cm, km, KEEP_RATIO, MIN_KEEP, True))
    del q64, k64

    def error(keep: torch.Tensor) -> float:
        return math.nan if truth is None else float((keep != truth).sum().item())

    steps = {n: (lambda fn=fn: fn(q, k, qm, cm, km, KEEP_RATIO, MIN_KEEP, True))
             if callable(fn) else fn for n, fn in fns.items()}
    return _run_impls(device, "prune", size, dtype, steps, error, timing)


# ---------------------------------------------------------------------------- output

COLUMNS = [f.name for f in fields(Row)]


def format_table(rows: list[Row]) -> str:
    def cell(v: Any, name: str) -> str:
        if v is None:
            return "-"
        if name == "max_err":
            return f"{v:.1e}" if isinstance(v, float) and v % 1 else f"{v:g}"
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.2f}"
        return str(v)

    cells = [[cell(getattr(r, c), c) for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def machine_info(devices: list[torch.device], args: argparse.Namespace) -> dict[str, Any]:
    return {
        **report.machine_info(devices, args),
        "peers": peers.versions(),
        "settings": {"gamma": GAMMA, "keep_ratio": KEEP_RATIO, "min_keep": MIN_KEEP, "Hq": HQ,
                     "Hkv": HKV, "dh": DH, "instruction_tokens": INSTRUCTION_TOKENS,
                     "system_tokens": SYSTEM_TOKENS, "causal": True},
    }


def write_plot(rows: list[Row], path: Path) -> str | None:
    """Soft-DTW times, pruning times and pruning peak memory; returns why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib not installed ({e})"
    timed = [r for r in rows if r.median_ms is not None]
    panels = [("softdtw", "median_ms", "soft-DTW fwd+bwd (ms)"),
              ("prune", "median_ms", "prune_tokens (ms)"),
              ("prune", "peak_extra_mb", "prune_tokens peak extra memory (MiB)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
    for ax, (op, col, title) in zip(axes, panels):
        sel = [r for r in timed if r.op == op]
        xs = list(dict.fromkeys(r.size for r in sel))
        for key in dict.fromkeys((r.device, r.impl) for r in sel):
            pts = [(xs.index(r.size), getattr(r, col)) for r in sel if (r.device, r.impl) == key]
            ax.plot(*zip(*pts), marker="o", label=f"{key[1]} ({key[0]})")
        ax.set_xticks(range(len(xs)), xs, rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if sel:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------- entry point


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="where to run (default: all available: cpu, and cuda when present)")
    parser.add_argument("--out", type=Path, default=Path("bench_results"),
                        help="output folder for CSV, JSON and PNG (default: bench_results/)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and 3 repeats: a smoke test (< 30 s on 2 cores)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per case, median reported (default: 11; 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed runs first: numba compiles, the allocator warms up (default: 3)")
    parser.add_argument("--budget", type=float, default=30.0,
                        help="seconds of timed runs per implementation and size: slower ones get "
                             "fewer repeats, at least 1, shown in the repeats column (default: 30)")
    parser.add_argument("--contention", action="store_true",
                        help="CPU soft-DTW: also ours with one thread, timed side by side with "
                             "ours, quiet and again beside a busy process (the load DataLoader "
                             f"workers put beside training), each after {SETTLE_S:g} s in it")
    parser.add_argument("--only", choices=["softdtw", "prune"], default=None,
                        help="run one op only (default: both)")
    parser.add_argument("--max-n", type=int, default=CPU_MAX_N,
                        help=f"largest pruning N on CPU; larger sizes are listed as skipped "
                             f"(default: {CPU_MAX_N})")


def main(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2
    devices = [torch.device("cpu")] if args.device != "cuda" else []
    if args.device != "cpu" and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    timing = {"repeats": args.repeats or (3 if args.quick else 11), "warmup": args.warmup,
              "budget_s": args.budget}

    info = machine_info(devices, args)
    rows: list[Row] = []
    for device in devices:
        if args.only in (None, "softdtw"):
            sizes = [(s, False) for s in (QUICK_SOFT_DTW_SIZES if args.quick else SOFT_DTW_SIZES)]
            if device.type == "cuda" and not args.quick:
                sizes[1:1] = [(s, False) for s in SOFT_DTW_CUDA_SIZES]
                sizes += [(s, True) for s in SOFT_DTW_CUDA_OURS_ONLY]
            for size, ours_only in sizes:
                rows += bench_soft_dtw(device, size, ours_only, timing, args.contention)
        if args.only in (None, "prune"):
            max_n = args.max_n if device.type == "cpu" else None
            for N in QUICK_PRUNE_NS if args.quick else PRUNE_NS:
                rows += bench_prune(device, N, timing, max_n)

    print()
    print(format_table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    today, device_names = datetime.date.today().isoformat(), "+".join(d.type for d in devices)
    stem = args.out / f"kernels_{today}_{device_names}"
    report.write_results(stem, rows, info)
    print(f"\nwrote {stem}.csv, {stem}.json", end="")
    skipped = write_plot(rows, stem.with_suffix(".png"))
    print(f", {stem}.png" if skipped is None else f"\nplot skipped: {skipped}")
    failed = [r for r in rows if r.note.startswith(("failed", "unavailable"))
              and r.impl in ("ours", "reference")]
    return 1 if failed else 0
