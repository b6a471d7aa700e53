"""What ``lyra-pl chat`` (:mod:`lyra_pl.chat`) runs on: a stage export loaded as ``lyra-pl
eval`` loads it, requests turned into model inputs by the training data path, answers
streamed as they are generated, and units spoken by a unit vocoder.

A request (a conversation ending with a human turn, and the paths of its media) becomes an
official-format sample, which the converter (:func:`lyra_pl.data.official.build_sample`)
turns into shard members in memory, reading the media through :mod:`lyra_pl.data.media`;
the prompt decoder (:class:`lyra_pl.data.decode.SampleDecoder`) tokenizes it with the chat
template, and the training collate, with the data module's image and video processors,
batches it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, TextIO

from lyra_pl.data.conversation import DATA_PLACEHOLDERS
from lyra_pl.data.media import MediaError
from lyra_pl.data.official import MediaRoots, build_sample

# Option / command / JSONL field -> the official sample's media field.
MEDIA_FIELDS = {"image": "image", "video": "video", "audio": "speech", "sound": "sound"}
REQUEST_FIELDS = ("id", "prompt", *MEDIA_FIELDS)
TINY_TOKENIZER = "data/tiny/tokenizer"


class ChatError(Exception):
    """A problem with what the user gave (file, option, export): one line, exit code 2."""


# ----------------------------------------------------------------------------- options
def parse_lmme(text: str) -> dict[str, Any]:
    """``"N,RHO"`` -> LyraConfig overrides: LMME over N blocks, each pruning step keeping
    RHO of the context tokens (``0,1``: off)."""
    try:
        blocks, ratio = text.split(",")
        blocks, ratio = int(blocks), float(ratio)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N,RHO (e.g. 4,0.7), got {text!r}") from None
    if blocks < 0 or not 0 < ratio <= 1:
        raise argparse.ArgumentTypeError(f"need N >= 0 and 0 < RHO <= 1, got {text!r}")
    return {"lmme_blocks": blocks, "lmme_keep_ratio": ratio}


def run_config(export: Path) -> dict[str, Any]:
    """The training run's ``config.yaml`` beside its export (LightningCLI saves it in the
    run folder), or {} when there is none."""
    import yaml

    path = export.parent / "config.yaml"
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def find_tokenizer(given: str | None, config: dict[str, Any]) -> Path:
    """--tokenizer, else the one the run trained with (its config's ``data.tokenizer``),
    else the tiny corpus's."""
    from lyra_pl.data.datamodule import resolve_path

    if given is not None:
        return Path(resolve_path(given))  # one that does not exist fails when loaded
    data = config.get("data") or {}
    recorded = data.get("tokenizer") or (data.get("init_args") or {}).get("tokenizer")
    if recorded is not None:
        if not Path(resolve_path(recorded)).is_dir():
            raise ChatError(f"the run's tokenizer {recorded} (its config.yaml) is not here; "
                            "pass --tokenizer DIR")
        return Path(resolve_path(recorded))
    if Path(resolve_path(TINY_TOKENIZER)).is_dir():
        return Path(resolve_path(TINY_TOKENIZER))
    raise ChatError("no tokenizer found (no run config.yaml beside the export names one, and "
                    f"{TINY_TOKENIZER} is absent); pass --tokenizer DIR")


# ----------------------------------------------------------------------------- requests
def empty_media() -> dict[str, list[str]]:
    return {k: [] for k in MEDIA_FIELDS}


def human_turn(text: str, media: dict[str, list[str]]) -> str:
    """A human turn's text: a placeholder line per attached item, then ``text``, as the
    training data writes them; text that places its own placeholders is kept as written."""
    if any(p in text for p in DATA_PLACEHOLDERS.values()):
        return text
    lines = [DATA_PLACEHOLDERS[MEDIA_FIELDS[k]] for k in MEDIA_FIELDS for _ in media.get(k, ())]
    return "\n".join(lines + ([text] if text else []))


def check_paths(media: dict[str, list[str]], roots: MediaRoots, label: str = "--") -> None:
    """Each attached path exists (a video may be a folder of frames): named at once."""
    for kind, paths in media.items():
        for p in paths:
            if not roots.resolve(MEDIA_FIELDS[kind], p).exists():
                raise MediaError(f"{label}{kind} {p}: file not found")


def build(turns: list[dict[str, str]], media: dict[str, list[str]], roots: MediaRoots
          ) -> dict[str, Any]:
    """A conversation ending with a human turn, and its media (every turn's, in order) ->
    the raw shard sample the converter writes, with the media read and checked. The prompt
    decoder holds out a sample's last answer: an empty one stands for the answer to come."""
    sample = {"id": "chat", "conversations": [*turns, {"from": "gpt", "value": ""}],
              **{MEDIA_FIELDS[k]: list(v) for k, v in media.items() if v}}
    built = build_sample(sample, roots)
    return {"__key__": built.key, **built.members}


def read_request(line: str) -> dict[str, Any]:
    """A JSONL line -> its request object; ValueError saying what is wrong."""
    try:
        req = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(req, dict):
        raise ValueError(f"expected a JSON object, got {type(req).__name__}")
    return req


def request_fields(req: dict[str, Any]) -> tuple[str, dict[str, list[str]]]:
    """A request's (prompt, media); ValueError naming the field at fault."""
    unknown = sorted(set(req) - set(REQUEST_FIELDS))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} (fields: {', '.join(REQUEST_FIELDS)})")
    prompt = req.get("prompt", "")
    if not isinstance(prompt, str):
        raise ValueError(f"prompt: expected a string, got {type(prompt).__name__}")
    media = {}
    for kind in MEDIA_FIELDS:
        value = req.get(kind, [])
        paths = [value] if isinstance(value, str) else value
        if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
            raise ValueError(f"{kind}: expected a path or a list of paths, got {value!r}")
        media[kind] = paths
    if not prompt and not any(media.values()):
        raise ValueError("prompt: missing (and no media to answer)")
    return prompt, media


