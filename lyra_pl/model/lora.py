"""Multi-modality LoRA (MLoRA): named peft LoRA adapters on the LLM decoder, switched per batch.

Lyra keeps the vision-language model's weights and adds one LoRA adapter per new modality set
(``speech`` r64/alpha16 in stage 2, ``long_speech`` r128/alpha256 in stage 3, ``sound``), all on
q/k/v/o/gate/up/down. A batch runs with the adapters of the modalities it holds
(:func:`select_adapters`); text/image/video batches run the untouched base model, which is what
keeps the vision scores.

Every function takes the module the adapters live in as the *root* (the decoder, e.g.
``model.llm``), so the vision tower and projectors are never touched. LoRA layers, their math,
merging and the state-dict conventions are peft's (``peft.functional`` and ``BaseTunerLayer``
methods); this file adds only the policy peft leaves open:

* **Activation does not change trainability.** peft's ``set_adapter`` also flips
  ``requires_grad`` (active = trainable) and its first injection freezes the whole model; here
  switching adapters per batch, adding and loading never change an existing parameter's flag.
  New adapter weights start frozen; :func:`trainable_adapter_parameters` alone decides what
  trains, and freezing the base is the caller's job (``module.requires_grad_(False)``).
* **Adding or loading an adapter does not change the output**: it starts inactive (peft would
  make it the only active one) and in the train/eval mode of the layer it wraps.
* **No active adapter = the base model, bit for bit**: every tuner layer gets an empty active set
  and ``enable_adapters(False)``, so its forward is exactly ``base_layer(x)``.
* **dtype**: adapter weights are created in the base weights' dtype (peft's layer init moves them
  to the base layer's device and dtype; unlike ``get_peft_model`` nothing upcasts them).
  ``fp32_weights=True`` upcasts one adapter with ``peft.functional.cast_adapter_dtype``.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
from peft.functional import (
    cast_adapter_dtype,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_adapter,
    set_peft_model_state_dict,
    set_requires_grad,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lyra_pl.model.loading import copy_into, full_tensor, is_sharded

LORA_TARGETS: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)
ADAPTER_NAMES: tuple[str, ...] = ("speech", "long_speech", "sound")
"""The modality sets that get adapters, in the order :func:`select_adapters` returns them."""
KNOWN_MODALITIES: tuple[str, ...] = ("text", "image", "video", "speech", "long_speech", "sound")

CONFIG_NAME = "adapter_config.json"  # peft.utils.CONFIG_NAME
WEIGHTS_NAME = "adapter_model.safetensors"  # peft.utils.SAFETENSORS_WEIGHTS_NAME
PEFT_KEY_PREFIX = "base_model.model."  # what a PeftModel puts before its base model's names
_NAME_METADATA = "lyra_adapter_name"  # safetensors metadata entry; peft ignores it
_RESERVED_NAMES = frozenset({"base_layer", "weight", "bias"})


@dataclass(frozen=True)
class LoraSpec:
    """One adapter's hyper-parameters; fields map 1:1 to ``peft.LoraConfig`` (``r``,
    ``lora_alpha``, ``lora_dropout``, ``target_modules``). Validated on construction, so an
    invalid spec never reaches peft."""

    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraSpec.r must be a positive int, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or self.alpha <= 0:
            raise ValueError(f"LoraSpec.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"LoraSpec.dropout must be in [0, 1), got {self.dropout!r}")
        targets = self.targets
        if isinstance(targets, str) or not targets \
                or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"LoraSpec.targets must be a non-empty tuple of module names, "
                             f"got {targets!r}")
        object.__setattr__(self, "targets", tuple(targets))

    def to_peft(self) -> peft.LoraConfig:
        """The equivalent ``peft.LoraConfig`` (no task type: the adapter sits on a bare module)."""
        return peft.LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=float(self.dropout),
            target_modules=list(self.targets),
            bias="none",
        )


# --- inspection -----------------------------------------------------------------------------


def _tuner_layers(module: nn.Module) -> Iterator[BaseTunerLayer]:
    return (m for m in module.modules() if isinstance(m, BaseTunerLayer))


def adapter_names(module: nn.Module) -> list[str]:
    """Adapters present in ``module``, in the order they were added (peft's ``peft_config``
    registry, which injection keeps on the root module and saving reads)."""
    return list(getattr(module, "peft_config", {}))


def active_adapters(module: nn.Module) -> list[str]:
    """Adapters the forward currently adds, in :func:`adapter_names` order ([] = base model)."""
    for layer in _tuner_layers(module):
        return [] if layer.disable_adapters else list(layer.active_adapters)
    return []


def _check_known(module: nn.Module, names: Sequence[str]) -> list[str]:
    """Validate ``names``; return them deduplicated in :func:`adapter_names` order, so the sum
    peft computes does not depend on the caller's order."""
    if isinstance(names, str):
        raise TypeError(f"expected a sequence of adapter names, got the string {names!r}")
    present = adapter_names(module)
    for name in names:
        if name not in present:
            raise KeyError(f"unknown adapter {name!r}; adapters present: {present}")
    return [n for n in present if n in set(names)]


