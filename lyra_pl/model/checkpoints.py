"""Checkpoint folders checked completely before anything is built.

A Qwen2-VL or Whisper folder from the hub (or written by ``save_pretrained``) is compared with
the :class:`~lyra_pl.model.LyraConfig` the model will be built from, field by field, for every
field that changes the numbers, not only the shapes: ``rope_theta``, the M-RoPE sections,
``rms_norm_eps``, the activation, the ViT's heads and patch geometry, Whisper's mel bins and
positions, tied embeddings, the media token ids. Its files are checked too: every shard the
index names exists, and each safetensors header describes no more bytes than the file holds
(an interrupted download). Only JSON is read (config.json, the index, the headers): no tensor,
no model, a fraction of a second whatever the checkpoint's size.

Both config layouts are read: transformers 4.4x's (text fields at the top level,
``"rope_scaling": {"type": "mrope", "mrope_section": [...]}``, ``rope_theta`` beside it, the
ViT's ``in_chans``) and 5.x's (``text_config``, ``rope_parameters``, ``in_channels``). A field
a config leaves out takes the default transformers would give it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from transformers import WhisperConfig
from transformers.models.qwen2_vl.configuration_qwen2_vl import (Qwen2VLTextConfig,
                                                                 Qwen2VLVisionConfig)

INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint folder that does not fit the model or is incomplete (one line)."""


# ----------------------------------------------------------------------------- files
def shard_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, each checked complete: the index's
    shards (all present) or ``model.safetensors`` or every ``*.safetensors``."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(d)!r} does not exist")
    index = d / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (d / n).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard {missing[0]}, which is missing from "
                                  f"{d} ({len(missing)} of {len(names)} shards missing)")
        files = [d / n for n in names]
        held = set()
        for f in files:
            held |= set(read_header(f))
        absent = sorted(set(weight_map) - held)
        if absent:
            raise CheckpointError(f"{index} puts {absent[0]!r} in {weight_map[absent[0]]}, "
                                  f"which does not hold it ({len(absent)} tensor(s) absent)")
        return files
    if (d / "model.safetensors").exists():  # hub repos may add e.g. model.fp32-*.safetensors
        files = [d / "model.safetensors"]
    else:
        files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {str(d)!r} (pytorch_model.bin "
                                "checkpoints are not read: convert them to safetensors)")
    for f in files:
        read_header(f)
    return files


def read_header(path: Path) -> dict[str, Any]:
    """A safetensors file's tensor entries (name -> dtype, shape, data_offsets), checked
    against the file's size: a file shorter than its header describes is named as truncated."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated: {size} bytes, not even a safetensors "
                                  "header (an interrupted download?)")
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated: {size} bytes, its header alone would "
                                  f"need {8 + n} (an interrupted download?)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: not a safetensors file (unreadable header)") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated: {size:,} bytes, its header describes "
                              f"{8 + n + end:,} (an interrupted download?)")
    return tensors


# ----------------------------------------------------------------------------- configs
def _json(directory: str | Path) -> tuple[Path, dict]:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} not found")
    try:
        return path, json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _rope(text: dict, top: dict) -> dict:
    """rope_theta and mrope_section wherever the config's era keeps them."""
    params = text.get("rope_parameters") or top.get("rope_parameters") or {}
    scaling = text.get("rope_scaling") or top.get("rope_scaling") or {}
    theta = params.get("rope_theta", text.get("rope_theta", top.get("rope_theta")))
    section = params.get("mrope_section", scaling.get("mrope_section"))
    return {"rope_theta": theta, "mrope_section": None if section is None else list(section)}


def _same(got: Any, want: Any) -> bool:
    if isinstance(got, (int, float)) and isinstance(want, (int, float)) \
            and not isinstance(got, bool) and not isinstance(want, bool):
        return math.isclose(got, want, rel_tol=1e-9, abs_tol=0.0)
    return got == want


def _compare(path: Path, found: dict[str, Any], want: dict[str, Any],
             defaults: dict[str, Any], prefix: str = "") -> list[str]:
    """'field: checkpoint X, model Y' for each field that differs (absent: the default)."""
    out = []
    for key, expected in want.items():
        got = found.get(key, defaults.get(key))
        if got is None and expected is None:
            continue
        if not _same(got, expected):
            out.append(f"{prefix}{key} is {got!r} in the checkpoint, {expected!r} in the model")
    return out


def _raise(path: Path, problems: list[str], preset: str) -> None:
    if problems:
        raise CheckpointError(f"{path}: {'; '.join(problems)} (preset {preset!r}: build the "
                              "model from a matching preset or override the fields)")


_TEXT = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
         "intermediate_size", "vocab_size", "rms_norm_eps", "hidden_act")
_VISION = ("depth", "embed_dim", "num_heads", "mlp_ratio", "hidden_size", "hidden_act",
           "patch_size", "spatial_merge_size", "temporal_patch_size", "in_channels")
_WHISPER = ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
            "num_mel_bins", "max_source_positions", "activation_function")


def check_qwen2vl(directory: str | Path, config, preset: str = "?") -> list[Path]:
    """A Qwen2-VL folder against ``config`` (a LyraConfig): config.json, then its files.
    Returns the checked safetensors files."""
    path, found = _json(directory)
    text = found.get("text_config", found)  # 4.4x: the text fields at the top level
    ours_text = config.text_config().to_dict()
    text_defaults = Qwen2VLTextConfig().to_dict()
    problems = _compare(path, text, {k: ours_text[k] for k in _TEXT}, text_defaults)
    rope = _rope(text, found)
    ours_rope = {"rope_theta": config.rope_theta, "mrope_section": list(config.mrope_section)}
    problems += _compare(path, rope, ours_rope, {})
    tied = found.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
    problems += _compare(path, {"tie_word_embeddings": tied},
                         {"tie_word_embeddings": config.tie_word_embeddings}, {})
    top_defaults = {"image_token_id": 151655, "video_token_id": 151656}  # Qwen2VLConfig's
    problems += _compare(path, found, {"image_token_id": config.image_token_id,
                                       "video_token_id": config.video_token_id}, top_defaults)
    vision = dict(found.get("vision_config", {}))
    if "in_chans" in vision and "in_channels" not in vision:
        vision["in_channels"] = vision["in_chans"]  # the 4.4x name
    ours_vision = config.vision_config().to_dict()
    problems += _compare(path, vision, {k: ours_vision[k] for k in _VISION},
                         Qwen2VLVisionConfig().to_dict(), prefix="vision_config.")
    _raise(path, problems, preset)
    return shard_files(directory)


def check_whisper(directory: str | Path, config, preset: str = "?") -> list[Path]:
    """A Whisper folder against ``config``: the encoder's fields, then its files."""
    path, found = _json(directory)
    ours = config.whisper_config().to_dict()
    problems = _compare(path, found, {k: ours[k] for k in _WHISPER}, WhisperConfig().to_dict())
    _raise(path, problems, preset)
    return shard_files(directory)


def check_checkpoints(config, qwen2vl: str | Path | None = None,
                      whisper: str | Path | None = None, preset: str = "?") -> None:
    """Both folders (those given), before any model is built."""
    if qwen2vl is not None:
        check_qwen2vl(qwen2vl, config, preset)
    if whisper is not None:
        check_whisper(whisper, config, preset)
