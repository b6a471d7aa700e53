"""Typed wrappers over the compiled ops in ``torch.ops.lyra``, with their fake (meta) and
autograd registrations, so they run eagerly on CPU/CUDA and trace under
``torch.compile(fullgraph=True)``.

Plain-PyTorch references of every op live in :mod:`lyra_pl.reference`.
"""
from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
from torch import Tensor

from lyra_pl import _extension  # noqa: F401  (registers torch.ops.lyra.*)

__all__ = [
    "soft_dtw",
    "lcmr_loss",
    "context_scores",
    "select_tokens",
    "prune_tokens",
    "compact",
]

_HALF = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- checks
def _check_tensor(x, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _check_float(x: Tensor, name: str) -> None:
    _check_tensor(x, name)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _check_same_device(name: str, ref: Tensor, **tensors: Tensor) -> None:
    for other, t in tensors.items():
        if t.device != ref.device:
            raise ValueError(
                f"{other} is on {t.device} but {name} is on {ref.device}; move them to one device"
            )


# ----------------------------------------------------------------------------- soft-DTW
@torch.library.register_fake("lyra::soft_dtw_forward")
def _(D, x_lengths, y_lengths, gamma, bandwidth, store_weights):
    B, L, S = D.shape
    weights = D.new_empty((B, L, S, 3) if store_weights else (0,))
    return D.new_empty((B,)), weights


@torch.library.register_fake("lyra::soft_dtw_backward")
def _(grad, weights, x_lengths, y_lengths, bandwidth):
    return weights.new_empty(weights.shape[:3])


def _soft_dtw_setup_context(ctx, inputs, output):
    _, x_lengths, y_lengths, _, bandwidth, store_weights = inputs
    if store_weights:
        ctx.save_for_backward(output[1], x_lengths, y_lengths)
    ctx.bandwidth = bandwidth
    # The weights output takes no gradient: without this, autograd would fill a zero tensor
    # the size of the weights (3 x D) for it in every backward.
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _soft_dtw_backward(ctx, grad_value, _grad_weights):
    if grad_value is None:
        return None, None, None, None, None, None
    if not ctx.saved_tensors:
        raise RuntimeError(
            "soft_dtw was called with store_weights=False, so it cannot be differentiated"
        )
    weights, x_lengths, y_lengths = ctx.saved_tensors
    dD = torch.ops.lyra.soft_dtw_backward(
        grad_value.contiguous(), weights, x_lengths, y_lengths, ctx.bandwidth
    )
    return dD, None, None, None, None, None


torch.library.register_autograd(
    "lyra::soft_dtw_forward", _soft_dtw_backward, setup_context=_soft_dtw_setup_context
)


@torch.library.register_fake("lyra::soft_dtw_alignment")
def _(D, x_lengths, y_lengths, gamma, bandwidth):
    return D.new_empty((D.shape[0],)), D.new_empty(D.shape)


@torch.library.register_fake("lyra::soft_dtw_alignment_backward")
def _(grad, alignment):
    return alignment.new_empty(alignment.shape)


def _soft_dtw_alignment_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])  # E itself takes no gradient
    ctx.set_materialize_grads(False)


def _soft_dtw_alignment_backward(ctx, grad_value, _grad_alignment):
    if grad_value is None:
        return None, None, None, None, None
    (alignment,) = ctx.saved_tensors
    dD = torch.ops.lyra.soft_dtw_alignment_backward(grad_value.contiguous(), alignment)
    return dD, None, None, None, None


torch.library.register_autograd(
    "lyra::soft_dtw_alignment",
    _soft_dtw_alignment_backward,
    setup_context=_soft_dtw_alignment_setup_context,
)


def soft_dtw(
    D: Tensor,
    x_lengths: Tensor,
    y_lengths: Tensor,
    gamma: float = 0.1,
    bandwidth: int | None = None,
) -> Tensor:
    """Batched soft-DTW value ``R[L_b, S_b]`` of each sample's cost matrix.

    Args:
        D: (B, Lmax, Smax) pairwise costs; sample b uses ``D[b, :x_lengths[b], :y_lengths[b]]``.
            float32/float64; float16/bfloat16 are upcast to float32.
        x_lengths, y_lengths: (B,) integer tensors on D's device, in ``[1, Lmax]``/``[1, Smax]``.
        gamma: soft-min temperature, > 0.
        bandwidth: Sakoe-Chiba band (cells with ``|i - j| > bandwidth`` are excluded), or None.

    Returns:
        (B,) values, differentiable with respect to D (the gradient is exactly zero outside each
        sample's valid region).
    """
    _check_float(D, "D")
    _check_tensor(x_lengths, "x_lengths")
    _check_tensor(y_lengths, "y_lengths")
    _check_same_device("D", D, x_lengths=x_lengths, y_lengths=y_lengths)
    if D.dim() != 3:
        raise ValueError(f"D must have shape (B, Lmax, Smax), got {tuple(D.shape)}")
    if not 0 < gamma < math.inf:
        raise ValueError(f"gamma must be a finite number > 0, got {gamma}")
    if bandwidth is not None and (
        not isinstance(bandwidth, int) or isinstance(bandwidth, bool) or bandwidth < 0
    ):
        raise ValueError(f"bandwidth must be None or an int >= 0, got {bandwidth!r}")
    if D.dtype in _HALF:
        D = D.float()
    band = -1 if bandwidth is None else bandwidth
    if D.requires_grad and torch.is_grad_enabled():
        # The gradient is E = d value / dD times the incoming gradient: computed with the value
        # (on the CPU in one cache-resident pass per sample) and kept instead of the soft-min
        # weights, a third of their memory.
        value, _ = torch.ops.lyra.soft_dtw_alignment(D, x_lengths, y_lengths, float(gamma), band)
        return value
    value, _ = torch.ops.lyra.soft_dtw_forward(D, x_lengths, y_lengths, float(gamma), band, False)
    return value


