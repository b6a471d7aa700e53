"""Context parallelism (CP): the process groups behind :class:`~lyra_pl.model.sequence_split.
SequenceSplit`, and which ranks share a batch.

Ranks ``g*R .. g*R + R-1`` form CP group ``g`` (R = ``context_parallel``): consecutive ranks,
so that with R dividing the GPUs of a node a group never leaves its node, where the per-layer
K/V all-gathers run on the fast links. The groups' ranks read the same batches (data-parallel
rank ``g`` of ``world / R``) and each trains on its share of every sample's tokens. FSDP2
still shards over every rank (or every rank of a node, hybrid), so the CP ranks also share the
parameters, and its gradient reduction, an average over all ranks, is made the data-parallel
average by the loss: every rank's loss is the group's sum (:meth:`SequenceSplit.sum`), whose
backward scales each rank's part by R.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import _functional_collectives as funcol

# An all-gather whose backward reduce-scatters the gradients (on NCCL and on gloo, also over a
# subgroup; torch.distributed.nn's all_gather emulates that on gloo with scatters that name
# group ranks as global ones). Renamed in torch 2.13; the GPU machines run 2.11.
_all_gather = (getattr(funcol, "all_gather_single_autograd", None)
               or funcol.all_gather_tensor_autograd)

from lyra_pl.model.sequence_split import SequenceSplit


class GroupCollectives:
    """:class:`~lyra_pl.model.sequence_split.Collectives` over a process group (autograd-aware
    collectives of ``torch.distributed.nn``)."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def all_gather(self, x: Tensor) -> list[Tensor]:
        return list(_all_gather(x.contiguous(), 0, self.group).chunk(self.size))

    def all_reduce(self, x: Tensor) -> Tensor:
        return _AllReduceSum.apply(x, self.group)


class _AllReduceSum(torch.autograd.Function):
    """Sum over a group; the backward sums the gradients (each rank's part of a summed loss
    gets the whole group's gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def check_degree(context_parallel: int, world_size: int, ranks_per_node: int) -> None:
    """A CP degree must split the job into whole groups that each stay within a node."""
    if context_parallel < 1:
        raise ValueError(f"context_parallel must be >= 1, got {context_parallel}")
    if world_size % context_parallel:
        raise ValueError(f"context_parallel {context_parallel} does not divide the "
                         f"{world_size} ranks of the job")
    if ranks_per_node % context_parallel:
        raise ValueError(f"context_parallel {context_parallel} does not divide the "
                         f"{ranks_per_node} ranks of a node: a group would span two nodes")


def context_parallel_split(device_mesh, context_parallel: int, ranks_per_node: int
                           ) -> SequenceSplit:
    """This rank's :class:`SequenceSplit`, from the job's device mesh (all ranks call it)."""
    world = device_mesh.size()
    check_degree(context_parallel, world, ranks_per_node)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_mesh.device_type, (world // context_parallel, context_parallel),
                            mesh_dim_names=("data", "context"))
    return SequenceSplit(GroupCollectives(mesh.get_group("context")))


def data_parallel_rank(global_rank: int, world_size: int, context_parallel: int
                       ) -> tuple[int, int]:
    """(rank, size) of the data-parallel replica ``global_rank`` belongs to: the ranks of a CP
    group read the same batches."""
    return global_rank // context_parallel, world_size // context_parallel


def is_group_leader(global_rank: int, context_parallel: int) -> bool:
    """Whether the rank speaks for its CP group (metrics its ranks would otherwise count R
    times)."""
    return global_rank % context_parallel == 0
