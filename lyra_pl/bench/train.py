"""Training throughput of a stage-2 step (joint SFT: speech projector + ``speech`` LoRA, CE +
LCMR), baseline vs LMME: tokens/s, step time, peak memory and model FLOPs utilization.

The real training path runs: :class:`~lyra_pl.training.stages.JointSFTStage` in a Lightning
``Trainer`` (FSDP2 over one device on CUDA by default, as on one GPU of a cluster), AdamW,
random weights (cost does not depend on them). Every step sees the same batch: per sample a
system prompt, one speech clip of the length that fills ``--seq`` decoder tokens (10 speech
tokens per second), a 64-token instruction and a 32-token answer, and a transcript of
2.5 tokens per second of speech for LCMR. Steps after ``--warmup`` are timed (CUDA
synchronized); peak memory (CUDA only) is torch's peak allocation over the timed steps.

Model FLOPs per step are counted from the module shapes and the tokens each decoder layer
really processed (LMME shrinks them): 2 FLOPs per multiply-add; decoder linears forward +
input gradients (+ weight gradients for the LoRA factors of the adapters the batch runs),
causal attention 2 n^2 d forward and twice that backward (the causal half of the n x n
products, what FlashAttention computes); the frozen Whisper encoder forward (conv1 at 3000
mel frames, the rest at 1500 states, non-causal attention, per 30 s window); the trainable
projector forward + weight gradients + input gradients past its first layer; ``lm_head`` on
the answer tokens. Not counted: the log-mel features (preprocessing), LMME's token scoring
(overhead), the LCMR similarity (about 0.1% of a tiny step) and elementwise ops.
``tests/test_bench.py`` checks the count against torch's ``FlopCounterMode`` on a real
training step.
MFU = FLOPs / (step time x the device's peak dense bf16 FLOP/s: H100/H200 SXM 989 TFLOP/s,
H100 PCIe 756, A100 312, or ``--peak-tflops``). On CPU there is no MFU unless a peak is given.

``--context-parallel N``: each setting runs on N devices (N CPU processes without a GPU) as
one context-parallel group under FSDP2 (each a share of every sample's tokens, its own
process tree per setting). The row's step time is the slowest rank's median, tokens/s the
group's (the sample's decoder tokens per second) and per rank (divided by N), peak memory the
largest rank's, and MFU the per-rank share of the model FLOPs (1/N of the step's) against one
device's peak.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import re
import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import lightning as L
import torch

from lyra_pl.bench.report import machine_info, write_results
from lyra_pl.training.tracking import synced_clock

SETTINGS = {"baseline": None, "LMME(4,0.8)": (4, 0.8), "LMME(4,0.7)": (4, 0.7)}
SYSTEM_TOKENS, INSTRUCTION_TOKENS, ANSWER_TOKENS = 16, 64, 32
SPEECH_TOKENS_PER_S, TRANSCRIPT_TOKENS_PER_S = 10, 2.5
# Peak dense bf16 TFLOP/s by device-name substring, first match wins (NVIDIA data sheets).
PEAK_TFLOPS = {"H200 NVL": 835.0, "H200": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0,
               "H100": 989.4, "A100": 312.0}


@dataclass
class Row:
    setting: str
    seq: int
    batch_size: int
    step_s: float
    tokens_per_s: float
    peak_gib: float
    tflops_per_step: float
    mfu: float
    decoder_tokens: str  # tokens per layer of sample 0 (first, after each pruning step)
    note: str = ""
    context_parallel: int = 1
    tokens_per_s_rank: float = math.nan  # tokens_per_s / context_parallel


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def make_batch(config, seq: int, batch_size: int):
    """The benchmark batch: a dict ``{"inputs": LyraInputs}`` of ``batch_size`` equal samples
    of ``seq`` decoder tokens."""
    from lyra_pl.model.inputs import Sample, collate

    text = SYSTEM_TOKENS + INSTRUCTION_TOKENS + ANSWER_TOKENS
    speech_tokens = seq - text
    if speech_tokens < SPEECH_TOKENS_PER_S:
        raise ValueError(f"--seq {seq}: too short for a speech clip after {text} text tokens")
    seconds = speech_tokens / SPEECH_TOKENS_PER_S
    g = torch.Generator().manual_seed(0)
    ids = config.placeholder_ids
    vocab = min(config.vocab_size, min(ids.values()))  # ordinary tokens only

    def words(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    prompt = words(SYSTEM_TOKENS) + [ids["speech"]] + words(INSTRUCTION_TOKENS)
    answer = words(ANSWER_TOKENS)
    samples = [Sample(input_ids=prompt + answer, labels=[-100] * len(prompt) + answer,
                      speech=[0.1 * torch.randn(int(seconds * 16000), generator=g)],
                      transcripts=[words(max(1, round(seconds * TRANSCRIPT_TOKENS_PER_S)))])
               for _ in range(batch_size)]
    return {"inputs": collate(samples, ids, config.pad_token_id)}


def _linear_params(module: torch.nn.Module) -> int:
    """Weights of the Linear / Conv layers under ``module`` (global sizes under FSDP2)."""
    return sum(m.weight.numel() for m in module.modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d)))


def _decoder_layer_params(layer: torch.nn.Module, adapters: Sequence[str]) -> tuple[int, int]:
    """(frozen, trainable) weights of the Linear layers one decoder layer runs for a batch with
    the LoRA ``adapters``: its base linears and those adapters' factors (peft's
    ``<linear>.lora_A.<adapter>``; a batch's other adapters do not run)."""
    frozen = trainable = 0
    for name, m in layer.named_modules():
        factor = re.fullmatch(r".*\.lora_[AB]\.([^.]+)", name)
        if not isinstance(m, torch.nn.Linear) or (factor and factor[1] not in adapters):
            continue
        if m.weight.requires_grad:
            trainable += m.weight.numel()
        else:
            frozen += m.weight.numel()
    return frozen, trainable