Normalize = Literal["length_sum", "x_length", "none"]


def lcmr_loss(
    speech: Tensor,
    text: Tensor,
    speech_lengths: Tensor,
    text_lengths: Tensor,
    gamma: float = 0.1,
    temperature: float = 0.06,
    normalize: Normalize = "length_sum",
) -> Tensor:
    """Latent cross-modality regularizer (docs/method.md): per-sample soft-DTW alignment cost between
    projected speech tokens and the LLM's embeddings of the transcript.

    ``D[l, s] = -log softmax_s(speech_l . text_s / temperature)`` with the softmax over each
    sample's valid text tokens only, then :func:`soft_dtw`, divided by ``L + S``
    (``"length_sum"``, the paper), ``L`` (``"x_length"``, the official code) or nothing.

    Args:
        speech: (B, Lmax, d); text: (B, Smax, d); lengths: (B,) integer tensors.

    Returns:
        (B,) losses, differentiable with respect to ``speech`` and ``text``.
    """
    _check_float(speech, "speech")
    _check_float(text, "text")
    _check_tensor(speech_lengths, "speech_lengths")
    _check_tensor(text_lengths, "text_lengths")
    _check_same_device(
        "speech", speech, text=text, speech_lengths=speech_lengths, text_lengths=text_lengths
    )
    if speech.dim() != 3 or text.dim() != 3:
        raise ValueError(
            f"speech and text must be (B, L, d) and (B, S, d), got {tuple(speech.shape)} "
            f"and {tuple(text.shape)}"
        )
    if speech.shape[0] != text.shape[0] or speech.shape[2] != text.shape[2]:
        raise ValueError(
            f"speech {tuple(speech.shape)} and text {tuple(text.shape)} must agree in batch "
            "size and hidden size"
        )
    if not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if normalize not in ("length_sum", "x_length", "none"):
        raise ValueError(
            f"normalize must be 'length_sum', 'x_length' or 'none', got {normalize!r}"
        )
    dtype = torch.promote_types(speech.dtype, torch.float32)
    logits = torch.bmm(speech.to(dtype), text.to(dtype).transpose(1, 2)) / temperature
    text_valid = torch.arange(text.shape[1], device=text.device) < text_lengths[:, None]
    logits = logits.masked_fill(~text_valid[:, None, :], float("-inf"))
    # Zero, not +inf, on padded text columns: soft_dtw never reads them, and no inf or NaN
    # can then reach the gradient.
    D = (-torch.log_softmax(logits, dim=-1)).masked_fill(~text_valid[:, None, :], 0.0)
    value = soft_dtw(D, speech_lengths, text_lengths, gamma=gamma)
    if normalize == "length_sum":
        value = value / (speech_lengths + text_lengths).to(value.dtype)
    elif normalize == "x_length":
        value = value / speech_lengths.to(value.dtype)
    return value


# ----------------------------------------------------------------------------- pruning
def _scores_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.register_fake("lyra::context_scores")
def _(q, k, query_mask, key_mask, causal, scale, query_positions=None):
    return q.new_empty(q.shape[0], k.shape[2], dtype=_scores_dtype(q))


@torch.library.register_fake("lyra::select_tokens")
def _(scores, context_mask, key_mask, keep_ratio, min_keep):
    return key_mask.new_empty(scores.shape, dtype=torch.bool)


@torch.library.register_fake("lyra::prune_tokens")
def _(q, k, query_mask, context_mask, key_mask, keep_ratio, min_keep, causal, scale):
    return key_mask.new_empty(q.shape[0], q.shape[2], dtype=torch.bool)


