"""LCMR, the latent cross-modality regularizer, as the model applies it.

For each speech clip that has a transcript: soft-DTW alignment cost between the clip's projected
speech tokens and the LLM's input embeddings of its transcript (``lyra_pl.ops.lcmr_loss``,
docs/method.md), batched over clips with their true lengths, averaged over those clips.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lyra_pl import ops


def pad_sequences(flat: Tensor, counts: Tensor) -> Tensor:
    """(sum(counts), H) concatenated sequences -> (n, max(counts), H), zero-padded; no loop."""
    n, L = counts.shape[0], int(counts.max()) if counts.numel() else 0
    starts = torch.cumsum(counts, 0) - counts
    row = torch.repeat_interleave(torch.arange(n, device=flat.device), counts, output_size=flat.shape[0])
    col = torch.arange(flat.shape[0], device=flat.device) - starts[row]
    out = flat.new_zeros(n * L, flat.shape[-1])
    return out.index_copy(0, row * L + col, flat).view(n, L, -1)


def lcmr_term(
    speech_tokens: Tensor,
    speech_counts: Tensor,
    transcript_ids: Tensor,
    transcript_lengths: Tensor,
    embed: nn.Embedding,
    gamma: float,
    temperature: float,
    normalize: str,
) -> Tensor | None:
    """Mean LCMR over the clips with a transcript (None when no clip has one).

    The transcript embeddings are the regularizer's target and are detached: LCMR moves speech
    tokens toward the text embedding space, never the embeddings toward speech.
    """
    has = transcript_lengths > 0
    if not bool(has.any()):
        return None
    speech = pad_sequences(speech_tokens, speech_counts)[has]
    text = embed(transcript_ids[has]).detach()
    losses = ops.lcmr_loss(
        speech, text.to(speech.dtype), speech_counts[has], transcript_lengths[has],
        gamma=gamma, temperature=temperature, normalize=normalize,
    )
    return losses.mean()
