"""The one rule for a stage run's precision.

Two settings can lower the compute precision: the Trainer's ``precision`` (Lightning: autocast
for ``*-mixed``, the weights' dtype for ``*-true``) and the stage's ``param_dtype`` /
``reduce_dtype`` (FSDP2's ``MixedPrecisionPolicy``: compute and all-gather in ``param_dtype``,
reduce gradients in ``reduce_dtype``, fp32 master weights). Exactly one of them may own it:

- under FSDP2, the recommended pair is ``trainer.precision: 32-true`` with ``param_dtype:
  bfloat16`` and ``reduce_dtype: float32`` (torchtitan's choice: bf16 compute and gathers, fp32
  weights, optimizer state and gradient reduction);
- without FSDP2 (one process on the default strategy) FSDP2's policy does not exist, so
  ``param_dtype`` / ``reduce_dtype`` must be null and ``trainer.precision`` says it all.

Any other combination is an error naming both settings, raised by :func:`check` before the run
starts (from the parsed config, by the preflight) and again when a stage builds its model (for
runs set up in Python).
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping

import torch

TRUE_FP32 = "32-true"
_ALIASES = {"32": "32-true", 32: "32-true", "bf16": "bf16-mixed", "16": "16-mixed", 16: "16-mixed",
            "64": "64-true", 64: "64-true"}


def normalize(precision) -> str:
    """Lightning's precision flag in its canonical spelling (``32`` -> ``32-true``)."""
    return _ALIASES.get(precision, str(precision))


def _name(dtype) -> str | None:
    if dtype is None:
        return None
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else str(dtype)


def check(precision, param_dtype, reduce_dtype, fsdp2: bool) -> None:
    """Raises ``ValueError`` (one line, both settings named) unless exactly one setting owns the
    compute precision. ``precision``: the Trainer's flag; ``param_dtype`` / ``reduce_dtype``:
    the stage's (a dtype, its name, or None); ``fsdp2``: the run shards with FSDP2."""
    precision = normalize(precision)
    param, reduce = _name(param_dtype), _name(reduce_dtype)
    if not fsdp2 and (param is not None or reduce is not None):
        setting = (f"model.init_args.param_dtype={param}" if param is not None
                   else f"model.init_args.reduce_dtype={reduce}")
        raise ValueError(f"{setting} is FSDP2's mixed precision, but this run does not use FSDP2 "
                         "(trainer.strategy is not lyra_pl.training.parallelize.FSDP2Strategy): "
                         "set it to null and choose the precision with trainer.precision "
                         "(e.g. bf16-mixed)")
    if param is not None and precision != TRUE_FP32:
        raise ValueError(f"trainer.precision={precision} and model.init_args.param_dtype={param} "
                         "both set the compute precision: keep one (under FSDP2: "
                         f"trainer.precision={TRUE_FP32} with param_dtype=bfloat16, "
                         "reduce_dtype=float32; or param_dtype=null)")


def uses_fsdp2(strategy) -> bool:
    """Whether a config's ``trainer.strategy`` (a class path with init args, a strategy object or
    a registered name) shards with FSDP2 (:class:`FSDP2Strategy` or another
    ``ModelParallelStrategy``)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    if isinstance(strategy, ModelParallelStrategy):
        return True
    path = strategy.get("class_path") if isinstance(strategy, Mapping) else strategy
    if not isinstance(path, str) or "." not in path:
        return False  # "auto", "ddp", ...: no FSDP2
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return False  # LightningCLI reports an unknown class itself
    return isinstance(cls, type) and issubclass(cls, ModelParallelStrategy)


def check_config(trainer: Mapping[str, Any], model_args: Mapping[str, Any]) -> None:
    """:func:`check` on a parsed LightningCLI config's ``trainer`` and ``model.init_args``."""
    check(trainer.get("precision", TRUE_FP32), model_args.get("param_dtype"),
          model_args.get("reduce_dtype"), uses_fsdp2(trainer.get("strategy")))
