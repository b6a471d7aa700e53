"""Per-GPU memory ESTIMATE for a training stage (parameters, gradients, optimizer, activations).

``lyra-pl plan --preset pro --nodes 4 --gpus-per-node 8 --seq-len 8192 [--stage 2] [--json]``,
or ``lyra-pl plan --config configs/pro/stage2_joint_sft.yaml [--gpu-memory 80]`` (every setting
from the stage config), each ending with whether it fits a GPU of ``--gpu-memory`` GiB.
``--context-parallel R`` (or the stage's ``model.init_args.context_parallel``) estimates a run
with context parallelism of degree R.

Arithmetic only: nothing is allocated or measured. The model it assumes is the one
:mod:`lyra_pl.training.parallelize` builds (FSDP2 ``fully_shard`` per decoder layer, each
speech-generator layer as a unit, the frozen ViT and Whisper encoder replicated, and the root
-- embeddings, lm_head, final norm, projectors, generator input/output layers -- kept unsharded
after forward), with bf16 compute and AdamW. Every assumption is listed in
:attr:`MemoryPlan.assumptions` and printed under the table.

Activation model (bytes per token per decoder layer, bf16, ideal autograd: only the tensors
backward needs, fused RMSNorm, SDPA/flash attention with GQA-native K/V, no dropout)::

    attention: norm input 2h + q/k/v input 2h + q 2h + k,v 2*2*kv_dim + attention output 2h
               + logsumexp 4*heads (fp32)
    MLP (SwiGLU): norm input 2h + gate/up input 2h + gate 2I + up 2I + down input 2I
    total    = 12h + 4*kv_dim + 6I + 4*heads         (Pro: 280,064 B ~ 34.2h)

i.e. the "34 s b h" of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", without the 5 a s^2 b term that flash attention removes and without
dropout masks), recounted for GQA and Qwen2's SwiGLU MLP. With ``attn_implementation="eager"``
the softmax probabilities add 6*heads*s bytes per token (fp32 softmax + its bf16 copy).
Per-layer checkpointing keeps each layer's input (2h per token) plus one layer's full
activations during its recomputation.

Context parallelism of degree R (CP; R = 1 is off, and then nothing below applies): a CP group
is R consecutive ranks within one node (R divides the GPUs per node), there are world / R
data-parallel replicas, and each group trains on one micro-batch split along the sequence.
FSDP2 shards over the same ranks as without CP, so parameter, gradient and optimizer bytes do
not change. Each block's sequence is padded to a multiple of 2R and split zig-zag, so a rank
holds 1/R of every per-token activation (stored and checkpointed layer inputs), and computes
the cross-entropy over 1/R of the answer positions. CP adds all-gathers, counted in one row of
the table as the largest of them (they happen at different times, so they are not summed):
each layer's K and V over the full (padded) sequence, 4*kv_dim bytes per token, kept for
backward in every layer without checkpointing and one layer at a time with it; at each LMME
pruning point the sequence's hidden states, gathered and compacted, 2h*(S_before + S_after);
the full assembled input embeddings every rank builds before taking its share, 2h*seq_len.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from typing import Any

from lyra_pl.keep_count import keep_count

GIB = 2**30
STAGE_SEQ_LEN = {1: 2048, 2: 8192, 3: 131072, 4: 16384}
"""Default ``--seq-len`` per stage: the stage's max length in docs/method.md."""
STAGE_LORA_RANK = {1: 0, 2: 64, 3: 128, 4: 0}
STAGE_FRACTIONS = {3: (0.95, 0.01)}
"""Default ``--context-fraction`` / ``--answer-fraction`` of a stage (others: 0.9 / 1.0, the
upper bound): a stage-3 sample is a long recording with a short question and answer (2 h of
speech is 72,000 tokens; a 1,311-token question and answer is 1% of 131,072)."""
STAGE_ADAPTERS = {1: 0, 2: 2, 3: 1, 4: 0}  # LoRA adapters trained: stage 2 speech + sound
STAGE_TRAINABLE = {
    1: "speech projector",
    2: "speech + sound projectors + speech and sound LoRA r64 (q,k,v,o,gate,up,down)",
    3: "speech projector + LoRA r128 (q,k,v,o,gate,up,down)",
    4: "speech generator (LLM frozen, run without grad)",
}
SHARDINGS = ("hybrid", "full")

_COUNTS_CACHE: dict[str, dict[str, int]] = {}


