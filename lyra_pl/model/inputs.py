"""What the model takes: :class:`LyraInputs` (a batch of tensors) and :func:`collate`, which
builds one from per-sample raw inputs and checks them, naming the sample at fault.

A batch is checked once, where it is built (on the CPU), and carries its sizes as host ints
(:class:`~lyra_pl.model.sizes.BatchSizes`): moving it to a device reads nothing back."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import torch
from torch import Tensor

from lyra_pl.model.assemble import IGNORE, MODALITIES
from lyra_pl.model.audio import WINDOW_SAMPLES, AudioBatch
from lyra_pl.model.sizes import BatchSizes


@dataclass
class LyraInputs:
    """A batch. ``input_ids`` carry one placeholder token per media item; items of each
    modality are given in row-major placeholder order.

    input_ids: (B, T) right-padded; lengths: (B,) real tokens (default: all T).
    labels: (B, T) answer-token labels, IGNORE (-100) elsewhere; None for inference.
    pixel_values / image_grid_thw: Qwen2-VL image patches (P, C*2*14*14) and (n_images, 3).
    pixel_values_videos / video_grid_thw: the same for videos.
    speech, sound: 16 kHz clips, one per placeholder.
    transcript_ids / transcript_lengths: (n_speech, S) / (n_speech,) token ids of each speech
        clip's transcript for LCMR; length 0 = no transcript.
    media_counts: (B, 4) items per sample (image, video, speech, sound), so that a mismatch
        names its sample; :func:`collate` fills it.
    sizes: the batch's sizes as host ints (:meth:`host_sizes`); :func:`collate` and :meth:`to`
        fill them. Assigning any other field drops them: they described the old tensors.
    """

    input_ids: Tensor
    lengths: Tensor | None = None
    labels: Tensor | None = None
    pixel_values: Tensor | None = None
    image_grid_thw: Tensor | None = None
    pixel_values_videos: Tensor | None = None
    video_grid_thw: Tensor | None = None
    speech: AudioBatch | None = None
    sound: AudioBatch | None = None
    transcript_ids: Tensor | None = None
    transcript_lengths: Tensor | None = None
    media_counts: Tensor | None = None
    sizes: BatchSizes | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        # The recorded sizes describe the tensors they were measured from.
        if name != "sizes" and "sizes" in self.__dict__:
            object.__setattr__(self, "sizes", None)
        object.__setattr__(self, name, value)

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got {tuple(self.input_ids.shape)}")
        B, T = self.input_ids.shape
        if self.lengths is None:
            self.lengths = torch.full((B,), T, dtype=torch.long, device=self.input_ids.device)
        if tuple(self.lengths.shape) != (B,) or bool(((self.lengths < 1) | (self.lengths > T)).any()):
            raise ValueError(f"lengths must be (B,) = ({B},) with values in [1, {T}], got "
                             f"{self.lengths.tolist()}")
        if self.labels is not None and self.labels.shape != self.input_ids.shape:
            raise ValueError(f"labels {tuple(self.labels.shape)} must match input_ids "
                             f"{tuple(self.input_ids.shape)}")
        for name in ("image", "video"):
            pix = self.pixel_values if name == "image" else self.pixel_values_videos
            grid = self.image_grid_thw if name == "image" else self.video_grid_thw
            if (pix is None) != (grid is None):
                raise ValueError(f"{name}s need both pixel values and a grid_thw")
            if grid is not None:
                if grid.dim() != 2 or grid.shape[1] != 3:
                    raise ValueError(f"{name}_grid_thw must be (n, 3), got {tuple(grid.shape)}")
                empty = (grid <= 0).any(1).nonzero().flatten().tolist()
                if empty:
                    raise ValueError(f"{name} {empty[0]} has an empty grid {grid[empty[0]].tolist()}")
                if int(grid.prod(1).sum()) != pix.shape[0]:
                    raise ValueError(f"{name}s: grid_thw describes {int(grid.prod(1).sum())} "
                                     f"patches but pixel values hold {pix.shape[0]}")
        if (self.transcript_ids is None) != (self.transcript_lengths is None):
            raise ValueError("transcript_ids and transcript_lengths go together")
        if self.transcript_ids is not None:
            n = 0 if self.speech is None else len(self.speech)
            if self.transcript_ids.shape[0] != n or self.transcript_lengths.shape != (n,):
                raise ValueError(f"transcripts must be given for each of the {n} speech clips "
                                 f"(length 0 = none), got {tuple(self.transcript_ids.shape)}")

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    def modalities(self) -> set[str]:
        """Which input modalities the batch has; ``long_speech`` when a clip exceeds one
        Whisper window (the adapters of multi-modality LoRA are chosen from this)."""
        out = {"text"}
        if self.pixel_values is not None:
            out.add("image")
        if self.pixel_values_videos is not None:
            out.add("video")
        if self.speech is not None:
            long = any(n > WINDOW_SAMPLES for n in self.speech.host_lengths)
            out.add("long_speech" if long else "speech")
        if self.sound is not None:
            out.add("sound")
        return out

    def host_sizes(self) -> BatchSizes:
        """The batch's :class:`~lyra_pl.model.sizes.BatchSizes`: those recorded, else measured
        from the tensors (free on the CPU; for a batch built by hand on a device, one sync per
        tensor) and recorded."""
        if self.sizes is None:
            self.sizes = BatchSizes.measure(self)
        return self.sizes

    def to(self, device: torch.device | str) -> "LyraInputs":
        """The batch on ``device``, with its sizes. It is not checked again: that would read
        the values back from the device."""
        sizes = self.host_sizes()
        out = copy.copy(self)
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (Tensor, AudioBatch)):
                setattr(out, f.name, value.to(device))
        out.sizes = sizes
        return out


@dataclass
class Sample:
    """One sample's raw inputs, for :func:`collate`.

    images: (C, H, W) tensors (uint8 or float in [0, 1]); videos: (T, C, H, W); speech and
    sound: 1-D waveforms with their sample rates (16 kHz required; we never resample silently).
    """

    input_ids: Sequence[int] | Tensor
    labels: Sequence[int] | Tensor | None = None
    images: list[Tensor] = field(default_factory=list)
    videos: list[Tensor] = field(default_factory=list)
    speech: list[Tensor] = field(default_factory=list)
    speech_sample_rates: list[int] | int = 16000
    sound: list[Tensor] = field(default_factory=list)
    sound_sample_rates: list[int] | int = 16000
    transcripts: list[Sequence[int] | None] | None = None


def _rates(rates: list[int] | int, n: int) -> list[int]:
    return [rates] * n if isinstance(rates, int) else list(rates)


def _check_visual(x: Tensor, what: str, sample: int, index: int, ndim: int) -> None:
    if not isinstance(x, Tensor) or x.dim() != ndim:
        raise ValueError(f"sample {sample}: {what} {index} must be a {ndim}-D tensor, got "
                         f"{getattr(x, 'shape', type(x))}")
    if x.numel() == 0 or min(x.shape) == 0:
        raise ValueError(f"sample {sample}: {what} {index} has zero size {tuple(x.shape)}")


def collate(
    samples: Sequence[Sample],
    placeholder_ids: dict[str, int],
    pad_token_id: int,
    image_processor: Any | None = None,
    video_processor: Any | None = None,
) -> LyraInputs:
    """Pads and stacks samples into a :class:`LyraInputs`, checking each sample's placeholders
    against its media and each media item itself (errors name the sample and the item).

    ``image_processor`` / ``video_processor``: transformers' ``Qwen2VLImageProcessor`` /
    ``Qwen2VLVideoProcessor`` (needed only when samples have images / videos; the video
    processor needs torchvision installed, or pass pre-processed ``pixel_values_videos`` and
    ``video_grid_thw`` to :class:`LyraInputs` directly).
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    ids = [torch.as_tensor(s.input_ids, dtype=torch.long) for s in samples]
    lengths = torch.tensor([len(x) for x in ids])
    for b, x in enumerate(ids):
        if x.dim() != 1 or len(x) == 0:
            raise ValueError(f"sample {b}: input_ids must be a non-empty 1-D sequence")
    T = int(lengths.max())
    input_ids = torch.full((len(ids), T), pad_token_id, dtype=torch.long)
    labels = torch.full((len(ids), T), IGNORE, dtype=torch.long)
    has_labels = any(s.labels is not None for s in samples)
    counts = torch.zeros(len(samples), 4, dtype=torch.long)
    for b, (s, x) in enumerate(zip(samples, ids)):
        input_ids[b, : len(x)] = x
        items = (s.images, s.videos, s.speech, s.sound)
        is_placeholder = torch.zeros_like(x, dtype=torch.bool)
        for m, name in enumerate(MODALITIES):
            counts[b, m] = len(items[m])
            found = int((x == placeholder_ids[name]).sum())
            if found != len(items[m]):
                raise ValueError(f"sample {b}: {found} <{name}> placeholder(s) in the text but "
                                 f"{len(items[m])} {name} input(s)")
            is_placeholder |= x == placeholder_ids[name]
        if s.labels is not None:
            lab = torch.as_tensor(s.labels, dtype=torch.long)
            if lab.shape != x.shape:
                raise ValueError(f"sample {b}: labels {tuple(lab.shape)} and input_ids "
                                 f"{tuple(x.shape)} differ in length")
            if bool((is_placeholder & (lab != IGNORE)).any()):
                raise ValueError(f"sample {b}: a placeholder token has a label; only text tokens "
                                 "can be answers")
            labels[b, : len(x)] = lab
        for i, img in enumerate(s.images):
            _check_visual(img, "image", b, i, 3)
        for i, vid in enumerate(s.videos):
            _check_visual(vid, "video", b, i, 4)

    out: dict[str, Any] = {}
    images = [img for s in samples for img in s.images]
    if images:
        if image_processor is None:
            raise ValueError("samples have images but no image_processor was given")
        enc = image_processor(images=images, return_tensors="pt")
        out.update(pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"])
    videos = [vid for s in samples for vid in s.videos]
    if videos:
        if video_processor is None:
            raise ValueError("samples have videos but no video_processor was given")
        enc = video_processor(videos=videos, return_tensors="pt")
        out.update(pixel_values_videos=enc["pixel_values_videos"],
                   video_grid_thw=enc["video_grid_thw"])
    for kind in ("speech", "sound"):
        clips, rates, owners = [], [], []
        for b, s in enumerate(samples):
            items = getattr(s, kind)
            clips += items
            rates += _rates(getattr(s, f"{kind}_sample_rates"), len(items))
            owners += [b] * len(items)
        if clips:
            out[kind] = AudioBatch.from_list(clips, rates, kind=kind, sample_ids=owners)
    if any(s.transcripts is not None for s in samples):
        rows = []
        for b, s in enumerate(samples):
            tr = s.transcripts if s.transcripts is not None else [None] * len(s.speech)
            if len(tr) != len(s.speech):
                raise ValueError(f"sample {b}: {len(tr)} transcripts for {len(s.speech)} "
                                 "speech clips (use None for a clip without one)")
            rows += [torch.as_tensor([] if t is None else t, dtype=torch.long) for t in tr]
        t_len = torch.tensor([len(r) for r in rows], dtype=torch.long)
        t_ids = torch.full((len(rows), max(1, int(t_len.max()) if rows else 1)), pad_token_id,
                           dtype=torch.long)
        for i, r in enumerate(rows):
            t_ids[i, : len(r)] = r
        out.update(transcript_ids=t_ids, transcript_lengths=t_len)
    batch = LyraInputs(input_ids=input_ids, lengths=lengths,
                       labels=labels if has_labels else None, media_counts=counts, **out)
    # The placeholders were checked against the items above: with the per-sample counts the
    # model plans the assembled layout on the host and checks nothing on the device.
    batch.sizes = BatchSizes.measure(batch, checked_media_counts=counts)
    return batch

