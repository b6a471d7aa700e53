"""`lyra-pl export`: a trained Lyra model in formats other tools load.

``--format hf`` writes a Qwen2-VL folder that transformers' ``Qwen2VLForConditionalGeneration.
from_pretrained`` loads: config.json, sharded safetensors with an index, the tokenizer, the
image processor and the chat template. One modality's LoRA adapter can be merged into the
weights (``--merge speech``: W + alpha/r B A, the model a speech batch runs); the adapters
not merged go to ``adapters/<name>/`` as peft folders keyed for that Qwen2-VL model
(``PeftModel.from_pretrained``). What transformers has no class for goes to ``lyra/``: the
speech and sound projectors, the speech generator and the Whisper encoder, with ``lyra.json``
saying how they attach; ``README.md`` is a model card (base models, the stages that trained
it, their data and final metrics from their MLflow runs).

``--format lyra`` writes a stage export directory (what ``init_from``, ``lyra-pl eval`` and
``lyra-pl chat`` read) from a run's checkpoint: Lightning's, or FSDP2's distributed one.

Nothing holds the whole model: base tensors are read one at a time from the base Qwen2-VL
folder, merged, and written shard by shard; from a checkpoint only the trained tensors
(adapters, projectors, generator) are read, each alone.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lyra_pl.training.stages import RUN_FILE  # what a stage export records of its run

PARTS = ("speech_projector", "sound_projector", "speech_generator")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json",
                   "video_preprocessor_config.json", "chat_template.json", "chat_template.jinja",
                   "generation_config.json")
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<image>{% elif content['type'] == 'video' %}<video>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class ExportError(ValueError):
    """A source that cannot be exported (one line saying why)."""


# ----------------------------------------------------------------------------- the source
def find_export(source: str | Path, scratch: Path) -> Path:
    """The stage export directory ``source`` is, holds (``<run>/export``), or, for a
    checkpoint (a ``.ckpt`` file or FSDP2's distributed ``.ckpt`` directory, or a run folder
    with ``checkpoints/last.ckpt`` and no export), one written from it into ``scratch``."""
    src = Path(source)
    if (src / "config.json").is_file():
        return src
    if (src / "export" / "config.json").is_file():
        return src / "export"
    if (src / "checkpoints" / "last.ckpt").exists():
        src = src / "checkpoints" / "last.ckpt"
    if src.suffix == ".ckpt" and src.exists():
        return checkpoint_to_export(src, scratch / "export")
    raise ExportError(f"--ckpt {source}: not a stage export (config.json), a run folder (with "
                      "export/ or checkpoints/last.ckpt) or a Lightning checkpoint")


def _checkpoint_meta(ckpt: Path) -> tuple[dict, Any]:
    """(the checkpoint's metadata, a reader of its tensors by state-dict name)."""
    if ckpt.is_dir():  # FSDP2's distributed checkpoint: meta.pt and one .distcp per rank
        from torch.distributed.checkpoint import FileSystemReader, load

        meta = torch.load(ckpt / "meta.pt", map_location="cpu", weights_only=False)
        reader = FileSystemReader(str(ckpt))
        shapes = reader.read_metadata().state_dict_metadata

        def read(names: list[str]) -> dict[str, torch.Tensor]:
            """Only these tensors (the trained ones: a small part of the model), each from the
            ranks' files that hold its pieces."""
            missing = [n for n in names if f"state_dict.{n}" not in shapes]
            if missing:
                raise ExportError(f"{ckpt}: no tensor {missing[0]!r} in the checkpoint")
            buf = {f"state_dict.{n}": torch.empty(shapes[f"state_dict.{n}"].size,
                                                  dtype=shapes[f"state_dict.{n}"].properties.dtype)
                   for n in names}
            with warnings.catch_warnings():  # "no process group: loading in one process"
                warnings.simplefilter("ignore", UserWarning)
                load(buf, storage_reader=reader)
            return {n: buf[f"state_dict.{n}"] for n in names}

        return meta, read
    meta = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
    state = meta.pop("state_dict")

    def read_file(names: list[str]) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in state]
        if missing:
            raise ExportError(f"{ckpt}: no tensor {missing[0]!r} in the checkpoint")
        return {n: state[n] for n in names}

    return meta, read_file