@dataclass
class MemoryPlan:
    """Per-GPU memory estimate, in bytes, of one training step. Not a measurement."""

    # inputs
    preset: str
    stage: int
    nodes: int
    gpus_per_node: int
    seq_len: int
    micro_batch: int
    sharding: str
    lmme: tuple[int, float] | None
    shard_size: int  # GPUs a parameter is sharded over
    # counts
    total_params: int
    trainable_params: int  # including LoRA
    lora_params: int
    # bytes per GPU
    params_sharded: int  # fp32 master copy of every parameter but the frozen encoders, sharded
    params_gathered: int  # transient bf16 unsharded units (root + 2 x largest unit)
    params_replicated: int  # the frozen ViT and Whisper encoder, bf16, whole on every GPU
    params: int  # params_sharded + params_gathered + params_replicated
    lora: int  # fp32 LoRA weights, sharded
    grads: int  # fp32, trainable only, sharded
    optimizer: int  # AdamW exp_avg + exp_avg_sq, fp32, trainable only, sharded
    activations: int  # stored for backward, no checkpointing
    activations_checkpointed: int  # per-layer activation checkpointing
    logits: int  # lm_head output + fp32 cross-entropy over the answer positions
    total: int
    total_checkpointed: int
    tokens_per_layer: list[int] = field(default_factory=list)  # per micro-batch row, global
    # context parallelism (all 0 but context_parallel / data_parallel when it is off)
    context_parallel: int = 1  # CP degree R: ranks one micro-batch's sequence is split over
    data_parallel: int = 0  # data-parallel replicas = nodes x gpus_per_node / R
    cp_kv_gather: int = 0  # gathered K/V, all layers (kept for backward without AC)
    cp_kv_gather_checkpointed: int = 0  # gathered K/V of one layer (per-layer AC)
    cp_lmme_gather: int = 0  # hidden states gathered + compacted at the largest pruning point
    cp_input_gather: int = 0  # full assembled input embeddings on every rank
    cp_transient: int = 0  # max of the three above without AC: in `total`
    cp_transient_checkpointed: int = 0  # max with per-layer AC: in `total_checkpointed`
    assumptions: list[str] = field(default_factory=list)
    estimate: bool = True  # always: these numbers are computed, never measured

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lmme"] = list(self.lmme) if self.lmme else None
        return d


# ---------------------------------------------------------------------------- counting
def _counts(config) -> dict[str, int]:
    from lyra_pl.model.info import parameter_counts

    key = json.dumps(config.to_dict(), sort_keys=True, default=str)
    if key not in _COUNTS_CACHE:
        _COUNTS_CACHE[key] = parameter_counts(config)
    return _COUNTS_CACHE[key]


