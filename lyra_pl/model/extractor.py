"""LMME, the latent multi-modality extractor: drop the context tokens the instruction does not
attend to, between blocks of decoder layers.

At a pruning layer the layer itself returns the post-RoPE query and key of its input
(:class:`~lyra_pl.model.decoder.LyraDecoderLayer` calls :func:`scoring_qk` inside its forward),
and :func:`lyra_pl.ops.prune_tokens` picks the survivors in one fused pass that never
materializes the attention matrix. :class:`TokenState` then compacts every per-token tensor
with :func:`lyra_pl.ops.compact`, batched, keeping token order and right padding.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor, nn
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

from lyra_pl import ops
from lyra_pl.model.assemble import IGNORE, PAD, Assembled

PADS = {"modality": PAD, "targets": IGNORE, "index": -1}
"""What :class:`TokenState` fields hold at padding positions (0 for the others)."""


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
        names = [f.name for f in fields(self)]
        # Positions go as (B, N, 3): a (3, B, N) tensor is ambiguous to compact when B == N == 3.
        tensors = [self.positions.permute(1, 2, 0) if n == "positions" else getattr(self, n)
                   for n in names]
        out = dict(zip(names, ops.compact(keep, *tensors, pad_value=[PADS.get(n, 0) for n in names])))
        out["positions"] = out["positions"].permute(2, 0, 1)
        return replace(self, **out)


@torch.no_grad()
def scoring_qk(layer: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor
               ) -> tuple[Tensor, Tensor]:
    """Post-RoPE (B, heads, N, head_dim) query and key of ``layer``'s attention for its input
    ``hidden`` (B, N, H): its own input norm and q/k projections, then RoPE, as the attention
    computes them.

    Called from inside the layer's forward, where FSDP2 has gathered the layer's parameters and
    where torch.compile traces it; calling ``q_proj`` / ``k_proj`` (plain, or LoRA-wrapped by
    peft) gives their real outputs (in training, LoRA dropout draws a mask of its own here).
    The two projections run a second time, without autograd and at the pruning layers only
    (q and k are about 6% of a Base layer's weight FLOPs): forward hooks on the attention's
    own projections would avoid that, but a compiled layer keeps running the hooks it was
    traced with, not the ones added for a later call.
    """
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    B, N = x.shape[:2]
    q = attn.q_proj(x).view(B, N, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(B, N, -1, attn.head_dim).transpose(1, 2)
    return apply_rotary_pos_emb(q, k, cos, sin)


def select_context(
    state: TokenState, q: Tensor, k: Tensor, keep_ratio: float, min_keep: int,
    causal: bool = True,
) -> Tensor:
    """The LMME keep mask (B, N): every non-context token, and per sample the top
    ``keep_ratio`` of its context tokens (at least ``min_keep``) by the attention probability
    they receive from the instruction tokens, averaged over heads and instruction rows.

    ``causal``: each instruction row's softmax runs over the keys it attends to (the model's
    real attention); False: over every real token of the sample (the official scoring)."""
    return ops.prune_tokens(
        q, k, state.instruction, state.context, state.valid, keep_ratio, min_keep, causal=causal
    )