def step_flops(model, tokens_per_layer: list[list[int]], speech_tokens: list[int],
               windows: int, answer_tokens: int, adapters: Sequence[str],
               causal: bool = True) -> float:
    """Model FLOPs of one training step (see the module docstring). ``tokens_per_layer``:
    per sample, the decoder tokens of each layer; ``adapters``: the LoRA adapters the batch
    runs (:meth:`LyraModel.adapters_for`; under FSDP2 the other trainable ones also run, at
    scale 0: not model FLOPs). ``causal=False``: decoder attention as the full n x n products
    (what attention with a mask computes, e.g. ``eager``)."""
    from lyra_pl.model.audio import FRAMES_PER_WINDOW, STATES_PER_WINDOW

    cfg = model.config
    frozen, lora = _decoder_layer_params(model.llm.layers[0], adapters)
    d = cfg.num_heads * cfg.head_dim
    attention = 6 if causal else 12  # n^2 d multiples: forward and backward (twice forward)
    flops = 0.0
    for per_layer in tokens_per_layer:
        for n in per_layer:
            flops += 2 * n * frozen * 2  # forward + input gradients
            flops += 2 * n * lora * 3  # forward + input + weight gradients
            flops += attention * n * n * d
    flops += 2 * answer_tokens * cfg.hidden_size * cfg.vocab_size * 2
    proj = model.speech_projector
    first, rest = proj.linear1.weight.numel(), _linear_params(proj) - proj.linear1.weight.numel()
    # forward + weight gradients; input gradients too past the first layer (its input, the
    # frozen encoder's output, needs none)
    flops += 2 * sum(speech_tokens) * (2 * first + 3 * rest)
    whisper = model.audio_encoder.whisper
    conv1 = whisper.conv1.weight.numel()  # stride 1: runs at the mel frame rate
    flops += windows * (2 * FRAMES_PER_WINDOW * conv1
                        + 2 * STATES_PER_WINDOW * (_linear_params(whisper) - conv1)
                        + 4 * STATES_PER_WINDOW ** 2 * cfg.audio_dim * cfg.audio_layers)
    return flops


