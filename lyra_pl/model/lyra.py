"""`LyraModel`: the encoders, projectors, Qwen2-VL decoder with LMME, LCMR and the speech
generator, as one plain ``nn.Module`` (no Lightning, nothing distributed)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.qwen2_vl.modeling_qwen2_vl import (
    Qwen2VisionTransformerPretrainedModel,
    Qwen2VLTextModel,
)

from lyra_pl.model import lora
from lyra_pl.model.assemble import IGNORE, IMAGE, SOUND, SPEECH, VIDEO, Assembled, Media, assemble
from lyra_pl.model.config import LyraConfig
from lyra_pl.model.decoder import DecoderCache, LyraDecoderLayer, run_layers
from lyra_pl.model.encoders import AudioEncoder
from lyra_pl.model.extractor import TokenState
from lyra_pl.model.inputs import LyraInputs
from lyra_pl.model.lcmr import lcmr_term, pad_sequences
from lyra_pl.model.projectors import SoundProjector, SpeechProjector
from lyra_pl.model.sequence_split import ATTENTION, SequenceSplit
from lyra_pl.model.speech_generator import SpeechGenerator


@dataclass
class LyraOutput:
    """What a forward pass returns.

    loss = ce_loss + lcmr_weight * lcmr_loss (the parts are returned for logging; a part is None
    when the batch has nothing for it). ``generator_loss``: the speech generator's CTC loss
    (stage 4), when unit targets were given; not part of ``loss``. ``state`` is the final token batch (after LMME), its
    ``hidden`` the final-norm hidden states; ``keeps`` the keep mask of each pruning step.
    Under a sequence split (:meth:`LyraModel.split_sequence`) the losses are the whole
    batch's on every rank, ``state`` and ``logits`` this rank's tokens only.
    """

    loss: Tensor | None
    ce_loss: Tensor | None
    lcmr_loss: Tensor | None
    logits: Tensor | None
    state: TokenState
    generator_loss: Tensor | None = None
    keeps: list[Tensor] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)
    tokens: int = 0  # valid tokens entering the decoder (host int)


class LyraModel(nn.Module):
    """Lyra: Qwen2-VL (decoder + ViT), a frozen Whisper encoder with the speech and sound
    projectors, and the CTC speech generator. Built from a :class:`LyraConfig`; use
    ``torch.device("meta")`` to build any preset in seconds.
    """

    def __init__(self, config: LyraConfig):
        super().__init__()
        config.validate()
        self.config = config
        device = torch.get_default_device()  # meta inside ``with torch.device("meta")``
        # Always built on the meta device, then allocated and initialized once by
        # init_weights: a model built here and one built on meta and materialized (FSDP2,
        # benchmarks) get the same weights from the same seed.
        with torch.device("meta"):
            self.llm = Qwen2VLTextModel(config.text_config())
            # Same modules and keys as transformers' layers; they can also return LMME's q/k.
            self.llm.layers = nn.ModuleList(
                LyraDecoderLayer(self.llm.config, i) for i in range(config.num_layers))
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            if config.tie_word_embeddings:
                self.lm_head.weight = self.llm.embed_tokens.weight
            self.visual = Qwen2VisionTransformerPretrainedModel(config.vision_config())
            self.audio_encoder = AudioEncoder(config.whisper_config(), config.audio_window_batch)
            self.speech_projector = SpeechProjector(
                config.audio_dim, config.hidden_size, config.speech_downsample,
                config.speech_projector_hidden,
            )
            self.sound_projector = SoundProjector(
                config.audio_dim, config.hidden_size, config.sound_tokens,
                config.sound_projector_hidden,
            )
            self.speech_generator = SpeechGenerator(
                llm_hidden=config.hidden_size,
                hidden=config.generator_hidden,
                num_layers=config.generator_layers,
                num_heads=config.generator_heads,
                num_kv_heads=config.generator_kv_heads,
                intermediate=config.generator_intermediate,
                upsample=config.generator_upsample,
                n_units=config.n_units,
                rms_norm_eps=config.rms_norm_eps,
                rope_theta=config.generator_theta,
            )
        self.audio_encoder.requires_grad_(False)  # Whisper stays frozen in every stage
        self.sequence_split: SequenceSplit | None = None
        if device.type != "meta":
            self.to_empty(device=device)
            self.init_weights(device)

    @classmethod
    def from_pretrained(
        cls,
        config: LyraConfig,
        qwen2vl: str | None = None,
        whisper: str | None = None,
        parts: str | None = None,
        adapters: tuple[str, ...] = (),
        dtype: torch.dtype | None = None,
    ) -> "LyraModel":
        """Builds the model on CPU (in ``dtype``, default float32) and loads local checkpoints:
        a Qwen2-VL directory (LLM + ViT), a Whisper directory (encoder), a directory of our
        saved parts, and LoRA adapter directories (peft format). Anything not given keeps its
        random initialization.

        The whole model is materialized on CPU first (Base: ~18 GB in bf16). For sharded
        training of large presets, build on the meta device and use the functions of
        :mod:`lyra_pl.model.loading`, which assign the loaded tensors."""
        from lyra_pl.model import loading
        from lyra_pl.model.checkpoints import check_checkpoints

        # Every field that changes the numbers and every file, before the model is built.
        check_checkpoints(config, qwen2vl, whisper)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype or previous)
        try:
            model = cls(config)
        finally:
            torch.set_default_dtype(previous)
        if qwen2vl is not None:
            loading.load_qwen2vl(model, qwen2vl)
        if whisper is not None:
            loading.load_whisper(model, whisper)
        if parts is not None:
            loading.load_parts(model, parts)
        for directory in adapters:
            lora.load_adapter(model.llm, directory)
        return model

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | str | None = None) -> None:
        """Initializes every parameter and buffer in place (shards included), the one rule for
        whatever no checkpoint fills: run by the constructor, and after ``to_empty`` on a model
        built on the meta device (:func:`lyra_pl.training.parallelize.materialize`).

        - the LLM with ``lm_head``, the ViT and the Whisper encoder: transformers'
          ``_init_weights`` of their pretrained-model classes, as transformers builds them
          (normal(0, 0.02) linears and embeddings, unit norms, sinusoidal Whisper positions);
        - the projectors and the speech generator: their ``reset_parameters`` (PyTorch's
          defaults, unit RMS norms);
        - LoRA adapters: peft's init of each adapter's config (B = 0: a new adapter is a no-op);
        - the rotary tables: :meth:`init_buffers` on ``buffer_device``.
        """
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.llm.embed_tokens.weight  # ``to_empty`` unties them
        else:
            self.llm._init_weights(self.lm_head)
        for part in (self.llm, self.visual, self.audio_encoder.whisper):
            part.apply(part._init_weights)  # children first, as transformers applies it
        for part in (self.speech_projector, self.sound_projector, self.speech_generator):
            part.reset_parameters()
        configs = getattr(self.llm, "peft_config", {})
        for module in self.llm.modules():
            if hasattr(module, "reset_lora_parameters"):
                for name, adapter in configs.items():
                    module.reset_lora_parameters(name, adapter.init_lora_weights)
        self.init_buffers(buffer_device)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Rebuilds the rotary tables, the only buffers, which checkpoints do not hold: needed
        after building on the meta device and loading (``assign=True``) or ``to_empty``.
        ``device``: default, the device of the input embeddings (CPU while they are meta)."""
        if device is None:
            weight = self.llm.embed_tokens.weight
            device = "cpu" if weight.is_meta else weight.device
        with torch.device(device):
            self.llm.rotary_emb = type(self.llm.rotary_emb)(self.llm.config)
            self.visual.rotary_pos_emb = type(self.visual.rotary_pos_emb)(self.visual.config)
            gen = self.speech_generator
            gen.rotary_emb = type(gen.rotary_emb)(gen.config)

    def split_sequence(self, split: SequenceSplit | None) -> None:
        """Context parallelism: training passes (:meth:`forward`) split each sample's sequence
        over ``split``'s group (:mod:`lyra_pl.model.sequence_split`); generation does not.
        None: back to whole sequences."""
        if split is not None and self.config.attn_implementation != "sdpa":
            raise ValueError("context parallelism needs attn_implementation 'sdpa', got "
                             f"{self.config.attn_implementation!r}")
        self.sequence_split = split
        self.llm.config._attn_implementation = (self.config.attn_implementation if split is None
                                                else ATTENTION)

    # ------------------------------------------------------------------ parts
    def components(self) -> dict[str, nn.Module]:
        """The named parts, in a fixed order (parameter counts, freezing, saving)."""
        return {
            "llm": self.llm,
            "lm_head": self.lm_head,
            "vision": self.visual,
            "audio_encoder": self.audio_encoder,
            "speech_projector": self.speech_projector,
            "sound_projector": self.sound_projector,
            "speech_generator": self.speech_generator,
        }

    def adapters_for(self, inputs: LyraInputs) -> list[str]:
        """The LoRA adapters a batch uses (multi-modality LoRA): chosen from its modalities."""
        return lora.select_adapters(inputs.modalities(), lora.adapter_names(self.llm))

    def activate_adapters(self, inputs: LyraInputs, adapters: list[str] | None = None) -> list[str]:
        """Activates the batch's adapters (default :meth:`adapters_for`) and returns them. Always
        set, also to none, so that a previous batch's adapter never leaks into this one."""
        adapters = self.adapters_for(inputs) if adapters is None else adapters
        if lora.adapter_names(self.llm):
            lora.set_active_adapters(self.llm, adapters)
        return adapters

    # ------------------------------------------------------------------ encoding
    def encode_media(self, inputs: LyraInputs, split: SequenceSplit | None = None
                     ) -> dict[int, Media]:
        """Runs each encoder once for all items of the batch. Token counts per item are
        derived on the host too (grids, clip lengths), so assembly reads nothing back.
        ``split``: the speech windows are encoded across its ranks, each a share, and every
        rank gets all their tokens."""
        media: dict[int, Media] = {}
        merge = self.config.spatial_merge_size
        sizes = inputs.host_sizes()
        for m, pix, grid in (
            (IMAGE, inputs.pixel_values, inputs.image_grid_thw),
            (VIDEO, inputs.pixel_values_videos, inputs.video_grid_thw),
        ):
            if pix is None:
                continue
            grids = sizes.grids[m]
            bad = [i for i, (_, h, w) in enumerate(grids) if h % merge or w % merge]
            if bad:
                raise ValueError(f"{'image' if m == IMAGE else 'video'} {bad[0]}: grid "
                                 f"{list(grids[bad[0]])} is not a multiple of the {merge}x{merge} merge")
            dtype = self.visual.patch_embed.proj.weight.dtype
            tokens = self.visual(pix.to(dtype), grid_thw=grid).pooler_output
            llm_grid = grid // torch.tensor([1, merge, merge], device=grid.device)
            host = tuple(t * (h // merge) * (w // merge) for t, h, w in grids)
            media[m] = Media(tokens, llm_grid.prod(1), llm_grid, host)
        if inputs.speech is not None:
            speech, encoder = inputs.speech, self.audio_encoder
            if split is None:
                tokens, counts = encoder.speech(speech, self.speech_projector)
            else:
                per_window = encoder.window_tokens(speech)
                shares = split.shares(len(per_window))
                local, counts = encoder.speech(speech, self.speech_projector, shares[split.rank])
                tokens = split.gather_rows(
                    local, [sum(per_window[w] for w in share) for share in shares])
            media[SPEECH] = Media(tokens, counts, host_counts=speech.host_num_tokens())
        if inputs.sound is not None:
            tokens, counts = self.audio_encoder.sound(inputs.sound, self.sound_projector)
            host = (self.config.sound_tokens,) * len(inputs.sound)
            media[SOUND] = Media(tokens, counts, host_counts=host)
        return media

    def prepare(self, inputs: LyraInputs, split: SequenceSplit | None = None
                ) -> tuple[Assembled, dict[int, Media]]:
        """Encodes the media and assembles the decoder's input batch (the whole batch, also
        under ``split``, where only the speech encoding is shared out)."""
        valid = torch.arange(inputs.input_ids.shape[1], device=inputs.input_ids.device) < inputs.lengths[:, None]
        ids = inputs.input_ids.masked_fill(~valid, self.config.pad_token_id)  # padding is ignored
        sizes = inputs.host_sizes()
        lo, hi = sizes.token_range
        if lo < 0 or hi >= self.config.vocab_size:
            b = int(((ids < 0) | (ids >= self.config.vocab_size)).any(1).nonzero()[0])
            raise ValueError(f"sample {b}: token ids outside the vocabulary "
                             f"[0, {self.config.vocab_size})")
        media = self.encode_media(inputs, split)
        embeds = self.llm.embed_tokens(ids)
        assembled = assemble(
            ids, inputs.lengths, inputs.labels, embeds, media, self.config.placeholder_ids,
            inputs.media_counts, sizes,
        )
        return assembled, media

    # ------------------------------------------------------------------ forward
    def run_decoder(
        self, assembled: Assembled, cache: DecoderCache | None = None,
        split: SequenceSplit | None = None,
    ) -> tuple[TokenState, list[Tensor]]:
        """The decoder layers over an assembled batch, with this config's LMME."""
        cfg = self.config
        return run_layers(self.llm, TokenState.from_assembled(assembled), cfg.lmme_layers(),
                          cfg.lmme_keep_ratio, cfg.lmme_min_keep, cache, cfg.lmme_causal, split)

    def forward(
        self,
        inputs: LyraInputs,
        return_logits: bool = False,
        adapters: list[str] | None = None,
        cache: DecoderCache | None = None,
        units: Tensor | None = None,
        unit_lengths: Tensor | None = None,
    ) -> LyraOutput:
        """Training/evaluation pass. CE is computed only at positions with a target (the
        surviving answer tokens), so the (B, N, vocab) logits are built only when asked for.
        ``units`` / ``unit_lengths`` (B, U) / (B,): speech unit targets; the generator's loss is
        computed here, inside forward, so that it also works under FSDP."""
        cfg = self.config
        split = self.sequence_split if cache is None else None
        if split is not None and units is not None:
            raise ValueError("context parallelism covers the LLM stages; the speech generator "
                             "(units) trains on whole sequences")
        adapters = self.activate_adapters(inputs, adapters)
        assembled, media = self.prepare(inputs, split)
        state, keeps = self.run_decoder(assembled, cache, split)
        logits = self.lm_head(state.hidden) if return_logits else None
        ce = None
        if assembled.n_targets:
            # LMME keeps every target, so their count is known on the host: no mask readback
            # (under a split, this rank's share of them is read: one sync).
            has_target = (state.targets != IGNORE).flatten()
            n = assembled.n_targets if split is None else int(has_target.sum())
            rows = torch.nonzero_static(has_target, size=n).squeeze(1)
            target_logits = self.lm_head(state.hidden.flatten(0, 1).index_select(0, rows))
            ce = F.cross_entropy(target_logits.float(), state.targets.flatten().index_select(0, rows),
                                 reduction="sum") / assembled.n_targets
        lcmr = None
        if inputs.transcript_ids is not None and SPEECH in media and cfg.lcmr_weight > 0:
            lcmr = lcmr_term(
                media[SPEECH].tokens, media[SPEECH].counts, inputs.transcript_ids,
                inputs.transcript_lengths, self.llm.embed_tokens, cfg.lcmr_gamma,
                cfg.lcmr_temperature, cfg.lcmr_normalize,
                speech_sizes=media[SPEECH].host_sizes(),
                transcript_sizes=inputs.host_sizes().transcripts,
                part=(0, 1) if split is None else (split.rank, split.size),
            )
        if split is not None:  # each rank holds a part of each loss: one sum over the group
            ce, lcmr = _sum_parts(split, ce, lcmr)
        parts = [x for x in (ce, None if lcmr is None else cfg.lcmr_weight * lcmr) if x is not None]
        loss = sum(parts) if parts else None
        generator = None
        if units is not None:
            if unit_lengths is None:
                raise ValueError("units need unit_lengths")
            generator = self.speech_generator_loss(state, units, unit_lengths, assembled.n_answers)
        return LyraOutput(loss, ce, lcmr, logits, state, generator, keeps, adapters,
                          sum(assembled.host_lengths))

    def speech_generator_loss(
        self, state: TokenState, units: Tensor, unit_lengths: Tensor,
        n_answers: tuple[int, ...] | None = None,
    ) -> Tensor:
        """CTC loss of the speech generator on the LLM's final hidden states at the answer
        tokens of each sample (stage 4), against its unit targets (B, U) / (B,).
        ``n_answers``: answer tokens per sample as host ints (otherwise read, a sync)."""
        counts = state.answer.sum(1)
        if n_answers is None:
            n_answers = tuple(counts.tolist())
        missing = [b for b, n in enumerate(n_answers) if n == 0]
        if missing:
            raise ValueError(f"sample {missing[0]}: no answer tokens to generate speech from")
        rows = torch.nonzero_static(state.answer.flatten(), size=sum(n_answers)).squeeze(1)
        # The generator learns from the LLM, never the other way round.
        answers = state.hidden.flatten(0, 1).index_select(0, rows).detach()
        hidden = pad_sequences(answers, counts, max(n_answers))
        return self.speech_generator.loss(hidden, counts, units, unit_lengths)

    @torch.no_grad()
    def generate(self, inputs: LyraInputs, **kwargs):
        """Text (and, with ``speech=True``, streaming speech units); see
        :func:`lyra_pl.model.generate.generate`."""
        from lyra_pl.model.generate import generate

        return generate(self, inputs, **kwargs)


def _sum_parts(split: SequenceSplit, *parts: Tensor | None) -> list[Tensor | None]:
    """Each part summed over the group, in one all-reduce (None stays None: the ranks agree on
    which parts exist, as they hold the same batch). Its backward gives each rank's part the
    group's gradient: with FSDP2 averaging over every rank, the step is the one-rank step."""
    present = [p for p in parts if p is not None]
    if not present:
        return list(parts)
    # clones, not views of the sums: FSDP2 hooks the root's outputs for backward
    sums = iter(s.clone() for s in split.sum(torch.stack([p.float() for p in present])))
    return [None if p is None else next(sums) for p in parts]
