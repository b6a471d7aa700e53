"""Audio encoder: the frozen Whisper encoder over 30 s windows, for speech and for sound.

Whisper only accepts exactly 30 s (3000 mel frames -> 1500 states). The official Lyra code pads
every clip to one window (a 2 s clip costs 300 LLM tokens, mostly padding) and silently cuts
anything longer. Here every clip is cut into as many windows as it needs, all windows of the
batch are encoded together in fixed-size chunks (memory bounded by `window_batch`, not by the
audio's length: a 2-hour recording is 240 windows), and only tokens that cover real audio are
kept, so the LLM sees 10 tokens per second of actual speech.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import transformers
from torch import Tensor, nn
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from lyra_pl.model.audio import (
    FRAMES_PER_WINDOW,
    SAMPLES_PER_STATE,
    SAMPLES_PER_TOKEN,
    STATES_PER_WINDOW,
    TOKENS_PER_WINDOW,
    WINDOW_SAMPLES,
    AudioBatch,
    ceil_div,
    log_mel,
)
from lyra_pl.model.projectors import SoundProjector, SpeechProjector

STATES_PER_TOKEN = SAMPLES_PER_TOKEN // SAMPLES_PER_STATE  # 5


@dataclass(frozen=True)
class _WindowPlan:
    """Where every 30 s window of a batch comes from, in clip order then time order."""

    clip: Tensor  # (W,) int64 clip index of each window
    index: Tensor  # (W,) int64 window index within its clip
    real: Tensor  # (W,) int64 samples of real audio in the window, 1..480000
    tokens: tuple[int, ...]  # host ints: speech tokens of each window, 1..300

    @classmethod
    def of(cls, audio: AudioBatch) -> _WindowPlan:
        device = audio.waveforms.device
        lengths = audio.lengths.to(device)
        per_clip = audio.num_windows().to(device)
        clip = torch.repeat_interleave(torch.arange(len(audio), device=device), per_clip,
                                       output_size=sum(audio.host_num_windows()))
        first = per_clip.cumsum(0) - per_clip
        index = torch.arange(clip.numel(), device=device) - first[clip]
        real = (lengths[clip] - index * WINDOW_SAMPLES).clamp(max=WINDOW_SAMPLES)
        return cls(clip, index, real, cls.host_tokens(audio))

    @staticmethod
    def host_tokens(audio: AudioBatch) -> tuple[int, ...]:
        """Speech tokens of each window, from the clip lengths the batch keeps on the host."""
        return tuple(ceil_div(min(n - i * WINDOW_SAMPLES, WINDOW_SAMPLES), SAMPLES_PER_TOKEN)
                     for n, w in zip(audio.host_lengths, audio.host_num_windows())
                     for i in range(w))

    def __len__(self) -> int:
        return self.clip.numel()


def _gather_windows(waveforms: Tensor, clip: Tensor, index: Tensor, real: Tensor) -> Tensor:
    """(w, 480000) windows cut from (N, T) waveforms, exact zeros past each clip's end.

    One vectorized gather; samples past `real` are never read, so whatever the caller left in
    the padding (or past T) cannot leak into the features.
    """
    offsets = torch.arange(WINDOW_SAMPLES, device=waveforms.device)
    valid = offsets < real[:, None]
    flat = clip[:, None] * waveforms.shape[1] + index[:, None] * WINDOW_SAMPLES + offsets
    samples = torch.take(waveforms, torch.where(valid, flat, 0))
    return torch.where(valid, samples, 0.0)


class AudioEncoder(nn.Module):
    """The Whisper encoder (frozen by the caller) run over 30 s windows of any-length audio.

    `self.whisper` is a plain `WhisperEncoder`, so checkpoint loading maps Whisper's
    `model.encoder.*` keys onto `whisper.*` unchanged. The projectors live outside (they are
    trained, this is not) and are passed to `speech` / `sound`.
    """

    def __init__(self, whisper_config: transformers.WhisperConfig, window_batch: int = 8):
        super().__init__()
        frames = 2 * whisper_config.max_source_positions
        if frames != FRAMES_PER_WINDOW:
            raise ValueError(
                f"AudioEncoder needs a Whisper encoder over 30 s windows: 2 * max_source_positions "
                f"must be {FRAMES_PER_WINDOW} mel frames (conv strides 1 and 2), got "
                f"max_source_positions={whisper_config.max_source_positions} ({frames} frames)"
            )
        if window_batch < 1:
            raise ValueError(f"AudioEncoder window_batch must be >= 1, got {window_batch}")
        self.whisper = WhisperEncoder(whisper_config)
        self.dim = whisper_config.d_model
        self.num_mel_bins = whisper_config.num_mel_bins
        self.window_batch = window_batch

    def _encode(self, audio: AudioBatch, plan: _WindowPlan, start: int, stop: int) -> Tensor:
        """Whisper states (w, 1500, dim) of windows start..stop of the plan."""
        weight = self.whisper.conv1.weight
        waves = _gather_windows(
            audio.waveforms, plan.clip[start:stop], plan.index[start:stop], plan.real[start:stop]
        )
        features = log_mel(waves.to(weight.device, non_blocking=True), self.num_mel_bins)
        # The encoder is frozen in Lyra: no graph for it (a 2-hour clip would otherwise keep
        # 240 windows of activations). If someone does unfreeze it, gradients flow as usual.
        frozen = not any(p.requires_grad for p in self.whisper.parameters())
        with torch.no_grad() if frozen else contextlib.nullcontext():
            return self.whisper(input_features=features.to(weight.dtype)).last_hidden_state

    def _chunks(self, windows: range | _WindowPlan):
        """(start, stop) of consecutive groups of at most ``window_batch`` windows."""
        if not isinstance(windows, range):
            windows = range(len(windows))
        for start in range(windows.start, windows.stop, self.window_batch):
            yield start, min(start + self.window_batch, windows.stop)

    def speech(self, audio: AudioBatch, projector: SpeechProjector,
               windows: range | None = None) -> tuple[Tensor, Tensor]:
        """Speech tokens of every clip: 10 per second of real audio.

        Returns:
            tokens: (sum(counts), projector.out_dim), clip by clip, in time order.
            counts: (N,) int64, exactly `audio.num_tokens()` (on `audio.lengths`' device).

        Each window keeps only its first ceil(real_samples / 1600) groups of 5 states (at most
        300), so a 2 s clip gives 20 tokens and a 2-hour one 72,000; padding groups are dropped
        before the projector, which therefore never spends compute on them.

        ``windows``: encode only these windows of the batch (all its clips' 30 s windows in
        clip then time order, :meth:`window_tokens`), e.g. one rank's share under context
        parallelism; ``tokens`` then holds theirs only.
        """
        if projector.downsample != STATES_PER_TOKEN or projector.encoder_dim != self.dim:
            raise ValueError(
                f"AudioEncoder.speech needs a SpeechProjector with encoder_dim={self.dim} and "
                f"downsample={STATES_PER_TOKEN} (10 tokens/s, as AudioBatch.num_tokens assumes), "
                f"got encoder_dim={projector.encoder_dim}, downsample={projector.downsample}"
            )
        plan = _WindowPlan.of(audio)
        windows = range(len(plan)) if windows is None else windows
        tokens_per_window = ceil_div(plan.real, SAMPLES_PER_TOKEN)  # 1..300
        dtype = projector.linear1.weight.dtype
        pieces = []
        for start, stop in self._chunks(windows):
            states = self._encode(audio, plan, start, stop)
            groups = states.view(stop - start, TOKENS_PER_WINDOW, STATES_PER_TOKEN, self.dim)
            keep = torch.arange(TOKENS_PER_WINDOW, device=states.device) < tokens_per_window[
                start:stop, None
            ].to(states.device)
            # The kept groups' count is known on the host: no mask readback.
            rows = torch.nonzero_static(keep.flatten(), size=sum(plan.tokens[start:stop]))
            kept = groups.flatten(0, 1).index_select(0, rows.squeeze(1))
            pieces.append(projector(kept.reshape(-1, self.dim).to(dtype)))
        if not pieces:  # no clips, or no windows in this share: the projector still runs, on
            # nothing, so that its output is part of the graph as on the ranks that encode
            pieces.append(projector(projector.linear1.weight.new_zeros(0, self.dim)))
        return torch.cat(pieces), audio.num_tokens()

    @staticmethod
    def window_tokens(audio: AudioBatch) -> tuple[int, ...]:
        """Speech tokens of each 30 s window of the batch (clip then time order), host ints."""
        return _WindowPlan.host_tokens(audio)

    def sound(self, audio: AudioBatch, projector: SoundProjector) -> tuple[Tensor, Tensor]:
        """Sound-event tokens: `projector.n_tokens` per clip, from mean-pooled Whisper states.

        The paper encodes sound with ImageBind into one token. We reuse the frozen Whisper
        encoder instead: it is already in memory for speech, it was trained on ~680K hours of
        noisy, multi-domain audio (its states describe non-speech sound well), and it avoids
        another ~1B-parameter model, its dependency and its download (everything stays offline).
        A few pooled tokens rather than one keep a coarse sense of time (what happens first).

        Each clip's real states (50 per second, over all its windows; padding excluded) are
        split into n_tokens equal consecutive segments (segment of state i = floor(i * n / n_real))
        and averaged. A clip shorter than n_tokens states repeats states (segment m then takes
        state floor(m * n_real / n)).

        Returns:
            tokens: (N * n_tokens, projector.out_dim), clip by clip.
            counts: (N,) int64, all n_tokens (on `audio.lengths`' device).
        """
        if projector.encoder_dim != self.dim:
            raise ValueError(
                f"AudioEncoder.sound needs a SoundProjector with encoder_dim={self.dim}, "
                f"got {projector.encoder_dim}"
            )
        k = projector.n_tokens
        n_clips = len(audio)
        plan = _WindowPlan.of(audio)
        n_real = ceil_div(audio.lengths.to(plan.clip.device), SAMPLES_PER_STATE)  # per clip
        device = self.whisper.conv1.weight.device
        sums: Tensor | None = None
        sizes = torch.zeros(n_clips, k, device=device)
        segment = torch.arange(k, device=device)
        in_window = torch.arange(STATES_PER_WINDOW, device=device)[None, :, None]
        for start, stop in self._chunks(plan):
            states = self._encode(audio, plan, start, stop)
            clip = plan.clip[start:stop].to(device)
            n = n_real[plan.clip[start:stop]].to(device)[:, None, None]  # (w, 1, 1)
            # (w, 1500, 1): index of each state within its clip
            state = (plan.index[start:stop].to(device) * STATES_PER_WINDOW)[:, None, None] + in_window
            first = ceil_div(segment * n, k)  # (w, 1, k): segment m is [first, last)
            last = ceil_div((segment + 1) * n, k)
            # Segments end at n_real at most, so padding states (index >= n_real) never count.
            member = (state >= first) & (state < last)
            member |= (first == last) & (state == torch.div(segment * n, k, rounding_mode="floor"))
            acc = torch.promote_types(states.dtype, torch.float32)
            window_sums = torch.einsum("wtk,wtd->wkd", member.to(acc), states.to(acc))
            if sums is None:
                sums = torch.zeros(n_clips, k, self.dim, device=device, dtype=acc)
            sums = sums.index_add(0, clip, window_sums)
            sizes = sizes.index_add(0, clip, member.sum(1).to(sizes.dtype))
        dtype = projector.linear1.weight.dtype
        if sums is None:
            pooled = torch.zeros(0, k, self.dim, device=device, dtype=dtype)
        else:
            pooled = (sums / sizes[..., None].to(sums.dtype)).to(dtype)
        tokens = projector(pooled).reshape(n_clips * k, projector.out_dim)
        return tokens, torch.full((n_clips,), k, dtype=torch.int64, device=audio.lengths.device)