def _stage(meta: dict, ckpt: Path):
    """The stage a checkpoint was trained with (LightningCLI records its class in the
    hyperparameters; else the run folder's config.yaml says), built from them. Relative paths
    are found from the working directory or from a folder above the checkpoint (runs start
    in the folder that holds ``runs/``)."""
    import importlib

    from lyra_pl.training.stages import LyraStage

    hparams = dict(meta.get("hyper_parameters") or {})
    path = hparams.pop("_class_path", None)
    hparams.pop("_instantiator", None)
    if path is None:
        import yaml

        for folder in (ckpt.parent, ckpt.parent.parent):
            if (folder / "config.yaml").is_file():
                model = yaml.safe_load((folder / "config.yaml").read_text()).get("model") or {}
                path = model.get("class_path")
                break
    module, _, name = (path or "").rpartition(".")
    cls = getattr(importlib.import_module(module), name, None) if module else None
    if not (isinstance(cls, type) and issubclass(cls, LyraStage)):
        raise ExportError(f"{ckpt}: cannot tell which stage trained it (no _class_path in its "
                          "hyperparameters, no config.yaml beside it)")
    for key in ("init_from", "qwen2vl", "whisper"):
        value = hparams.get(key)
        if value and not Path(value).is_absolute() and not Path(value).exists():
            found = next((p / value for p in ckpt.resolve().parents if (p / value).exists()), None)
            if found is None:
                raise ExportError(f"{ckpt}: its {key} {value!r} is not found from here or "
                                  "from a folder above the checkpoint")
            hparams[key] = str(found)
    return cls(**hparams)


def checkpoint_to_export(ckpt: Path, out: Path) -> Path:
    """A stage export directory from a Lightning checkpoint: the model is built on the meta
    device with the stage's adapters, and only the trained tensors are read into it."""
    from lyra_pl.model import lora
    from lyra_pl.model.lyra import LyraModel
    from lyra_pl.training.stages import BaseVLMStage

    meta, read = _checkpoint_meta(ckpt)
    stage = _stage(meta, ckpt)
    if isinstance(stage, BaseVLMStage):
        raise ExportError(f"{ckpt}: stage 0 trains the whole base model; export its "
                          "export/ folder (its qwen2vl/ is a Qwen2-VL checkpoint already)")
    with torch.device("meta"):
        model = LyraModel(stage.config)
    if stage.init_from is not None:
        for sub in sorted(Path(stage.init_from).glob("adapter_*")):
            lora.inject_saved_adapter(model.llm, sub, sub.name.removeprefix("adapter_"))
    stage.setup_trainable(model)  # adds the adapters this stage trains
    names = [k for k in model.state_dict()
             if k.split(".")[0] in PARTS or ".lora_" in k]
    tensors = read([f"model.{k}" for k in names])
    model.load_state_dict({k: tensors[f"model.{k}"] for k in names}, strict=False, assign=True)
    stage.model = model
    stage.save_model(out)
    record = json.loads((out / RUN_FILE).read_text()) if (out / RUN_FILE).is_file() else {}
    record.update(checkpoint=str(ckpt.resolve()), global_step=meta.get("global_step"),
                  epochs=meta.get("epoch"))
    (out / RUN_FILE).write_text(json.dumps(record, indent=2))
    return out


