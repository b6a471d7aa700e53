"""Discrete speech units for stage 4: frame features -> k-means -> unit ids -> "<12><7>...".

Lyra's speech generator predicts HuBERT k-means units (1000 of them) with CTC. The tiny corpus
makes units the same way at toy scale: 25 Hz frames of log-mel energies (or, given a local
checkpoint, HuBERT layer features at 50 Hz), a seeded k-means fitted on the training answers,
and consecutive duplicate units collapsed (as in LLaMA-Omni/Lyra; CTC targets need no
durations).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

N_FFT, HOP, N_MELS = 1024, 640, 80  # at 16 kHz: 64 ms windows every 40 ms = 25 Hz frames
UNIT_PATTERN = re.compile(r"<(\d+)>")


def mel_filters(n_mels: int = N_MELS, n_fft: int = N_FFT, rate: int = 16000) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular filters, evenly spaced on the HTK mel scale."""
    mel = np.linspace(0.0, 2595.0 * np.log10(1.0 + rate / 2 / 700.0), n_mels + 2)
    hz = 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    freqs = np.fft.rfftfreq(n_fft, 1.0 / rate)
    rising = (freqs[None] - hz[:-2, None]) / (hz[1:-1] - hz[:-2])[:, None]
    falling = (hz[2:, None] - freqs[None]) / (hz[2:] - hz[1:-1])[:, None]
    return np.maximum(0.0, np.minimum(rising, falling))


def logmel_frames(clips: Sequence[np.ndarray], rate: int = 16000) -> list[Tensor]:
    """16 kHz clips -> (frames, 80) float64 log10 mel energies at 25 Hz, one per clip."""
    filters = torch.from_numpy(mel_filters(N_MELS, N_FFT, rate))
    window = torch.hann_window(N_FFT, dtype=torch.float64)
    out = []
    for c in clips:
        x = torch.from_numpy(np.asarray(c, dtype=np.float64))
        power = torch.stft(x, N_FFT, HOP, window=window, return_complex=True).abs().square()
        out.append((filters @ power).clamp(min=1e-10).log10().T.contiguous())
    return out


def hubert_frames(clips: Sequence[np.ndarray], directory: str | Path, layer: int = 6,
                  ) -> list[Tensor]:
    """16 kHz clips -> (frames, dim) float64 hidden states of HuBERT layer ``layer`` (50 Hz)
    from a local checkpoint (``HubertModel.from_pretrained(directory)``). Not exercised by
    the tests here (no checkpoint is available offline)."""
    from transformers import HubertModel

    model = HubertModel.from_pretrained(str(directory)).eval()
    out = []
    with torch.no_grad():
        for c in clips:
            wave = torch.from_numpy(np.asarray(c, dtype=np.float32))[None]
            states = model(wave, output_hidden_states=True).hidden_states[layer]
            out.append(states[0].double())
    return out


def kmeans(x: Tensor, k: int, seed: int = 0, iters: int = 100) -> Tensor:
    """Lloyd's k-means with k-means++ seeding on (n, d) points -> (k, d) float64 centroids.

    Deterministic for a seed (float64 on CPU, a seeded torch.Generator). A cluster that ends
    up empty keeps its centroid."""
    x = x.double().cpu()
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n}")
    g = torch.Generator().manual_seed(seed)
    centers = x[torch.randint(n, (1,), generator=g)]
    d2 = (x - centers).square().sum(1)
    for _ in range(1, k):
        if d2.sum() <= 0:
            raise ValueError(f"k-means needs at least k={k} distinct points")
        i = torch.multinomial(d2 / d2.sum(), 1, generator=g)
        centers = torch.cat([centers, x[i]])
        d2 = torch.minimum(d2, (x - x[i]).square().sum(1))
    for _ in range(iters):
        assign = assign_units(x, centers)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)[:, None]
        new = torch.where(counts > 0, sums / counts.clamp(min=1), centers)
        if torch.equal(new, centers):
            break
        centers = new
    return centers


def assign_units(x: Tensor, centers: Tensor) -> Tensor:
    """(n, d) points -> (n,) int64 index of the nearest centroid."""
    d = torch.cdist(x.double(), centers.double(), compute_mode="donot_use_mm_for_euclid_dist")
    return d.argmin(1)


def dedup(units: Tensor) -> Tensor:
    """Collapses runs of the same unit: [3, 3, 7, 7, 7, 3] -> [3, 7, 3]."""
    return torch.unique_consecutive(units)


def units_to_string(units: Sequence[int] | Tensor) -> str:
    return "".join(f"<{int(u)}>" for u in units)


def parse_units(text: str) -> list[int]:
    """"<12><873>" -> [12, 873]; ValueError on anything else."""
    ids = [int(m) for m in UNIT_PATTERN.findall(text)]
    if not ids or units_to_string(ids) != text:
        raise ValueError(f"not a unit string: {text[:40]!r}")
    return ids


class UnitExtractor:
    """Frame features of 16 kHz clips -> normalization + k-means fitted on training clips ->
    unit strings. ``hubert``: a local HuBERT checkpoint directory (features of layer
    ``hubert_layer``) instead of log-mel."""

    def __init__(self, k: int = 64, seed: int = 0, hubert: str | Path | None = None,
                 hubert_layer: int = 6):
        if not 2 <= k <= 1000:
            raise ValueError(f"k must be in 2..1000 (unit ids < 1000), got {k}")
        self.k, self.seed, self.hubert, self.hubert_layer = k, seed, hubert, hubert_layer
        self.mean = self.std = self.centers = None

    @property
    def feature_name(self) -> str:
        return (f"HuBERT layer {self.hubert_layer}, 50 Hz" if self.hubert
                else f"log-mel, {N_MELS} bins, 25 Hz")

    def frames(self, clips: Sequence[np.ndarray]) -> list[Tensor]:
        """16 kHz clips -> (frames, dim) features, one tensor per clip."""
        if self.hubert:
            return hubert_frames(clips, self.hubert, self.hubert_layer)
        return logmel_frames(clips)

    def fit(self, frames: Sequence[Tensor]) -> UnitExtractor:
        """Fits per-dimension normalization and k-means on the frames of the training clips."""
        x = torch.cat(list(frames))
        self.mean, self.std = x.mean(0), x.std(0).clamp(min=1e-6)
        self.centers = kmeans((x - self.mean) / self.std, self.k, self.seed)
        return self

    def units(self, frames: Sequence[Tensor]) -> list[str]:
        """Per-clip frames -> unit strings, consecutive duplicates collapsed."""
        if self.centers is None:
            raise RuntimeError("UnitExtractor.fit must run first")
        return [units_to_string(dedup(assign_units((f - self.mean) / self.std, self.centers)))
                for f in frames]
