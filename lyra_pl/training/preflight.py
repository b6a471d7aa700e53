"""What a stage run needs, checked before anything starts (no distributed set-up, no MLflow
run, no model build): that its precision settings agree (:mod:`lyra_pl.training.precision`), the checkpoints and exports it loads, its data, its tokenizer and the
checkpoint it resumes, and that a new run does not land in the folder of an earlier one (whose
``last.ckpt`` a later ``--ckpt_path last`` would confuse with its own). Each problem is one line that says what to do; :class:`LyraCLI` calls
:func:`check_run` on the parsed config and ``lyra-pl`` prints the first problem and exits 2.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

from lyra_pl.training import precision

# runs/<preset>/<stage name>/export...: an output of an earlier stage of the pipeline.
_STAGE_OUTPUT = re.compile(r"runs/(?P<preset>[^/]+)/stage(?P<stage>\d)_[a-z_]+/export")


class RunInputError(ValueError):
    """A stage's input that is missing or unusable (one line saying what to do)."""


def _hint(path: str) -> str:
    """How to make ``path`` when it is an earlier stage's export, else how to point at one."""
    m = _STAGE_OUTPUT.search(Path(path).as_posix())
    if m is None:
        return "point it at an existing directory"
    preset, stage = m["preset"], int(m["stage"])
    first = 0 if preset == "tiny" else 1
    stages = ",".join(str(s) for s in range(first, stage + 1))
    return (f"it is stage {stage}'s export: run `lyra-pl pipeline --preset {preset} --stages "
            f"{stages}` first (with the same --root / default_root_dir), or point it elsewhere")


def check_run(config: Mapping[str, Any], subcommand: str | None) -> None:
    """Raises :class:`RunInputError` for the first missing input of a parsed LightningCLI
    config (the subcommand's part)."""
    from lyra_pl.data.datamodule import resolve_path
    from lyra_pl.data.shards import MANIFEST, is_url

    model = dict((config.get("model") or {}).get("init_args") or {})
    try:
        precision.check_config(config.get("trainer") or {}, model)
    except ValueError as e:
        raise RunInputError(str(e)) from None
    _check_context_parallel(model, config.get("trainer") or {})
    for key in ("qwen2vl", "whisper", "init_from"):
        path = model.get(key)
        if path is not None and not Path(path).is_dir():
            raise RunInputError(f"--model.init_args.{key}: {path} does not exist; "
                                f"{_hint(str(path))}")
    _check_checkpoints(model)
    data = dict(config.get("data") or {})
    tokenizer = data.get("tokenizer")
    if tokenizer is not None and not resolve_path(tokenizer).is_dir():
        raise RunInputError(f"--data.tokenizer: {tokenizer} is not a tokenizer directory "
                            "(a local Hugging Face tokenizer, e.g. the Qwen2-VL checkpoint's)")
    splits = {"fit": ("train", "val"), "validate": ("val",), "predict": ("predict",)}
    for split in splits.get(subcommand or "fit", ()):
        path, source = data.get(split), data.get(f"{split}_source")
        if path is None or is_url(path):
            continue  # a URL's manifest is read (with a timeout) when the data is set up
        if (resolve_path(path) / MANIFEST).is_file():
            continue
        if source is not None and resolve_path(source).is_file():
            continue  # prepare_data converts it
        because = (f"and its source {source} does not exist" if source is not None else
                   f"and no --data.{split}_source is given to convert it from")
        raise RunInputError(f"--data.{split}: {path} holds no converted dataset ({MANIFEST}) "
                            f"{because}; convert it with `lyra-pl data convert` "
                            "(docs/data.md)")
    ckpt = config.get("ckpt_path")
    root = Path((config.get("trainer") or {}).get("default_root_dir") or ".")
    earlier = sorted((root / "checkpoints").glob("*.ckpt")) if subcommand == "fit" else []
    if earlier and ckpt is None and not config.get("overwrite"):
        raise RunInputError(f"{root} already holds an earlier run's checkpoints "
                            f"({earlier[0].name}, ...): resume it with --ckpt_path last, start "
                            "over in it with --overwrite, or choose another "
                            "--trainer.default_root_dir")
    if ckpt is not None and ckpt not in ("last", "best", "hpc", "registry") and \
            not Path(ckpt).exists():
        raise RunInputError(f"--ckpt_path: {ckpt} does not exist (or use --ckpt_path last to "
                            "resume this run folder's last checkpoint)")


def _check_context_parallel(model: Mapping[str, Any], trainer: Mapping[str, Any]) -> None:
    """Context parallelism needs the FSDP2 strategy and groups that fit the job's ranks."""
    from lyra_pl.training.context_parallel import check_degree

    cp = model.get("context_parallel") or 1
    if cp == 1:
        return
    strategy = trainer.get("strategy")
    name = strategy.get("class_path", "") if isinstance(strategy, Mapping) else str(strategy)
    if not name.endswith(("FSDP2Strategy", "ModelParallelStrategy")):
        raise RunInputError(f"--model.init_args.context_parallel {cp} needs "
                            "--trainer.strategy lyra_pl.training.parallelize.FSDP2Strategy, got "
                            f"{name or None}")
    devices, nodes = trainer.get("devices"), int(trainer.get("num_nodes") or 1)
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if isinstance(devices, int):
        try:
            check_degree(cp, devices * nodes, devices)
        except ValueError as e:
            raise RunInputError(f"--model.init_args.context_parallel: {e} (--trainer.devices "
                                f"{devices}, --trainer.num_nodes {nodes})") from None


def _check_checkpoints(model: Mapping[str, Any]) -> None:
    """The base checkpoints against the preset and overrides the stage builds from: every field
    that changes the numbers, every shard, each file complete (headers only, seconds)."""
    from lyra_pl.model.checkpoints import CheckpointError, check_checkpoints
    from lyra_pl.model.config import LyraConfig

    if model.get("qwen2vl") is None and model.get("whisper") is None:
        return
    preset = model.get("preset") or "tiny"
    try:
        config = LyraConfig.from_preset(preset, **dict(model.get("model_overrides") or {}))
    except (TypeError, ValueError):
        return  # the stage reports a bad preset or override itself, naming it
    try:
        check_checkpoints(config, model.get("qwen2vl"), model.get("whisper"), preset)
    except (CheckpointError, FileNotFoundError) as e:
        key = "whisper" if model.get("whisper") and str(model.get("whisper")) in str(e) else "qwen2vl"
        raise RunInputError(f"--model.init_args.{key}: {e}") from None
