"""Plain-PyTorch references of the ops in :mod:`lyra_pl.ops`: same signatures, same results.

They are the ground truth of the tests (run in float64) and the "naive path" of the
benchmarks: soft-DTW vectorized over each anti-diagonal with autograd for the backward, and
the attention scores through a fully materialized (B, Hq, T, N) probability tensor.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lyra_pl.keep_count import keep_count


def soft_dtw(
    D: Tensor,
    x_lengths: Tensor,
    y_lengths: Tensor,
    gamma: float = 0.1,
    bandwidth: int | None = None,
) -> Tensor:
    """Soft-DTW by the recursion of docs/method.md, one anti-diagonal of the whole batch at a time."""
    B, Lmax, Smax = D.shape
    dev = D.device
    # Unreachable cells hold a large finite value instead of +inf: exp(-FAR / gamma) is exactly
    # 0, so results are the same, and autograd through logsumexp never sees inf - inf.
    far = torch.tensor(1e10, dtype=D.dtype, device=dev)
    i = torch.arange(1, Lmax + 1, device=dev)  # 1-based rows of R
    rows = i - 1
    # Diagonals of R indexed by row 0..Lmax; d2, d1 are diagonals k-2 and k-1.
    d2 = torch.full((B, Lmax + 1), 1e10, dtype=D.dtype, device=dev)
    d2[:, 0] = 0.0  # diagonal 0 is R[0,0]
    d1 = torch.full_like(d2, 1e10)  # diagonal 1 is all border
    values = torch.zeros(B, dtype=D.dtype, device=dev)
    end = x_lengths + y_lengths
    for k in range(2, Lmax + Smax + 1):
        j = k - i
        valid = (j >= 1) & (i <= x_lengths[:, None]) & (j <= y_lengths[:, None])
        if bandwidth is not None:
            valid = valid & ((i - j).abs() <= bandwidth)
        cost = D[:, rows, (j - 1).clamp(0, Smax - 1)]  # (B, Lmax)
        prev = torch.stack([d2[:, :-1], d1[:, :-1], d1[:, 1:]])  # diag, up, left predecessors
        softmin = -gamma * torch.logsumexp(-prev / gamma, dim=0)
        cur = torch.cat([far.expand(B, 1), torch.where(valid, cost + softmin, far)], dim=1)
        values = torch.where(end == k, cur.gather(1, x_lengths[:, None]).squeeze(1), values)
        d2, d1 = d1, cur
    return values


def soft_dtw_value_and_grad(
    D: Tensor,
    x_lengths: Tensor,
    y_lengths: Tensor,
    gamma: float = 0.1,
    bandwidth: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Float64 soft-DTW values and d value_b / d D_b by the classic R and E matrices
    (Cuturi & Blondel 2017; the backward of mblondel/soft-dtw, which recomputes the soft-min
    weights from R), without autograd: a second, independent reference, fast enough for
    long sequences (one sample at a time, vectorized over anti-diagonals)."""
    D = D.detach().double()
    B = D.shape[0]
    values = torch.zeros(B, dtype=torch.float64, device=D.device)
    grad = torch.zeros_like(D)
    for b in range(B):
        L, S = int(x_lengths[b]), int(y_lengths[b])
        C = torch.zeros(L + 2, S + 2, dtype=torch.float64, device=D.device)
        C[1 : L + 1, 1 : S + 1] = D[b, :L, :S]
        R = torch.full_like(C, float("inf"))
        R[0, 0] = 0.0

        def diagonal(k):
            i = torch.arange(max(1, k - S), min(L, k - 1) + 1, device=D.device)
            j = k - i
            if bandwidth is not None:
                keep = (i - j).abs() <= bandwidth
                i, j = i[keep], j[keep]
            return i, j

        for k in range(2, L + S + 1):
            i, j = diagonal(k)
            prev = torch.stack([R[i - 1, j - 1], R[i - 1, j], R[i, j - 1]])
            R[i, j] = C[i, j] - gamma * torch.logsumexp(-prev / gamma, dim=0)
        values[b] = R[L, S]

        E = torch.zeros_like(C)
        E[L, S] = 1.0
        for k in range(L + S - 1, 1, -1):
            i, j = diagonal(k)

            def weight(si, sj):  # the soft-min weight successor (si, sj) gives to (i, j)
                w = torch.exp((R[si, sj] - R[i, j] - C[si, sj]) / gamma)
                return torch.where(torch.isfinite(R[si, sj]), w, 0.0)

            E[i, j] = (
                E[i + 1, j] * weight(i + 1, j)
                + E[i, j + 1] * weight(i, j + 1)
                + E[i + 1, j + 1] * weight(i + 1, j + 1)
            )
        grad[b, :L, :S] = E[1 : L + 1, 1 : S + 1]
    return values, grad


