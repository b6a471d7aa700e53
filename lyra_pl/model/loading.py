"""Loading real weights from local directories, and saving/loading our own parts.

- a Qwen2-VL checkpoint (LLM + ViT), as written by ``save_pretrained`` or downloaded from the
  hub (both key layouts: ``model.layers.*``/``visual.*`` and ``model.language_model.*``/
  ``model.visual.*``), sharded or not;
- a Whisper checkpoint, of which only the encoder is read;
- our projectors and speech generator as safetensors files (LoRA adapters: :mod:`lora`).

Tensors are read file by file and tensor by tensor, by byte range
(:class:`~lyra_pl.model.safetensors_file.SafetensorsFile`), and cast to their parameter's
dtype as they are read. A rank of a model sharded by FSDP2 reads only its rows of each sharded
parameter (dim 0) and the replicated frozen encoders whole, so the ranks together read the
checkpoint about once (once per replica under hybrid sharding). A model on the meta device
gets each file's tensors assigned (``assign=True``); others are copied into. No second full
model is built.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lyra_pl.model.checkpoints import check_qwen2vl, check_whisper
from lyra_pl.model.safetensors_file import SafetensorsFile

PARTS = ("speech_projector", "sound_projector", "speech_generator")


def _load_mapped(
    module: nn.Module, shards: list[Path], directory: str | Path,
    rename: Callable[[str], str | None], what: str,
    allow_missing: Callable[[str], bool] = lambda k: False,
) -> None:
    """Loads every tensor of ``shards`` whose key ``rename`` maps into ``module``
    (:func:`_load_file`); errors on what is left."""
    own = module.state_dict()
    loaded: set[str] = set()
    for shard in shards:
        with SafetensorsFile(shard) as f:
            names = {}
            for key in f.keys():
                name = rename(key)
                if name is None:
                    continue
                if name not in own:  # the layer already holds LoRA adapters (peft wraps it)
                    wrapped = ".base_layer.".join(name.rsplit(".", 1))
                    name = wrapped if wrapped in own else name
                if name not in own:
                    raise ValueError(f"{what}: {shard.name} has {key!r}, which maps to "
                                     f"{name!r}, not a parameter of the model")
                if f.shape(key) != tuple(own[name].shape):
                    raise ValueError(f"{what}: {key!r} has shape {f.shape(key)}, the model's "
                                     f"{name!r} has {tuple(own[name].shape)}")
                names[key] = name
            _load_file(module, own, f, names)
        loaded |= set(names.values())
    missing = [k for k in own if k not in loaded and not allow_missing(k) and ".lora_" not in k]
    if missing:
        raise ValueError(f"{what}: {len(missing)} tensor(s) missing from {str(directory)!r}, "
                         f"e.g. {missing[:3]}")


def load_qwen2vl(model: nn.Module, directory: str | Path) -> None:
    """Qwen2-VL LLM + ViT weights into ``model.llm``, ``model.lm_head``, ``model.visual``."""
    cfg = model.config
    # Every field that changes the numbers, and the files, before a tensor is read.
    shards = check_qwen2vl(directory, cfg)
    tied = cfg.tie_word_embeddings

    def rename(key: str) -> str | None:
        if tied and key.startswith("lm_head."):
            return None  # the same tensor as the embeddings
        if key.endswith("rotary_emb.inv_freq"):
            return None  # old checkpoints saved the rotary table; it is rebuilt, not loaded
        for prefix, target in (("model.language_model.", "llm."), ("model.visual.", "visual."),
                               ("visual.", "visual."), ("lm_head.", "lm_head."),
                               ("model.", "llm.")):
            if key.startswith(prefix):
                return target + key[len(prefix):]
        return None

    parts = nn.ModuleDict({"llm": model.llm, "lm_head": model.lm_head, "visual": model.visual})
    _load_mapped(parts, shards, directory, rename, "Qwen2-VL checkpoint",
                 allow_missing=lambda k: tied and k == "lm_head.weight")
    if tied:
        model.lm_head.weight = model.llm.embed_tokens.weight
    _init_buffers(model)


def _save_checkpoint(tensors: dict[str, Tensor], config, directory: str | Path) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
    config.save_pretrained(str(d))
    return d


def save_qwen2vl(model: nn.Module, directory: str | Path, write: bool = True) -> None:
    """``model.llm``, ``lm_head`` and ``visual`` as a Qwen2-VL checkpoint directory (keys of
    transformers' ``Qwen2VLForConditionalGeneration``, its config.json), which
    :func:`load_qwen2vl` and transformers both read: the tiny preset's trained base VLM
    is handed to the later stages as their ``qwen2vl``. Sharded weights are gathered (call
    on every rank, ``write`` on one)."""
    tensors = {}
    for prefix, module in (("model.language_model.", model.llm), ("model.visual.", model.visual),
                           ("lm_head.", model.lm_head)):
        if prefix == "lm_head." and model.config.tie_word_embeddings:
            continue
        for k, v in module.state_dict().items():
            if ".lora_" in k or k.endswith("rotary_emb.inv_freq"):
                continue  # adapters are saved apart; rotary tables are rebuilt
            tensors[prefix + k.replace(".base_layer.", ".")] = full_tensor(v.detach()).cpu()
    if write:
        _save_checkpoint(tensors, model.config.qwen2vl_config(), directory)


def save_whisper(model: nn.Module, directory: str | Path, write: bool = True) -> None:
    """The audio encoder as a Whisper checkpoint directory (encoder keys only), read by
    :func:`load_whisper`: how the tiny preset keeps one frozen random encoder across stages."""
    tensors = {"model.encoder." + k: full_tensor(v.detach()).cpu()
               for k, v in model.audio_encoder.whisper.state_dict().items()}
    if write:
        _save_checkpoint(tensors, model.config.whisper_config(), directory)


def load_whisper(model: nn.Module, directory: str | Path) -> None:
    """The encoder of a Whisper checkpoint into ``model.audio_encoder.whisper``."""
    shards = check_whisper(directory, model.config)
    def rename(key: str) -> str | None:
        for prefix in ("model.encoder.", "encoder."):
            if key.startswith(prefix):
                return key[len(prefix):]
        return None

    _load_mapped(model.audio_encoder.whisper, shards, directory, rename, "Whisper checkpoint")
    _init_buffers(model)


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is sharded: a ``DTensor``, as FSDP2 makes every parameter it manages. The
    one test of it, for loading, :mod:`lora` and :mod:`lyra_pl.training.parallelize`."""
    return isinstance(t, DTensor)


def _local_index(t: Tensor) -> tuple[slice, ...]:
    """Which slice of the full tensor a sharded ``t`` holds on this rank: each mesh dimension
    that shards a tensor dimension (FSDP2: dim 0) splits it as ``torch.chunk`` does
    (placements with a ``dim`` are shards)."""
    index = [slice(None)] * t.dim()
    coord = t.device_mesh.get_coordinate()
    for i, placement in enumerate(t.placements):
        d = getattr(placement, "dim", None)
        if d is None:
            continue  # replicated along this mesh dimension
        n, parts = t.shape[d], t.device_mesh.size(i)
        chunk = -(-n // parts)
        start = min(coord[i] * chunk, n)
        index[d] = slice(start, min(start + chunk, n))
    return tuple(index)


def _copy_shard(target: Tensor, piece: Tensor) -> None:
    local = target.to_local()
    if tuple(piece.shape) != tuple(local.shape):
        raise RuntimeError(f"shard of shape {tuple(local.shape)} does not match its slice "
                           f"{tuple(piece.shape)} of the full tensor")
    local.copy_(piece)


def copy_into(target: Tensor, full: Tensor) -> None:
    """Copies the full tensor ``full`` into ``target``: whole into a plain tensor, only this
    rank's slice into a sharded one (for tensors already in memory, such as LoRA adapters;
    checkpoint files are read slice by slice by :func:`_load_file`)."""
    with torch.no_grad():
        if is_sharded(target):
            _copy_shard(target, full[_local_index(target)])
        else:
            target.copy_(full)


def _read_into(target: Tensor, f: SafetensorsFile, key: str) -> None:
    """Reads ``key`` of ``f`` into ``target``: whole into a plain tensor; into a sharded one
    only the rows of this rank's slice (dim 0, how FSDP2 shards), cut further in memory if
    another dimension is sharded too. ``copy_`` casts to the target's dtype."""
    with torch.no_grad():
        if is_sharded(target):
            index = _local_index(target)
            piece = f.read(key, index[0])[(slice(None), *index[1:])] if index else f.read(key)
            _copy_shard(target, piece)
        else:
            target.copy_(f.read(key))


def _load_file(module: nn.Module, own: dict[str, Tensor], f: SafetensorsFile,
               names: dict[str, str]) -> None:
    """Loads the tensors ``names`` (key in ``f`` -> key in ``own``, ``module``'s state dict)
    one at a time, each cast to its parameter's dtype as it is read: into a sharded (FSDP2)
    module only this rank's slices, into a plain one by copying; a module on the meta device
    has the file's tensors assigned instead (``assign=True``)."""
    sharded = any(is_sharded(p) for p in module.parameters())
    if not sharded and any(p.is_meta for p in module.parameters()):
        state = {name: f.read(key).to(own[name].dtype) for key, name in names.items()}
        module.load_state_dict(state, strict=False, assign=True)
        return
    for key, name in names.items():
        _read_into(own[name], f, key)


def full_tensor(t: Tensor) -> Tensor:
    """A plain tensor of ``t``; a sharded one is gathered, which every rank must do together."""
    return t.full_tensor() if is_sharded(t) else t


def save_parts(model: nn.Module, directory: str | Path, parts: tuple[str, ...] = PARTS,
               write: bool = True) -> None:
    """Our trained parts, one safetensors file each (``<part>.safetensors``). Sharded weights
    are gathered first: call it on every rank, with ``write`` true on one."""
    d = Path(directory)
    for part in parts:
        state = {k: full_tensor(v.detach()).contiguous().cpu()
                 for k, v in getattr(model, part).state_dict().items()}
        if write:
            d.mkdir(parents=True, exist_ok=True)
            save_file(state, str(d / f"{part}.safetensors"), metadata={"lyra_part": part})


def load_parts(model: nn.Module, directory: str | Path, parts: tuple[str, ...] | None = None) -> list[str]:
    """Loads the ``<part>.safetensors`` files found in ``directory`` (or exactly ``parts``)."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"directory {str(d)!r} does not exist")
    names = parts if parts is not None else tuple(p for p in PARTS if (d / f"{p}.safetensors").exists())
    if not names:
        raise FileNotFoundError(f"no part files ({', '.join(p + '.safetensors' for p in PARTS)}) "
                                f"in {str(d)!r}")
    for part in names:
        if part not in PARTS:
            raise ValueError(f"unknown part {part!r}; parts are {PARTS}")
        path = d / f"{part}.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"{str(path)!r} not found")
        module = getattr(model, part)
        own = module.state_dict()
        with SafetensorsFile(path) as f:
            keys = f.keys()
            bad = [k for k in keys if k not in own or f.shape(k) != tuple(own[k].shape)]
            missing = [k for k in own if k not in keys]
            if bad or missing:
                raise ValueError(f"{path.name} does not fit the model's {part}: unexpected or "
                                 f"mis-shaped {bad[:3]}, missing {missing[:3]}")
            _load_file(module, own, f, {k: k for k in keys})
    _init_buffers(model)
    return list(names)


def _init_buffers(model: nn.Module) -> None:
    # Checkpoints do not hold the rotary tables (non-persistent buffers): a model built on the
    # meta device and loaded with assign=True gets them rebuilt here.
    if hasattr(model, "init_buffers") and any(b.is_meta for b in model.buffers()):
        model.init_buffers()
