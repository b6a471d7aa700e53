"""Sequence assembly: text with placeholders + encoder tokens -> one padded embedding batch.

Each ``<image>``, ``<video>``, ``<speech>``, ``<sound>`` placeholder in ``input_ids`` stands for
one media item and is replaced by that item's tokens; items of a modality are taken in
row-major placeholder order. Everything is computed for the whole batch at once (flat index
arithmetic, no loop over samples), and the result carries what the decoder and the extractor
need per token: M-RoPE positions, modality ids, next-token targets, the context and
instruction masks.

Given the batch's host sizes (:class:`~lyra_pl.model.sizes.BatchSizes`, checked by collate)
the layout is planned on the host and nothing is read back from the device; without them the
placeholders are checked and the layout is measured on the device (a few syncs).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lyra_pl.model.sizes import BatchSizes

TEXT, IMAGE, VIDEO, SPEECH, SOUND = 0, 1, 2, 3, 4
MODALITIES = ("image", "video", "speech", "sound")  # modality id = index + 1
PAD = -1
IGNORE = -100


@dataclass
class Media:
    """One modality's encoded items, in placeholder order.

    tokens: (sum(counts), H) the items' tokens, concatenated. counts: (n_items,) tokens per item.
    grids: (n_items, 3) the (t, h, w) token grid of image/video items (M-RoPE); None for
    sequence-like items (speech, sound), whose tokens get text-like positions.
    host_counts: ``counts`` as host ints, when the encoder knows them without reading the
    device (None: read from ``counts``, a sync).
    """

    tokens: Tensor
    counts: Tensor
    grids: Tensor | None = None
    host_counts: tuple[int, ...] | None = None

    def host_sizes(self) -> tuple[int, ...]:
        """Tokens per item, as host ints."""
        return tuple(self.counts.tolist()) if self.host_counts is None else self.host_counts


@dataclass
class Assembled:
    """The assembled batch, right-padded to N tokens; per-token tensors are (B, N)."""

    embeds: Tensor  # (B, N, H)
    positions: Tensor  # (3, B, N) M-RoPE (temporal, height, width)
    lengths: Tensor  # (B,)
    valid: Tensor  # bool, real tokens
    modality: Tensor  # 0 text, 1 image, 2 video, 3 speech, 4 sound, -1 padding
    targets: Tensor  # next-token label at each position (IGNORE where none)
    answer: Tensor  # bool, the token is part of an answer (has a label)
    context: Tensor  # bool, prunable: media tokens that no target depends on
    instruction: Tensor  # bool, text after the first media token that is not an answer
    next_position: Tensor  # (B,) the position a generated token continues from
    # Host ints (LMME never drops a target or an answer token, so they hold after pruning too):
    host_lengths: tuple[int, ...]  # ``lengths``
    n_targets: int  # tokens with a target
    n_answers: tuple[int, ...]  # answer tokens per sample


def placeholder_modality(input_ids: Tensor, placeholder_ids: dict[str, int]) -> Tensor:
    """(B, T) modality id of each input token: 0 text, 1..4 the placeholder's modality."""
    modality = torch.zeros_like(input_ids)
    for i, name in enumerate(MODALITIES):
        modality = torch.where(input_ids == placeholder_ids[name], i + 1, modality)
    return modality


def check_media_counts(
    modality: Tensor, valid: Tensor, media_counts: Tensor | None, given: dict[int, int]
) -> None:
    """Placeholders must match the items given, per sample when ``media_counts`` says which
    sample owns how many items, otherwise for the whole batch."""
    B = modality.shape[0]
    found = torch.stack(
        [((modality == m) & valid).sum(1) for m in range(1, 5)], dim=1
    )  # (B, 4)
    if media_counts is not None:
        if tuple(media_counts.shape) != (B, 4):
            raise ValueError(f"media_counts must be (B, 4) = ({B}, 4), got "
                             f"{tuple(media_counts.shape)}")
        bad = (found != media_counts.to(found.device)).nonzero()
        if len(bad):
            b, m = bad[0].tolist()
            name = MODALITIES[m]
            raise ValueError(
                f"sample {b}: {int(found[b, m])} <{name}> placeholder(s) in the text but "
                f"{int(media_counts[b, m])} {name} input(s)"
            )
    # Past the per-sample check, media_counts sums to the placeholders found: one comparison
    # with the inputs given covers both cases.
    total = found.sum(0).tolist()
    for m in range(4):
        if total[m] == given.get(m + 1, 0):
            continue
        if media_counts is not None:
            raise ValueError(f"media_counts says {total[m]} {MODALITIES[m]} input(s) in the "
                             f"batch but {given.get(m + 1, 0)} were given")
        owners = (found[:, m] > 0).nonzero().flatten().tolist()
        raise ValueError(
            f"{total[m]} <{MODALITIES[m]}> placeholder(s) in the batch (samples {owners}) "
            f"but {given.get(m + 1, 0)} {MODALITIES[m]} input(s); pass media_counts to find "
            "the sample"
        )


