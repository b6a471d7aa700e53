"""Validation metrics over every rank: the one place that decides how ranks agree on them.

Each rank adds each batch's metrics weighted by the batch's samples (padding batches are not
added); at the epoch's end one gather of the metric names and one all-reduce of the sums give
every rank the same sample-weighted means over the whole set, and the number of samples
validated. Lightning's ``sync_dist`` instead averages the ranks' own means (ranks with more
samples count no more), and needs every rank to have logged every name: a metric that only
some ranks saw (LCMR needs speech in the batch) would leave the others waiting.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class EpochMeans:
    def __init__(self) -> None:
        self.sums: dict[str, tuple[Tensor, int]] = {}
        self.samples = 0

    def add(self, metrics: dict[str, Tensor], samples: int) -> None:
        """One batch's metrics (scalars, kept on their device: no host sync)."""
        self.samples += samples
        for name, value in metrics.items():
            total, n = self.sums.get(name, (0.0, 0))
            self.sums[name] = (total + value.detach().double() * samples, n + samples)

    def compute(self, device: torch.device) -> tuple[dict[str, float], int]:
        """(name -> mean over every rank's samples, samples validated on every rank); resets.
        Every rank must call it (it runs collectives when a process group is up)."""
        sums, samples = self.sums, self.samples
        self.sums, self.samples = {}, 0
        names = sorted(sums)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            everyone: list[list[str]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(everyone, names)
            names = sorted(set().union(*everyone))
        dtype = torch.float32 if device.type == "mps" else torch.float64
        # row per name: (weighted sum, samples); the last row counts the samples themselves
        table = torch.zeros(len(names) + 1, 2, device=device, dtype=dtype)
        for i, name in enumerate(names):
            if name in sums:
                total, n = sums[name]
                table[i, 0], table[i, 1] = total, n
        table[-1, 1] = samples
        if distributed:
            dist.all_reduce(table)
        values = table.tolist()
        means = {name: s / n for name, (s, n) in zip(names, values) if n > 0}
        return means, int(values[-1][1])
