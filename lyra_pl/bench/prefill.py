"""Prefill time, decode speed and peak memory of the decoder with and without LMME: the
paper's Table 4a (docs/method.md) on our code.

A model of the preset's shape with random weights (cost does not depend on them) prefills one
prompt of N tokens: a short system text, N - 80 context tokens (speech) and a 64-token text
instruction, then decodes ``--decode-tokens`` tokens greedily through the KV cache, for each
setting: baseline (no pruning), LMME(4, 0.8) and LMME(4, 0.7). Only the LLM runs (the prompt's
embeddings are given), as in the paper's table. Out of memory is reported as such.

On CPU (``--preset tiny``, the default there) it is a smoke test of the whole path in about a
minute; the numbers that count come from a GPU.
"""
from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lyra_pl.bench.report import machine_info, write_results

SYSTEM_TOKENS, INSTRUCTION_TOKENS = 16, 64
SETTINGS = {"baseline": None, "LMME(4,0.8)": (4, 0.8), "LMME(4,0.7)": (4, 0.7)}
GPU_LENGTHS = [2 ** k for k in range(11, 18)]
CPU_LENGTHS = [2 ** k for k in range(8, 13)]


@dataclass
class Row:
    setting: str
    tokens: int
    prefill_s: float
    decode_tok_s: float
    peak_mib: float
    kept_after_last_block: int
    note: str = ""


def build_model(preset: str, device: torch.device, dtype: torch.dtype):
    """The preset's model with random weights (the model's own init), allocated directly on
    ``device`` in ``dtype`` (built on the meta device: no full-precision copy is ever made)."""
    from lyra_pl.model import LyraConfig, LyraModel

    config = LyraConfig.from_preset(preset)
    with torch.device("meta"):
        model = LyraModel(config)
    model.to(dtype).to_empty(device=device)
    model.init_weights(device)
    return model.eval()


def prompt(config, tokens: int, device: torch.device, dtype: torch.dtype):
    """An assembled single-sample prompt: system text, context (speech) tokens, instruction."""
    from lyra_pl.model.assemble import IGNORE, SPEECH, Assembled

    if tokens <= SYSTEM_TOKENS + INSTRUCTION_TOKENS:
        raise ValueError(f"--lengths: {tokens} tokens leave no context tokens")
    index = torch.arange(tokens, device=device)
    context = (index >= SYSTEM_TOKENS) & (index < tokens - INSTRUCTION_TOKENS)
    g = torch.Generator(device=device).manual_seed(0)
    embeds = torch.randn(1, tokens, config.hidden_size, generator=g, device=device) * 0.02
    return Assembled(
        embeds=embeds.to(dtype), positions=index.view(1, 1, -1).expand(3, 1, -1).clone(),
        lengths=torch.tensor([tokens], device=device),
        valid=torch.ones(1, tokens, dtype=torch.bool, device=device),
        modality=torch.where(context, SPEECH, 0).view(1, -1),
        targets=torch.full((1, tokens), IGNORE, device=device),
        answer=torch.zeros(1, tokens, dtype=torch.bool, device=device),
        context=context.view(1, -1), instruction=(index >= tokens - INSTRUCTION_TOKENS).view(1, -1),
        next_position=torch.tensor([tokens], device=device),
        host_lengths=(tokens,), n_targets=0, n_answers=(0,))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def run_case(model, setting: tuple[int, float] | None, tokens: int, decode_tokens: int,
             device: torch.device, dtype: torch.dtype, repeats: int = 3,
             budget_s: float = 20.0) -> Row:
    """One setting at one length: the median prefill time over ``repeats`` runs after a
    warm-up (fewer when they would exceed ``budget_s``), then one more prefill and greedy
    decoding from its cache. Peak memory: on CUDA the allocator's peak over that last prefill
    and the decoding (weights included); on CPU the extra resident memory of one prefill."""
    from lyra_pl.model.decoder import DecoderCache, decode_step, run_layers
    from lyra_pl.model.extractor import TokenState
    from lyra_pl.bench.kernels import measure

    cfg = model.config
    prune_at, rho = ((), 1.0) if setting is None else (
        cfg.replace(lmme_blocks=setting[0]).lmme_layers(), setting[1])
    assembled = prompt(cfg, tokens, device, dtype)

    def prefill():
        cache = DecoderCache()
        state, keeps = run_layers(model.llm, TokenState.from_assembled(assembled), prune_at, rho,
                                  cfg.lmme_min_keep, cache, cfg.lmme_causal)
        return cache, state, keeps

    m = measure(prefill, device, repeats, warmup=1, budget_s=budget_s)
    peak, prefill_s = m.peak_extra_mb, m.median_ms / 1e3
    # The memory probe's cache stayed alive through the timed runs: dropped, and the peak
    # counted afresh over one prefill and the decoding, so no cache is counted twice.
    del m
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    cache, state, keeps = prefill()
    last = state.hidden[:, -1]
    position = assembled.next_position.clone()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        token = model.lm_head(last).argmax(-1)
        hidden = decode_step(model.llm, model.llm.embed_tokens(token)[:, None],
                             position.view(1, 1, 1).expand(3, 1, 1), cache)
        position += 1
        last = hidden[:, 0]
    _sync(device)
    decode_s = time.perf_counter() - t0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20  # whole process, as nvidia-smi
    kept = int(keeps[-1].sum()) if keeps else tokens
    name = "baseline" if setting is None else f"LMME({setting[0]},{setting[1]})"
    return Row(name, tokens, prefill_s, decode_tokens / decode_s, peak, kept)