# ----------------------------------------------------------------------------- model
class TextStream:
    """``generate``'s per-step callback for one sample: writes each new piece of the answer
    as it is generated (text ending in half a UTF-8 character waits for the next token)."""

    def __init__(self, tokenizer, out: TextIO):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.shown = 0

    def __call__(self, tokens: list[int | None], units=None) -> None:
        if tokens[0] is None:
            return
        self.ids.append(tokens[0])
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self.out.write(text[self.shown:])
            self.out.flush()
            self.shown = len(text)

    def finish(self) -> None:
        """The rest of the answer (an unfinished character at its very end) and a newline."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.out.write(text[self.shown:] + "\n")
        self.out.flush()


class Chat:
    """A loaded export, and the training decoder and collate that make its inputs."""

    def __init__(self, args: argparse.Namespace, tokenizer: Path):
        import torch

        from lyra_pl.data.datamodule import LyraDataModule
        from lyra_pl.data.decode import SampleDecoder
        from lyra_pl.data.video import VideoProcessor
        from lyra_pl.eval.cli import load_for_inference

        try:
            module, self.info, self.context = load_for_inference(
                args, args.max_new_tokens, args.lmme)
            self.decoder = SampleDecoder(tokenizer, mode="prompt", system_prompt=args.system,
                                         transcripts=False,
                                         expected_ids=dict(module.config.placeholder_ids))
            self.ids = self.decoder.placeholder_ids()  # also: the tokenizer fits the model
        except (FileNotFoundError, ValueError, TypeError, OSError) as e:
            raise ChatError(str(e).splitlines()[0]) from None
        self.model, self.device = module.model, module.device
        # The processors (and pixel bounds) the data module batches training samples with.
        data = LyraDataModule(tokenizer=str(tokenizer))
        self.collate_kwargs = {"image_processor": data.image_processor(),
                               "video_processor": VideoProcessor(data.min_pixels,
                                                                 data.max_pixels)}
        sample = bool(args.temperature) or args.top_p is not None
        self.options = {"max_new_tokens": args.max_new_tokens, "do_sample": sample,
                        "temperature": args.temperature or 1.0, "top_p": args.top_p}
        if sample and args.seed is not None:
            self.options["generator"] = torch.Generator(self.device).manual_seed(args.seed)

    @property
    def tokenizer(self):
        return self.decoder.tokenizer

    def inputs(self, raws: list[dict[str, Any]]):
        """Raw samples (:func:`build`) -> a batch; ValueError naming what does not decode."""
        from lyra_pl.model.inputs import collate

        samples = [self.decoder(raw).sample for raw in raws]
        return collate(samples, self.ids, self.tokenizer.pad_token_id, **self.collate_kwargs)

    def answer(self, inputs, on_step: Callable | None = None, speech: bool = False
               ) -> tuple[list[str], list[list[int]] | None]:
        """The batch's answers (and with ``speech`` their speech units)."""
        import torch

        with torch.inference_mode(), self.context():
            out = self.model.generate(inputs.to(self.device), on_step=on_step, speech=speech,
                                      **self.options)
        texts = [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in out.tokens]
        return texts, out.units

    def stream(self, inputs, out: TextIO, speech: bool = False) -> tuple[str, list[int] | None]:
        """One sample's answer streamed to ``out`` as it is generated; (text, units)."""
        stream = TextStream(self.tokenizer, out)
        texts, units = self.answer(inputs, stream, speech)
        stream.finish()
        return texts[0], units[0] if units else None


# ----------------------------------------------------------------------------- speech
def load_vocoder(path: str | None, out: str, export: Path, config: dict[str, Any]):
    """The unit vocoder for --speech-out, once the export is known to have a trained speech
    generator (the run's config names the stage that wrote it)."""
    from lyra_pl.data.encode import AUDIO
    from lyra_pl.model.vocoder import UnitVocoder

    if path is None:
        raise ChatError("--speech-out needs --vocoder DIR (a CodeHiFiGAN unit vocoder: "
                        "config.json and a g_<step> checkpoint)")
    if Path(out).suffix.lower() not in AUDIO:
        raise ChatError(f"--speech-out {out}: unsupported format (use {', '.join(AUDIO)})")
    if not (export / "speech_generator.safetensors").is_file():
        raise ChatError(f"{export} has no speech generator (speech_generator.safetensors)")
    stage = str((config.get("model") or {}).get("class_path", ""))
    if stage and not stage.endswith("SpeechGenStage"):
        raise ChatError(f"{export} was written by {stage.rsplit('.', 1)[-1]}, which does not "
                        "train the speech generator; use a stage-4 (SpeechGenStage) export")
    try:
        return UnitVocoder.from_pretrained(path)
    except (FileNotFoundError, ValueError, NotImplementedError) as e:
        raise ChatError(f"--vocoder {path}: {e}") from None


def write_speech(path: str, vocoder, units: list[int]) -> None:
    """``units`` through the vocoder into an audio file (format from its suffix)."""
    from lyra_pl.data.encode import write_audio

    wave = vocoder(units).float().cpu().numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_audio(path, wave, vocoder.sample_rate)
    print(f"wrote {path}: {len(wave) / vocoder.sample_rate:.2f} s of speech from "
          f"{len(units)} units", file=sys.stderr)
