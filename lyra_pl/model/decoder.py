"""Our layer loop over transformers' Qwen2-VL decoder layers, with LMME between blocks.

The layers are transformers' ``Qwen2VLDecoderLayer``, subclassed only so that a pruning layer
can also return the query and key LMME scores with (:class:`LyraDecoderLayer`); this file
decides what they see: positions, masks and, after each pruning layer, the compacted token
batch. Sequences are right-padded, so with a causal mask no real token ever attends to padding
and the full-sequence pass needs no explicit mask under SDPA (its flash/memory-efficient
kernels then apply).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLDecoderLayer

from lyra_pl.model.extractor import TokenState, scoring_qk, select_context
from lyra_pl.model.sequence_split import ATTENTION, SequenceSplit, register_attention, without_hidden

register_attention()
SDPA_LIKE = ("sdpa", ATTENTION)
"""Attention implementations that take no mask in a full causal pass over right padding."""


class LyraDecoderLayer(Qwen2VLDecoderLayer):
    """transformers' Qwen2-VL decoder layer (same modules, same state-dict keys) that, called
    with ``return_qk=True``, returns ``(hidden, q, k)``: also the post-RoPE query and key of its
    input (:func:`~lyra_pl.model.extractor.scoring_qk`, no autograd). Computed inside the
    layer's own forward, so they are what FSDP2's gathered parameters, peft's LoRA wrappers and
    ``torch.compile``'s graph of the layer give, with no hooks."""

    def forward(self, hidden_states: Tensor, *args, return_qk: bool = False, **kwargs):
        out = super().forward(hidden_states, *args, **kwargs)
        if not return_qk:
            return out
        cos, sin = kwargs["position_embeddings"]
        q, k = scoring_qk(self, hidden_states, cos, sin)
        return out, q, k


@dataclass
class DecoderCache:
    """A KV cache whose layers after each pruning point hold fewer tokens.

    ``kv`` is a transformers :class:`DynamicCache` (one entry per layer, each its own length);
    ``key_valid[j]`` (B, K_j) marks the real cached tokens of the layers of block ``j``
    (pruned-away and padding slots are False), and grows by one column per decoded token.
    """

    kv: DynamicCache = field(default_factory=DynamicCache)
    key_valid: list[Tensor] = field(default_factory=list)
    block_of_layer: list[int] = field(default_factory=list)


