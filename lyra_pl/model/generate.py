"""Batched generation with a KV cache that LMME has shrunk, and streaming speech units.

Prefill runs the full layer loop once (LMME prunes there); each decoding step then feeds one
token per sample through :func:`~lyra_pl.model.decoder.decode_step`, where the layers after
each pruning point attend to their smaller caches. New tokens continue each sample's original
M-RoPE positions (the largest position of its prompt + 1), whatever was pruned.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import StopStringCriteria

from lyra_pl.model.decoder import DecoderCache, decode_step
from lyra_pl.model.inputs import LyraInputs


@dataclass
class GenerationOutput:
    """tokens: per sample, the generated ids (up to and including a stop/eos token).
    units: per sample, the speech units streamed alongside (None unless ``speech=True``).
    kept: per pruning step, (B,) tokens each sample kept in the prefill (LMME)."""

    tokens: list[list[int]]
    units: list[list[int]] | None
    kept: list[Tensor]


def _warpers(temperature: float, top_k: int | None, top_p: float | None) -> LogitsProcessorList:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    out = LogitsProcessorList()
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(temperature))
    if top_k:
        out.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        out.append(TopPLogitsWarper(top_p))
    return out


def _ends_with(seq: Tensor, stops: Sequence[Sequence[int]]) -> Tensor:
    """(B,) whether each row of ``seq`` (B, L) ends with one of the id sequences."""
    hit = torch.zeros(seq.shape[0], dtype=torch.bool, device=seq.device)
    for stop in stops:
        n = len(stop)
        if 0 < n <= seq.shape[1]:
            hit |= (seq[:, -n:] == torch.as_tensor(stop, device=seq.device)).all(1)
    return hit


def _all_done(done: Tensor, synced: bool) -> bool:
    """Whether every sample has finished; with ``synced``, on every rank of the default process
    group (a sharded model must run the same number of decoding steps everywhere, or its
    parameter all-gathers would wait forever)."""
    if not synced or not torch.distributed.is_initialized():
        return bool(done.all())
    flag = done.all().to(torch.int32).reshape(1)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def generate(
    model: Any,
    inputs: LyraInputs,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_ids: Sequence[int] | None = None,
    stop_token_ids: Sequence[Sequence[int]] = (),
    stop_strings: Sequence[str] = (),
    tokenizer: Any = None,
    generator: torch.Generator | None = None,
    speech: bool = False,
    synced: bool = False,
    on_step: Callable[[list[int | None], list[list[int]] | None], None] | None = None,
) -> GenerationOutput:
    """Generates up to ``max_new_tokens`` per sample, greedy or sampled.

    A sample stops at an eos token (default: the config's), at one of ``stop_token_ids``
    sequences, or at one of ``stop_strings`` (needs ``tokenizer``; transformers'
    ``StopStringCriteria`` handles strings that span tokens). ``speech=True`` streams units from
    the speech generator as tokens are produced; ``on_step(new_tokens, new_units)`` is called
    after each step (None for finished samples). ``synced=True`` (a sharded model) keeps every
    rank decoding until the samples of all ranks have finished.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer")
    cfg = model.config
    eos = list(cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)
    warpers = _warpers(temperature, top_k, top_p) if do_sample else None
    string_stop = StopStringCriteria(tokenizer, list(stop_strings)) if stop_strings else None

    model.activate_adapters(inputs)
    assembled, _ = model.prepare(inputs)
    cache = DecoderCache()
    state, keeps = model.run_decoder(assembled, cache)
    B = state.hidden.shape[0]
    device = state.hidden.device
    rows = torch.arange(B, device=device)
    last = state.hidden[rows, state.lengths - 1]  # (B, H): every prompt ends with text
    position = assembled.next_position.clone()
    stream = model.speech_generator.stream(B) if speech else None

    out = torch.empty(B, 0, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    count = torch.zeros(B, dtype=torch.long, device=device)  # tokens generated per sample
    eos_ids = torch.as_tensor(eos, dtype=torch.long, device=device)
    # Placeholders stand for media inputs; the model must never produce one.
    banned = torch.tensor(list(cfg.placeholder_ids.values()), device=device)
    for step in range(max_new_tokens):
        logits = model.lm_head(last).float()
        logits[:, banned] = float("-inf")
        if do_sample:
            logits = warpers(out, logits)
            token = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
        else:
            token = logits.argmax(-1)
        active = ~done
        token = token.masked_fill(done, cfg.pad_token_id)
        out = torch.cat([out, token[:, None]], dim=1)
        count += active
        finished = torch.isin(token, eos_ids) | _ends_with(out, stop_token_ids)
        if string_stop is not None:
            finished |= string_stop(out, logits)
        done = done | (finished & active)
        new_units = None
        all_done = _all_done(done, synced)
        if stream is not None or (step + 1 < max_new_tokens and not all_done):
            # Feed the token: its hidden state gives the next logits and its speech units.
            hidden = decode_step(
                model.llm, model.llm.embed_tokens(token)[:, None],
                position.view(1, B, 1).expand(3, B, 1), cache,
            )
            position += 1
            last = hidden[:, 0]
            if stream is not None:
                new_units = stream.step(hidden, active=active)
        if on_step is not None:
            on_step([t if a else None for t, a in zip(token.tolist(), active.tolist())], new_units)
        if all_done:
            break

    tokens = [row[:n] for row, n in zip(out.tolist(), count.tolist())]
    kept = [keep.sum(1) for keep in keeps]
    return GenerationOutput(tokens, stream.units if stream is not None else None, kept)
