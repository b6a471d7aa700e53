"""The uniform-graph rule of sharded training: every trainable parameter is in every rank's
autograd graph, whatever the rank's batch holds.

Why: under FSDP2 each unit's post-backward reduce-scatters the gradients of the unit's
parameters that have one, during backward if the unit's inputs require grad, at its end
otherwise. Ranks whose batches hold different modalities (speech on one, text or sound on
another) use different adapters and projectors: they would reduce different sets of tensors,
or the same in another order, and hang or mix them up.

How: :func:`install` hooks the units so that each adds ``0 * sum(its trainable parameters)`` to
its output. Values are unchanged, parameters the batch uses get their gradients (+ 0), the
others zeros, and nothing extra runs (an adapter the batch does not select costs no matmul).
The root's own parameters (projectors, embeddings, lm_head, the generator's input and output
layers) join the token embeddings, the decoder's input, so the decoder layers' inputs require
grad on every rank alike and their reductions come in the same order everywhere.

Only sharded: :func:`~lyra_pl.training.parallelize.parallelize` installs it when it shards. On
one process a parameter the batch does not use keeps no gradient (AdamW skips it), and the
model itself knows nothing of any of this.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn


def _trainable(root: nn.Module, skip: set[nn.Module]) -> list[tuple[nn.Module, str]]:
    """(module, name) of each trainable parameter of ``root`` outside the modules ``skip``, once
    each (tied weights). Names, not tensors: under FSDP2 a unit holds other (unsharded) tensors
    while it runs than between runs."""
    found, seen = [], set()

    def visit(module: nn.Module) -> None:
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                found.append((module, name))
        for child in module.children():
            if child not in skip:
                visit(child)

    visit(root)
    return found


def _add_zero(params: list[tuple[nn.Module, str]]):
    """A forward hook adding ``0 * sum(params)`` to the output (a tensor, or a tuple whose first
    element is the hidden states, such as a decoder layer's ``(hidden, q, k)``)."""

    def hook(module: nn.Module, args, output):
        if not torch.is_grad_enabled():  # evaluation, generation: no graph to make uniform
            return None
        zero = sum(getattr(m, name).sum() for m, name in params) * 0.0
        if isinstance(output, tuple):
            return (output[0] + zero, *output[1:])
        return output + zero  # a 0-dim term: the output keeps its dtype

    return hook


def install(model: nn.Module, layers: Sequence[nn.Module],
            encoders: Iterable[nn.Module] = ()) -> None:
    """Hooks ``model`` (a :class:`~lyra_pl.model.LyraModel`) for the uniform-graph rule.

    Call it before ``fully_shard``: a unit's hook then runs before FSDP2's post-forward, while
    the unit still holds its unsharded parameters, and FSDP2 registers its pre-backward hook on
    the output that now requires grad.

    Args:
        layers: the units whose output is their hidden states (decoder and generator layers):
            each adds its own trainable parameters' term.
        encoders: the other units (trainable encoders). They use all their parameters whenever
            they run, and must run on every rank or none (:func:`parallelize`), so they need no
            term; their parameters are only kept out of the root's.
    """
    units = {*layers, *encoders}
    for layer in layers:
        params = _trainable(layer, units - {layer})
        if params:
            layer.register_forward_hook(_add_zero(params))
    root = _trainable(model, units)
    if root:
        model.llm.embed_tokens.register_forward_hook(_add_zero(root))