# ----------------------------------------------------------------------------- hf
class ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_bytes`` and the index, as
    ``save_pretrained`` names them."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[dict[str, torch.Tensor] | list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.size + nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        path = self.out / f"model-{len(self.files) + 1:05d}.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append(list(self.pending))
        self.pending, self.size = {}, 0

    def close(self) -> None:
        if self.pending or not self.files:
            self._flush()
        n, weight_map = len(self.files), {}
        for i, names in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
            (self.out / f"model-{i + 1:05d}.tmp").rename(self.out / final)
            weight_map.update({name: final for name in names})
        if n > 1:
            (self.out / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=2))


def _hf_name(key: str) -> str | None:
    """A Qwen2-VL checkpoint key (either era) in transformers 5's layout."""
    if key.endswith("rotary_emb.inv_freq"):
        return None
    for old, new in (("model.language_model.", "model.language_model."),
                     ("model.visual.", "model.visual."), ("visual.", "model.visual."),
                     ("lm_head.", "lm_head."), ("model.", "model.language_model.")):
        if key.startswith(old):
            return new + key[len(old):]
    return None


def _adapter(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, {module path in the text model: (A, B)}) of a saved adapter."""
    from lyra_pl.model.lora import CONFIG_NAME, PEFT_KEY_PREFIX, WEIGHTS_NAME

    config = json.loads((directory / CONFIG_NAME).read_text())
    tensors = load_file(str(directory / WEIGHTS_NAME))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        path, _, which = key.removeprefix(PEFT_KEY_PREFIX).rpartition(".lora_")
        pairs.setdefault(path, {})[which.split(".")[0]] = value
    return config, {p: (v["A"], v["B"]) for p, v in pairs.items()}


def _merged(key: str, tensor: torch.Tensor, delta: dict[str, tuple], scale: float) -> torch.Tensor:
    """``tensor`` plus the merged adapter's scale * B A when it adapts this linear."""
    if not key.startswith("model.language_model.") or not key.endswith(".weight"):
        return tensor
    path = key[len("model.language_model."):-len(".weight")]
    if path not in delta:
        return tensor
    a, b = delta[path]
    return (tensor.double() + scale * (b.double() @ a.double())).to(tensor.dtype)