def _adapter_parameters(module: nn.Module, name: str) -> list[nn.Parameter]:
    """One adapter's parameters in module order (the containers ``set_requires_grad`` visits)."""
    params: list[nn.Parameter] = []
    for layer in _tuner_layers(module):
        for attr in layer.adapter_layer_names:
            container = getattr(layer, attr)
            if name in container:
                entry = container[name]
                params.extend([entry] if isinstance(entry, nn.Parameter) else entry.parameters())
    return params


@contextmanager
def _keep_requires_grad(module: nn.Module) -> Iterator[None]:
    """On exit, restore every pre-existing parameter's ``requires_grad`` and freeze parameters
    created inside: peft ties trainability to injection and activation, we do not."""
    before = [(p, p.requires_grad) for p in module.parameters()]
    seen = {id(p) for p, _ in before}
    try:
        yield
    finally:
        for p in module.parameters():
            if id(p) not in seen:
                p.requires_grad_(False)
        for p, flag in before:
            p.requires_grad_(flag)


# --- adding, switching, training ------------------------------------------------------------


def _check_new_name(module: nn.Module, name: str) -> None:
    if name in adapter_names(module):
        raise ValueError(f"adapter {name!r} already exists; adapters present: "
                         f"{adapter_names(module)}")
    # ModuleDict keys cannot hold dots or shadow attributes; 'lora_' would confuse peft's key
    # filtering and the reserved names its key renaming.
    if not isinstance(name, str) or not name.isidentifier() or "lora_" in name \
            or name in _RESERVED_NAMES or hasattr(nn.ModuleDict(), name):
        raise ValueError(f"invalid adapter name {name!r}: use an identifier without 'lora_' that "
                         f"is not in {sorted(_RESERVED_NAMES)} nor an nn.Module attribute")


def _check_targets(module: nn.Module, targets: Collection[str]) -> None:
    """Fail (none found) or warn (some missing) before peft touches the module. peft matches a
    target-list entry against the last components of a module path."""
    paths = [n for n, _ in module.named_modules() if n]
    found = {t for t in targets if any(p == t or p.endswith("." + t) for p in paths)}
    missing = sorted(set(targets) - found)
    where = type(module).__name__
    if not found:
        raise ValueError(f"none of the LoRA targets {missing} exist in {where}")
    if missing:
        warnings.warn(f"LoRA targets {missing} not found in {where}; adapting {sorted(found)}")


