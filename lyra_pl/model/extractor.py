"""LMME, the latent multi-modality extractor: drop the context tokens the instruction does not
attend to, between blocks of decoder layers.

At a pruning layer the layer's own query and key projections are captured with forward hooks
(no second projection, no patched attention), RoPE is applied to them, and
:func:`lyra_pl.ops.prune_tokens` picks the survivors in one fused pass that never materializes
the attention matrix. :class:`TokenState` then compacts every per-token tensor with
:func:`lyra_pl.ops.compact`, batched, keeping token order and right padding.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Iterator

import torch
from torch import Tensor, nn
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

from lyra_pl import ops
from lyra_pl.model.assemble import IGNORE, PAD, Assembled


@dataclass
class TokenState:
    """The per-token tensors that travel through the decoder and shrink at each pruning step.

    All are (B, N, ...) except ``positions`` (3, B, N). ``index`` is each token's position in
    the assembled (unpruned) sequence, so callers can see which tokens survived.
    """

    hidden: Tensor
    positions: Tensor
    valid: Tensor
    modality: Tensor
    targets: Tensor
    answer: Tensor
    context: Tensor
    instruction: Tensor
    index: Tensor

    @classmethod
    def from_assembled(cls, a: Assembled) -> "TokenState":
        B, N = a.valid.shape
        index = torch.arange(N, device=a.valid.device).expand(B, N)
        return cls(a.embeds, a.positions, a.valid, a.modality, a.targets, a.answer, a.context,
                   a.instruction, index)

    @property
    def lengths(self) -> Tensor:
        return self.valid.sum(1)

    def compact(self, keep: Tensor) -> "TokenState":
        """Keeps the tokens where ``keep`` (B, N) is True, left-aligned and right-padded."""
        pads = {"modality": PAD, "targets": IGNORE, "index": -1}
        names = [f.name for f in fields(self)]
        # Positions go as (B, N, 3): a (3, B, N) tensor is ambiguous to compact when B == N == 3.
        tensors = [self.positions.permute(1, 2, 0) if n == "positions" else getattr(self, n)
                   for n in names]
        out = dict(zip(names, ops.compact(keep, *tensors, pad_value=[pads.get(n, 0) for n in names])))
        out["positions"] = out["positions"].permute(2, 0, 1)
        return replace(self, **out)


@contextmanager
def capture_qk(attn: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Records the outputs of ``attn.q_proj`` and ``attn.k_proj`` during one layer call.

    Forward hooks, not a patched forward: whatever the projections are (plain, LoRA-wrapped by
    peft, sharded by FSDP) their real outputs are what the attention used.
    """
    out: dict[str, Tensor] = {}
    handles = [
        getattr(attn, name).register_forward_hook(
            lambda _m, _i, o, key=key: out.__setitem__(key, o)
        )
        for name, key in (("q_proj", "q"), ("k_proj", "k"))
    ]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def rotated_qk(captured: dict[str, Tensor], cos: Tensor, sin: Tensor, head_dim: int):
    """(B, N, heads*head_dim) projections -> post-RoPE (B, heads, N, head_dim) q and k."""
    q, k = captured["q"], captured["k"]
    B, N = q.shape[:2]
    q = q.view(B, N, -1, head_dim).transpose(1, 2)
    k = k.view(B, N, -1, head_dim).transpose(1, 2)
    return apply_rotary_pos_emb(q, k, cos, sin)


def select_context(
    state: TokenState, q: Tensor, k: Tensor, keep_ratio: float, min_keep: int
) -> Tensor:
    """The LMME keep mask (B, N): every non-context token, and per sample the top
    ``keep_ratio`` of its context tokens (at least ``min_keep``) by the attention probability
    they receive from the instruction tokens, averaged over heads and instruction rows."""
    return ops.prune_tokens(
        q, k, state.instruction, state.context, state.valid, keep_ratio, min_keep, causal=True
    )
