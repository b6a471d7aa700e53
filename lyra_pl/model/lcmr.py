"""LCMR, the latent cross-modality regularizer, as the model applies it.

For each speech clip that has a transcript: soft-DTW alignment cost between the clip's projected
speech tokens and the LLM's input embeddings of its transcript (``lyra_pl.ops.lcmr_loss``,
docs/method.md), batched over clips with their true lengths, averaged over those clips.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from lyra_pl import ops


def pad_sequences(flat: Tensor, counts: Tensor, max_count: int | None = None) -> Tensor:
    """(sum(counts), H) concatenated sequences -> (n, max(counts), H), zero-padded; no loop.
    ``max_count``: max(counts) when the caller knows it on the host (otherwise read, a sync)."""
    n = counts.shape[0]
    if max_count is None:
        max_count = int(counts.max()) if n else 0
    starts = torch.cumsum(counts, 0) - counts
    row = torch.repeat_interleave(torch.arange(n, device=flat.device), counts, output_size=flat.shape[0])
    col = torch.arange(flat.shape[0], device=flat.device) - starts[row]
    out = flat.new_zeros(n * max_count, flat.shape[-1])
    return out.index_copy(0, row * max_count + col, flat).view(n, max_count, -1)


def lcmr_term(
    speech_tokens: Tensor,
    speech_counts: Tensor,
    transcript_ids: Tensor,
    transcript_lengths: Tensor,
    embed: nn.Embedding,
    gamma: float,
    temperature: float,
    normalize: str,
    *,
    speech_sizes: Sequence[int] | None = None,
    transcript_sizes: Sequence[int] | None = None,
    part: tuple[int, int] = (0, 1),
) -> Tensor | None:
    """Mean LCMR over the clips with a transcript (None when no clip has one).

    ``part = (i, n)``: only the clips ``i, i + n, ...`` of those with a transcript, their sum
    over the count of all of them: the ``n`` parts add up to the mean (context parallelism
    runs each part on one rank of the group; a part without clips is 0).

    ``speech_sizes`` / ``transcript_sizes``: ``speech_counts`` / ``transcript_lengths`` as host
    ints, so that nothing is read back from the device (without them they are read, a sync).
    The transcript embeddings are the regularizer's target and are detached: LCMR moves speech
    tokens toward the text embedding space, never the embeddings toward speech.
    """
    if speech_sizes is None:
        speech_sizes = speech_counts.tolist()
    if transcript_sizes is None:
        transcript_sizes = transcript_lengths.tolist()
    n = sum(t > 0 for t in transcript_sizes)
    if not n:
        return None
    index, parts = part
    mine = range(index, n, parts)
    if not mine:
        return speech_tokens.new_zeros(())
    # The clips with a transcript, found on the device in a shape known on the host.
    rows = torch.nonzero_static(transcript_lengths > 0, size=n).squeeze(1)
    if len(mine) < n:
        rows = rows[mine.start::mine.step]
    with_text = [s for s, t in zip(speech_sizes, transcript_sizes) if t > 0]
    longest = max(with_text[i] for i in mine)
    speech = pad_sequences(speech_tokens, speech_counts, max(speech_sizes)).index_select(0, rows)
    speech = speech[:, :longest]
    text = embed(transcript_ids.index_select(0, rows)).detach()
    losses = ops.lcmr_loss(
        speech, text.to(speech.dtype), speech_counts.index_select(0, rows),
        transcript_lengths.index_select(0, rows),
        gamma=gamma, temperature=temperature, normalize=normalize,
    )
    return losses.sum() / n
