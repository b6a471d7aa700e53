"""The one place that applies parallelism to a :class:`~lyra_pl.model.LyraModel`.

Order (torchtitan's): activation checkpointing, then ``torch.compile``, then FSDP2
(``fully_shard``) per decoder layer, trainable encoders and the speech generator's layers as
units, then the root (embeddings, final norm, lm_head and the small projectors); frozen
encoders are replicated. Before sharding it installs the uniform-graph hooks
(:mod:`lyra_pl.training.uniform_graph`): ranks with different modalities must still reduce the
same gradients. The model file knows nothing of any of this.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from lyra_pl.model.loading import is_sharded
from lyra_pl.training import uniform_graph


def parallelize(
    model: nn.Module,
    mesh=None,
    activation_checkpointing: bool = False,
    compile: bool = False,
    param_dtype: torch.dtype | None = torch.bfloat16,
    reduce_dtype: torch.dtype | None = torch.float32,
    reshard_after_forward: bool = True,
    sequence_split=None,
) -> nn.Module:
    """Applies activation checkpointing, compile and FSDP2 to ``model`` in place; returns it.

    Args:
        mesh: a 1-D ``DeviceMesh`` (shard over it) or a 2-D one named
            ``("replicate", "shard")`` for hybrid sharding (replicate across nodes, shard within
            a node). None: no sharding (single process).
        activation_checkpointing: per decoder layer, through the layers' own transformers
            mechanism (``GradientCheckpointingLayer``), non-reentrant.
        compile: ``torch.compile`` each decoder layer, ``fullgraph=True``.
        param_dtype / reduce_dtype: FSDP2 mixed precision (compute in bf16, reduce gradients in
            fp32 by default); None keeps the parameters' dtype.
        sequence_split: context parallelism, a :class:`~lyra_pl.model.sequence_split.
            SequenceSplit` over this rank's CP group
            (:func:`~lyra_pl.training.context_parallel.context_parallel_split`); its ranks must
            be among the ranks of ``mesh``, which then reduces their partial gradients too.
    """
    if sequence_split is not None:
        if mesh is None:
            raise ValueError("context parallelism needs FSDP2 (a mesh): its gradient reduction "
                             "sums the context-parallel ranks' parts")
        if compile:
            raise ValueError("context parallelism does not run with compile=True yet")
        model.split_sequence(sequence_split)
    llm = model.llm
    if activation_checkpointing:
        # transformers renamed the method in 5.2x; the GPU machines run 5.17.
        if hasattr(llm, "activation_checkpointing_enable"):
            llm.activation_checkpointing_enable({"use_reentrant": False})
        else:
            llm.gradient_checkpointing_enable({"use_reentrant": False})
    if compile:
        # Per layer, one graph each (no breaks): the layer loop between them stays eager, as
        # LMME's pruning changes the batch's shape there.
        for layer in llm.layers:
            layer.compile(fullgraph=True)
    if mesh is None:
        return model

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kwargs = dict(mesh=mesh, mp_policy=mp)
    # Units must be modules whose forward is what runs (FSDP2 gathers in forward hooks): the
    # ViT and the Whisper encoder as single units, the speech generator's layers one by one.
    # An encoder runs only for batches with its modality, and ranks' batches differ: a sharded
    # encoder would all-gather on some ranks and not others. Frozen encoders are therefore
    # replicated (left out of FSDP2: no gradients, so nothing to reduce; stored in the compute
    # dtype). A trainable encoder is sharded and every rank's batches must then use it.
    encoders = [model.visual, model.audio_encoder.whisper]
    frozen = [e for e in encoders if not any(p.requires_grad for p in e.parameters())]
    trainable = [e for e in encoders if e not in frozen]
    layers = [*llm.layers, *model.speech_generator.layers]
    uniform_graph.install(model, layers, trainable)  # before fully_shard: see there
    for unit in [*llm.layers, *trainable, *model.speech_generator.layers]:
        fully_shard(unit, reshard_after_forward=reshard_after_forward, **kwargs)
    ignored = {p for e in frozen for p in e.parameters()}
    if param_dtype is not None:
        for e in frozen:
            e.to(param_dtype)
    # The root holds the embeddings, lm_head (one unit, so tied weights stay tied), the
    # projectors and the generator's input/output layers. Training calls the root's forward;
    # ``generate`` does not: see :func:`unsharded_root`.
    fully_shard(model, reshard_after_forward=False, ignored_params=ignored or None, **kwargs)
    return model


def materialize(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Allocates a model built on the meta device (and sharded: each rank allocates only its
    shards) on ``device`` and initializes it by the model's own rule,
    ``model.init_weights(device)`` (:meth:`~lyra_pl.model.LyraModel.init_weights`, the rule a
    model built on one process follows too). Checkpoints are loaded afterwards, shard by
    shard."""
    model.to_empty(device=device)
    model.init_weights(device)
    return model


@contextmanager
def unsharded_root(model: nn.Module):
    """Gathers the FSDP2 root's own parameters (embeddings, lm_head, projectors) for code that
    calls submodules directly instead of the root's forward, such as generation; the sharded
    layers gather themselves in their forward hooks. No-op on an unsharded model."""
    if not hasattr(model, "unshard"):
        yield model
        return
    model.unshard()
    try:
        yield model
    finally:
        model.reshard()


def parameter_share(model: nn.Module) -> tuple[int, int, int]:
    """(values of the sharded parameters this rank holds, values of the sharded parameters in
    all, values of the unsharded parameters, which every rank holds whole): under FSDP2 the
    first is about the second / ranks, the third is the replicated frozen encoders."""
    held = sharded = whole = 0
    for p in model.parameters():
        if is_sharded(p):
            held += p.to_local().numel()
            sharded += p.numel()
        else:
            whole += p.numel()
    return held, sharded, whole


def data_parallel_mesh(device_mesh, num_nodes: int = 1, hybrid: bool = False):
    """The mesh FSDP2 shards over, from Lightning's ``("data_parallel", "tensor_parallel")``
    mesh: its data-parallel dimension, or with ``hybrid`` a 2-D ``("replicate", "shard")`` mesh
    that shards within a node and replicates across the ``num_nodes`` nodes (HSDP: the
    all-gathers stay on the fast intra-node links)."""
    dp = device_mesh["data_parallel"]
    if not hybrid or num_nodes <= 1:
        return dp
    size = dp.size()
    if size % num_nodes:
        raise ValueError(f"hybrid sharding needs the {size} data-parallel ranks to split evenly "
                         f"over {num_nodes} nodes")
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(dp.device_type, (num_nodes, size // num_nodes),
                            mesh_dim_names=("replicate", "shard"))


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` for pure data parallelism with FSDP2: every rank is
    a data-parallel rank (its own "auto" means one data-parallel rank per node, with tensor
    parallelism inside a node). The stages' ``configure_model`` applies FSDP2 over it
    (:func:`parallelize`); it runs on CPU (gloo) and GPU (nccl) and saves distributed
    checkpoints that load on any number of ranks."""

    def __init__(self, save_distributed_checkpoint: bool = True,
                 process_group_backend: str | None = None, **kwargs):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.world_size
        super().setup_environment()
