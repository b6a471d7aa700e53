"""Projectors from frozen audio encoder states into the LLM's embedding space.

These are the only audio weights Lyra trains (stage 1 trains the speech projector alone).
"""

from __future__ import annotations

from torch import Tensor, nn


class SpeechProjector(nn.Module):
    """Concatenate k consecutive encoder states, then Linear -> ReLU -> Linear.

    With Whisper's 50 states per second and k = 5 this gives 10 speech tokens per second
    (1500 states -> 300 tokens per 30 s window), as in Lyra: Linear(1280 * 5, 2048) -> ReLU ->
    Linear(2048, hidden). Concatenation (not pooling) keeps every state's information while
    cutting the LLM's sequence length five-fold.
    """

    def __init__(self, encoder_dim: int, out_dim: int, downsample: int = 5, hidden: int = 2048):
        super().__init__()
        self.encoder_dim = encoder_dim
        self.out_dim = out_dim
        self.downsample = downsample
        self.linear1 = nn.Linear(encoder_dim * downsample, hidden)
        self.act = nn.ReLU()
        self.linear2 = nn.Linear(hidden, out_dim)

    def reset_parameters(self) -> None:
        """PyTorch's default init of both linears (:meth:`LyraModel.init_weights` calls it)."""
        self.linear1.reset_parameters()
        self.linear2.reset_parameters()

    def forward(self, states: Tensor) -> Tensor:
        """(..., n * k, encoder_dim) -> (..., n, out_dim)."""
        *lead, length, dim = states.shape
        if dim != self.encoder_dim:
            raise ValueError(
                f"SpeechProjector expects encoder states of width {self.encoder_dim}, got {dim}"
            )
        if length % self.downsample:
            raise ValueError(
                f"SpeechProjector got {length} encoder states, not a multiple of "
                f"downsample k={self.downsample}"
            )
        grouped = states.reshape(*lead, length // self.downsample, self.downsample * dim)
        return self.linear2(self.act(self.linear1(grouped)))


class SoundProjector(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear over `n_tokens` pooled encoder states per clip.

    Sound events (AudioCaps-style captions) need a summary, not a transcript, so a clip becomes
    a fixed handful of tokens whatever its length (see `AudioEncoder.sound`). The norm comes
    first because averaging hundreds of Whisper states shrinks what tells sounds apart to a
    small deviation around a shared mean; normalizing each pooled token restores its scale (on
    the tiny corpus, a sound-only run's held-out accuracy went from 0.25 to 0.92 with it).
    """

    def __init__(self, encoder_dim: int, out_dim: int, n_tokens: int = 4, hidden: int = 2048):
        super().__init__()
        if n_tokens < 1:
            raise ValueError(f"SoundProjector needs n_tokens >= 1, got {n_tokens}")
        self.encoder_dim = encoder_dim
        self.out_dim = out_dim
        self.n_tokens = n_tokens
        self.norm = nn.LayerNorm(encoder_dim)
        self.linear1 = nn.Linear(encoder_dim, hidden)
        self.act = nn.GELU()
        self.linear2 = nn.Linear(hidden, out_dim)

    def reset_parameters(self) -> None:
        """PyTorch's default init of the norm and both linears (:meth:`LyraModel.init_weights`
        calls it)."""
        self.norm.reset_parameters()
        self.linear1.reset_parameters()
        self.linear2.reset_parameters()

    def forward(self, pooled: Tensor) -> Tensor:
        """(..., n_tokens, encoder_dim) -> (..., n_tokens, out_dim)."""
        if pooled.dim() < 2 or tuple(pooled.shape[-2:]) != (self.n_tokens, self.encoder_dim):
            raise ValueError(
                f"SoundProjector expects (..., {self.n_tokens}, {self.encoder_dim}) pooled states, "
                f"got shape {tuple(pooled.shape)}"
            )
        return self.linear2(self.act(self.linear1(self.norm(pooled))))