def _check_qk(
    q: Tensor, k: Tensor, query_mask: Tensor, query_positions: Tensor | None = None, **masks: Tensor
) -> None:
    """q (B, Hq, Nq, dh) and k (B, Hkv, N, dh) with Nq == N unless ``query_positions`` place
    q's rows among the keys; query_mask (B, Nq); the other masks (B, N)."""
    _check_float(q, "q")
    _check_float(k, "k")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"q and k must be (B, Hq, N, head_dim) and (B, Hkv, N, head_dim), got "
            f"{tuple(q.shape)} and {tuple(k.shape)}"
        )
    if q.dtype != k.dtype:
        raise TypeError(f"k has dtype {k.dtype} but q has {q.dtype}; they must match")
    B, Hq, Nq, dh = q.shape
    N = k.shape[2]
    if query_positions is None and (k.shape[0], k.shape[2], k.shape[3]) != (B, Nq, dh):
        raise ValueError(
            f"k {tuple(k.shape)} must match q {tuple(q.shape)} in batch, tokens and head_dim"
        )
    if query_positions is not None and (k.shape[0], k.shape[3]) != (B, dh):
        raise ValueError(f"k {tuple(k.shape)} must match q {tuple(q.shape)} in batch and head_dim")
    if Hq < 1 or k.shape[1] < 1:
        raise ValueError(f"q and k need at least one head each, got Hq={Hq}, Hkv={k.shape[1]}")
    if Hq % k.shape[1] != 0:
        raise ValueError(
            f"the number of query heads ({Hq}) must be a multiple of the number of kv heads "
            f"({k.shape[1]})"
        )
    _check_same_device("q", q, k=k)
    _check_masks("q", q, (B, Nq), query_mask=query_mask)
    _check_masks("q", q, (B, N), **masks)
    if query_positions is not None:
        _check_tensor(query_positions, "query_positions")
        if query_positions.dtype != torch.int64:
            raise TypeError(f"query_positions must be an int64 tensor, got {query_positions.dtype}")
        if tuple(query_positions.shape) != (B, Nq):
            raise ValueError(
                f"query_positions must have shape (B, Nq) = {(B, Nq)}, got "
                f"{tuple(query_positions.shape)}"
            )
        _check_same_device("q", q, query_positions=query_positions)


def _check_masks(ref_name: str, ref: Tensor, shape: tuple, **masks: Tensor) -> None:
    """Each mask is a bool tensor of `shape` on `ref`'s device."""
    for name, t in masks.items():
        _check_tensor(t, name)
        if t.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool tensor, got {t.dtype}")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    _check_same_device(ref_name, ref, **masks)


def _check_keep(keep_ratio: float, min_keep: int) -> None:
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if not isinstance(min_keep, int) or isinstance(min_keep, bool) or min_keep < 0:
        raise ValueError(f"min_keep must be an int >= 0, got {min_keep!r}")


def context_scores(
    q: Tensor,
    k: Tensor,
    query_mask: Tensor,
    key_mask: Tensor,
    causal: bool = True,
    scale: float | None = None,
    query_positions: Tensor | None = None,
) -> Tensor:
    """Attention probability each token receives from the instruction tokens, averaged over
    the query heads and the instruction rows (docs/method.md, LMME), without materializing the
    attention matrix.

    Args:
        q: (B, Hq, Nq, head_dim) post-RoPE queries; k: (B, Hkv, N, head_dim) keys, Hq a multiple
            of Hkv (GQA, no copy). The head dimension must be contiguous for a zero-copy call.
        query_mask: (B, Nq) bool, the instruction rows. key_mask: (B, N) bool, valid tokens.
        causal: a query row at key position p attends only to keys j <= p.
        scale: logit scale, default ``head_dim ** -0.5``.
        query_positions: None, and then Nq == N and row i of q sits at key position i; or a
            (B, Nq) int64 tensor on q's device with each row's position among the N keys, for
            scoring all keys from only some query rows (context parallelism: a rank's own rows
            against every rank's keys). Over the rows where ``query_mask`` is True it must be
            strictly ascending within [0, N) per sample (else ValueError); other rows are
            ignored. With the rows of q split into groups, the scores of the whole are the
            groups' scores weighted by their per-sample row counts.

    Returns:
        (B, N) float32 scores (float64 for float64 inputs); zero for invalid keys, and for every
        key of a sample without instruction rows.
    """
    _check_qk(q, k, query_mask, query_positions, key_mask=key_mask)
    return torch.ops.lyra.context_scores(q, k, query_mask, key_mask, causal, scale, query_positions)