def run_setting(args, name: str, setting: tuple[int, float] | None, device: torch.device
                ) -> Row | None:
    """The setting's row (None on the other ranks of a context-parallel run)."""
    from lyra_pl.training.parallelize import FSDP2Strategy
    from lyra_pl.training.stages import JointSFTStage

    overrides = {"lmme_blocks": setting[0], "lmme_keep_ratio": setting[1]} if setting else {}
    cuda = device.type == "cuda"
    fsdp_bf16 = cuda and args.strategy == "fsdp"  # FSDP2's policy owns precision; else autocast
    stage = JointSFTStage(preset=args.preset, model_overrides=overrides,
                          lora_r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                          activation_checkpointing=args.activation_checkpointing,
                          param_dtype="bfloat16" if fsdp_bf16 else None,
                          reduce_dtype="float32" if fsdp_bf16 else None, warmup_ratio=0.0,
                          context_parallel=args.context_parallel)
    batch = make_batch(stage.config, args.seq, args.batch_size)
    timer = StepTimer(args.warmup, device)
    strategy = FSDP2Strategy() if args.strategy == "fsdp" else "auto"
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=args.context_parallel,
                        strategy=strategy,
                        precision="32-true" if args.strategy == "fsdp" or not cuda
                        else "bf16-mixed",
                        max_steps=args.warmup + args.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[timer], default_root_dir=str(args.out),
                        # every rank the same batches: one context-parallel group
                        use_distributed_sampler=args.context_parallel == 1)
    loader = torch.utils.data.DataLoader([batch] * (args.warmup + args.steps), batch_size=None)
    environ = dict(os.environ)
    try:
        trainer.fit(stage, train_dataloaders=loader)
        ranks = [(statistics.median(timer.times), timer.peak_gib)]
        if args.context_parallel > 1:  # every rank's step time and peak memory
            ranks = [None] * args.context_parallel
            torch.distributed.all_gather_object(ranks, (statistics.median(timer.times),
                                                        timer.peak_gib))
        model = stage.model
        on_device = stage.transfer_batch_to_device(batch, stage.device, 0)
        tokens, speech = _decoder_tokens(model, on_device)  # collective under FSDP2
    finally:
        # The FSDP strategy's process group and the MASTER_* variables Lightning exported would
        # otherwise outlive the run (a later launch in this process tree finds the port taken).
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
    if trainer.global_rank:
        return None
    step_s = max(t for t, _ in ranks)
    peak_gib = max(p for _, p in ranks)
    windows = int(batch["inputs"].speech.num_windows().sum())
    flops = step_flops(model, tokens, speech, windows, args.batch_size * ANSWER_TOKENS,
                       model.adapters_for(batch["inputs"]))
    peak = peak_tflops(device, args.peak_tflops)
    entering = sum(t[0] for t in tokens)
    cp = args.context_parallel
    return Row(name, args.seq, args.batch_size, step_s, entering / step_s, peak_gib,
               flops / 1e12, flops / cp / step_s / (peak * 1e12) if peak else math.nan,
               "/".join(str(n) for n in tokens[0]), context_parallel=cp,
               tokens_per_s_rank=entering / step_s / cp)


