"""Qwen2-VL's video preprocessing without torchvision (transformers' ``Qwen2VLVideoProcessor``
needs it): frames resized to one ``smart_resize`` size, rescaled and normalized with CLIP's
statistics, the frame count padded to a multiple of the temporal patch by repeating the last
frame, and cut into the flat (temporal x spatial) patches the vision tower reads, in the
same layout as transformers' processor."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize


class VideoProcessor:
    """``processor(videos=[(T, 3, H, W) uint8 frames, ...])`` ->
    ``{"pixel_values_videos": (patches, 3 * t * p * p), "video_grid_thw": (V, 3)}``."""

    def __init__(self, min_pixels: int = 128 * 28 * 28, max_pixels: int = 768 * 28 * 28,
                 patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2,
                 image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
                 image_std: Sequence[float] = OPENAI_CLIP_STD):
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.patch, self.merge, self.temporal = patch_size, merge_size, temporal_patch_size
        self.mean = torch.tensor(image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(image_std).view(1, 3, 1, 1)

    def __call__(self, videos: Sequence[Tensor], return_tensors: str = "pt") -> dict[str, Tensor]:
        p, m, tp = self.patch, self.merge, self.temporal
        patches, grids = [], []
        for i, video in enumerate(videos):
            if video.dim() != 4 or video.shape[1] != 3 or video.shape[0] == 0:
                raise ValueError(f"video {i}: expected (frames, 3, H, W) frames, got shape "
                                 f"{tuple(video.shape)}")
            T, C, H, W = video.shape
            h, w = smart_resize(H, W, factor=p * m, min_pixels=self.min_pixels,
                                max_pixels=self.max_pixels)
            x = video.float()
            if (h, w) != (H, W):
                x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True,
                                  align_corners=False).clamp(0, 255)
            x = (x / 255.0 - self.mean) / self.std
            if T % tp:
                x = torch.cat([x, x[-1:].expand(tp - T % tp, -1, -1, -1)])
            gt, gh, gw = x.shape[0] // tp, h // p, w // p
            x = x.reshape(gt, tp, C, gh // m, m, p, gw // m, m, p)
            x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, h/m, w/m, m, m, C, tp, p, p)
            patches.append(x.reshape(gt * gh * gw, C * tp * p * p))
            grids.append([gt, gh, gw])
        return {"pixel_values_videos": torch.cat(patches),
                "video_grid_thw": torch.tensor(grids, dtype=torch.long)}