def assemble(
    input_ids: Tensor,
    lengths: Tensor,
    labels: Tensor | None,
    text_embeds: Tensor,
    media: dict[int, Media],
    placeholder_ids: dict[str, int],
    media_counts: Tensor | None = None,
    sizes: BatchSizes | None = None,
) -> Assembled:
    """Builds the decoder's input batch.

    Args:
        input_ids: (B, T) token ids with one placeholder per item; right padding beyond
            ``lengths`` (B,) is ignored.
        labels: (B, T) answer-token labels (IGNORE elsewhere; placeholders must be IGNORE), or
            None for inference.
        text_embeds: (B, T, H) the LLM's input embeddings of ``input_ids``.
        media: modality id -> :class:`Media`, for the modalities present.
        media_counts: optional (B, 4) items per sample (image, video, speech, sound), to name
            the sample when placeholders and inputs disagree.
        sizes: the batch's host sizes; what they lack is read from the device.
    """
    device = input_ids.device
    B, T = input_ids.shape
    H = text_embeds.shape[-1]
    in_valid = torch.arange(T, device=device) < lengths[:, None]
    modality_in = placeholder_modality(input_ids, placeholder_ids)
    item_tokens = {m: x.host_sizes() for m, x in media.items()}
    planned = sizes is not None and sizes.media_counts is not None
    if planned:  # collate checked every sample's placeholders against its items
        _check_items_given(sizes.media_counts, {m: len(t) for m, t in item_tokens.items()})
    else:
        check_media_counts(modality_in, in_valid, media_counts,
                           {m: len(x.counts) for m, x in media.items()})
        if labels is not None:
            bad = (labels != IGNORE) & (modality_in != TEXT) & in_valid
            if bad.any():
                b = int(bad.nonzero()[0, 0])
                raise ValueError(f"sample {b}: a placeholder token has a label; only text "
                                 "tokens can be answers")
    for m, x in media.items():
        if sum(item_tokens[m]) != x.tokens.shape[0]:
            raise ValueError(f"{MODALITIES[m - 1]}: {x.tokens.shape[0]} tokens for "
                             f"{sum(item_tokens[m])} placeholder slots")

    # Rank of each placeholder among its modality's placeholders (row-major) = its item index.
    flat_mod = modality_in.masked_fill(~in_valid, PAD).flatten()  # (B*T,)
    item = torch.zeros_like(flat_mod)
    reps = (flat_mod == TEXT).long()  # tokens each input token expands to
    grid_in = torch.zeros(B * T, 3, dtype=torch.long, device=device)
    media = {m: x for m, x in media.items() if len(x.counts)}
    for m, x in media.items():
        is_m = flat_mod == m
        rank = torch.cumsum(is_m, 0) - 1
        item = torch.where(is_m, rank, item)
        counts = x.counts.to(device)
        reps = torch.where(is_m, counts[rank.clamp(min=0)], reps)
        if x.grids is not None:
            grid_in = torch.where(is_m[:, None], x.grids.to(device)[rank.clamp(min=0)], grid_in)

    # Expanded layout: source input token and offset within it of every output token.
    out_lengths = reps.view(B, T).sum(1)
    if planned:
        host_lengths = _planned_lengths(sizes.lengths, sizes.media_counts, item_tokens)
    else:
        host_lengths = tuple(out_lengths.tolist())
    N, total = max(host_lengths, default=0), sum(host_lengths)
    src = torch.repeat_interleave(torch.arange(B * T, device=device), reps, output_size=total)
    starts = torch.cumsum(reps, 0) - reps  # first output token of each input token (flat)
    offset = torch.arange(total, device=device) - starts[src]
    row = src // T
    row_start = torch.cumsum(out_lengths, 0) - out_lengths
    col = starts[src] - row_start[row] + offset
    flat_out = row * N + col

    # Values: text embeddings, or the modality's tokens in item order.
    mod = flat_mod[src]
    values = text_embeds.reshape(B * T, H)[src]
    for m, x in media.items():
        values = values.masked_scatter((mod == m)[:, None], x.tokens.to(values.dtype))
    embeds = values.new_zeros(B * N, H).index_copy(0, flat_out, values).view(B, N, H)

    def spread(x: Tensor, fill: int) -> Tensor:
        return x.new_full((B * N,), fill).index_copy(0, flat_out, x).view(B, N)

    modality = spread(mod, PAD)
    valid = modality != PAD

    # M-RoPE: text-like tokens advance the position by 1; an image/video item of grid (t,h,w)
    # takes (start+t', start+h', start+w') and advances it by max(t, h, w), as in Qwen2-VL.
    grid = grid_in[src]  # (total, 3), zero for text-like tokens
    is_grid = grid[:, 0] > 0
    hw = (grid[:, 1] * grid[:, 2]).clamp(min=1)
    t_off = offset // hw
    h_off = (offset // grid[:, 2].clamp(min=1)) % grid[:, 1].clamp(min=1)
    w_off = offset % grid[:, 2].clamp(min=1)
    offsets = torch.stack([t_off, h_off, w_off]) * is_grid  # (3, total)
    last_of_item = offset == reps[src] - 1
    advance = torch.where(is_grid, torch.where(last_of_item, grid.amax(1), 0), 1)
    adv = spread(advance, 0)
    base = torch.cumsum(adv, 1) - adv
    positions = torch.zeros(3, B * N, dtype=torch.long, device=device)
    positions[:, flat_out] = offsets + base.flatten()[flat_out]
    positions = positions.view(3, B, N)
    next_position = base[:, -1] + adv[:, -1] if N else torch.zeros(B, dtype=torch.long, device=device)

    if labels is not None:
        label_exp = spread(labels.flatten()[src], IGNORE).masked_fill(~valid, IGNORE)
    else:
        label_exp = torch.full((B, N), IGNORE, dtype=torch.long, device=device)
    answer = label_exp != IGNORE
    targets = torch.cat([label_exp[:, 1:], label_exp.new_full((B, 1), IGNORE)], dim=1)
    is_media = valid & (modality != TEXT)
    # Never pruned: a media token that is the input of a target (one just before an answer),
    # and each sample's last token, from which generation continues.
    last = torch.arange(N, device=device) == (out_lengths - 1)[:, None]
    context = is_media & (targets == IGNORE) & ~last
    instruction = valid & (modality == TEXT) & ~answer & (torch.cumsum(is_media, 1) > 0)
    if sizes is not None:
        n_targets, n_answers = sizes.targets, sizes.answers
    else:
        *n_answers, n_targets = torch.cat([answer.sum(1), (targets != IGNORE).sum()[None]]).tolist()
    return Assembled(embeds, positions, out_lengths, valid, modality, targets, answer, context,
                     instruction, next_position, host_lengths, n_targets, tuple(n_answers))


def _check_items_given(media_counts: tuple[tuple[int, ...], ...], given: dict[int, int]) -> None:
    for m, name in enumerate(MODALITIES, start=1):
        found = sum(c[m - 1] for c in media_counts)
        if found != given.get(m, 0):
            raise ValueError(f"{found} <{name}> placeholder(s) in the batch but "
                             f"{given.get(m, 0)} {name} input(s)")


def _planned_lengths(
    lengths: tuple[int, ...], media_counts: tuple[tuple[int, ...], ...],
    item_tokens: dict[int, tuple[int, ...]],
) -> tuple[int, ...]:
    """Assembled tokens per sample, from host ints: each placeholder becomes its item's tokens
    (a sample's items are the next ones of each modality, in row-major order)."""
    out = list(lengths)
    for m, tokens in item_tokens.items():
        ends = [0, *accumulate(c[m - 1] for c in media_counts)]
        sums = [0, *accumulate(tokens)]
        for b in range(len(out)):
            out[b] += sums[ends[b + 1]] - sums[ends[b]] - (ends[b + 1] - ends[b])
    return tuple(out)