def lcmr_loss(
    speech: Tensor,
    text: Tensor,
    speech_lengths: Tensor,
    text_lengths: Tensor,
    gamma: float = 0.1,
    temperature: float = 0.06,
    normalize: str = "length_sum",
) -> Tensor:
    """LCMR, one sample at a time on its unpadded slices (independent of the batched masking)."""
    losses = []
    for b in range(speech.shape[0]):
        L, S = int(speech_lengths[b]), int(text_lengths[b])
        x, y = speech[b, :L], text[b, :S]
        D = -torch.log_softmax(x @ y.T / temperature, dim=-1)
        one = torch.ones(1, dtype=torch.long, device=speech.device)
        value = soft_dtw(D[None], one * L, one * S, gamma=gamma)[0]
        norm = {"length_sum": L + S, "x_length": L, "none": 1}[normalize]
        losses.append(value / norm)
    return torch.stack(losses)


def context_scores(
    q: Tensor,
    k: Tensor,
    query_mask: Tensor,
    key_mask: Tensor,
    causal: bool = True,
    scale: float | None = None,
    query_positions: Tensor | None = None,
) -> Tensor:
    """The naive path: repeat the kv heads, materialize every instruction row's softmax over
    all tokens, average. Memory grows as B * Hq * T * N. Row i of q sits at key position
    ``query_positions[:, i]`` (i when None); positions are not checked here."""
    B, Hq, Nq, dh = q.shape
    N = k.shape[2]
    scale = dh**-0.5 if scale is None else scale
    out_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    k = k.repeat_interleave(Hq // k.shape[1], dim=1).to(out_dtype)
    counts = query_mask.sum(1)
    T = int(counts.max()) if query_mask.numel() else 0
    rows = torch.sort((~query_mask).to(torch.uint8), dim=1, stable=True).indices[:, :T]  # (B, T)
    row_valid = torch.arange(T, device=q.device) < counts[:, None]  # (B, T)
    pos = rows if query_positions is None else torch.gather(query_positions, 1, rows)  # (B, T)
    qr = torch.gather(q.to(out_dtype), 2, rows[:, None, :, None].expand(B, Hq, T, dh))
    logits = torch.einsum("bhtd,bhnd->bhtn", qr, k) * scale
    allowed = key_mask[:, None, :].expand(B, T, N)
    if causal:
        allowed = allowed & (torch.arange(N, device=q.device) <= pos[:, :, None])
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows that see nothing give 0
    probs = probs * row_valid[:, None, :, None]
    total = probs.sum(dim=(1, 2))
    norm = (counts * Hq).clamp(min=1).to(out_dtype)
    return total / norm[:, None]


def select_tokens(
    scores: Tensor,
    context_mask: Tensor,
    key_mask: Tensor,
    keep_ratio: float,
    min_keep: int = 32,
) -> Tensor:
    """Selection by a full stable sort. Each sample's valid context tokens (the candidates)
    rank first, by score descending with ties to the earlier token, -0.0 equal to +0.0, NaN
    below every number (-inf included); every other token ranks strictly below them, so that
    only candidates are ever among the k best."""
    candidates = context_mask & key_mask
    s = scores.double()
    nan = s.isnan()
    # Order within a class: by score (NaN and -0.0 set to values that sort like them), stably.
    by_score = torch.where(nan, float("-inf"), torch.where(s == 0, 0.0, s))
    order = torch.sort(by_score, dim=1, descending=True, stable=True).indices
    # Then by class, stably: 2 a candidate with a number, 1 a candidate with NaN, 0 the rest.
    rank_class = (candidates.long() * (2 - nan.long())).gather(1, order)
    order = order.gather(1, torch.sort(rank_class, dim=1, descending=True, stable=True).indices)
    counts = candidates.sum(1).tolist()
    k = torch.tensor([keep_count(n, keep_ratio, min_keep) for n in counts], dtype=torch.long,
                     device=scores.device)
    best = torch.arange(scores.shape[1], device=scores.device) < k[:, None]  # k first ranks
    chosen = torch.zeros_like(candidates).scatter_(1, order, best)
    return (key_mask & ~context_mask) | chosen


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
    scores = context_scores(q, k, query_mask, key_mask, causal, scale)
    return select_tokens(scores, context_mask, key_mask, keep_ratio, min_keep)
