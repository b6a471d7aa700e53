"""Context parallelism as the model sees it: one sample's sequence split over the ranks of a
context-parallel (CP) group, every layer exact.

The model imports nothing distributed. It calls a :class:`SequenceSplit`, which does the layout
arithmetic here in plain torch and leaves the communication to the :class:`Collectives` it is
given (:class:`lyra_pl.training.context_parallel.GroupCollectives` over a process group, set
up by :func:`lyra_pl.training.parallelize.parallelize`). Every rank of the group holds the
same batch and assembles its whole input; from there:

* **Layout (zig-zag).** The sequence is padded to a multiple of ``2R`` tokens and cut into
  ``2R`` equal chunks; rank ``r`` holds chunks ``r`` and ``2R-1-r``. Under causal attention
  a token's cost grows with its position, so each rank gets the same work. Padding goes at the
  end, like the right padding of the one-rank batch: no real token ever attends to it.
* **Attention.** Each layer all-gathers K and V over the group (with GQA they are
  ``Hkv/Hq`` of the queries' size; Llama 3 trained its long context this way) and runs SDPA for
  each of its two query chunks against the keys up to that chunk's end, with a lower-right
  causal mask. The backward sums the K/V gradients back to their owners.
* **LMME.** Each rank scores every key of the sequence from its own instruction rows
  (:func:`lyra_pl.ops.context_scores` with ``query_positions``); one all-reduce of the (B, N)
  partial sums gives every rank the same full-sequence scores, hence the same top-k. The kept
  tokens are gathered, compacted and split again, so the next block stays balanced; the
  per-token metadata (positions, masks, targets) is small and kept whole on every rank.
* **Losses.** Each rank sums the cross-entropy of its own targets over the global target
  count; LCMR runs each speech clip on one rank. One all-reduce of the parts gives every rank
  the one-rank loss, and its backward hands each rank its share of the gradient.
"""
from __future__ import annotations

from dataclasses import fields, replace
from typing import TYPE_CHECKING, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from lyra_pl import ops

if TYPE_CHECKING:
    from lyra_pl.model.extractor import TokenState

ATTENTION = "lyra_sequence_split"
"""Name of the attention function registered with transformers' ``AttentionInterface``
(:func:`sequence_split_attention`): SDPA, split over the group when a layer is called with a
``sequence_split``."""


class Collectives(Protocol):
    """What a :class:`SequenceSplit` needs from the group; both calls are differentiable."""

    rank: int
    size: int

    def all_gather(self, x: Tensor) -> list[Tensor]:
        """Every rank's ``x`` (same shape on each), in rank order. Backward: each rank gets the
        sum over ranks of the gradients of its own ``x``. Like every collective here, each
        rank must call it (and its backward) alike: ``x`` requires grad on all ranks or on
        none."""

    def all_reduce(self, x: Tensor) -> Tensor:
        """The sum over ranks. Backward: the sum over ranks of the gradients."""


