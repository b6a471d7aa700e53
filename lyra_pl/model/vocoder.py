"""Unit vocoder: discrete speech units -> waveform (unit HiFi-GAN, "CodeHiFiGAN").

Lyra and LLaMA-Omni turn the speech generator's units (1000 mHuBERT k-means units, 50 per
second) into 16 kHz audio with fairseq's ``CodeHiFiGANVocoder``. This module re-implements
that generator in plain torch so a released checkpoint loads without fairseq:

- ``config.json``: ``upsample_rates``, ``upsample_kernel_sizes``, ``upsample_initial_channel``,
  ``resblock_kernel_sizes``, ``resblock_dilation_sizes``, ``num_embeddings``,
  ``embedding_dim``, optional ``model_in_dim`` (default 80, must equal ``embedding_dim``
  here), ``dur_predictor_params`` and ``sampling_rate`` (default 16000);
- a generator checkpoint (``g_00500000``): a torch pickle ``{"generator": state_dict}`` with
  keys ``dict.weight``, ``conv_pre.*``, ``ups.N.*``, ``resblocks.N.convs{1,2}.M.*``,
  ``conv_post.*`` and optionally ``dur_predictor.{conv1.0,ln1,conv2.0,ln2,proj}.*``.
  Convs are weight-normed; the old ``weight_g``/``weight_v`` names (legacy
  ``torch.nn.utils.weight_norm``) and the ``parametrizations.weight.original{0,1}`` names
  both load. Weight norm is folded away after loading, as fairseq does for inference.

What is verified and what is not: the architecture (layer order, paddings, LeakyReLU slopes
including the final default-slope one, the averaging over resblocks, ``tanh`` output, the
duration rule ``clamp(round(exp(log_d) - 1), min=1)``, the duration predictor's second conv
having padding 1 whatever its kernel) and the key names were written from fairseq's
``models/text_to_speech/{codehifigan,hifigan,vocoder}.py`` and ``fastspeech2.py``
(``VariancePredictor``) source. No released checkpoint was available offline, so loading a
real file (e.g. LLaMA-Omni's ``vocoder/g_00500000``: its exact keys, whether it unpickles
with ``weights_only=True``) and the audio it produces are NOT verified. Multi-speaker,
external-embedding and f0-conditioned variants, and ``resblock: "2"``, are not supported and
raise.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["UnitVocoder", "CodeHiFiGANGenerator"]

LRELU_SLOPE = 0.1
REQUIRED_KEYS = ("upsample_rates", "upsample_kernel_sizes", "upsample_initial_channel",
                 "resblock_kernel_sizes", "resblock_dilation_sizes", "num_embeddings",
                 "embedding_dim")
DUR_KEYS = ("encoder_embed_dim", "var_pred_hidden_dim", "var_pred_kernel_size", "var_pred_dropout")
_LEGACY_SUFFIXES = {".weight_g": ".parametrizations.weight.original0",
                    ".weight_v": ".parametrizations.weight.original1"}


def _padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


def _conv(c_in: int, c_out: int, k: int, dilation: int = 1) -> nn.Module:
    return weight_norm(nn.Conv1d(c_in, c_out, k, 1, dilation=dilation,
                                 padding=_padding(k, dilation)))


class ResBlock(nn.Module):
    """HiFi-GAN ResBlock1: three (dilated conv, conv) pairs, each a residual update."""

    def __init__(self, channels: int, kernel_size: int, dilation: Sequence[int]) -> None:
        super().__init__()
        if len(dilation) != 3:
            raise ValueError(f"resblock dilations must have 3 entries, got {list(dilation)}")
        self.convs1 = nn.ModuleList(_conv(channels, channels, kernel_size, d) for d in dilation)
        self.convs2 = nn.ModuleList(_conv(channels, channels, kernel_size) for _ in dilation)

    def forward(self, x: Tensor) -> Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
        return x


class DurationPredictor(nn.Module):
    """fairseq's FastSpeech2 ``VariancePredictor``: log(1 + frames) per unit."""

    def __init__(self, encoder_embed_dim: int, var_pred_hidden_dim: int,
                 var_pred_kernel_size: int, var_pred_dropout: float) -> None:
        super().__init__()
        k, h = var_pred_kernel_size, var_pred_hidden_dim
        self.conv1 = nn.Sequential(nn.Conv1d(encoder_embed_dim, h, k, padding=(k - 1) // 2),
                                   nn.ReLU())
        self.ln1 = nn.LayerNorm(h)
        # fairseq hard-codes padding=1 here (same length only for kernel 3, the released setting).
        self.conv2 = nn.Sequential(nn.Conv1d(h, h, k, padding=1), nn.ReLU())
        self.ln2 = nn.LayerNorm(h)
        self.proj = nn.Linear(h, 1)
        self.dropout = nn.Dropout(var_pred_dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C) -> (B, T) log durations."""
        x = self.dropout(self.ln1(self.conv1(x.transpose(1, 2)).transpose(1, 2)))
        x = self.dropout(self.ln2(self.conv2(x.transpose(1, 2)).transpose(1, 2)))
        return self.proj(x).squeeze(2)


class CodeHiFiGANGenerator(nn.Module):
    """Unit embedding (``dict``) -> HiFi-GAN generator; optional duration predictor."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        if str(cfg.get("resblock", "1")) != "1":
            raise NotImplementedError(f"resblock {cfg['resblock']!r}: only ResBlock1 is supported")
        for key in ("multispkr", "embedder_params", "f0"):
            if cfg.get(key):
                raise NotImplementedError(f"config has {key!r}: speaker/f0-conditioned unit "
                                          "vocoders are not supported")
        if cfg.get("model_in_dim", 80) != cfg["embedding_dim"]:
            raise ValueError(f"model_in_dim={cfg.get('model_in_dim', 80)} must equal "
                             f"embedding_dim={cfg['embedding_dim']} (no extra conditioning)")
        rates, kernels = cfg["upsample_rates"], cfg["upsample_kernel_sizes"]
        if len(rates) != len(kernels):
            raise ValueError(f"upsample_rates {rates} and upsample_kernel_sizes {kernels} "
                             "differ in length")
        if len(cfg["resblock_kernel_sizes"]) != len(cfg["resblock_dilation_sizes"]):
            raise ValueError("resblock_kernel_sizes and resblock_dilation_sizes differ in length")
        ch = cfg["upsample_initial_channel"]
        self.num_kernels = len(cfg["resblock_kernel_sizes"])
        self.dict = nn.Embedding(cfg["num_embeddings"], cfg["embedding_dim"])
        self.conv_pre = _conv(cfg["embedding_dim"], ch, 7)
        self.ups = nn.ModuleList(
            weight_norm(nn.ConvTranspose1d(ch // 2**i, ch // 2**(i + 1), k, u,
                                           padding=(k - u) // 2))
            for i, (u, k) in enumerate(zip(rates, kernels)))
        self.resblocks = nn.ModuleList(
            ResBlock(ch // 2**(i + 1), k, d)
            for i in range(len(rates))
            for k, d in zip(cfg["resblock_kernel_sizes"], cfg["resblock_dilation_sizes"]))
        self.conv_post = _conv(ch // 2**len(rates), 1, 7)
        self.dur_predictor = None
        if cfg.get("dur_predictor_params"):
            params = cfg["dur_predictor_params"]
            missing = [k for k in DUR_KEYS if k not in params]
            if missing:
                raise ValueError(f"dur_predictor_params lacks {missing}")
            self.dur_predictor = DurationPredictor(**{k: params[k] for k in DUR_KEYS})

    def forward(self, code: Tensor, dur_prediction: bool = False) -> Tensor:
        """code (1, T) long -> waveform (1, 1, samples) in [-1, 1].

        With ``dur_prediction`` each (de-duplicated) unit is repeated by its predicted
        duration first; that is per utterance, hence batch size 1 there.
        """
        x = self.dict(code).transpose(1, 2)  # (B, C, T)
        if dur_prediction:
            if self.dur_predictor is None:
                raise ValueError("dur_prediction=True but the checkpoint has no duration predictor")
            if code.shape[0] != 1:
                raise ValueError("duration prediction works on one utterance at a time")
            log_dur = self.dur_predictor(x.transpose(1, 2))
            dur = torch.clamp(torch.round(torch.exp(log_dur) - 1).long(), min=1)
            x = torch.repeat_interleave(x, dur.view(-1), dim=2)
        x = self.conv_pre(x)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            x = sum(block(x) for block in blocks) / self.num_kernels
        x = self.conv_post(F.leaky_relu(x))  # default slope 0.01 here, as in HiFi-GAN
        return torch.tanh(x)

    def remove_weight_norm(self) -> None:
        """Fold g * v / |v| into plain weights (same outputs, no per-call renormalization)."""
        for module in self.modules():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


def _modern_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename legacy weight-norm keys (``x.weight_g``/``x.weight_v``) to parametrization names."""
    out = {}
    for key, value in state.items():
        for old, new in _LEGACY_SUFFIXES.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
                break
        out[key] = value
    return out


class UnitVocoder(nn.Module):
    """Units -> waveform at ``sample_rate``. Build with ``UnitVocoder.from_pretrained(path)``."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        missing = [k for k in REQUIRED_KEYS if k not in cfg]
        if missing:
            raise ValueError(f"vocoder config lacks {missing}")
        self.cfg = dict(cfg)
        self.generator = CodeHiFiGANGenerator(cfg)
        self.sample_rate: int = int(cfg.get("sampling_rate", 16000))
        self.num_units: int = int(cfg["num_embeddings"])
        self.hop_length: int = 1
        for rate in cfg["upsample_rates"]:
            self.hop_length *= int(rate)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, checkpoint: str | Path | None = None,
                        config: str | Path | None = None, map_location: str | torch.device = "cpu",
                        weights_only: bool = True) -> UnitVocoder:
        """Load a local CodeHiFiGAN vocoder.

        ``path`` is a directory holding ``config.json`` and a generator checkpoint (``g_*``;
        the highest step when there are several, or name one with ``checkpoint``), or the
        checkpoint file itself with ``config.json`` beside it (or ``config``). The pickle is
        read with ``weights_only=True``; pass False only for a file you trust.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"vocoder path {path} does not exist")
        if path.is_dir():
            ckpt = path / checkpoint if checkpoint is not None else _latest_generator(path)
            cfg_path = Path(config) if config is not None else path / "config.json"
        else:
            ckpt = path
            cfg_path = Path(config) if config is not None else path.parent / "config.json"
        if not ckpt.is_file():
            raise FileNotFoundError(f"vocoder checkpoint {ckpt} not found")
        if not cfg_path.is_file():
            raise FileNotFoundError(f"vocoder config {cfg_path} not found")
        with open(cfg_path) as f:
            vocoder = cls(json.load(f))
        try:
            obj = torch.load(ckpt, map_location=map_location, weights_only=weights_only)
        except pickle.UnpicklingError as err:
            raise ValueError(f"{ckpt} does not unpickle with weights_only=True; if you trust "
                             "the file, pass weights_only=False") from err
        if not isinstance(obj, dict) or "generator" not in obj:
            keys = list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"{ckpt}: expected a dict with a 'generator' state dict, got {keys}")
        result = vocoder.generator.load_state_dict(_modern_keys(obj["generator"]), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"{ckpt} does not match {cfg_path}: missing "
                             f"{result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}")
        vocoder.generator.remove_weight_norm()
        return vocoder.to(map_location).eval()

    @torch.no_grad()
    def forward(self, units: Sequence[int] | Tensor, dur_prediction: bool | None = None) -> Tensor:
        """One utterance's units (list or 1-D tensor) -> waveform (samples,) in [-1, 1].

        ``dur_prediction`` defaults to True when the checkpoint has a duration predictor:
        CTC-collapsed units are de-duplicated, and the predictor restores their lengths.
        Without it the output has ``len(units) * hop_length`` samples.
        """
        device = self.generator.dict.weight.device
        code = torch.as_tensor(units, device=device)
        if code.dim() == 2 and code.shape[0] == 1:
            code = code[0]
        if code.dim() != 1 or code.numel() == 0:
            raise ValueError("expected one non-empty utterance of units, got shape "
                             f"{tuple(code.shape)}")
        if code.is_floating_point() or code.dtype == torch.bool:
            raise ValueError(f"units must be integers, got {code.dtype}")
        bad = (code < 0) | (code >= self.num_units)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0, 0])
            raise ValueError(f"unit {i} is {int(code[i])}, outside [0, {self.num_units})")
        if dur_prediction is None:
            dur_prediction = self.generator.dur_predictor is not None
        return self.generator(code.long()[None], dur_prediction=dur_prediction).reshape(-1)


def _latest_generator(directory: Path) -> Path:
    """The ``g_<step>`` file with the highest step in ``directory``."""
    found = sorted((p for p in directory.glob("g_*") if p.name[2:].isdigit()),
                   key=lambda p: int(p.name[2:]))
    if not found:
        raise FileNotFoundError(f"no generator checkpoint (g_<step>) in {directory}")
    return found[-1]