def select_tokens(
    scores: Tensor,
    context_mask: Tensor,
    key_mask: Tensor,
    keep_ratio: float,
    min_keep: int = 32,
) -> Tensor:
    """Which tokens survive a pruning step.

    Keeps every valid non-context token and, per sample, the ``k`` highest-scoring valid context
    tokens, ``k = keep_count(n, keep_ratio, min_keep)`` (:mod:`lyra_pl.keep_count`: ``n`` if
    ``n < min_keep``, else ``max(min_keep, floor(keep_ratio * n))`` with the floor of exact
    decimal arithmetic, so 0.7 of 90 keeps 63) with ``n`` the sample's valid context tokens.
    Ties go to the earlier token; NaN scores rank lowest.

    Returns:
        (B, N) bool, False on padding; token order is untouched.
    """
    _check_float(scores, "scores")
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape (B, N), got {tuple(scores.shape)}")
    _check_masks(
        "scores", scores, tuple(scores.shape), context_mask=context_mask, key_mask=key_mask
    )
    _check_keep(keep_ratio, min_keep)
    if scores.dtype in _HALF:
        scores = scores.float()
    return torch.ops.lyra.select_tokens(scores, context_mask, key_mask, float(keep_ratio), min_keep)


def prune_tokens(
    q: Tensor,
    k: Tensor,
    query_mask: Tensor,
    context_mask: Tensor,
    key_mask: Tensor,
    keep_ratio: float,
    min_keep: int = 32,
    causal: bool = True,
    scale: float | None = None,
) -> Tensor:
    """``select_tokens(context_scores(q, k, ...), ...)`` in one op: the extractor's step."""
    _check_qk(q, k, query_mask, context_mask=context_mask, key_mask=key_mask)
    _check_keep(keep_ratio, min_keep)
    return torch.ops.lyra.prune_tokens(
        q, k, query_mask, context_mask, key_mask, float(keep_ratio), min_keep, causal, scale
    )


# ----------------------------------------------------------------------------- compaction
@torch.library.custom_op("lyra::compact_index", mutates_args=())
def _compact_index(keep: Tensor) -> tuple[Tensor, Tensor]:
    lengths = keep.sum(1)
    new_len = int(lengths.max()) if keep.numel() else 0
    # A stable sort of "dropped" puts the kept positions first, in their original order.
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
    return order[:, :new_len].contiguous(), lengths


@_compact_index.register_fake
def _(keep):
    new_len = torch.library.get_ctx().new_dynamic_size()
    return keep.new_empty(keep.shape[0], new_len, dtype=torch.long), keep.new_empty(
        keep.shape[0], dtype=torch.long
    )


def compact(keep: Tensor, *tensors: Tensor, pad_value: float | Sequence[float] = 0):
    """Gathers the kept positions of per-token tensors into left-aligned, padded tensors.

    Args:
        keep: (B, N) bool, e.g. from :func:`prune_tokens`.
        *tensors: each shaped (B, N, ...) (hidden states, labels, masks) or (3, B, N, ...)
            (M-RoPE positions); batched, no loop over samples.
        pad_value: value of the padded positions (``N' - lengths[b]`` at the end of each row),
            one for all tensors or one per tensor (e.g. -100 for labels).

    Returns:
        The compacted tensors, in order, each with N replaced by ``N' = max(lengths)``, then
        ``lengths`` (B,) int64.
    """
    _check_tensor(keep, "keep")
    if keep.dtype != torch.bool or keep.dim() != 2:
        raise ValueError(f"keep must be a (B, N) bool tensor, got {keep.dtype} {tuple(keep.shape)}")
    pads = list(pad_value) if isinstance(pad_value, (list, tuple)) else [pad_value] * len(tensors)
    if len(pads) != len(tensors):
        raise ValueError(f"pad_value has {len(pads)} entries for {len(tensors)} tensors")
    B, N = keep.shape
    index, lengths = _compact_index(keep)
    new_len = index.shape[1]
    valid = torch.arange(new_len, device=keep.device) < lengths[:, None]  # (B, N')
    out = []
    for i, (t, pad) in enumerate(zip(tensors, pads)):
        _check_tensor(t, f"tensors[{i}]")
        _check_same_device("keep", keep, **{f"tensors[{i}]": t})
        if t.dim() >= 2 and tuple(t.shape[:2]) == (B, N):
            dim, idx, mask = 1, index, valid
        elif t.dim() >= 3 and t.shape[0] == 3 and tuple(t.shape[1:3]) == (B, N):
            dim, idx, mask = 2, index[None].expand(3, B, new_len), valid[None]
        else:
            raise ValueError(
                f"tensors[{i}] has shape {tuple(t.shape)}; expected (B, N, ...) or (3, B, N, ...) "
                f"with (B, N) = {(B, N)}"
            )
        trailing = t.shape[dim + 1:]
        idx_full = idx.reshape(*idx.shape, *([1] * len(trailing))).expand(*idx.shape, *trailing)
        gathered = torch.gather(t, dim, idx_full)
        mask_full = mask.reshape(*mask.shape, *([1] * len(trailing)))
        out.append(gathered.masked_fill(~mask_full, pad))
    return (*out, lengths)
