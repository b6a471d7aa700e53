"""`lyra-pl needle`: needle in a haystack for long speech (the paper's Figure 6).

A spoken needle ("The secret code word is cherry.") is spliced into a long recording at
chosen depths (0 = start, 1 = end) of haystacks of chosen lengths; the model hears the whole
recording and is asked the needle's question. A cell's score is the fraction of needles
whose answer word the model says. Outputs in ``--out``:

- ``needle_heatmap.png``: accuracy by depth (x) and haystack length (y);
- ``kept_tokens.png``: for one recording (the longest haystack, needle at the middle depth),
  which speech positions survive each LMME pruning step, with the needle marked;
- ``needle.json`` (every cell, every answer, the kept-token map) and ``needle.csv``;
- an MLflow run with the accuracy metrics and these files as artifacts.

Haystacks are built from audio files (default: the tiny corpus's LibriSpeech-format
validation tree; ``--haystack`` takes files or directories, e.g. a LibriSpeech split),
concatenated in name order with 0.3 s of silence between clips and cut to length. Needles
are the tiny corpus's (``data/tiny/eval/needles.json``: spoken by its held-out voice) or a
file in that format (``--needles``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from lyra_pl.data.media import SAMPLE_RATE, encode_wav, load_audio
from lyra_pl.eval.metrics import normalize_answer

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".opus", ".mp3", ".m4a"}
GAP_S = 0.3


# ----------------------------------------------------------------------------- audio
def audio_files(paths: Sequence[str | Path]) -> list[Path]:
    """The audio files named, or found below the directories named, in name order."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in AUDIO_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"--haystack {str(p)!r} does not exist")
    if not files:
        raise ValueError(f"--haystack {[str(p) for p in paths]}: no audio files")
    return files


def load_clip(path: Path) -> np.ndarray:
    """A file as float32 mono at 16 kHz."""
    return load_audio(path)[0]


def haystack(clips: Sequence[np.ndarray], seconds: float) -> np.ndarray:
    """The clips in order (cycling), each followed by ``GAP_S`` of silence, cut to
    ``seconds``."""
    n = int(round(seconds * SAMPLE_RATE))
    gap = np.zeros(int(GAP_S * SAMPLE_RATE), np.float32)
    parts, total, i = [], 0, 0
    while total < n:
        clip = clips[i % len(clips)]
        parts += [clip, gap]
        total += len(clip) + len(gap)
        i += 1
    return np.concatenate(parts)[:n]


def insert(hay: np.ndarray, needle: np.ndarray, depth: float) -> tuple[np.ndarray, int]:
    """The haystack with the needle spliced in at ``depth`` of its length (0 start, 1 end),
    and the needle's first sample."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth {depth} is outside [0, 1]")
    at = int(round(depth * len(hay)))
    return np.concatenate([hay[:at], needle, hay[at:]]), at


def answered(prediction: str, answer: str) -> bool:
    """Whether the (normalized) answer appears among the prediction's words."""
    words = normalize_answer(prediction).split()
    want = normalize_answer(answer).split()
    return any(words[i:i + len(want)] == want for i in range(len(words) - len(want) + 1))


# ----------------------------------------------------------------------------- model
class Prompter:
    """Turns (audio, question) pairs into a model batch with the training data path (the
    shard sample decoder in prompt mode, then collate)."""

    def __init__(self, tokenizer: str | Path, placeholder_ids: dict[str, int]):
        from lyra_pl.data.decode import SampleDecoder

        self.decoder = SampleDecoder(tokenizer, mode="prompt", expected_ids=placeholder_ids)

    def batch(self, items: Sequence[tuple[np.ndarray, str, str]]):
        from lyra_pl.model.inputs import collate

        decoded = []
        for i, (audio, question, answer) in enumerate(items):
            meta = {"conversations": [{"from": "human", "value": f"<speech>\n{question}"},
                                      {"from": "gpt", "value": answer}]}
            decoded.append(self.decoder({"__key__": f"needle{i}", "json": meta,
                                         "speech0.wav": encode_wav(audio, SAMPLE_RATE)}))
        tok = self.decoder.tokenizer
        return collate([d.sample for d in decoded], self.decoder.placeholder_ids(),
                       tok.pad_token_id)


