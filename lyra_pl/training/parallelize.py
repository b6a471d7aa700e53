"""The one place that applies parallelism to a :class:`~lyra_pl.model.LyraModel`.

Order (torchtitan's): activation checkpointing, then ``torch.compile``, then FSDP2
(``fully_shard``) per decoder layer, the encoders and the speech generator as single units,
then the root (embeddings, final norm, lm_head and the small projectors). The model file knows
nothing of any of this.
"""
from __future__ import annotations

import torch
from torch import nn


def parallelize(
    model: nn.Module,
    mesh=None,
    activation_checkpointing: bool = False,
    compile: bool = False,
    param_dtype: torch.dtype | None = torch.bfloat16,
    reduce_dtype: torch.dtype | None = torch.float32,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Applies activation checkpointing, compile and FSDP2 to ``model`` in place; returns it.

    Args:
        mesh: a 1-D ``DeviceMesh`` (shard over it) or a 2-D one named
            ``("replicate", "shard")`` for hybrid sharding (replicate across nodes, shard within
            a node). None: no sharding (single process).
        activation_checkpointing: per decoder layer, through the layers' own transformers
            mechanism (``GradientCheckpointingLayer``), non-reentrant.
        param_dtype / reduce_dtype: FSDP2 mixed precision (compute in bf16, reduce gradients in
            fp32 by default); None keeps the parameters' dtype.
    """
    llm = model.llm
    if activation_checkpointing:
        # transformers renamed the method in 5.2x; the GPU machines run 5.17.
        if hasattr(llm, "activation_checkpointing_enable"):
            llm.activation_checkpointing_enable({"use_reentrant": False})
        else:
            llm.gradient_checkpointing_enable({"use_reentrant": False})
    if compile:
        for layer in llm.layers:
            layer.compile()
    if mesh is None:
        return model

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kwargs = dict(mesh=mesh, mp_policy=mp)
    for layer in llm.layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kwargs)
    # Units must be modules whose forward is what runs (FSDP2 gathers in forward hooks): the
    # ViT and the Whisper encoder as single units, the speech generator's layers one by one.
    units = [model.visual, model.audio_encoder.whisper, *model.speech_generator.layers]
    for unit in units:
        fully_shard(unit, reshard_after_forward=reshard_after_forward, **kwargs)
    # The root holds the embeddings, lm_head (one unit, so tied weights stay tied), the
    # projectors and the generator's input/output layers. Training calls the root's forward;
    # ``generate`` does not, so generation needs an unsharded model.
    fully_shard(model, reshard_after_forward=False, **kwargs)
    return model