def _inject(module: nn.Module, name: str, config: peft.LoraConfig, fp32_weights: bool) -> None:
    if not isinstance(config.target_modules, str):  # a regex target is peft's to check
        _check_targets(module, config.target_modules)
    active = active_adapters(module)
    try:
        with _keep_requires_grad(module), warnings.catch_warnings():
            # a second adapter is what we mean to add; peft warns about it
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(config, module, adapter_name=name)
            if fp32_weights:
                cast_adapter_dtype(module, adapter_name=name, autocast_adapter_dtype=True)
    except Exception:
        _unload(module, merge=[], remove=[name])
        raise
    for layer in _tuner_layers(module):
        # new submodules (the LoRA dropout) start in train mode: follow the wrapped layer
        layer.train(layer.get_base_layer().training)
    set_active_adapters(module, active)


def add_adapter(
    module: nn.Module, name: str, spec: LoraSpec, *, fp32_weights: bool = False
) -> None:
    """Inject a named LoRA adapter into every ``spec.targets`` layer of ``module``.

    The adapter starts inactive and frozen (peft inits B to zero, so activating it changes
    nothing until it is trained). It has the base weights' dtype unless ``fp32_weights``: then
    float32 under a low-precision base (peft casts the input to the adapter's dtype and the sum
    back to the base dtype).
    """
    _check_new_name(module, name)
    _inject(module, name, spec.to_peft(), fp32_weights)


def set_active_adapters(module: nn.Module, names: Sequence[str]) -> None:
    """Make exactly ``names`` active (peft sums several); empty = the base model, bit-exactly.

    An inactive adapter does not run at all (peft's forward skips it), and a layer an adapter
    does not target skips it too. ``requires_grad`` is left as it was, so per-batch switching
    never changes what the optimizer owns.
    """
    names = _check_known(module, names)
    with _keep_requires_grad(module):
        set_adapter(module, names)
        for layer in _tuner_layers(module):
            layer.enable_adapters(bool(names))


def trainable_adapter_parameters(module: nn.Module, names: Sequence[str]) -> list[nn.Parameter]:
    """Set ``requires_grad`` on the named adapters' weights, clear it on every other adapter's,
    and return the named adapters' parameters (for the optimizer). Base weights are untouched."""
    names = _check_known(module, names)
    set_requires_grad(module, adapter_names(module), requires_grad=False)
    if names:
        set_requires_grad(module, names, requires_grad=True)
    return [p for name in names for p in _adapter_parameters(module, name)]


# --- saving and loading (peft's on-disk format) ---------------------------------------------