class StepTimer(L.Callback):
    """Wall time of each training step after ``warmup`` (by
    :func:`~lyra_pl.training.tracking.synced_clock`), and the peak memory of those steps."""

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device = warmup, device
        self.times: list[float] = []
        self.peak_gib = math.nan

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._t0 = synced_clock(self.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        seconds = synced_clock(self.device) - self._t0
        if batch_idx >= self.warmup:
            self.times.append(seconds)
        if self.device.type == "cuda":
            self.peak_gib = torch.cuda.max_memory_allocated(self.device) / 2**30


def _decoder_tokens(model, batch) -> tuple[list[list[int]], list[int]]:
    """Per sample, the decoder tokens each layer processes (LMME shrinks them), and its
    speech tokens, from one forward pass."""
    from lyra_pl.model.assemble import SPEECH

    from lyra_pl.training.parallelize import unsharded_root

    inputs = batch["inputs"]
    with torch.no_grad(), unsharded_root(model):
        model.activate_adapters(inputs)
        assembled, _ = model.prepare(inputs)
        _, keeps = model.run_decoder(assembled)
    prune_at = model.config.lmme_layers()
    n = assembled.valid.sum(1).tolist()
    speech = (assembled.modality == SPEECH).sum(1).tolist()
    kept = [k.sum(1).tolist() for k in keeps]
    out = []
    for b in range(len(n)):
        per, current, j = [], n[b], 0
        for i in range(model.config.num_layers):
            per.append(current)
            if i in prune_at:
                current = kept[j][b]
                j += 1
        out.append(per)
    return out, speech


def format_table(rows: list[Row]) -> str:
    cp = any(r.context_parallel > 1 for r in rows)
    per_rank = f"{'CP':>4}{'tok/s/rank':>12}" if cp else ""
    head = (f"{'setting':<13}{'seq':>7}{'batch':>6}{'step s':>9}{'tokens/s':>11}{per_rank}"
            f"{'peak GiB':>10}{'TFLOP/step':>12}{'MFU':>7}  decoder tokens per layer (sample 0)")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.note:
            lines.append(f"{r.setting:<13}{r.seq:>7}{r.batch_size:>6}  {r.note}")
            continue
        mfu = "n/a" if math.isnan(r.mfu) else f"{r.mfu:.1%}"
        peak = "n/a" if math.isnan(r.peak_gib) else f"{r.peak_gib:.2f}"  # CUDA only
        layers = r.decoder_tokens.split("/")
        short = "/".join(dict.fromkeys(layers)) if len(layers) > 8 else r.decoder_tokens
        ranks = f"{r.context_parallel:>4}{r.tokens_per_s_rank:>12.0f}" if cp else ""
        lines.append(f"{r.setting:<13}{r.seq:>7}{r.batch_size:>6}{r.step_s:>9.3f}"
                     f"{r.tokens_per_s:>11.0f}{ranks}{peak:>10}{r.tflops_per_step:>12.3g}"
                     f"{mfu:>7}  {short}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=None, help="default: mini on CUDA, tiny on CPU")
    parser.add_argument("--seq", type=int, default=None,
                        help="decoder tokens per sample (default: 4096 on CUDA, 512 on CPU)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (default: 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (default: 2)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--lora-rank", type=int, default=64, help="speech LoRA rank (default 64)")
    parser.add_argument("--strategy", choices=["fsdp", "single"], default=None,
                        help="fsdp: FSDP2 over one device (default on CUDA); single: no sharding")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--context-parallel", type=int, default=1, metavar="N",
                        help="run each setting on N devices (CPU processes without a GPU) "
                             "as one context-parallel group under FSDP2 (default 1)")
    parser.add_argument("--row-json", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak dense bf16 TFLOP/s for MFU (default: known GPUs)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--out", type=Path, default=Path("bench_results"))


def main(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    args.preset = args.preset or ("mini" if cuda else "tiny")
    args.seq = args.seq or (4096 if cuda else 512)
    cp = args.context_parallel
    if cp < 1:
        print(f"--context-parallel must be >= 1, got {cp}", file=sys.stderr)
        return 2
    if cp > 1 and args.strategy == "single":
        print("--context-parallel needs --strategy fsdp", file=sys.stderr)
        return 2
    args.strategy = args.strategy or ("fsdp" if cuda or cp > 1 else "single")
    if cp > 1:
        if cuda and torch.cuda.device_count() < cp:
            print(f"--context-parallel {cp}: only {torch.cuda.device_count()} CUDA device(s)",
                  file=sys.stderr)
            return 2
    if args.row_json is not None:  # one setting of a context-parallel run (see _launch)
        row = run_setting(args, args.settings[0], SETTINGS[args.settings[0]], device)
        if row is not None:
            args.row_json.write_text(json.dumps(asdict(row)))
        return 0
    rows: list[Row] = []
    for name in args.settings:
        try:
            rows.append(_launch(args, name) if cp > 1
                        else run_setting(args, name, SETTINGS[name], device))
        except torch.cuda.OutOfMemoryError:
            rows.append(Row(name, args.seq, args.batch_size, math.nan, math.nan, math.nan,
                            math.nan, math.nan, "", "OOM", context_parallel=cp))
        # The Trainer and the module reference each other: only the collector frees a
        # setting's model, optimizer and activations before the next one is measured.
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(format_table(rows))
    stem = args.out / (f"train_{args.preset}_seq{args.seq}{f'_cp{cp}' if cp > 1 else ''}_"
                       f"{datetime.date.today().isoformat()}_{device.type}")
    info = {**machine_info([device], args),
            "preset": args.preset, "seq": args.seq, "batch_size": args.batch_size,
            "steps": args.steps, "warmup": args.warmup, "strategy": args.strategy,
            "lora_rank": args.lora_rank, "activation_checkpointing": args.activation_checkpointing,
            "context_parallel": cp,
            "device": str(device), "peak_tflops": peak_tflops(device, args.peak_tflops),
            "rows": [asdict(r) for r in rows]}
    write_results(stem, rows, info)
    print(f"\nwrote {stem}.csv, {stem}.json")
    return 0


def _launch(args: argparse.Namespace, name: str) -> Row:
    """One setting of a context-parallel run in a process tree of its own (Lightning launches
    its ranks; a second Trainer in the same tree would find the first one's process group)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        argv = [sys.executable, "-m", "lyra_pl.bench", "train", "--settings", name,
                "--row-json", str(out)]
        for flag in ("preset", "seq", "batch_size", "steps", "warmup", "lora_rank", "strategy",
                     "context_parallel", "peak_tflops", "device", "out"):
            value = getattr(args, flag)
            if value is not None:
                argv += [f"--{flag.replace('_', '-')}", str(value)]
        if args.activation_checkpointing:
            argv.append("--activation-checkpointing")
        proc = subprocess.run(argv, capture_output=True, text=True)
        if "OutOfMemoryError" in proc.stderr:
            raise torch.cuda.OutOfMemoryError(proc.stderr[-500:])
        if proc.returncode or not out.is_file():
            raise RuntimeError(f"setting {name} under --context-parallel {args.context_parallel} "
                               f"failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return Row(**json.loads(out.read_text()))