def _qwen2_layer_params(h: int, heads: int, kv_heads: int, inter: int) -> int:
    """One Qwen2 decoder layer: q/k/v with bias, o without, SwiGLU MLP, two RMSNorms."""
    kv = kv_heads * (h // heads)
    return (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * inter + 2 * h


def decoder_layer_params(config) -> int:
    return _qwen2_layer_params(config.hidden_size, config.num_heads, config.num_kv_heads,
                               config.intermediate_size)


def lora_params_per_layer(config, rank: int) -> int:
    """LoRA A (r x in) + B (out x r) on q,k,v,o,gate,up,down of one decoder layer."""
    h, inter = config.hidden_size, config.intermediate_size
    kv = config.num_kv_heads * config.head_dim
    return rank * (9 * h + 2 * kv + 3 * inter)


def _act_bytes_per_token(h: int, heads: int, kv_heads: int, inter: int, eager_seq: int,
                         lora_rank: int = 0, frozen_linears: bool = False) -> int:
    kv = kv_heads * (h // heads)
    b = 12 * h + 4 * kv + 6 * inter + 4 * heads
    if frozen_linears:  # autograd saves no input of a Linear whose weight needs no grad
        b -= 4 * h
    b += 7 * 2 * lora_rank  # LoRA: the r-wide A(x) of each of the 7 targets
    if eager_seq:
        b += 6 * heads * eager_seq
    return b


def lmme_tokens_per_layer(config, seq_len: int, lmme: tuple[int, float] | None,
                          context_fraction: float) -> list[int]:
    """Tokens each decoder layer sees. Before the first pruning point all ``seq_len``; after
    each pruning point the context tokens shrink to ``keep_count(ctx, rho, min_keep)``, what
    ``select_tokens`` keeps; text tokens (``seq_len - round(context_fraction * seq_len)``) are
    never pruned."""
    L = config.num_layers
    if not lmme:
        return [seq_len] * L
    n, rho = lmme
    prune_after = set(config.replace(lmme_blocks=n, lmme_keep_ratio=rho).lmme_layers())
    ctx = round(context_fraction * seq_len)
    text = seq_len - ctx
    out = []
    for i in range(L):
        out.append(text + ctx)
        if i in prune_after:
            ctx = keep_count(ctx, rho, config.lmme_min_keep)
    return out


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def cp_local_tokens(n: int, cp: int) -> int:
    """Tokens one of ``cp`` context-parallel ranks holds of a sequence of ``n``: the sequence
    padded to a multiple of ``2 * cp`` (the zig-zag split's 2R chunks), 1/cp of that. With
    ``cp == 1`` (no context parallelism) all ``n``, unpadded."""
    return n if cp == 1 else _ceil_div(n, 2 * cp) * 2


# ---------------------------------------------------------------------------- estimate
def estimate(
    config,
    stage: int,
    nodes: int,
    gpus_per_node: int,
    seq_len: int,
    micro_batch: int = 1,
    sharding: str = "hybrid",
    lmme: tuple[int, float] | None = None,
    *,
    context_fraction: float = 0.9,
    answer_fraction: float = 1.0,
    context_parallel: int = 1,
) -> MemoryPlan:
    """Per-GPU memory estimate of one training step of ``stage`` (1-4).

    ``lmme=(n_blocks, keep_ratio)`` prunes context tokens at the end of each block; which share
    of the sequence is context is unknown from shapes alone: ``context_fraction`` (default 0.9:
    10% instruction/answer text, never pruned). ``answer_fraction`` is the share of positions
    whose logits enter the cross-entropy (default 1.0: an upper bound, as if lm_head ran over
    every position); in stage 4 it is also the share of positions the speech generator
    upsamples. ``context_parallel`` is the CP degree R (1: off); the module docstring says
    what it changes.
    """
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(msg)

    def pos_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    need(stage in STAGE_TRAINABLE, f"stage must be 1, 2, 3 or 4, got {stage!r}")
    need(pos_int(nodes), f"nodes must be a positive int, got {nodes!r}")
    need(pos_int(gpus_per_node), f"gpus_per_node must be a positive int, got {gpus_per_node!r}")
    need(pos_int(seq_len), f"seq_len must be a positive int, got {seq_len!r}")
    need(pos_int(micro_batch), f"micro_batch must be a positive int, got {micro_batch!r}")
    need(sharding in SHARDINGS, f"sharding must be 'hybrid' or 'full', got {sharding!r}")
    need(0.0 <= context_fraction <= 1.0, f"context_fraction must be in [0, 1], got "
         f"{context_fraction!r}")
    need(0.0 < answer_fraction <= 1.0, f"answer_fraction must be in (0, 1], got "
         f"{answer_fraction!r}")
    need(pos_int(context_parallel), f"context_parallel must be an int >= 1, got "
         f"{context_parallel!r}")
    # A CP group is R consecutive ranks within one node. R dividing the GPUs per node also
    # makes the world (nodes x gpus_per_node) a multiple of R.
    need(gpus_per_node % context_parallel == 0,
         f"context_parallel {context_parallel} must divide gpus_per_node {gpus_per_node}: a "
         f"CP group's ranks are consecutive and sit within one node")
    if lmme is not None:
        need(len(lmme) == 2, f"lmme must be (n_blocks, keep_ratio), got {lmme!r}")
        n, rho = lmme
        need(pos_int(n) and n <= config.num_layers,
             f"LMME n_blocks must be an int in [1, num_layers={config.num_layers}], got {n!r}")
        need(isinstance(rho, (int, float)) and 0.0 < rho <= 1.0,
             f"LMME keep_ratio must be in (0, 1], got {rho!r}")
        lmme = (int(n), float(rho))

    counts = _counts(config)
    h, L, V = config.hidden_size, config.num_layers, config.vocab_size
    shard = gpus_per_node if sharding == "hybrid" else nodes * gpus_per_node
    b = micro_batch
    notes: list[str] = ["ESTIMATE from shapes and the formulas below; nothing was measured."]

    # --- parameters
    total = counts["total"]
    rank = STAGE_LORA_RANK[stage]
    lora_layer = lora_params_per_layer(config, rank) * STAGE_ADAPTERS[stage] if rank else 0
    lora_n = lora_layer * L
    layer_n = decoder_layer_params(config)
    gen_layer_n = _qwen2_layer_params(config.generator_hidden, config.generator_heads,
                                      config.generator_kv_heads, config.generator_intermediate)
    root_n = (total - L * layer_n - counts["vision"] - counts["audio_encoder"]
              - config.generator_layers * gen_layer_n)
    units = {"decoder layer": layer_n + lora_layer, "generator layer": gen_layer_n}
    largest = max(units, key=units.get)
    encoders_n = counts["vision"] + counts["audio_encoder"]
    params_sharded = _ceil_div(4 * (total - encoders_n), shard)
    params_gathered = 2 * root_n + 2 * 2 * units[largest]
    params_replicated = 2 * encoders_n
    lora_bytes = _ceil_div(4 * lora_n, shard)
    notes.append(
        f"params: fp32 master copy of the {total - encoders_n:,} parameters outside the "
        f"encoders (frozen ones included) sharded over {shard} GPUs ({sharding} sharding), "
        f"plus bf16 all-gathered copies of the root unit ({root_n:,}: embeddings, lm_head, "
        f"norm, projectors, generator in/out; kept unsharded after forward) and 2 x the "
        f"largest other unit ({largest}, {units[largest]:,}; current + prefetched), plus the "
        f"frozen ViT and Whisper encoder ({encoders_n:,}) replicated in bf16 on every GPU "
        f"(an encoder runs only for batches with its modality, so it is not sharded)."
    )

    # --- trainable: grads and optimizer
    if stage == 4:
        trainable = counts["speech_generator"]
    else:
        trainable = counts["speech_projector"] + lora_n
        if stage == 2:
            trainable += counts["sound_projector"]
    grads = _ceil_div(4 * trainable, shard)
    optimizer = _ceil_div(2 * 4 * trainable, shard)
    notes.append(
        f"trainable (stage {stage}): {STAGE_TRAINABLE[stage]} = {trainable:,} parameters; "
        f"grads fp32 and AdamW exp_avg/exp_avg_sq fp32, sharded like the params. Whisper "
        f"encoder and ViT frozen and run without grad (no stored activations)."
    )
    if rank:
        notes.append(f"LoRA r{rank}: r*(9h + 2*kv_dim + 3I) per adapter x "
                     f"{STAGE_ADAPTERS[stage]} adapter(s) = {lora_layer:,} per layer, fp32; "
                     f"activations count one adapter per token.")

    # --- activations
    eager = seq_len if config.attn_implementation == "eager" else 0
    per_tok = _act_bytes_per_token(h, config.num_heads, config.num_kv_heads,
                                   config.intermediate_size, eager, lora_rank=rank,
                                   frozen_linears=(stage == 1))
    tokens = lmme_tokens_per_layer(config, seq_len, lmme, context_fraction)
    n_answer = max(1, round(answer_fraction * seq_len))
    R = context_parallel
    local = [cp_local_tokens(t, R) for t in tokens]  # tokens per rank at each layer
    if stage == 4:
        # LLM under no_grad: nothing stored; the generator's layers train on upsampled tokens.
        g_tok = n_answer * config.generator_upsample
        g_per_tok = _act_bytes_per_token(
            config.generator_hidden, config.generator_heads, config.generator_kv_heads,
            config.generator_intermediate, g_tok if eager else 0)
        G = config.generator_layers
        activations = b * g_tok * g_per_tok * G
        activations_ckpt = b * g_tok * (2 * config.generator_hidden * G + g_per_tok)
        logits = b * g_tok * (config.n_units + 1) * 10
        notes.append(
            f"stage 4: the LLM runs without grad (no stored LLM activations, no LLM logits); "
            f"the speech generator's {G} layers see answer_fraction x seq_len x "
            f"{config.generator_upsample} = {g_tok:,} upsampled positions; CTC logits over "
            f"{config.n_units + 1} classes at 10 B/element."
        )
    else:
        activations = b * per_tok * sum(local)
        activations_ckpt = b * (2 * h * sum(local) + per_tok * max(local))
        logits = b * _ceil_div(n_answer, R) * V * 10
        notes.append(
            f"logits: {n_answer:,} answer positions (answer_fraction {answer_fraction:g}"
            f"{', an upper bound: lm_head over every position' if answer_fraction == 1 else ''})"
            f"{f' / CP {R} = {_ceil_div(n_answer, R):,} per rank' if R > 1 else ''}"
            f" x vocab {V:,} x 10 B (bf16 logits 2 + fp32 upcast 4 + fp32 log-softmax saved "
            f"for backward 4)."
        )
    adj = {1: " - 4h (stage 1: frozen q/k/v and gate/up inputs are not saved)",
           2: " + 14r (LoRA A outputs)", 3: " + 14r (LoRA A outputs)"}.get(stage, "")
    notes.append(
        f"activations per decoder layer per token: 12h + 4*kv_dim + 6I + 4*heads{adj} = "
        f"{per_tok:,} B"
        f" (~{per_tok / h:.1f}h; Korthikanti et al. 2022's 34h with SDPA/flash attention, no "
        f"dropout, recounted for GQA and SwiGLU"
        f"{'; + 6*heads*s for eager softmax' if eager else ''}); ideal autograd -- HF's fp32 "
        f"RMSNorm upcast and other temporaries can add more."
    )
    notes.append("checkpointing: per decoder layer, keeps each layer's bf16 input (2h per token)"
                 " plus one layer's full activations during recomputation.")
    if lmme:
        notes.append(
            f"LMME{lmme}: context_fraction {context_fraction:g} of the tokens are context "
            f"(pruned to keep_ratio at each block end, at least {config.lmme_min_keep}); the "
            f"rest is text, never pruned. Tokens per layer {tokens[0]:,} -> {tokens[-1]:,} "
            f"(mean {sum(tokens) / L:,.0f}). Scoring temporaries at pruning points not counted."
        )
    cp = _cp_gathers(config, stage, b, seq_len, tokens, lmme, R)
    if R > 1:
        notes += _cp_notes(config, stage, b, seq_len, gpus_per_node, nodes * gpus_per_node,
                           shard, local, R, n_answer, cp)
    notes.append("not counted: CUDA context / NCCL buffers (~1-3 GiB), allocator fragmentation,"
                 " transient encoder (ViT/Whisper) forward activations, unsharded gradient "
                 "buffers during reduce-scatter, batch inputs.")
    if seq_len > config.max_position_embeddings:
        notes.append(f"seq_len {seq_len:,} exceeds the preset's max_position_embeddings "
                     f"{config.max_position_embeddings:,}.")

    fixed = params_sharded + params_gathered + params_replicated + lora_bytes + grads + optimizer + logits
    return MemoryPlan(
        preset=config.preset, stage=stage, nodes=nodes, gpus_per_node=gpus_per_node,
        seq_len=seq_len, micro_batch=micro_batch, sharding=sharding, lmme=lmme,
        shard_size=shard, total_params=total, trainable_params=trainable, lora_params=lora_n,
        params_sharded=params_sharded, params_gathered=params_gathered,
        params_replicated=params_replicated,
        params=params_sharded + params_gathered + params_replicated, lora=lora_bytes, grads=grads,
        optimizer=optimizer, activations=activations,
        activations_checkpointed=activations_ckpt, logits=logits,
        total=fixed + activations + cp["cp_transient"],
        total_checkpointed=fixed + activations_ckpt + cp["cp_transient_checkpointed"],
        tokens_per_layer=tokens, assumptions=notes,
        context_parallel=R, data_parallel=nodes * gpus_per_node // R, **cp,
    )


def _cp_gathers(config, stage: int, b: int, seq_len: int, tokens: list[int],
                lmme: tuple[int, float] | None, R: int) -> dict[str, int]:
    """Bytes per GPU of what context parallelism all-gathers (all 0 when ``R == 1``)."""
    names = ("cp_kv_gather", "cp_kv_gather_checkpointed", "cp_lmme_gather", "cp_input_gather",
             "cp_transient", "cp_transient_checkpointed")
    if R == 1:
        return dict.fromkeys(names, 0)
    h, kv = config.hidden_size, config.num_kv_heads * config.head_dim
    gathered = [R * cp_local_tokens(t, R) for t in tokens]  # padded global tokens per layer
    # K and V, bf16, over the full sequence. With grad, SDPA keeps them for backward in every
    # layer; stage 4's LLM runs without grad, so one layer's exist at a time either way.
    kv_one = b * 2 * 2 * kv * max(gathered)
    kv_all = kv_one if stage == 4 else b * 2 * 2 * kv * sum(gathered)
    lmme_g = 0
    if lmme:
        prune_after = config.replace(lmme_blocks=lmme[0], lmme_keep_ratio=lmme[1]).lmme_layers()
        lmme_g = max((b * 2 * h * (gathered[i] + tokens[i + 1]) for i in prune_after),
                     default=0)
    input_g = b * 2 * h * seq_len
    return dict(zip(names, (kv_all, kv_one, lmme_g, input_g, max(kv_all, lmme_g, input_g),
                            max(kv_one, lmme_g, input_g))))


def _cp_notes(config, stage: int, b: int, seq_len: int, gpus_per_node: int, world: int,
              shard: int, local: list[int], R: int, n_answer: int,
              cp: dict[str, int]) -> list[str]:
    """The assumption lines of context parallelism, one per rule."""
    def gib(x: int) -> str:
        return f"{x / GIB:,.2f} GiB"

    kv = config.num_kv_heads * config.head_dim
    notes = [
        f"context parallelism: CP {R} = a group of {R} consecutive ranks within one node ({R} "
        f"divides {gpus_per_node} GPUs per node); {world} GPUs = {world // R} data-parallel "
        f"replicas x {R}; each CP group trains on the same micro-batch, split along the "
        f"sequence (keeping the global batch takes {R}x accumulate_grad_batches).",
        f"CP parameters: FSDP2 shards over the same {shard} GPUs as without CP (the CP ranks "
        f"are in the sharding group), so params, LoRA, grads and optimizer per GPU do not "
        f"change with CP.",
        f"CP sequence split: each block's sequence is padded to a multiple of 2R = {2 * R} and "
        f"split zig-zag (2R chunks, balanced for causal attention); a rank holds 1/R of its "
        f"tokens, {local[0]:,} -> {local[-1]:,} per layer, so every per-token activation above "
        f"(stored, and the checkpointed layer inputs) is per rank.",
        f"CP attention: each layer all-gathers K and V over the CP group, 2 x 2 B x kv_dim "
        f"{kv:,} x the padded global tokens at that layer = {gib(cp['cp_kv_gather_checkpointed'])}"
        f" at the longest layer, per micro-batch of {b}. "
        + ("Stage 4's LLM runs without grad, so only one layer's exists at a time in both "
           "columns." if stage == 4 else
           f"No AC: SDPA keeps the gathered K/V of every layer for backward, "
           f"{gib(cp['cp_kv_gather'])} (not divided by R; the rank's own K/V stay in the "
           f"per-token count); per-layer AC: one layer's at a time, in its forward or "
           f"recomputation."),
    ]
    if cp["cp_lmme_gather"]:
        notes.append(
            f"CP LMME: at each pruning point the hidden states of the whole sequence are "
            f"all-gathered (2h x S_before) and compacted (2h x S_after) before each rank keeps "
            f"its new share: {gib(cp['cp_lmme_gather'])} at the largest pruning point.")
    notes.append(
        f"CP input: every rank assembles the full input embeddings of the micro-batch (2h x "
        f"seq_len {seq_len:,} x {b} = {gib(cp['cp_input_gather'])}) before taking its share; "
        f"the 30 s Whisper windows of speech are encoded across the CP ranks, 1/R each.")
    if stage == 4:
        notes.append("CP stage 4: the speech generator's upsampled positions and its CTC "
                     "logits are counted whole on every rank (not divided by R: an upper "
                     "bound).")
    else:
        notes.append(
            f"CP logits: each rank computes the cross-entropy over its local answer positions "
            f"only, {n_answer:,} / {R} = {_ceil_div(n_answer, R):,}; this assumes they are "
            f"spread evenly over the ranks (an answer contiguous at the end of the sequence "
            f"lies in one or two zig-zag chunks, so one rank may hold up to all of them).")
    parts = {"gathered K/V": (cp["cp_kv_gather"], cp["cp_kv_gather_checkpointed"]),
             "LMME gather": (cp["cp_lmme_gather"],) * 2,
             "input assembly": (cp["cp_input_gather"],) * 2}
    peak = max(parts, key=lambda k: parts[k][0])
    peak_ckpt = max(parts, key=lambda k: parts[k][1])
    notes.append(
        f"CP peak transient: the gathers happen at different times, so the 'CP all-gathers' "
        f"row is the largest one, not their sum: no AC {peak} "
        f"({gib(cp['cp_transient'])}), per-layer AC {peak_ckpt} "
        f"({gib(cp['cp_transient_checkpointed'])}); it is added on top of every stored "
        f"activation (an upper bound for the forward-time gathers, which come before later "
        f"layers store theirs).")
    return notes


# ---------------------------------------------------------------------------- output
def format_plan(plan: MemoryPlan) -> str:
    """A table in GiB (without / with per-layer activation checkpointing), assumptions below."""
    def g(x: int) -> str:
        return f"{x / GIB:,.2f}"

    lm = f"LMME{plan.lmme}" if plan.lmme else "LMME off"
    head = (f"Per-GPU memory ESTIMATE (computed, not measured): preset {plan.preset!r}, stage "
            f"{plan.stage}, {plan.nodes} node(s) x {plan.gpus_per_node} GPUs, {plan.sharding} "
            f"sharding (params sharded over {plan.shard_size} GPUs), seq_len {plan.seq_len:,}, "
            f"micro_batch {plan.micro_batch}, {lm}")
    if plan.context_parallel > 1:
        head += f", CP {plan.context_parallel} (data-parallel replicas {plan.data_parallel})"
    rows = [
        ("params (all three below)", plan.params, plan.params),
        ("  of which fp32 shard", plan.params_sharded, plan.params_sharded),
        ("  of which bf16 gathered units", plan.params_gathered, plan.params_gathered),
        ("  of which bf16 frozen encoders", plan.params_replicated, plan.params_replicated),
        ("lora (fp32, sharded)", plan.lora, plan.lora),
        ("grads (fp32, trainable, sharded)", plan.grads, plan.grads),
        ("optimizer (AdamW 2 x fp32, sharded)", plan.optimizer, plan.optimizer),
        ("activations (bf16, stored)", plan.activations, plan.activations_checkpointed),
        *([("CP all-gathers (largest)", plan.cp_transient, plan.cp_transient_checkpointed)]
          if plan.context_parallel > 1 else []),
        ("logits / cross-entropy", plan.logits, plan.logits),
        ("total", plan.total, plan.total_checkpointed),
    ]
    w = max(len(r[0]) for r in rows)
    lines = [head, "", f"{'GiB per GPU':<{w}}  {'no AC':>10}  {'per-layer AC':>12}",
             "-" * (w + 26)]
    for i, (name, a, c) in enumerate(rows):
        if name == "total":
            lines.append("-" * (w + 26))
        lines.append(f"{name:<{w}}  {g(a):>10}  {g(c):>12}")
    lines += ["", "Assumptions (estimate):"] + [f"- {n}" for n in plan.assumptions]
    return "\n".join(lines)


def _parse_lmme(text: str) -> tuple[int, float]:
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        n, rho = int(parts[0]), float(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected N,RHO (e.g. 4,0.7), got {text!r}") from None
    if n < 1 or not 0.0 < rho <= 1.0:
        raise argparse.ArgumentTypeError(f"need N >= 1 and 0 < RHO <= 1, got {text!r}")
    return n, rho


STAGE_CLASSES = {"SpeechAlignStage": 1, "JointSFTStage": 2, "LongSpeechStage": 3,
                 "SpeechGenStage": 4}


def settings_from_config(path: str) -> dict[str, Any]:
    """What a stage config sets that the estimate depends on: preset, stage, nodes, GPUs per
    node, sequence length (``data.max_length``), micro-batch, sharding, LMME (the stage's
    defaults under ``model_overrides``), activation checkpointing, and the context-parallel
    degree (``model.init_args.context_parallel``, only where the config sets it)."""
    from omegaconf import OmegaConf

    from lyra_pl.data.datamodule import resolve_path
    from lyra_pl.training.stages import STAGES

    cfg = OmegaConf.to_container(OmegaConf.load(resolve_path(path)), resolve=False)
    model, data, trainer = cfg.get("model", {}), cfg.get("data", {}), cfg.get("trainer", {})
    name = str(model.get("class_path", "")).rsplit(".", 1)[-1]
    if name not in STAGE_CLASSES:
        raise ValueError(f"{path}: model.class_path {model.get('class_path')!r} is not a stage "
                         f"the estimate covers ({', '.join(STAGE_CLASSES)})")
    stage, init = STAGE_CLASSES[name], model.get("init_args", {})
    lyra = {**STAGES[stage].model_defaults, **(init.get("model_overrides") or {})}
    devices = trainer.get("devices", 1)
    cp = ({"context_parallel": int(init["context_parallel"])}
          if init.get("context_parallel") is not None else {})
    return {"preset": init.get("preset"), "stage": stage,
            "nodes": int(trainer.get("num_nodes", 1)),
            "gpus_per_node": devices if isinstance(devices, int) else 1,
            "seq_len": data.get("max_length") or STAGE_SEQ_LEN[stage],
            "micro_batch": int(data.get("batch_size", 1)),
            "sharding": "hybrid" if init.get("hybrid_shard") else "full",
            "lmme": ((int(lyra["lmme_blocks"]), float(lyra.get("lmme_keep_ratio", 0.7)))
                     if lyra.get("lmme_blocks") else None),
            "activation_checkpointing": bool(init.get("activation_checkpointing")), **cp}


def verdict(plan: MemoryPlan, gpu_gib: float, checkpointed: bool | None) -> str:
    """Whether the estimate fits a GPU of ``gpu_gib``: with the config's activation
    checkpointing setting, or (None) with and without."""
    def one(total: int, how: str) -> str:
        fits = total <= gpu_gib * GIB
        return (f"{'fits' if fits else 'does NOT fit'} in {gpu_gib:g} GiB per GPU {how} "
                f"(estimate {total / GIB:,.1f} GiB)")

    if checkpointed is None:
        return "; ".join((one(plan.total, "without activation checkpointing"),
                          one(plan.total_checkpointed, "with it")))
    return one(plan.total_checkpointed if checkpointed else plan.total,
               "with activation checkpointing, as the config sets" if checkpointed else
               "without activation checkpointing, as the config sets")


def main(argv: list[str] | None = None) -> int:
    from lyra_pl.model.config import PRESETS, LyraConfig

    parser = argparse.ArgumentParser(
        prog="lyra-pl plan",
        description="Per-GPU memory estimate (params, grads, optimizer, activations with and "
                    "without checkpointing) of a training stage. Computed, not measured. "
                    "--config takes every setting from a stage config; flags override it.")
    parser.add_argument("--config", default=None,
                        help="a stage config (configs/<preset>/<stage>.yaml)")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS))
    parser.add_argument("--stage", type=int, default=None, choices=sorted(STAGE_TRAINABLE),
                        help="default 2")
    parser.add_argument("--nodes", type=int, default=None, help="default 1")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="default 8")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per sample (default: the stage's max length, "
                             + ", ".join(f"{s}: {n}" for s, n in STAGE_SEQ_LEN.items()) + ")")
    parser.add_argument("--micro-batch", type=int, default=None, help="default 1")
    parser.add_argument("--sharding", choices=SHARDINGS, default=None,
                        help="hybrid (default): shard within a node, replicate across nodes; "
                             "full: shard over all GPUs")
    parser.add_argument("--lmme", type=_parse_lmme, default=None, metavar="N,RHO")
    parser.add_argument("--context-parallel", type=int, default=None, metavar="R",
                        help="context-parallel degree: ranks of one node that split a "
                             "micro-batch's sequence (default 1: off)")
    parser.add_argument("--context-fraction", type=float, default=None,
                        help="share of tokens that are context (LMME prunes only those; "
                             "default 0.95 in stage 3, else 0.9)")
    parser.add_argument("--answer-fraction", type=float, default=None,
                        help="share of positions with a loss (default 0.01 in stage 3, else "
                             "1.0, an upper bound)")
    parser.add_argument("--gpu-memory", type=float, default=80.0,
                        help="GiB per GPU for the fits / does-not-fit verdict (default 80)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    given = {"preset": args.preset, "stage": args.stage, "nodes": args.nodes,
             "gpus_per_node": args.gpus_per_node, "seq_len": args.seq_len,
             "micro_batch": args.micro_batch, "sharding": args.sharding, "lmme": args.lmme,
             "context_parallel": args.context_parallel}
    settings: dict[str, Any] = {"stage": 2, "nodes": 1, "gpus_per_node": 8, "micro_batch": 1,
                                "sharding": "hybrid", "activation_checkpointing": None,
                                "context_parallel": 1}
    if args.config is not None:
        try:
            settings.update(settings_from_config(args.config))
        except (OSError, ValueError) as e:
            parser.error(str(e))
    settings.update({k: v for k, v in given.items() if v is not None})
    if settings.get("preset") not in PRESETS:
        parser.error(f"--preset (or --config) is required; one of {sorted(PRESETS)}")
    for name in ("nodes", "gpus_per_node", "micro_batch", "context_parallel"):
        if settings[name] < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {settings[name]}")
    seq_len = settings.get("seq_len") or STAGE_SEQ_LEN[settings["stage"]]
    if seq_len < 1:
        parser.error(f"--seq-len must be >= 1, got {seq_len}")
    context_fraction, answer_fraction = STAGE_FRACTIONS.get(settings["stage"], (0.9, 1.0))
    if args.context_fraction is not None:
        context_fraction = args.context_fraction
    if args.answer_fraction is not None:
        answer_fraction = args.answer_fraction
    try:
        plan = estimate(
            LyraConfig.from_preset(settings["preset"]), settings["stage"], settings["nodes"],
            settings["gpus_per_node"], seq_len, settings["micro_batch"], settings["sharding"],
            settings.get("lmme"), context_fraction=context_fraction,
            answer_fraction=answer_fraction, context_parallel=settings["context_parallel"])
    except ValueError as e:
        parser.error(str(e))
    fit = verdict(plan, args.gpu_memory, settings["activation_checkpointing"])
    if args.json:
        print(json.dumps({**plan.to_dict(), "gpu_memory_gib": args.gpu_memory, "verdict": fit}))
    else:
        print(format_plan(plan) + "\n\n" + fit[0].upper() + fit[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