def _adapter_state_dict(module: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """peft's saved-format state dict of one adapter: keys relative to ``module`` without the
    adapter name (``layers.0.self_attn.q_proj.lora_A.weight``)."""
    return get_peft_model_state_dict(module, adapter_name=name, save_embedding_layers=False)


def save_adapter(module: nn.Module, name: str, directory: str | os.PathLike,
                 write: bool = True) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` as
    ``PeftModel.save_pretrained`` does for one adapter, so ``LoraConfig.from_pretrained`` and
    ``PeftModel.from_pretrained`` read it.

    Key convention: ``module`` plays a PeftModel's base model, so keys are
    ``base_model.model.<path in module>.lora_{A,B}.weight`` with no adapter name (the name is
    chosen at load time). ``set_peft_model_state_dict`` strips that prefix when the model it
    loads into is not wrapped, so :func:`load_adapter` reads prefixed and plain keys alike. The
    adapter name goes into the safetensors metadata, which peft ignores. Save from one rank, on
    any module: sharded tensors are gathered, so under FSDP2 call it on every rank
    with ``write`` true on one.
    """
    _check_known(module, [name])
    state = {  # sharded weights are gathered: every rank calls, one writes
        PEFT_KEY_PREFIX + key: full_tensor(value.detach()).contiguous().cpu()
        for key, value in _adapter_state_dict(module, name).items()
    }
    if not write:
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, directory / WEIGHTS_NAME, metadata={"format": "pt", _NAME_METADATA: name})

    config = copy.deepcopy(module.peft_config[name])
    config.inference_mode = True  # what PeftModel.save_pretrained records
    config.base_model_name_or_path = getattr(module, "name_or_path", None) or None
    cls = type(module)
    auto_mapping = {"base_model_class": cls.__name__, "parent_library": cls.__module__}
    config.save_pretrained(str(directory), auto_mapping_dict=auto_mapping)


def _read_saved(directory: Path) -> tuple[peft.LoraConfig, dict[str, torch.Tensor], str | None]:
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {str(directory)!r} does not exist")
    for file in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / file).is_file():
            raise FileNotFoundError(f"adapter directory {str(directory)!r} has no {file}")
    config = peft.PeftConfig.from_pretrained(str(directory))
    if not isinstance(config, peft.LoraConfig):
        raise ValueError(f"{directory / CONFIG_NAME} holds a {config.peft_type} adapter, not LoRA")
    with safe_open(directory / WEIGHTS_NAME, framework="pt") as f:
        saved_name = (f.metadata() or {}).get(_NAME_METADATA)
        state = {key: f.get_tensor(key) for key in f.keys()}
    return config, state, saved_name


def _config_mismatch(have: peft.LoraConfig, want: peft.LoraConfig) -> list[str]:
    def targets(c: peft.LoraConfig) -> object:
        return c.target_modules if isinstance(c.target_modules, str) else sorted(c.target_modules)

    fields = {"r": lambda c: c.r, "lora_alpha": lambda c: c.lora_alpha, "target_modules": targets}
    return [f"{field}: module has {get(have)!r}, file has {get(want)!r}"
            for field, get in fields.items() if get(have) != get(want)]


def _state_mismatch(module: nn.Module, name: str, state: dict[str, torch.Tensor]) -> list[str]:
    expected = {k: tuple(v.shape) for k, v in _adapter_state_dict(module, name).items()}
    got = {k.removeprefix(PEFT_KEY_PREFIX): tuple(v.shape) for k, v in state.items()}
    problems = [f"missing {k}" for k in sorted(expected.keys() - got.keys())]
    problems += [f"unexpected {k}" for k in sorted(got.keys() - expected.keys())]
    problems += [f"{k}: file {got[k]} vs module {expected[k]}"
                 for k in sorted(expected.keys() & got.keys()) if got[k] != expected[k]]
    return problems


def load_adapter(
    module: nn.Module,
    directory: str | os.PathLike,
    name: str | None = None,
    *,
    fp32_weights: bool = False,
) -> str:
    """Load an adapter saved by :func:`save_adapter` (or ``PeftModel.save_pretrained``) and
    return its name.

    The name defaults to the one recorded at save time, else the directory's basename (where
    ``PeftModel.save_pretrained`` puts a non-default adapter). A missing adapter is injected from
    the saved config (inactive and frozen, like :func:`add_adapter`; ``fp32_weights`` as there);
    an existing one must have the same r, alpha and targets. Tensors must match the adapter's
    keys and shapes exactly (values are cast to its dtype); on any error the module is left as
    it was.
    """
    directory = Path(directory)
    config, state, saved_name = _read_saved(directory)
    name = name or saved_name or directory.resolve().name
    injected = name not in adapter_names(module)
    if injected:
        try:
            _check_new_name(module, name)
        except ValueError as err:
            raise ValueError(f"{err} (name taken from {str(directory)!r}; pass name=...)") from None
        config.inference_mode = False
        _inject(module, name, config, fp32_weights)
    else:
        problems = _config_mismatch(module.peft_config[name], config)
        if problems:
            raise ValueError(f"{directory / CONFIG_NAME} does not match adapter {name!r}: "
                             + "; ".join(problems))
    problems = _state_mismatch(module, name, state)
    if problems:
        if injected:
            _unload(module, merge=[], remove=[name])
        raise ValueError(f"{directory / WEIGHTS_NAME} does not match adapter {name!r}: "
                         + "; ".join(problems))
    params = dict(module.named_parameters())
    if any(is_sharded(p) for p in params.values()):
        # Sharded by FSDP2: each rank copies its slice of every tensor into its shard.
        for key, value in state.items():
            path = key.removeprefix(PEFT_KEY_PREFIX)
            for part in (".lora_A.", ".lora_B."):
                path = path.replace(part, f"{part}{name}.")
            copy_into(params[path], value.to(params[path].dtype))
        return name
    result = set_peft_model_state_dict(module, state, adapter_name=name)
    if result.unexpected_keys:  # guarded above; a change in peft's key mapping would land here
        raise ValueError(f"peft did not load {result.unexpected_keys} into adapter {name!r}")
    return name


def inject_saved_adapter(module: nn.Module, directory: str | os.PathLike,
                         name: str | None = None) -> str:
    """Adds the adapter a :func:`save_adapter` directory describes, without its weights (for
    a model on the meta device that is sharded before anything is loaded; call
    :func:`load_adapter` afterwards). Returns its name."""
    directory = Path(directory)
    config, _, saved_name = _read_saved(directory)
    name = name or saved_name or directory.resolve().name
    if name not in adapter_names(module):
        _check_new_name(module, name)
        config.inference_mode = False
        _inject(module, name, config, False)
    return name


# --- merging for export ---------------------------------------------------------------------


def _unload(module: nn.Module, merge: Sequence[str], remove: Sequence[str]) -> None:
    """Merge ``merge`` into the base weights, delete ``remove``, and put the plain base layer
    back wherever no adapter is left (what peft's ``merge_and_unload`` does for a PeftModel)."""
    for path, layer in list(module.named_modules()):
        if not isinstance(layer, BaseTunerLayer):
            continue
        if merge:
            layer.merge(safe_merge=True, adapter_names=list(merge))
        present = {key for attr in layer.adapter_layer_names for key in getattr(layer, attr)}
        if present - set(remove):
            for name in present & set(remove):
                layer.delete_adapter(name)
        else:
            parent_path, _, child = path.rpartition(".")
            setattr(module.get_submodule(parent_path), child, layer.get_base_layer())
    for name in remove:
        getattr(module, "peft_config", {}).pop(name, None)
    if not adapter_names(module) and hasattr(module, "peft_config"):
        del module.peft_config


def merge_adapters(module: nn.Module, names: Sequence[str]) -> None:
    """Fold ``names`` into the base weights (peft's ``merge``, with its NaN check) and remove
    every LoRA layer, so the module is the plain architecture again with base state-dict keys
    (``layers.0.self_attn.q_proj.weight``). Adapters not named are discarded: save them first.
    For export with one fixed modality set; training keeps the adapters separate."""
    names = _check_known(module, names)
    _unload(module, merge=names, remove=adapter_names(module))


# --- routing --------------------------------------------------------------------------------


def select_adapters(modalities: Collection[str], available: Collection[str]) -> list[str]:
    """The adapters a batch with these modalities runs, in :data:`ADAPTER_NAMES` order.

    Speech uses ``long_speech`` when the batch holds long speech and that adapter exists, else
    ``speech``; sound uses ``sound``; text, image and video use none (the base VLM). Adapters
    not in ``available`` are never returned. Unknown modality names raise, so a typo cannot
    silently run the base model.
    """
    if isinstance(modalities, str):
        raise TypeError(f"modalities must be a collection of names, got the string {modalities!r}")
    unknown = sorted(set(modalities) - set(KNOWN_MODALITIES))
    if unknown:
        raise ValueError(f"unknown modalities {unknown}; known: {list(KNOWN_MODALITIES)}")
    chosen: set[str] = set()
    if "long_speech" in modalities and "long_speech" in available:
        chosen.add("long_speech")
    elif {"speech", "long_speech"} & set(modalities) and "speech" in available:
        chosen.add("speech")
    if "sound" in modalities and "sound" in available:
        chosen.add("sound")
    return [name for name in ADAPTER_NAMES if name in chosen]