def _mask(impl: str, key_valid: Tensor | None, q_len: int, dtype: torch.dtype):
    """The attention mask the layers get.

    Full-sequence SDPA: None (causal, right padding). Decoding: (B, 1, 1, K) bool over the cached
    keys. Eager attention takes an additive float mask, causal when ``q_len > 1``.
    """
    if key_valid is None and impl in SDPA_LIKE:
        return None
    if impl in SDPA_LIKE:
        return key_valid[:, None, None, :]
    K = key_valid.shape[1]
    allowed = key_valid[:, None, None, :].expand(-1, 1, q_len, K)
    if q_len > 1:
        allowed = allowed & torch.ones(q_len, K, dtype=torch.bool, device=key_valid.device).tril(K - q_len)
    return torch.zeros(allowed.shape, dtype=dtype, device=key_valid.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def run_layers(
    llm: nn.Module,
    state: TokenState,
    prune_at: tuple[int, ...] = (),
    keep_ratio: float = 1.0,
    min_keep: int = 32,
    cache: DecoderCache | None = None,
    causal: bool = True,
    split: SequenceSplit | None = None,
) -> tuple[TokenState, list[Tensor]]:
    """Full-sequence pass (training, evaluation, generation prefill).

    Args:
        llm: the Qwen2-VL text model; its ``layers``, ``rotary_emb`` and ``norm`` are used.
        state: the assembled tokens; ``state.hidden`` holds the input embeddings.
        prune_at: 0-based layers after which LMME prunes (``LyraConfig.lmme_layers()``); they
            must be :class:`LyraDecoderLayer` (``LyraModel`` builds every layer as one).
        cache: filled for generation when given.
        causal: LMME scoring over the causal keys, or over all keys (``LyraConfig.lmme_causal``).
        split: context parallelism (:mod:`lyra_pl.model.sequence_split`): ``state`` is the
            whole batch, the same on every rank of the group; each rank runs its share of the
            tokens. Needs the layers' attention to be the split one (:data:`ATTENTION`).

    Returns:
        The final state (``hidden`` after the final norm, compacted if pruned) and the keep
        mask of each pruning step (B, N_before). Under ``split`` the state is this rank's
        share of the tokens and the keep masks cover the whole (padded) sequence.
    """
    bad = [i for i in prune_at if not (0 <= i < len(llm.layers)
                                       and isinstance(llm.layers[i], LyraDecoderLayer))]
    if bad:
        raise ValueError(f"prune_at: layer {bad[0]} is not a LyraDecoderLayer of the "
                         f"{len(llm.layers)} layers (LMME needs the layers LyraModel builds)")
    impl = llm.config._attn_implementation
    extra = {}
    if split is not None:
        if cache is not None:
            raise ValueError("a sequence split runs full training passes, not cached generation")
        if impl != ATTENTION:
            raise ValueError(f"a sequence split needs the layers' attention {ATTENTION!r}, "
                             f"got {impl!r}")
        whole = split.pad_state(state)
        state = split.shard_state(whole)
        whole = without_hidden(whole)
        extra = {"sequence_split": split}
    h = state.hidden
    cos, sin = llm.rotary_emb(h, state.positions)
    mask = _mask(impl, None if impl in SDPA_LIKE else state.valid, h.shape[1], h.dtype)
    keeps: list[Tensor] = []
    if cache is not None:
        cache.kv = DynamicCache()  # a full pass starts a new sequence: never attend to old keys
        cache.key_valid = [state.valid]
        cache.block_of_layer = []
    for i, layer in enumerate(llm.layers):
        prune = i in prune_at
        kwargs = dict(attention_mask=mask, position_embeddings=(cos, sin),
                      past_key_values=None if cache is None else cache.kv,
                      use_cache=cache is not None, **extra)
        if prune:
            h, q, k = layer(h, return_qk=True, **kwargs)
        else:
            h = layer(h, **kwargs)
        if cache is not None:
            cache.block_of_layer.append(len(cache.key_valid) - 1)
        if prune:
            if split is None:
                keep = select_context(state, q, k, keep_ratio, min_keep, causal)
                state = TokenState.compact(_with_hidden(state, h), keep)
            else:
                keep = split.select(whole, state, q, k, keep_ratio, min_keep, causal)
                whole, state = split.compact(whole, h, keep)
            keeps.append(keep)
            h = state.hidden
            cos, sin = llm.rotary_emb(h, state.positions)
            mask = _mask(impl, None if impl in SDPA_LIKE else state.valid, h.shape[1], h.dtype)
            if cache is not None:
                cache.key_valid.append(state.valid)
    return _with_hidden(state, llm.norm(h)), keeps


def decode_step(
    llm: nn.Module, hidden: Tensor, positions: Tensor, cache: DecoderCache
) -> Tensor:
    """One cached step: ``hidden`` (B, 1, H) new-token embeddings at ``positions`` (3, B, 1).

    Each block's layers attend to that block's cached (possibly pruned) tokens plus the new one.
    Returns the final-norm hidden states (B, 1, H).
    """
    impl = llm.config._attn_implementation
    ones = torch.ones(hidden.shape[0], 1, dtype=torch.bool, device=hidden.device)
    cache.key_valid = [torch.cat([kv, ones], dim=1) for kv in cache.key_valid]
    masks = [_mask(impl, kv, 1, hidden.dtype) for kv in cache.key_valid]
    cos, sin = llm.rotary_emb(hidden, positions)
    h = hidden
    for i, layer in enumerate(llm.layers):
        h = layer(
            h,
            attention_mask=masks[cache.block_of_layer[i]],
            position_embeddings=(cos, sin),
            past_key_values=cache.kv,
            use_cache=True,
        )
    return llm.norm(h)


def _with_hidden(state: TokenState, hidden: Tensor) -> TokenState:
    return replace(state, hidden=hidden)
