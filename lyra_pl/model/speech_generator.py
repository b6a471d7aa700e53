"""Streaming CTC speech generator: LLM hidden states -> discrete speech units.

Lyra (like LLaMA-Omni) generates speech in parallel with text: every hidden state the LLM
produces for a text token is repeated ``upsample`` (25) times, run through a small causal
Qwen2-style decoder, and classified per frame into ``n_units`` discrete units plus a CTC
blank. Collapsing repeats and dropping blanks gives the unit sequence a unit vocoder turns
into audio.

Conventions
- The CTC blank is the LAST class, ``blank = n_units``, so unit ids equal class ids.
- Batches are right-padded. The decoder layers are causal, so a real frame never sees a
  padding frame and padding needs no attention mask during training.
- Streaming keeps a ``DynamicCache`` over the generator's own layers: each step runs only
  the new ``upsample * n_new`` frames, with positions continuing where the previous step
  stopped (the official code re-runs the whole prefix for every token).

The transformers ``Qwen2DecoderLayer`` / ``Qwen2RotaryEmbedding`` / ``Qwen2RMSNorm`` are used
as they are, called with explicit ``position_embeddings`` (and an explicit mask when the
cache is non-empty; see ``UnitStream.step``).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache, Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2DecoderLayer,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
)

__all__ = ["SpeechGenerator", "UnitStream", "ctc_collapse", "format_units", "parse_units"]


# --------------------------------------------------------------------------- CTC collapse


def _collapse_keep(ids: Tensor, prev: Tensor, blank: int) -> Tensor:
    """Which frames emit a unit: not blank, and not equal to the frame before.

    ``prev`` (B,) is the class of the frame just before ``ids[:, 0]`` (``blank`` at the start
    of a sequence, the last frame of the previous step when streaming), which is what makes
    the collapse exact across step boundaries.
    """
    before = torch.cat([prev[:, None], ids[:, :-1]], dim=1)
    return (ids != blank) & (ids != before)


def _split_rows(ids: Tensor, keep: Tensor) -> list[list[int]]:
    """Selected ids of each row as Python lists (one gather, one host transfer)."""
    flat = ids[keep].tolist()
    out, start = [], 0
    for n in keep.sum(dim=1).tolist():
        out.append(flat[start:start + n])
        start += n
    return out


def ctc_collapse(ids: Tensor, lengths: Tensor, blank: int) -> list[list[int]]:
    """Greedy CTC decoding of frame class ids: merge repeats, then drop blanks.

    ids: (B, T) class ids (e.g. ``logits.argmax(-1)``); lengths: (B,) valid frames per row
    (frames past a row's length are ignored). ``[5, 5, blank, 5, 7, 7]`` -> ``[5, 5, 7]``.
    """
    if ids.dim() != 2 or lengths.shape != ids.shape[:1]:
        raise ValueError(f"ids must be (B, T) and lengths (B,), got {tuple(ids.shape)} "
                         f"and {tuple(lengths.shape)}")
    valid = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths.to(ids.device)[:, None]
    start = torch.full_like(ids[:, 0], blank)
    return _split_rows(ids, _collapse_keep(ids, start, blank) & valid)


# ----------------------------------------------------------------------- unit strings


_UNITS_RE = re.compile(r"(?:<\d+>)*")
_UNIT_RE = re.compile(r"<(\d+)>")


def format_units(units: list[int]) -> str:
    """``[12, 873]`` -> ``"<12><873>"`` (the ``tgt_unit`` format of the data)."""
    for i, u in enumerate(units):
        if isinstance(u, bool) or not isinstance(u, int) or u < 0:
            raise ValueError(f"unit {i} is {u!r}; units must be non-negative ints")
    return "".join(f"<{u}>" for u in units)


def parse_units(s: str, n_units: int | None = None) -> list[int]:
    """``"<12><873>"`` -> ``[12, 873]``; surrounding whitespace is ignored, ``""`` -> ``[]``.

    Raises ValueError naming the character offset of the first malformed piece, and (when
    ``n_units`` is given) any unit id outside ``[0, n_units)``.
    """
    text = s.strip()
    if not _UNITS_RE.fullmatch(text):
        pos = 0
        while (m := _UNIT_RE.match(text, pos)) is not None:
            pos = m.end()
        raise ValueError(f"malformed unit string at offset {pos}: {text[pos:pos + 20]!r} "
                         "(expected a sequence like '<12><873>')")
    units = [int(u) for u in _UNIT_RE.findall(text)]
    if n_units is not None:
        bad = [u for u in units if u >= n_units]
        if bad:
            raise ValueError(f"unit id {bad[0]} out of range [0, {n_units})")
    return units


# ------------------------------------------------------------------------- the module


class SpeechGenerator(nn.Module):
    """LLM hidden states -> per-frame unit logits (``n_units`` + blank), trained with CTC.

    input_proj (llm_hidden -> hidden), each state repeated ``upsample`` times, ``num_layers``
    causal Qwen2 decoder layers with 1-D RoPE, RMSNorm, head (hidden -> n_units + 1).
    ``rope_theta``: the official generator inherits the LLM's (LyraModel passes
    ``LyraConfig.generator_theta``); 10000 only for a generator built on its own.
    """

    def __init__(
        self,
        llm_hidden: int,
        hidden: int,
        *,
        num_heads: int,
        num_kv_heads: int,
        intermediate: int,
        num_layers: int = 2,
        upsample: int = 25,
        n_units: int = 1000,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 16384 * 25,
    ) -> None:
        super().__init__()
        if hidden % num_heads or (hidden // num_heads) % 2:
            raise ValueError(f"hidden={hidden} must split into num_heads={num_heads} heads "
                             "of even size (RoPE rotates pairs)")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of "
                             f"num_kv_heads={num_kv_heads}")
        if upsample < 1 or n_units < 1 or num_layers < 1:
            raise ValueError(f"upsample={upsample}, n_units={n_units}, num_layers={num_layers} "
                             "must all be >= 1")
        self.upsample = upsample
        self.n_units = n_units
        self.blank = n_units
        self.config = Qwen2Config(
            vocab_size=n_units + 1,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            max_position_embeddings=max_position_embeddings,
            rms_norm_eps=rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
            use_sliding_window=False,
            attention_dropout=0.0,
        )
        self.config._attn_implementation = "sdpa"
        self.input_proj = nn.Linear(llm_hidden, hidden)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(self.config, i) for i in range(num_layers))
        self.rotary_emb = Qwen2RotaryEmbedding(self.config)
        self.norm = Qwen2RMSNorm(hidden, eps=rms_norm_eps)
        self.head = nn.Linear(hidden, n_units + 1)

    def reset_parameters(self) -> None:
        """PyTorch's default init of every linear, ones for the RMS norms (what a freshly built
        generator has). :meth:`LyraModel.init_weights` calls it; the rotary table is a buffer,
        rebuilt apart (``LyraModel.init_buffers``)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
            elif isinstance(module, Qwen2RMSNorm):
                nn.init.ones_(module.weight)

    # -- shared trunk ------------------------------------------------------------------

    def _frames(self, hidden_states: Tensor) -> Tensor:
        """(B, N, llm_hidden) -> (B, N * upsample, hidden).

        Projecting before repeating is the same math as repeating first (the projection acts
        per frame) at 1/upsample of the cost.
        """
        x = self.input_proj(hidden_states.to(self.input_proj.weight.dtype))
        return x.repeat_interleave(self.upsample, dim=1)

    def _logits(self, frames: Tensor, start: int = 0, cache: DynamicCache | None = None) -> Tensor:
        """Run the layers over frames at positions ``start, start + 1, ...``; return logits.

        With an empty cache (or none) attention is plain causal (sdpa ``is_causal``). With a
        non-empty cache the query block sits after ``start`` cached keys; transformers' sdpa
        path would align ``is_causal`` top-left (and crop the keys), so an explicit boolean
        mask with the correct bottom-right alignment is passed instead.
        """
        t = frames.shape[1]
        positions = torch.arange(start, start + t, device=frames.device)[None, :]
        cos_sin = self.rotary_emb(frames, positions)
        mask = None
        if start > 0:
            keys = torch.arange(start + t, device=frames.device)
            mask = (keys[None, :] <= positions[0, :, None])[None, None]  # (1, 1, t, start + t)
        x = frames
        for layer in self.layers:
            x = layer(x, attention_mask=mask, past_key_values=cache,
                      use_cache=cache is not None, position_embeddings=cos_sin)
        return self.head(self.norm(x))

    # -- training ----------------------------------------------------------------------

    def forward(self, hidden_states: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """hidden_states (B, N, llm_hidden), lengths (B,) -> logits (B, N*upsample, n_units+1),
        frame lengths (B,) = lengths * upsample. Padding frames hold garbage; use the lengths."""
        if hidden_states.dim() != 3 or lengths.shape != hidden_states.shape[:1]:
            raise ValueError(f"hidden_states must be (B, N, D) and lengths (B,), got "
                             f"{tuple(hidden_states.shape)} and {tuple(lengths.shape)}")
        return self._logits(self._frames(hidden_states)), lengths * self.upsample

    def loss(self, hidden_states: Tensor, lengths: Tensor, units: Tensor,
             unit_lengths: Tensor) -> Tensor:
        """CTC loss, blank = n_units, computed in float32 (float64 stays float64).

        Reduction: each sample's negative log-likelihood is divided by its number of target
        units (at least 1), then averaged over the batch (torch's ``reduction="mean"``), so
        the loss is per unit and long answers do not dominate a batch.

        Raises ValueError (naming the sample) when a target cannot be aligned: more units
        plus repeated neighbours (which need a blank between them) than frames, or unit ids
        outside ``[0, n_units)``. ``zero_infinity`` stays False, so these never turn into a
        silent inf or zero. The checks cost one host sync per call.
        """
        n = hidden_states.shape[1]
        if units.dim() != 2 or units.shape[0] != hidden_states.shape[0] \
                or unit_lengths.shape != units.shape[:1]:
            raise ValueError(f"units must be (B, U) and unit_lengths (B,) with B = "
                             f"{hidden_states.shape[0]}, got {tuple(units.shape)} and "
                             f"{tuple(unit_lengths.shape)}")
        units = units.long()
        frame_lengths = lengths * self.upsample
        valid = torch.arange(units.shape[1], device=units.device)[None, :] < unit_lengths[:, None]
        repeats = (valid[:, 1:] & (units[:, 1:] == units[:, :-1])).sum(dim=1)
        need = unit_lengths + repeats
        bad_len = ((lengths < 0) | (lengths > n)
                   | (unit_lengths < 0) | (unit_lengths > units.shape[1]))
        bad_ids = (valid & ((units < 0) | (units >= self.n_units))).any(dim=1)
        too_long = need > frame_lengths
        if bool((bad_len | bad_ids | too_long).any()):
            self._raise_target_error(lengths, n, units, unit_lengths, repeats, valid,
                                     bad_len, bad_ids, too_long)

        logits, frame_lengths = self(hidden_states, lengths)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            log_probs = logits.to(dtype).log_softmax(dim=-1).transpose(0, 1)  # (T, B, C)
            nll = F.ctc_loss(log_probs, units.masked_fill(~valid, 0), frame_lengths,
                             unit_lengths, blank=self.blank, reduction="none",
                             zero_infinity=False)
        return (nll / unit_lengths.clamp(min=1).to(nll.dtype)).mean()

    def _raise_target_error(self, lengths: Tensor, n: int, units: Tensor, unit_lengths: Tensor,
                            repeats: Tensor, valid: Tensor, bad_len: Tensor, bad_ids: Tensor,
                            too_long: Tensor) -> None:
        """Raise the ValueError for the first bad sample (called only when there is one)."""
        b = int(torch.nonzero(bad_len | bad_ids | too_long)[0, 0])
        n_b, u_b = int(lengths[b]), int(unit_lengths[b])
        if bad_len[b]:
            raise ValueError(f"sample {b}: length {n_b} not in [0, {n}] or unit length {u_b} "
                             f"not in [0, {units.shape[1]}]")
        if bad_ids[b]:
            ids = units[b][valid[b]]
            u = int(ids[(ids < 0) | (ids >= self.n_units)][0])
            raise ValueError(f"sample {b}: unit id {u} out of range [0, {self.n_units})")
        raise ValueError(
            f"sample {b}: target of {u_b} units ({int(repeats[b])} adjacent repeats, each "
            f"needing a blank) needs {u_b + int(repeats[b])} frames, but {n_b} hidden states "
            f"x {self.upsample} = {n_b * self.upsample} frames")

    # -- inference ---------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, hidden_states: Tensor, lengths: Tensor) -> list[list[int]]:
        """Offline greedy (argmax) decode of whole sequences -> units per sample."""
        logits, frame_lengths = self(hidden_states, lengths)
        return ctc_collapse(logits.argmax(dim=-1), frame_lengths, self.blank)

    def stream(self, batch_size: int) -> UnitStream:
        """A streaming decoder with its own KV cache; feed it with ``UnitStream.step``."""
        return UnitStream(self, batch_size)


class UnitStream:
    """Greedy streaming decode, fed the hidden states of newly generated text tokens.

    Each ``step`` runs only the new ``upsample * n_new`` frames against the cached keys and
    values, and emits the units those frames complete. The collapse state (the last frame's
    class per sample) crosses steps, so feeding a sequence in any chunking yields exactly
    ``ctc_collapse(argmax(forward(all)))``, up to floating-point differences between the
    cached and the full attention computation.

    Samples that finish early are marked with ``active``: their frames are still computed
    (the batch advances together), their output is dropped, and they stay finished.
    """

    def __init__(self, generator: SpeechGenerator, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        param = generator.head.weight
        self.generator = generator
        self.batch_size = batch_size
        self.cache = DynamicCache(config=generator.config)
        self.frames_seen = 0
        self._prev = torch.full((batch_size,), generator.blank, dtype=torch.long,
                                device=param.device)
        self._finished = torch.zeros(batch_size, dtype=torch.bool, device=param.device)
        self._units: list[list[int]] = [[] for _ in range(batch_size)]

    @property
    def units(self) -> list[list[int]]:
        """All units emitted so far, per sample (copies)."""
        return [list(u) for u in self._units]

    @torch.no_grad()
    def step(self, hidden: Tensor, active: Tensor | None = None) -> list[list[int]]:
        """hidden (B, n_new, llm_hidden) -> the new units per sample ([] for finished ones).

        ``active`` (B,) bool marks samples still generating; a sample marked inactive once is
        finished for good (its cached frames are no longer its own), and marking it active
        again raises.
        """
        gen = self.generator
        if hidden.dim() != 3 or hidden.shape[0] != self.batch_size or hidden.shape[1] < 1:
            raise ValueError(f"hidden must be ({self.batch_size}, n_new >= 1, llm_hidden), "
                             f"got {tuple(hidden.shape)}")
        device = self._prev.device
        if active is not None:
            active = active.to(device=device, dtype=torch.bool)
            if active.shape != (self.batch_size,):
                raise ValueError(f"active must be ({self.batch_size},), got {tuple(active.shape)}")
            if bool((active & self._finished).any()):
                raise ValueError("a finished (inactive) sample cannot become active again")
            self._finished |= ~active
        frames = gen._frames(hidden.to(device))
        ids = gen._logits(frames, self.frames_seen, self.cache).argmax(dim=-1)
        self.frames_seen += frames.shape[1]
        keep = _collapse_keep(ids, self._prev, gen.blank) & ~self._finished[:, None]
        self._prev = ids[:, -1]
        new = _split_rows(ids, keep)
        for mine, more in zip(self._units, new):
            mine.extend(more)
        return new
