"""`BatchSizes`: a batch's sizes as host ints, the numbers the model would otherwise read back
from the device (on a GPU each read stalls the host until the stream has caught up).

They are measured where the batch is built, on the CPU (:func:`~lyra_pl.model.inputs.collate`,
or :meth:`~lyra_pl.model.inputs.LyraInputs.host_sizes` for a batch built by hand), and travel
with the batch to the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lyra_pl.model.assemble import IGNORE, IMAGE, VIDEO

if TYPE_CHECKING:
    from lyra_pl.model.inputs import LyraInputs


@dataclass(frozen=True)
class BatchSizes:
    """Host ints describing a :class:`~lyra_pl.model.inputs.LyraInputs`.

    lengths: real tokens per sample. answers: labelled tokens per sample. targets: tokens with a
    next-token target, i.e. labelled tokens but a sample's first (targets are the labels shifted
    left by one). token_range: the smallest and largest real token id. grids: (t, h, w) patch
    grid of each image (key IMAGE) and video (VIDEO). transcripts: transcript tokens per speech
    clip (0 = none). media_counts: items per sample (image, video, speech, sound), only when
    :func:`~lyra_pl.model.inputs.collate` checked them against the placeholders; None leaves
    that check, and the layout it allows to plan on the host, to the device.
    """

    lengths: tuple[int, ...]
    answers: tuple[int, ...]
    targets: int
    token_range: tuple[int, int]
    grids: dict[int, tuple[tuple[int, int, int], ...]]
    transcripts: tuple[int, ...]
    media_counts: tuple[tuple[int, int, int, int], ...] | None = None

    @classmethod
    def measure(cls, inputs: LyraInputs, checked_media_counts: Tensor | None = None) -> BatchSizes:
        """Reads the sizes from the batch's tensors: free on the CPU, syncs on a device."""
        ids, lengths, labels = inputs.input_ids, inputs.lengths, inputs.labels
        valid = torch.arange(ids.shape[1], device=ids.device) < lengths[:, None]
        real = ids.masked_select(valid)
        answer = valid & (labels != IGNORE) if labels is not None else torch.zeros_like(valid)
        answers = answer.sum(1)
        grids = {m: tuple(tuple(g) for g in grid.tolist())
                 for m, grid in ((IMAGE, inputs.image_grid_thw), (VIDEO, inputs.video_grid_thw))
                 if grid is not None}
        tr = inputs.transcript_lengths
        counts = checked_media_counts
        return cls(
            lengths=tuple(lengths.tolist()),
            answers=tuple(answers.tolist()),
            targets=int(answers.sum() - answer[:, 0].sum()),
            token_range=(int(real.min()), int(real.max())),
            grids=grids,
            transcripts=() if tr is None else tuple(tr.tolist()),
            media_counts=None if counts is None else tuple(tuple(c) for c in counts.tolist()),
        )