@torch.no_grad()
def kept_map(model, inputs, seconds: float, bins: int) -> dict[str, Any]:
    """Which speech positions of sample 0 survive each LMME step: per step, the fraction of
    its speech tokens kept in each of ``bins`` equal time bins of the recording."""
    from lyra_pl.model.assemble import SPEECH

    model.activate_adapters(inputs)
    assembled, _ = model.prepare(inputs)
    _, keeps = model.run_decoder(assembled)
    speech = (assembled.modality[0] == SPEECH).nonzero().flatten()  # assembled positions
    n = len(speech)
    time_of = {int(p): k * seconds / n for k, p in enumerate(speech.tolist())}
    alive = torch.arange(assembled.valid.shape[1], device=speech.device)
    rows = [alive.clone()]
    for keep in keeps:
        alive = alive[keep[0, : len(alive)]]
        rows.append(alive.clone())
    edges = np.linspace(0, seconds, bins + 1)
    out = []
    for r in rows:
        times = np.array([time_of[int(p)] for p in r.tolist() if int(p) in time_of])
        total = np.histogram([time_of[int(p)] for p in speech.tolist()], edges)[0]
        kept = np.histogram(times, edges)[0]
        out.append((kept / np.maximum(total, 1)).round(4).tolist())
    return {"bins_s": edges.round(3).tolist(), "kept_fraction": out,
            "speech_tokens": [int(sum(1 for p in r.tolist() if int(p) in time_of)) for r in rows],
            "pruned_after_layers": list(model.config.lmme_layers())}


# ----------------------------------------------------------------------------- plots
def plot_heatmap(acc: np.ndarray, lengths: Sequence[float], depths: Sequence[float],
                 path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + 0.9 * len(depths)), 1.2 + 0.6 * len(lengths)))
    im = ax.imshow(acc, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", origin="lower")
    ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_yticks(range(len(lengths)), [f"{s:g} s" for s in lengths])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("haystack length")
    for i in range(len(lengths)):
        for j in range(len(depths)):
            ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_kept(kept: dict[str, Any], needle_s: tuple[float, float], path: Path,
              title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frac = np.array(kept["kept_fraction"])
    edges = kept["bins_s"]
    fig, ax = plt.subplots(figsize=(9, 1.0 + 0.45 * len(frac)))
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1, aspect="auto", origin="upper",
              extent=(edges[0], edges[-1], len(frac) - 0.5, -0.5), interpolation="nearest")
    labels = ["input"] + [f"after layer {layer}" for layer in kept["pruned_after_layers"]]
    ax.set_yticks(range(len(frac)), [f"{lab} ({n})" for lab, n in
                                     zip(labels, kept["speech_tokens"])])
    ax.axvspan(*needle_s, color="red", alpha=0.25, label="needle")
    ax.set_xlabel("time in the recording (s)")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", type=Path, required=True,
                        help="a stage export directory (e.g. runs/tiny/stage3_long_speech/export)")
    parser.add_argument("--qwen2vl", default=None, help="default: the export's base.json")
    parser.add_argument("--whisper", default=None, help="default: the export's base.json")
    parser.add_argument("--tokenizer", default="data/tiny/tokenizer")
    parser.add_argument("--haystack", nargs="+", default=["data/tiny/eval/librispeech"],
                        help="audio files or directories (default: the tiny corpus's)")
    parser.add_argument("--needles", default="data/tiny/eval/needles.json",
                        help="needle list: [{audio, question, answer, ...}] (audio relative "
                             "to the file)")
    parser.add_argument("--num-needles", type=int, default=None,
                        help="use only the first N needles per cell (default: all)")
    parser.add_argument("--lengths", type=float, nargs="+", default=[15, 30, 60, 90],
                        help="haystack lengths in seconds (default: 15 30 60 90)")
    parser.add_argument("--depths", type=float, nargs="+", default=[0, 0.25, 0.5, 0.75, 1],
                        help="needle depths in [0, 1] (default: 0 0.25 0.5 0.75 1)")
    parser.add_argument("--lmme", nargs=2, metavar=("BLOCKS", "RATIO"), default=None,
                        help="LMME blocks and keep ratio (default: the export's config)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--bins", type=int, default=60, help="time bins of the kept-token map")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/needle"))
    parser.add_argument("--experiment", default="lyra_pl-eval")
    parser.add_argument("--no-mlflow", action="store_true")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lyra-pl needle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if any(not 0 <= d <= 1 for d in args.depths):
        parser.error(f"--depths must lie in [0, 1], got {args.depths}")
    if any(s <= 0 for s in args.lengths):
        parser.error(f"--lengths must be positive, got {args.lengths}")
    if args.num_needles is not None and args.num_needles < 1:
        parser.error(f"--num-needles must be >= 1, got {args.num_needles}")
    return run(args)


