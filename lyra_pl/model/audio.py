"""Audio inputs: a validated batch of 16 kHz mono clips, and Whisper's log-mel features in torch.

Everything downstream (the speech and sound encoders in `encoders.py`) relies on two facts
that this module enforces once, at the edge: every clip is 16 kHz mono float audio without
NaN/inf, and padding beyond a clip's length is never read as signal. Bad inputs fail here with
a message that names the clip and the sample it belongs to, rather than as a shape error deep
inside the encoder, or worse, as silently wrong tokens (we never resample or truncate).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

SAMPLE_RATE = 16000
"""Whisper's only sample rate; other rates must be resampled by the caller."""
HOP_LENGTH = 160
"""STFT hop: 100 mel frames per second."""
N_FFT = 400
WINDOW_SECONDS = 30
WINDOW_SAMPLES = WINDOW_SECONDS * SAMPLE_RATE  # 480000
"""Whisper encodes exactly one 30 s window at a time; longer audio is cut into windows."""
FRAMES_PER_WINDOW = WINDOW_SAMPLES // HOP_LENGTH  # 3000 mel frames
STATES_PER_WINDOW = FRAMES_PER_WINDOW // 2  # 1500 encoder states (conv2 has stride 2)
SAMPLES_PER_STATE = WINDOW_SAMPLES // STATES_PER_WINDOW  # 320: 50 states per second
SAMPLES_PER_TOKEN = 1600
"""One speech token per 5 encoder states: 10 speech tokens per second."""
TOKENS_PER_WINDOW = WINDOW_SAMPLES // SAMPLES_PER_TOKEN  # 300


def _clip_name(kind: str, index: int, sample_ids: Sequence[int] | None) -> str:
    """'speech clip 3 (batch sample 1)': the words every error message starts with."""
    name = f"{kind} clip {index}"
    if sample_ids is not None:
        name += f" (batch sample {sample_ids[index]})"
    return name


def ceil_div(a: Tensor | int, b: int) -> Tensor | int:
    """ceil(a / b), of a tensor or of a host int: one rule for both."""
    return (a + (b - 1)) // b