class SequenceSplit:
    """The sequence layout and the split versions of the model's sequence-wide steps."""

    def __init__(self, comm: Collectives):
        if comm.size < 1 or not 0 <= comm.rank < comm.size:
            raise ValueError(f"rank {comm.rank} of a group of {comm.size}")
        self.comm = comm
        self.rank, self.size = comm.rank, comm.size
        self.chunks = 2 * comm.size

    # ------------------------------------------------------------------ layout
    def padded_length(self, n: int) -> int:
        """``n`` rounded up to a multiple of 2R (at least 2R)."""
        return max(1, -(-n // self.chunks)) * self.chunks

    def shard(self, x: Tensor, dim: int) -> Tensor:
        """This rank's tokens of a whole (padded) sequence along ``dim``: chunks r and 2R-1-r."""
        parts = x.chunk(self.chunks, dim)
        if len(parts) != self.chunks or x.shape[dim] % self.chunks:
            raise ValueError(f"a sequence of {x.shape[dim]} tokens does not split into "
                             f"{self.chunks} chunks")
        return torch.cat([parts[self.rank], parts[self.chunks - 1 - self.rank]], dim)

    def unshard(self, x: Tensor, dim: int) -> Tensor:
        """The whole sequence from every rank's tokens (the inverse of :meth:`shard`)."""
        ordered: list[Tensor | None] = [None] * self.chunks
        for r, part in enumerate(self.comm.all_gather(x)):
            ordered[r], ordered[self.chunks - 1 - r] = part.chunk(2, dim)
        return torch.cat(ordered, dim)

    def local_positions(self, n_padded: int, device: torch.device) -> Tensor:
        """(n_padded / R,) sequence indices of this rank's tokens, ascending."""
        return self.shard(torch.arange(n_padded, device=device), 0)

    def pad_state(self, state: TokenState) -> TokenState:
        """``state`` right-padded to :meth:`padded_length` tokens, padding as compaction pads."""
        from lyra_pl.model.extractor import PADS

        n = state.valid.shape[1]
        extra = self.padded_length(n) - n
        if not extra:
            return state
        out = {}
        for f in fields(state):
            t = getattr(state, f.name)
            dim = 2 if f.name == "positions" else 1
            shape = list(t.shape)
            shape[dim] = extra
            out[f.name] = torch.cat([t, t.new_full(shape, PADS.get(f.name, 0))], dim)
        return replace(state, **out)

    def shard_state(self, state: TokenState) -> TokenState:
        """This rank's tokens of a padded whole-sequence state."""
        return replace(state, **{f.name: self.shard(getattr(state, f.name),
                                                    2 if f.name == "positions" else 1)
                                 for f in fields(state)})

    # ------------------------------------------------------------------ attention
    def attention(self, q: Tensor, k: Tensor, v: Tensor, scale: float | None,
                  dropout: float = 0.0) -> Tensor:
        """Exact causal attention of this rank's queries (B, Hq, n, d) over the whole sequence,
        from every rank's keys and values (B, Hkv, n, d). Returns (B, n, Hq, d), like
        transformers' attention functions."""
        keys, values = self.unshard(k, 2), self.unshard(v, 2)
        c = q.shape[2] // 2
        gqa = q.shape[1] != k.shape[1]
        out = []
        for half, chunk in ((0, self.rank), (1, self.chunks - 1 - self.rank)):
            end = (chunk + 1) * c  # the chunk's last query sees keys [0, end)
            out.append(F.scaled_dot_product_attention(
                q[:, :, half * c:(half + 1) * c], keys[:, :, :end], values[:, :, :end],
                attn_mask=causal_lower_right(c, end), dropout_p=dropout, scale=scale,
                enable_gqa=gqa))
        return torch.cat(out, 2).transpose(1, 2).contiguous()

    # ------------------------------------------------------------------ LMME
    @torch.no_grad()
    def select(self, whole: TokenState, local: TokenState, q: Tensor, k: Tensor,
               keep_ratio: float, min_keep: int, causal: bool) -> Tensor:
        """The LMME keep mask (B, N) over the whole sequence, the same on every rank: this rank's
        instruction rows score every key, the partial sums are added over the group, and the
        top-k is taken from the sums (as :func:`~lyra_pl.model.extractor.select_context` does on
        one rank)."""
        keys = self.unshard(k, 2)
        n = whole.valid.shape[1]
        positions = self.local_positions(n, q.device).expand(q.shape[0], -1)
        mean = ops.context_scores(q, keys, local.instruction, whole.valid, causal,
                                  query_positions=positions)
        # The op averages over heads and this rank's rows; weighted by the rows, summed over
        # the ranks and divided by all rows it is the one-rank average (heads cancel).
        rows = local.instruction.sum(1, keepdim=True)
        total = whole.instruction.sum(1, keepdim=True).clamp(min=1)
        scores = self.comm.all_reduce(mean.double() * rows) / total
        return ops.select_tokens(scores, whole.context, whole.valid, keep_ratio, min_keep)

    def compact(self, whole: TokenState, hidden: Tensor, keep: Tensor
                ) -> tuple[TokenState, TokenState]:
        """(whole, local) after keeping ``keep`` of the whole sequence: the hidden states are
        gathered, compacted with the metadata, padded and split again. The whole state keeps
        no hidden states (a (B, N, 0) placeholder): only the metadata is held whole."""
        whole = replace(whole, hidden=self.unshard(hidden, 1))
        whole = self.pad_state(whole.compact(keep))
        local = self.shard_state(whole)
        return without_hidden(whole), local

    # ------------------------------------------------------------------ inputs and losses
    def gather_rows(self, local: Tensor, sizes: Sequence[int]) -> Tensor:
        """Rows (n_r, ...) from each rank ``r`` (``sizes``: every rank's n_r, host ints),
        concatenated in rank order."""
        most = max(sizes)
        padded = torch.cat([local, local.new_zeros(most - local.shape[0], *local.shape[1:])])
        parts = self.comm.all_gather(padded)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    def share(self, n: int) -> range:
        """This rank's contiguous share of ``n`` items (the first ``n % R`` ranks get one more)."""
        q, extra = divmod(n, self.size)
        start = self.rank * q + min(self.rank, extra)
        return range(start, start + q + (self.rank < extra))

    def shares(self, n: int) -> list[range]:
        """Every rank's :meth:`share` of ``n`` items."""
        q, extra = divmod(n, self.size)
        starts = [r * q + min(r, extra) for r in range(self.size + 1)]
        return [range(a, b) for a, b in zip(starts, starts[1:])]

    def sum(self, x: Tensor) -> Tensor:
        """The sum over the group (differentiable)."""
        return self.comm.all_reduce(x)


def without_hidden(state: TokenState) -> TokenState:
    B, N = state.valid.shape
    return replace(state, hidden=state.hidden.new_empty(B, N, 0))


def sequence_split_attention(module, query: Tensor, key: Tensor, value: Tensor,
                             attention_mask: Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None,
                             sequence_split: SequenceSplit | None = None, **kwargs):
    """transformers attention function: SDPA, or with ``sequence_split`` (passed by
    :func:`~lyra_pl.model.decoder.run_layers` under context parallelism) the split attention."""
    if sequence_split is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    return sequence_split.attention(query, key, value, scaling, dropout), None


def register_attention() -> None:
    """Registers :func:`sequence_split_attention` under :data:`ATTENTION` (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, sequence_split_attention)