def _needles(path: Path, limit: int | None) -> list[dict[str, Any]]:
    entries = json.loads(path.read_text())
    for i, e in enumerate(entries):
        missing = [k for k in ("audio", "question", "answer") if k not in e]
        if missing:
            raise ValueError(f"{path}: needle {i} lacks {missing}")
        e["clip"] = load_clip(path.parent / e["audio"])
    if not entries:
        raise ValueError(f"{path}: no needles")
    return entries[:limit]


def run(args: argparse.Namespace) -> int:
    from lyra_pl.data.datamodule import resolve_path
    from lyra_pl.data.decode import load_tokenizer
    from lyra_pl.eval.cli import load_for_inference
    from lyra_pl.eval.runner import log_to

    t0 = time.perf_counter()
    overrides = ({"lmme_blocks": int(args.lmme[0]), "lmme_keep_ratio": float(args.lmme[1])}
                 if args.lmme else {})
    module, info, context = load_for_inference(args, args.max_new_tokens, overrides)
    model, device = module.model, module.device
    cfg = model.config
    lmme = f"LMME({cfg.lmme_blocks}, {cfg.lmme_keep_ratio})" if cfg.lmme_blocks else "no LMME"
    tokenizer = resolve_path(args.tokenizer)
    tok = load_tokenizer(tokenizer)
    needles = _needles(resolve_path(args.needles), args.num_needles)
    clips = [load_clip(f) for f in audio_files([resolve_path(h) for h in args.haystack])]
    prompter = Prompter(tokenizer, dict(cfg.placeholder_ids))

    cells = [(length, depth) for length in args.lengths for depth in args.depths]
    hays = {length: haystack(clips, length) for length in args.lengths}
    jobs = [(c, needle) for c in range(len(cells)) for needle in needles]
    print(f"{len(cells)} cells x {len(needles)} needles = {len(jobs)} recordings; model "
          f"{info['preset']} with {lmme}", flush=True)
    from tqdm import tqdm

    answers: list[dict[str, Any]] = []
    with torch.no_grad():
        for start in tqdm(range(0, len(jobs), args.batch_size), desc="needle", unit="batch"):
            chunk = jobs[start:start + args.batch_size]  # recordings built per batch
            inputs = prompter.batch([(insert(hays[cells[c][0]], n["clip"], cells[c][1])[0],
                                      n["question"], n["answer"]) for c, n in chunk])
            with context():
                out = model.generate(inputs.to(device), max_new_tokens=args.max_new_tokens)
            for (c, needle), ids in zip(chunk, out.tokens):
                text = tok.decode(ids, skip_special_tokens=True).strip()
                answers.append({"length_s": cells[c][0], "depth": cells[c][1],
                                "needle": needle.get("text", needle["answer"]),
                                "answer": needle["answer"], "prediction": text,
                                "correct": answered(text, needle["answer"])})
    acc = np.zeros((len(args.lengths), len(args.depths)))
    for i, length in enumerate(args.lengths):
        for j, depth in enumerate(args.depths):
            hits = [a["correct"] for a in answers
                    if a["length_s"] == length and a["depth"] == depth]
            acc[i, j] = sum(hits) / len(hits)

    # The kept-token map of one recording: the longest haystack, the middle depth.
    length, depth = max(args.lengths), sorted(args.depths)[len(args.depths) // 2]
    audio, at = insert(haystack(clips, length), needles[0]["clip"], depth)
    inputs = prompter.batch([(audio, needles[0]["question"], needles[0]["answer"])]).to(device)
    seconds = len(audio) / SAMPLE_RATE
    with context():
        kept = kept_map(model, inputs, seconds, args.bins)
    needle_span = (at / SAMPLE_RATE, (at + len(needles[0]["clip"])) / SAMPLE_RATE)

    args.out.mkdir(parents=True, exist_ok=True)
    title = f"{args.ckpt.parent.name} ({info['preset']}, {lmme})"
    heat, kept_png = args.out / "needle_heatmap.png", args.out / "kept_tokens.png"
    plot_heatmap(acc, args.lengths, args.depths, heat, f"needle in a haystack: {title}")
    plot_kept(kept, needle_span, kept_png, f"speech tokens kept: {seconds:.0f} s recording, "
              f"needle at {depth:.0%}: {title}")
    chance = float(np.mean([1 / len(n["choices"]) for n in needles if n.get("choices")])) \
        if any(n.get("choices") for n in needles) else None
    record = {"ckpt": info["ckpt"], "preset": info["preset"], "lmme": lmme,
              "lengths_s": args.lengths, "depths": args.depths, "needles": len(needles),
              "accuracy": acc.round(4).tolist(), "overall": float(acc.mean()),
              "chance_if_guessing_among_choices": chance,
              "kept_map": {**kept, "recording_s": round(seconds, 2), "depth": depth,
                           "needle_s": [round(x, 2) for x in needle_span]},
              "answers": answers, "seconds": round(time.perf_counter() - t0, 1),
              "device": str(device), "date": datetime.datetime.now().isoformat(timespec="seconds")}
    (args.out / "needle.json").write_text(json.dumps(record, indent=1) + "\n")
    with open(args.out / "needle.csv", "w") as f:
        f.write("length_s," + ",".join(f"depth_{d:g}" for d in args.depths) + "\n")
        for length, row in zip(args.lengths, acc):
            f.write(f"{length:g}," + ",".join(f"{v:.4f}" for v in row) + "\n")
    print("\naccuracy (rows: haystack length, columns: needle depth)")
    print(f"{'':>9}" + "".join(f"{d:>8.0%}" for d in args.depths))
    for length, row in zip(args.lengths, acc):
        print(f"{length:>7g} s" + "".join(f"{v:>8.2f}" for v in row))
    print(f"overall {acc.mean():.3f}" + (f" (guessing among the choices: {chance:.3f})"
                                         if chance else ""))
    print(f"kept speech tokens per step ({seconds:.0f} s recording): {kept['speech_tokens']}")
    if not args.no_mlflow:
        from lyra_pl.training.tracking import LyraMLFlowLogger

        logger = LyraMLFlowLogger(experiment_name=args.experiment,
                                  run_name=f"needle {args.ckpt.parent.name}")
        logger.log_hyperparams({**info, "lmme": lmme, "lengths": args.lengths,
                                "depths": args.depths, "needles": len(needles)})
        metrics = {"needle/accuracy": float(acc.mean())}
        metrics.update({f"needle/accuracy_{length:g}s": float(row.mean())
                        for length, row in zip(args.lengths, acc)})
        log_to([logger], metrics, [heat, kept_png, args.out / "needle.json",
                                   args.out / "needle.csv"])
        logger.finalize("success")
    print(f"wrote {heat}, {kept_png}, {args.out / 'needle.json'}, {args.out / 'needle.csv'}")
    return 0
