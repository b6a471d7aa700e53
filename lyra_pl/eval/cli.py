"""`lyra-pl eval --task TASK [TASK ...] --ckpt EXPORT_DIR`: the speech-centric evaluation.

The model is a stage's export directory (``<stage run>/export``, written by ``ExportModel``:
its ``config.json``, projectors, speech generator and LoRA adapters) on top of the frozen
Qwen2-VL and Whisper weights it was trained on (``--qwen2vl`` / ``--whisper``, by default
the ones recorded in the export's ``base.json``). Each task's data (default: the tiny
corpus's set) is converted into shards, the model answers greedily, and the scores go to a
table, ``<out>/<task>/results.json`` (with ``predictions.jsonl``), ``<out>/summary.json``,
and one MLflow run.

Under ``torchrun`` every process holds a whole copy of the model (on ``cuda:LOCAL_RANK``, or
the CPU) and answers its share of the batches; rank 0 gathers the answers, scores, writes
and logs. The results are those of one process with the same ``--batch-size``.

    lyra-pl eval --task all --ckpt runs/tiny/stage4_speech_gen/export
    lyra-pl eval --task asr --data /data/LibriSpeech/test-clean --ckpt ... --qwen2vl ... --whisper ...
    torchrun --standalone --nproc_per_node 8 -m lyra_pl.cli eval --task all --ckpt ...
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from lyra_pl.eval.tasks import TASKS


def build_module(ckpt: Path, qwen2vl: str | None, whisper: str | None, max_new_tokens: int,
                 overrides: dict | None = None):
    """A :class:`LyraStage` holding the exported model (nothing trains), with ``overrides``
    of its LyraConfig (e.g. LMME), and what it loads."""
    from lyra_pl.training.stages import BASE_FILE, LyraStage

    if not (ckpt / "config.json").is_file():
        raise FileNotFoundError(
            f"--ckpt {str(ckpt)!r} is not a stage export directory (no config.json); give "
            "<stage run>/export, written at the end of fit by the ExportModel callback")
    config = json.loads((ckpt / "config.json").read_text())
    base = json.loads((ckpt / BASE_FILE).read_text()) if (ckpt / BASE_FILE).is_file() else {}
    for name in ("qwen2vl", "whisper"):
        if (ckpt / name).is_dir():  # stage 0 exports its own base model
            base.setdefault(name, str(ckpt / name))
    qwen2vl, whisper = qwen2vl or base.get("qwen2vl"), whisper or base.get("whisper")
    missing = [f"--{n}" for n, v in (("qwen2vl", qwen2vl), ("whisper", whisper)) if v is None]
    if missing:
        raise ValueError(f"{ckpt} does not record its base weights ({BASE_FILE}); pass "
                         f"{' and '.join(missing)}")
    for name, path in (("qwen2vl", qwen2vl), ("whisper", whisper)):
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{name} weights {path!r} do not exist")
    overrides = {**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()
                    if k != "preset"}, **(overrides or {})}
    module = LyraStage(preset=config["preset"], model_overrides=overrides, init_from=str(ckpt),
                       qwen2vl=qwen2vl, whisper=whisper, param_dtype=None, reduce_dtype=None,
                       max_new_tokens=max_new_tokens)
    return module, {"ckpt": str(ckpt.resolve()), "qwen2vl": str(Path(qwen2vl).resolve()),
                    "whisper": str(Path(whisper).resolve()), "preset": config["preset"]}


def load_for_inference(args: argparse.Namespace, max_new_tokens: int,
                       overrides: dict | None = None):
    """The export of ``args.ckpt`` (see :func:`build_module`) built, on ``args.device`` in
    ``args.dtype`` (default: CUDA and bfloat16 when available, else CPU and float32), in eval
    mode. Returns (module, info, autocast context factory): inputs (features, pixels) arrive
    in float32, and autocast runs them in the weights' dtype."""
    import torch
    from contextlib import nullcontext

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    context = (lambda: torch.autocast(device.type, dtype)) if dtype != torch.float32 else nullcontext
    module, info = build_module(args.ckpt, args.qwen2vl, args.whisper, max_new_tokens, overrides)
    module.configure_model()
    module.to(device=device, dtype=dtype).eval()
    info.update(device=str(torch.cuda.get_device_name(device) if device.type == "cuda"
                           else device), dtype=str(dtype).removeprefix("torch."))
    return module, info, context


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", nargs="+", required=True, metavar="TASK",
                        help=f"one or more of {', '.join(TASKS)}, or all")
    parser.add_argument("--ckpt", type=Path, required=True,
                        help="a stage export directory (<stage run>/export)")
    parser.add_argument("--data", default=None,
                        help="the task's data (only with one task; default: the tiny corpus's "
                             "set): a shard directory, an official JSON, or for asr a "
                             "LibriSpeech-format tree or JSONL manifest")
    parser.add_argument("--qwen2vl", default=None, help="default: the export's base.json")
    parser.add_argument("--whisper", default=None, help="default: the export's base.json")
    parser.add_argument("--spelling-map", default=None, metavar="FILE",
                        help="asr: Whisper's British-to-American spelling map applied before "
                             "WER (default: the Whisper checkpoint's normalizer.json when it "
                             "has one; none: no map)")
    parser.add_argument("--tokenizer", default="data/tiny/tokenizer",
                        help="local tokenizer directory (default: the tiny corpus's)")
    parser.add_argument("--out", type=Path, default=Path("runs/eval"),
                        help="output directory (default: runs/eval)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="answer length limit (default: per task)")
    parser.add_argument("--limit", type=int, default=None,
                        help="only the first N samples of each task (quick checks)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda when available)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="weights and compute (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--experiment", default="lyra_pl-eval", help="MLflow experiment name")
    parser.add_argument("--no-mlflow", action="store_true", help="log nothing to MLflow")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lyra-pl eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    names = list(TASKS) if args.task == ["all"] else args.task
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)} or all")
    if args.data is not None and len(names) != 1:
        parser.error("--data names one task's data: give exactly one --task")
    if args.spelling_map not in (None, "none"):
        from lyra_pl.eval.metrics import spelling_map

        spelling_map(args.spelling_map)  # a bad file fails before the model loads
    return run(args, names)


def data_parallel(args: argparse.Namespace) -> tuple[int, int]:
    """(rank, world size): under ``torchrun`` (``WORLD_SIZE`` > 1) the default process group
    (NCCL between GPUs, one per process at ``LOCAL_RANK``; gloo on CPU) is set up and
    ``args.device`` pointed at this process's GPU; otherwise (0, 1)."""
    import os

    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    cuda = torch.cuda.is_available() and (args.device or "cuda").startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        args.device = f"cuda:{local}"
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return torch.distributed.get_rank(), world


def _broadcast(obj):
    """``obj`` of rank 0, on every rank."""
    import torch

    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def run(args: argparse.Namespace, names: list[str]) -> int:
    rank, world = data_parallel(args)
    module, info, context = load_for_inference(args, 32)
    info["processes"] = world
    loggers = []
    if not args.no_mlflow and rank == 0:
        from lyra_pl.training.tracking import LyraMLFlowLogger

        loggers.append(LyraMLFlowLogger(experiment_name=args.experiment,
                                        run_name=f"eval {args.ckpt.parent.name}"))
        loggers[0].log_hyperparams({**info, "tasks": ",".join(names),
                                    "data": args.data or "tiny corpus", "limit": args.limit})
    try:
        _run_tasks(args, names, module, info, context, loggers, rank, world)
    except BaseException:
        for lg in loggers:
            lg.finalize("failed")
        raise
    for lg in loggers:
        lg.finalize("success")
    if rank == 0:
        print(f"\nwrote {args.out / 'summary.json'} and {args.out}/<task>/"
              "{results.json,predictions.jsonl}")
    return 0


def _run_tasks(args, names, module, info, context, loggers, rank: int = 0,
               world: int = 1) -> list[dict]:
    """Each task (:func:`~lyra_pl.eval.runner.evaluate`, as ``EvalTask`` runs it during fit),
    then its files and metrics; then the summary. With several processes all answer, and
    rank 0 alone converts the data (first) and writes."""
    from lyra_pl.eval.runner import evaluate, format_results, log_to, metric_dict, write_outputs

    records = []
    for name in names:
        if rank == 0:
            print(f"\n=== {name}", flush=True)
        record, rows = evaluate(
            TASKS[name], module, args.tokenizer, args.data, args.out / name / "data",
            args.batch_size, args.max_new_tokens, limit=args.limit,
            spelling_map=args.spelling_map, context=context, progress=rank == 0, rank=rank,
            world=world, broadcast=_broadcast if world > 1 else lambda obj: obj, **info,
            date=datetime.datetime.now().isoformat(timespec="seconds"))
        records.append(record)
        if rank != 0:
            continue
        files = write_outputs(args.out, record, rows)
        log_to(loggers, metric_dict(record), files)
        print(format_results([record]), flush=True)
        lost = len(record["not_converted"]) + len(record["skipped_at_decode"])
        if lost:
            print(f"warning: {lost} {name} sample(s) could not be read and are not scored "
                  f"(see {files[1]})", file=sys.stderr)
    if rank != 0:
        return records
    table = format_results(records)
    print("\n" + table)
    summary = args.out / "summary.json"
    summary.write_text(json.dumps(records, indent=1) + "\n")
    (args.out / "summary.txt").write_text(table + "\n")
    log_to(loggers, {}, [summary, args.out / "summary.txt"])
    return records