def format_table(rows: list[Row]) -> str:
    head = f"{'setting':<13}{'tokens':>8}{'prefill s':>11}{'decode tok/s':>14}{'peak MiB':>10}{'kept':>8}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.note:
            lines.append(f"{r.setting:<13}{r.tokens:>8}{'':>11}{'':>14}{'':>10}{'':>8}  {r.note}")
        else:
            lines.append(f"{r.setting:<13}{r.tokens:>8}{r.prefill_s:>11.3f}{r.decode_tok_s:>14.1f}"
                         f"{r.peak_mib:>10.0f}{r.kept_after_last_block:>8}")
    return "\n".join(lines)


def write_plot(rows: list[Row], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for setting in dict.fromkeys(r.setting for r in rows):
        ok = [r for r in rows if r.setting == setting and not r.note]
        for ax, key in zip(axes, ("prefill_s", "decode_tok_s", "peak_mib")):
            ax.plot([r.tokens for r in ok], [getattr(r, key) for r in ok], marker="o", label=setting)
    for ax, title in zip(axes, ("prefill (s)", "decode (tokens/s)", "peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=None,
                        help="model shape (default: base on CUDA, tiny on CPU)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when available")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="prompt lengths (default: 2^11..2^17 on CUDA, 2^8..2^12 on CPU)")
    parser.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded (default: 32)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed prefills per case, median reported (default: 3)")
    parser.add_argument("--out", type=Path, default=Path("bench_results"),
                        help="output folder for CSV, JSON and PNG (default: bench_results/)")


def main(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = args.preset or ("base" if device.type == "cuda" else "tiny")
    lengths = args.lengths or (GPU_LENGTHS if device.type == "cuda" else CPU_LENGTHS)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(preset, device, dtype)
    rows: list[Row] = []
    for name, setting in SETTINGS.items():
        oom = False
        for tokens in lengths:
            if oom:  # longer prompts would only run out of memory again
                rows.append(Row(name, tokens, math.nan, math.nan, math.nan, 0, "OOM (shorter did)"))
                continue
            try:
                rows.append(run_case(model, setting, tokens, args.decode_tokens, device, dtype,
                                     args.repeats))
            except torch.cuda.OutOfMemoryError:
                oom = True
                rows.append(Row(name, tokens, math.nan, math.nan, math.nan, 0, "OOM"))
                torch.cuda.empty_cache()
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(format_table(rows))
    stem = args.out / f"prefill_{preset}_{datetime.date.today().isoformat()}_{device.type}"
    info = {**machine_info([device], args),
            "preset": preset, "device": str(device), "dtype": str(dtype),
            "decode_tokens": args.decode_tokens,
            "prompt": {"system": SYSTEM_TOKENS, "instruction": INSTRUCTION_TOKENS,
                       "context": "the rest (speech)"},
            "repeats": args.repeats,
            "memory": "CUDA: peak allocated by torch in the prefill and decode of the case "
                      "(weights included); CPU: peak resident set growth during one prefill"}
    write_results(stem, rows, info)
    skipped = write_plot(rows, stem.with_suffix(".png"))
    print(f"\nwrote {stem}.csv, {stem}.json" + (f", {stem}.png" if skipped is None
                                                  else f" (plot skipped: {skipped})"))
    return 0