@dataclass(frozen=True)
class AudioBatch:
    """N mono 16 kHz clips, zero-padded to a common length T.

    Attributes:
        waveforms: (N, T) float, clip i is `waveforms[i, :lengths[i]]`; whatever lies beyond
            is ignored by the encoders (they re-zero it), so callers may pass any padding.
        lengths: (N,) int64 sample counts, 1 <= lengths[i] <= T.
        kind: "speech", "sound", ...: only used in error messages.
        sample_ids: optional batch sample of each clip, only used in error messages.
        host_lengths: ``lengths`` as host ints, read once when the batch is built (free on
            the CPU) and kept when it moves, so that sizes derived from them (tokens, windows)
            never wait on the device.
    """

    waveforms: Tensor
    lengths: Tensor
    kind: str = "speech"
    sample_ids: tuple[int, ...] | None = None
    host_lengths: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        w, n = self.waveforms, self.lengths
        if w.dim() != 2 or not w.is_floating_point():
            raise ValueError(
                f"AudioBatch.waveforms must be a (N, T) float tensor, got shape {tuple(w.shape)} "
                f"dtype {w.dtype}"
            )
        if n.dim() != 1 or n.dtype != torch.int64 or n.shape[0] != w.shape[0]:
            raise ValueError(
                f"AudioBatch.lengths must be a ({w.shape[0]},) int64 tensor (one per waveform), "
                f"got shape {tuple(n.shape)} dtype {n.dtype}"
            )
        if self.sample_ids is not None and len(self.sample_ids) != w.shape[0]:
            raise ValueError(
                f"AudioBatch got {len(self.sample_ids)} sample_ids for {w.shape[0]} clips"
            )
        host = tuple(n.tolist())
        for i, length in enumerate(host):
            if not 1 <= length <= w.shape[1]:
                raise ValueError(
                    f"{_clip_name(self.kind, i, self.sample_ids)}: length {length} is outside "
                    f"[1, {w.shape[1]}] (the padded waveform length)"
                )
        object.__setattr__(self, "host_lengths", host)

    @classmethod
    def from_list(
        cls,
        clips: Sequence[Tensor | np.ndarray],
        sample_rates: int | Sequence[int] = SAMPLE_RATE,
        kind: str = "speech",
        sample_ids: Sequence[int] | None = None,
    ) -> AudioBatch:
        """Validate clips and pad them into one batch.

        Args:
            clips: 1-D float tensors or numpy arrays ((1, T) mono is accepted too).
            sample_rates: one rate for all clips, or one per clip; each must be 16000.
            kind: what the clips are ("speech", "sound"), for error messages.
            sample_ids: the batch sample each clip belongs to, for error messages.

        A single float32 clip is wrapped without a copy, so hours-long audio costs no extra
        memory here.
        """
        n = len(clips)
        ids = tuple(int(s) for s in sample_ids) if sample_ids is not None else None
        if ids is not None and len(ids) != n:
            raise ValueError(f"from_list got {len(ids)} sample_ids for {n} {kind} clips")
        if isinstance(sample_rates, (int, np.integer)):
            rates = [int(sample_rates)] * n
        else:
            rates = list(sample_rates)
        if len(rates) != n:
            raise ValueError(f"from_list got {len(rates)} sample_rates for {n} {kind} clips")

        tensors = [
            _validated_clip(clip, rate, _clip_name(kind, i, ids))
            for i, (clip, rate) in enumerate(zip(clips, rates))
        ]
        lengths = torch.tensor([t.shape[0] for t in tensors], dtype=torch.int64)
        if n == 1:
            waveforms = tensors[0].unsqueeze(0)
        else:
            waveforms = torch.zeros(n, int(lengths.max()) if n else 0, dtype=torch.float32)
            for i, t in enumerate(tensors):
                waveforms[i, : t.shape[0]] = t
        return cls(waveforms, lengths, kind=kind, sample_ids=ids)

    def __len__(self) -> int:
        return self.waveforms.shape[0]

    def _with(self, waveforms: Tensor, lengths: Tensor) -> AudioBatch:
        """The same clips in other tensors (moved, pinned). They were validated when the batch
        was built; validating again would read the lengths back from the device."""
        out = copy.copy(self)
        object.__setattr__(out, "waveforms", waveforms)
        object.__setattr__(out, "lengths", lengths)
        return out

    def to(self, device: torch.device | str, non_blocking: bool = False) -> AudioBatch:
        return self._with(self.waveforms.to(device, non_blocking=non_blocking),
                          self.lengths.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> AudioBatch:
        """Pinned copies, so a DataLoader with pin_memory=True can move them asynchronously."""
        return self._with(self.waveforms.pin_memory(), self.lengths.pin_memory())

    def num_tokens(self) -> Tensor:
        """(N,) int64 speech tokens per clip: 10 per second, the last partial one included."""
        return ceil_div(self.lengths, SAMPLES_PER_TOKEN)

    def host_num_tokens(self) -> tuple[int, ...]:
        """:meth:`num_tokens` as host ints."""
        return tuple(ceil_div(n, SAMPLES_PER_TOKEN) for n in self.host_lengths)

    def num_windows(self) -> Tensor:
        """(N,) int64 30 s Whisper windows per clip, the last one zero-padded."""
        return ceil_div(self.lengths, WINDOW_SAMPLES)

    def host_num_windows(self) -> tuple[int, ...]:
        """:meth:`num_windows` as host ints."""
        return tuple(ceil_div(n, WINDOW_SAMPLES) for n in self.host_lengths)


def _validated_clip(clip: Tensor | np.ndarray, rate: int, name: str) -> Tensor:
    """One clip as a contiguous 1-D float32 CPU tensor, or a ValueError/TypeError naming it."""
    if int(rate) != SAMPLE_RATE:
        raise ValueError(
            f"{name}: sample rate is {int(rate)} Hz, but {SAMPLE_RATE} Hz is required (Whisper). "
            f"Resample the audio to {SAMPLE_RATE} Hz first; lyra_pl never resamples silently."
        )
    if isinstance(clip, np.ndarray):
        if not np.issubdtype(clip.dtype, np.floating):
            raise ValueError(_dtype_message(name, str(clip.dtype)))
        clip = torch.from_numpy(np.ascontiguousarray(clip))
    elif not isinstance(clip, Tensor):
        raise TypeError(
            f"{name}: expected a 1-D float tensor or numpy array, got {type(clip).__name__}"
        )
    if not clip.is_floating_point():
        raise ValueError(_dtype_message(name, str(clip.dtype)))
    if clip.dim() == 2 and clip.shape[0] == 1:
        clip = clip[0]
    if clip.dim() != 1:
        raise ValueError(
            f"{name}: expected mono audio of shape (T,) or (1, T), got shape {tuple(clip.shape)}"
            + (" (multichannel: mix it down to mono first)" if clip.dim() == 2 else "")
        )
    if clip.shape[0] == 0:
        raise ValueError(f"{name}: the clip is empty (0 samples)")
    clip = clip.to("cpu", torch.float32).contiguous()
    finite = torch.isfinite(clip)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[:, 0]
        raise ValueError(
            f"{name}: contains NaN or inf values ({bad.numel()} of {clip.shape[0]} samples, "
            f"first at sample {int(bad[0])}, after conversion to float32)"
        )
    return clip


def _dtype_message(name: str, dtype: str) -> str:
    return (
        f"{name}: dtype {dtype} is not floating point; convert to float first "
        f"(e.g. int16 PCM / 32768.0 for values in [-1, 1])"
    )


@functools.lru_cache(maxsize=16)
def _mel_constants(
    num_mel_bins: int, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """(mel filters (num_mel_bins, 201), hann window (400,)), built once per device/dtype.

    The filters are exactly those of `WhisperFeatureExtractor(feature_size=num_mel_bins)`.
    """
    from transformers.audio_utils import mel_filter_bank

    filters = mel_filter_bank(
        num_frequency_bins=1 + N_FFT // 2,
        num_mel_filters=num_mel_bins,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )
    filters = torch.from_numpy(filters.T.copy()).to(device, dtype)
    window = torch.hann_window(N_FFT, device=device, dtype=dtype)
    return filters, window


def log_mel(windows: Tensor, num_mel_bins: int = 128) -> Tensor:
    """Whisper log-mel features of whole 30 s windows, batched: (W, 480000) -> (W, bins, 3000).

    Matches `WhisperFeatureExtractor(feature_size=num_mel_bins)` window by window (to ~1e-5),
    including its per-window dynamic range clamp (max - 8), so a window's features never
    depend on the other windows in the batch. Computed in float32 (float64 for float64 input)
    with autocast off: the 8-decade log range does not survive bf16.
    Whisper large-v3 uses 128 bins; v2 and older use 80.
    """
    if windows.dim() != 2 or windows.shape[1] != WINDOW_SAMPLES:
        raise ValueError(
            f"log_mel expects (W, {WINDOW_SAMPLES}) windows of 30 s at {SAMPLE_RATE} Hz, "
            f"got shape {tuple(windows.shape)}"
        )
    dtype = torch.float64 if windows.dtype == torch.float64 else torch.float32
    filters, window = _mel_constants(num_mel_bins, windows.device, dtype)
    with torch.autocast(windows.device.type, enabled=False):
        spec = torch.stft(windows.to(dtype), N_FFT, HOP_LENGTH, window=window, return_complex=True)
        power = (spec[..., :-1].abs() ** 2).contiguous()  # (W, 201, 3000): drop the last frame
        mel = filters @ power
        logs = mel.clamp(min=1e-10).log10()
        peak = logs.amax(dim=(1, 2), keepdim=True)
        logs = torch.maximum(logs, peak - 8.0)
        return (logs + 4.0) / 4.0