def write_hf(export: Path, out: Path, merge: str | None, tokenizer: Path | None,
             dtype: torch.dtype | None, max_shard_bytes: int) -> dict[str, Any]:
    """The ``--format hf`` folder of a stage export (see the module docstring)."""
    from lyra_pl.model.checkpoints import check_qwen2vl, check_whisper
    from lyra_pl.model.config import LyraConfig
    from lyra_pl.model.lora import PEFT_KEY_PREFIX
    from lyra_pl.model.safetensors_file import SafetensorsFile
    from lyra_pl.training.stages import BASE_FILE

    saved = json.loads((export / "config.json").read_text())
    config = LyraConfig.from_preset(saved["preset"], **{
        k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k != "preset"})
    base = json.loads((export / BASE_FILE).read_text()) if (export / BASE_FILE).is_file() else {}
    for name in ("qwen2vl", "whisper"):
        if (export / name).is_dir():  # stage 0 exports its own base model
            base.setdefault(name, str(export / name))
    missing = [n for n in ("qwen2vl", "whisper") if not base.get(n)]
    if missing:
        raise ExportError(f"{export} does not record its base {' and '.join(missing)} "
                          f"weights ({BASE_FILE})")
    qwen2vl, whisper = Path(base["qwen2vl"]), Path(base["whisper"])
    shards = check_qwen2vl(qwen2vl, config, saved["preset"])
    whisper_shards = check_whisper(whisper, config, saved["preset"])
    adapters = {p.name.removeprefix("adapter_"): p for p in sorted(export.glob("adapter_*"))}
    if merge is not None and merge not in adapters:
        raise ExportError(f"--merge {merge}: {export} has no such adapter (it has "
                          f"{sorted(adapters) or 'none'})")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"--out {out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)

    # The Qwen2-VL weights, one tensor at a time, with the merged adapter added.
    delta, scale = {}, 0.0
    if merge is not None:
        adapter_config, delta = _adapter(adapters[merge])
        scale = adapter_config["lora_alpha"] / adapter_config["r"]
    writer = ShardWriter(out, max_shard_bytes)
    for shard in shards:
        with SafetensorsFile(shard) as f:
            for key in f.keys():
                name = _hf_name(key)
                if name is None or (config.tie_word_embeddings and name == "lm_head.weight"):
                    continue
                tensor = _merged(name, f.read(key), delta, scale)
                writer.add(name, tensor if dtype is None else tensor.to(dtype))
    writer.close()
    hf_config = config.qwen2vl_config()
    hf_config.architectures = ["Qwen2VLForConditionalGeneration"]
    if dtype is not None:
        hf_config.dtype = dtype
    hf_config.save_pretrained(str(out))

    # Tokenizer, processor, chat template: the base folder's files, or the tokenizer's.
    source = tokenizer or qwen2vl
    copied = [n for n in TOKENIZER_FILES if (source / n).is_file()]
    if "tokenizer.json" not in copied and "vocab.json" not in copied:
        raise ExportError(f"{source} has no tokenizer files: pass --tokenizer DIR (the run's "
                          "data.tokenizer)")
    for name in copied:
        shutil.copy2(source / name, out / name)
    if "preprocessor_config.json" not in copied:
        try:  # transformers' default needs torchvision; its PIL twin writes the same file
            from transformers import Qwen2VLImageProcessorPil as Processor
        except ImportError:
            from transformers import Qwen2VLImageProcessor as Processor
        Processor().save_pretrained(str(out))
    tok_config = json.loads((out / "tokenizer_config.json").read_text()) \
        if (out / "tokenizer_config.json").is_file() else {}
    if not tok_config.get("chat_template") and not {"chat_template.json", "chat_template.jinja"} \
            & set(copied):
        (out / "chat_template.jinja").write_text(QWEN_CHAT_TEMPLATE)

    # The adapters not merged, as peft folders keyed for the Qwen2-VL model.
    kept = {}
    for name, directory in adapters.items():
        if name == merge:
            continue
        target = out / "adapters" / name
        target.mkdir(parents=True)
        shutil.copy2(directory / "adapter_config.json", target / "adapter_config.json")
        tensors = load_file(str(directory / "adapter_model.safetensors"))
        save_file({PEFT_KEY_PREFIX + "model.language_model." + k.removeprefix(PEFT_KEY_PREFIX): v
                   for k, v in tensors.items()}, str(target / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        kept[name] = f"adapters/{name}"

    # Lyra's own parts and the Whisper encoder.
    lyra = out / "lyra"
    (lyra / "audio_encoder").mkdir(parents=True)
    for part in PARTS:
        if (export / f"{part}.safetensors").is_file():
            shutil.copy2(export / f"{part}.safetensors", lyra / f"{part}.safetensors")
    encoder = ShardWriter(lyra / "audio_encoder", max_shard_bytes)
    for shard in whisper_shards:
        with SafetensorsFile(shard) as f:
            for key in f.keys():
                for prefix in ("model.encoder.", "encoder."):
                    if key.startswith(prefix):
                        encoder.add("model.encoder." + key[len(prefix):], f.read(key))
    encoder.close()
    config.whisper_config().save_pretrained(str(lyra / "audio_encoder"))
    description = lyra_description(config, merge, kept, base)
    (out / "lyra.json").write_text(json.dumps(description, indent=2))
    (out / "README.md").write_text(model_card(export, config, merge, kept, base))
    return description


def lyra_description(config, merge: str | None, kept: dict[str, str],
                     base: dict[str, str]) -> dict[str, Any]:
    """``lyra.json``: what the folder holds beside the Qwen2-VL model and how it attaches."""
    return {
        "format": "lyra_pl hf export 1",
        "qwen2vl": {"path": ".", "merged_adapter": merge,
                    "note": "loads with transformers' Qwen2VLForConditionalGeneration"},
        "adapters": {name: {"path": path, "keys": "peft, for the Qwen2-VL model",
                            "runs_for": _modality(name)} for name, path in kept.items()},
        "audio_encoder": {"path": "lyra/audio_encoder", "kind": "Whisper encoder (frozen)",
                          "window": "30 s of 16 kHz audio -> 128-bin log-mel, 3000 frames -> "
                                    "1500 states"},
        "speech_projector": {"path": "lyra/speech_projector.safetensors",
                             "input": "5 consecutive encoder states concatenated "
                                      f"({config.audio_dim * config.speech_downsample} values), "
                                      "only those covering real audio: 10 tokens per second",
                             "output": f"{config.hidden_size}-d LLM input embeddings, in place "
                                       "of each <speech> placeholder"},
        "sound_projector": {"path": "lyra/sound_projector.safetensors",
                            "input": f"encoder states mean-pooled into {config.sound_tokens} "
                                     "segments, each layer-normalized",
                            "output": f"{config.sound_tokens} LLM input embeddings per <sound>"},
        "speech_generator": {"path": "lyra/speech_generator.safetensors",
                             "input": "the LLM's final hidden states at the answer tokens",
                             "output": f"CTC over {config.n_units} speech units + blank, "
                                       f"x{config.generator_upsample} upsampled"},
        "placeholders": dict(config.placeholder_ids),
        "lyra_config": config.to_dict(),
        "base_models": base,
    }


def _modality(adapter: str) -> str:
    return {"speech": "batches with speech up to one 30 s window",
            "long_speech": "batches with longer speech", "sound": "batches with sound"}.get(
                adapter, adapter)


# ----------------------------------------------------------------------------- model card
def stage_chain(export: Path) -> list[dict[str, Any]]:
    """The stages behind an export, first to last: each export's run record names the export
    it started from (``init_from``); before the first, the stage that trained its base
    Qwen2-VL, when that is another stage's export (the tiny preset's stage 0)."""
    from lyra_pl.training.stages import BASE_FILE

    chain, seen, d = [], set(), export
    while d is not None and d.is_dir() and d.resolve() not in seen:
        seen.add(d.resolve())
        record = json.loads((d / RUN_FILE).read_text()) if (d / RUN_FILE).is_file() else {}
        config = json.loads((d / "config.json").read_text()) if (d / "config.json").is_file() else {}
        chain.append({"export": str(d.resolve()), **record, "preset": config.get("preset")})
        d = Path(record["init_from"]) if record.get("init_from") else None
        if d is None and (chain[-1]["export"] and (Path(chain[-1]["export"]) / BASE_FILE).is_file()):
            base = json.loads((Path(chain[-1]["export"]) / BASE_FILE).read_text())
            parent = Path(base.get("qwen2vl", "")).parent
            d = parent if (parent / RUN_FILE).is_file() else None
    return chain[::-1]


def final_metrics(record: dict[str, Any]) -> dict[str, float] | str:
    """The last value of each metric of a stage's MLflow run, or why there are none."""
    info = record.get("mlflow")
    if not info:
        return "no MLflow run recorded"
    try:
        from mlflow.tracking import MlflowClient

        run = MlflowClient(info["tracking_uri"]).get_run(info["run_id"])
    except Exception as e:  # the store may be elsewhere: the card says so
        return f"MLflow run {info.get('run_id')} not readable ({type(e).__name__})"
    return dict(sorted(run.data.metrics.items()))


def model_card(export: Path, config, merge: str | None, kept: dict[str, str],
               base: dict[str, str]) -> str:
    chain = stage_chain(export)
    lines = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text",
             "tags: [lyra, lyra_pl, qwen2_vl, speech, omni-modal]", "---", "",
             f"# Lyra ({config.hidden_size}-d, preset {chain[-1].get('preset') or '?'})", "",
             "A Lyra model (speech-centric omni-modal LLM, arXiv 2412.09501) trained with "
             "lyra_pl and exported with `lyra-pl export --format hf`.", "",
             "## Base models", ""]
    lines += [f"- {name}: `{path}`" for name, path in sorted(base.items())]
    lines += ["", "## How to load", "",
              "```python", "from transformers import Qwen2VLForConditionalGeneration",
              "model = Qwen2VLForConditionalGeneration.from_pretrained(\"THIS_FOLDER\")", "```",
              "", f"The `{merge}` adapter is merged into these weights: the model as it "
                  f"runs for {_modality(merge)}." if merge else
              "No adapter is merged: these are the base Qwen2-VL weights.",
              "Adapters kept as peft folders: " + (", ".join(f"`{p}`" for p in kept.values())
                                                   or "none") + ".",
              "Speech and sound input, the Whisper encoder and the speech generator are in "
              "`lyra/` (see `lyra.json`).", "", "## Training stages", ""]
    for i, stage in enumerate(chain, 1):
        data = stage.get("data") or {}
        lines += [f"### {i}. {stage.get('stage', 'unknown stage')}", "",
                  f"- export: `{stage['export']}`"]
        if stage.get("global_step") is not None:
            lines.append(f"- steps: {stage['global_step']}, epochs: {stage.get('epochs')}")
        lines += [f"- data ({split}): `{path}`" for split, path in sorted(data.items())]
        metrics = final_metrics(stage)
        if isinstance(metrics, str):
            lines.append(f"- metrics: {metrics}")
        else:
            lines += ["", "| metric | final value |", "|---|---|"]
            lines += [f"| {k} | {v:.4g} |" for k, v in metrics.items()]
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command
def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lyra-pl export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True,
                        help="a stage export, a run folder, or a Lightning checkpoint (.ckpt "
                             "file or FSDP2's distributed .ckpt directory)")
    parser.add_argument("--out", required=True, type=Path, help="a new (or empty) folder")
    parser.add_argument("--format", choices=["hf", "lyra"], default="hf")
    parser.add_argument("--merge", default=None, metavar="ADAPTER",
                        help="hf: merge this LoRA adapter (speech, long_speech, sound) into "
                             "the weights; the others stay peft folders (default: none merged)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="hf: tokenizer folder when the base Qwen2-VL folder has none "
                             "(default: the run's data.tokenizer)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="hf: weights' dtype (default: as in the base checkpoint)")
    parser.add_argument("--max-shard-size", default="5GB", help="hf: per file (default 5GB)")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            if args.format == "lyra":
                if args.out.exists() and any(args.out.iterdir()):
                    raise ExportError(f"--out {args.out} exists and is not empty")
                export = find_export(args.ckpt, Path(scratch))
                if export.resolve() != args.out.resolve():
                    shutil.copytree(export, args.out, dirs_exist_ok=True)
                print(f"wrote {args.out} (a stage export: init_from, lyra-pl eval, chat)")
                return 0
            export = find_export(args.ckpt, Path(scratch))
            tokenizer = args.tokenizer or _run_tokenizer(export)
            write_hf(export, args.out, args.merge, tokenizer,
                     None if args.dtype is None else getattr(torch, args.dtype),
                     _size(args.max_shard_size))
    except (ExportError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: Qwen2-VL weights"
          + (f" with the {args.merge} adapter merged" if args.merge else "")
          + ", tokenizer and processor, adapters/, lyra/ (projectors, generator, Whisper "
            "encoder), lyra.json, README.md")
    return 0


def _run_tokenizer(export: Path) -> Path | None:
    """The tokenizer the run that made ``export`` trained with, if its record says."""
    from lyra_pl.data.datamodule import resolve_path

    for stage in reversed(stage_chain(export)):
        tok = (stage.get("data") or {}).get("tokenizer")
        if tok:
            return Path(resolve_path(tok))
    return None
