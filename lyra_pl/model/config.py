"""`LyraConfig`: every shape and switch of a Lyra model, with the named presets.

One flat dataclass that maps 1:1 to :class:`~lyra_pl.model.lyra.LyraModel`'s constructor and to
the YAML files in ``configs/``. The transformers configs of the parts it reuses (Qwen2-VL text
decoder and ViT, Whisper encoder) are derived here and nowhere else.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from transformers import Qwen2VLConfig, WhisperConfig
from transformers.models.qwen2_vl.configuration_qwen2_vl import (
    Qwen2VLTextConfig,
    Qwen2VLVisionConfig,
)

# Qwen2-VL's tokenizer: <|image_pad|>, <|video_pad|>, <|endoftext|>, <|im_end|>. Ids from 151665
# up to the 151936-row embedding are unused by that tokenizer; Lyra's <speech> and <sound>
# placeholders take the first two (their embedding rows are never read: placeholders are
# replaced by the encoders' tokens).
_QWEN_TOKENS = dict(
    image_token_id=151655,
    video_token_id=151656,
    speech_token_id=151665,
    sound_token_id=151666,
    pad_token_id=151643,
    eos_token_ids=(151645, 151643),
)


@dataclass
class LyraConfig:
    """Shapes and switches of a Lyra model. Build one with :meth:`from_preset`.

    Groups of fields: the Qwen2-VL decoder (``vocab_size`` .. ``attn_implementation``), its
    ViT (``vision_*``), the frozen Whisper encoder (``audio_*``), the speech and sound
    projectors, the CTC speech generator (``generator_*``), the placeholder and special token
    ids, and the two techniques configured per model: LMME (``lmme_*``; ``lmme_blocks=0`` is
    off) and LCMR (``lcmr_*``).
    """

    preset: str = "custom"
    # --- LLM: the Qwen2-VL text decoder
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 352
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (4, 6, 6)
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    attn_implementation: str = "sdpa"
    # --- vision: the Qwen2-VL ViT (14x14 patches, 2 frames per temporal patch, 2x2 merge)
    vision_depth: int = 2
    vision_embed_dim: int = 64
    vision_num_heads: int = 2
    vision_mlp_ratio: int = 4
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    # --- audio: the Whisper encoder (30 s windows, 3000 mel frames -> 1500 states)
    audio_dim: int = 64
    audio_layers: int = 2
    audio_heads: int = 4
    audio_ffn_dim: int = 128
    num_mel_bins: int = 128
    audio_window_batch: int = 8
    # --- projectors
    speech_downsample: int = 5
    speech_projector_hidden: int = 256
    sound_tokens: int = 4
    sound_projector_hidden: int = 128
    # --- speech generator: Qwen2-style layers on the LLM's last hidden states, CTC over units
    generator_hidden: int = 96
    generator_layers: int = 2
    generator_heads: int = 4
    generator_kv_heads: int = 2
    generator_intermediate: int = 128
    generator_upsample: int = 25
    n_units: int = 1000
    generator_rope_theta: float | None = None
    """RoPE base of the speech generator's layers. None: the LLM's ``rope_theta``, which the
    official generator inherits (it copies the LLM's config); set a value to override it."""
    # --- token ids
    image_token_id: int = 500
    video_token_id: int = 501
    speech_token_id: int = 502
    sound_token_id: int = 503
    pad_token_id: int = 506
    eos_token_ids: tuple[int, ...] = (505,)
    # --- LMME(n, rho): prune context tokens at the last layer of each of n blocks
    lmme_blocks: int = 0
    lmme_keep_ratio: float = 0.7
    lmme_min_keep: int = 32
    lmme_causal: bool = True
    """LMME scores each context token by the attention it gets from the instruction rows, each
    row a softmax over the keys that row attends to. True: the causal keys (the model's real
    attention). False: every key of the sample (the official code's non-causal scoring)."""
    # --- LCMR: soft-DTW between projected speech and transcript embeddings
    lcmr_gamma: float = 0.1
    lcmr_temperature: float = 0.06
    lcmr_weight: float = 0.5
    lcmr_normalize: str = "length_sum"

    def __post_init__(self) -> None:
        self.mrope_section = tuple(self.mrope_section)
        self.eos_token_ids = tuple(self.eos_token_ids)
        self.validate()

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "LyraConfig":
        """A named preset (``tiny``, ``mini``, ``base``, ``pro``), with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"LyraConfig has no field(s) {sorted(unknown)}")
        return cls(**{"preset": name, **PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> "LyraConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def placeholder_ids(self) -> dict[str, int]:
        """Placeholder token id per modality, in modality-id order (1 image .. 4 sound)."""
        return {
            "image": self.image_token_id,
            "video": self.video_token_id,
            "speech": self.speech_token_id,
            "sound": self.sound_token_id,
        }

    @property
    def generator_theta(self) -> float:
        """The speech generator's RoPE base: ``generator_rope_theta``, else the LLM's."""
        return self.rope_theta if self.generator_rope_theta is None else self.generator_rope_theta

    def lmme_layers(self) -> tuple[int, ...]:
        """0-based indices of the layers after which LMME prunes: the last layer of each of the
        ``lmme_blocks`` blocks, except the final layer (pruning there would save nothing)."""
        n, L = self.lmme_blocks, self.num_layers
        return tuple(sorted({(i + 1) * L // n - 1 for i in range(n - 1)})) if n > 1 else ()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"LyraConfig({self.preset}): {msg}")

        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
            "num_kv_heads", "vision_depth", "vision_embed_dim", "vision_num_heads", "audio_dim",
            "audio_layers", "audio_heads", "audio_ffn_dim", "speech_downsample", "sound_tokens",
            "generator_hidden", "generator_layers", "generator_heads", "generator_kv_heads",
            "generator_upsample", "n_units", "audio_window_batch",
        ):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive int, got {value!r}")
        need(self.hidden_size % self.num_heads == 0,
             f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        need(self.num_heads % self.num_kv_heads == 0,
             f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        need(len(self.mrope_section) == 3 and sum(self.mrope_section) * 2 == self.head_dim,
             f"mrope_section {self.mrope_section} must have 3 parts summing to head_dim/2 = "
             f"{self.head_dim // 2}")
        need(self.vision_embed_dim % self.vision_num_heads == 0,
             "vision_embed_dim must be a multiple of vision_num_heads")
        need(self.audio_dim % self.audio_heads == 0, "audio_dim must be a multiple of audio_heads")
        need(self.generator_hidden % self.generator_heads == 0
             and self.generator_heads % self.generator_kv_heads == 0,
             "generator_hidden must divide into generator_heads, a multiple of generator_kv_heads")
        need(self.attn_implementation in ("sdpa", "eager"),
             f"attn_implementation must be 'sdpa' or 'eager', got {self.attn_implementation!r}")
        ids = dict(self.placeholder_ids, pad=self.pad_token_id,
                   **{f"eos[{i}]": t for i, t in enumerate(self.eos_token_ids)})
        for name, value in ids.items():
            need(0 <= value < self.vocab_size, f"{name} token id {value} is outside the "
                 f"vocabulary [0, {self.vocab_size})")
        need(len(set(self.placeholder_ids.values())) == 4, "placeholder token ids must differ")
        need(0 <= self.lmme_blocks <= self.num_layers,
             f"lmme_blocks must be in [0, num_layers={self.num_layers}], got {self.lmme_blocks}")
        need(0 < self.lmme_keep_ratio <= 1, f"lmme_keep_ratio must be in (0, 1], got "
             f"{self.lmme_keep_ratio}")
        need(self.lmme_min_keep >= 0, f"lmme_min_keep must be >= 0, got {self.lmme_min_keep}")
        need(isinstance(self.lmme_causal, bool),
             f"lmme_causal must be a bool, got {self.lmme_causal!r}")
        need(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}")
        need(self.generator_rope_theta is None or self.generator_rope_theta > 0,
             f"generator_rope_theta must be > 0 or None, got {self.generator_rope_theta}")
        need(self.lcmr_gamma > 0 and self.lcmr_temperature > 0 and self.lcmr_weight >= 0,
             "lcmr_gamma and lcmr_temperature must be > 0 and lcmr_weight >= 0")
        need(self.lcmr_normalize in ("length_sum", "x_length", "none"),
             f"lcmr_normalize must be 'length_sum', 'x_length' or 'none', got "
             f"{self.lcmr_normalize!r}")

    # ------------------------------------------------------------------ transformers configs
    def text_config(self) -> Qwen2VLTextConfig:
        cfg = Qwen2VLTextConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": self.rope_theta,
                "mrope_section": list(self.mrope_section),
            },
            tie_word_embeddings=self.tie_word_embeddings,
            pad_token_id=self.pad_token_id,
            bos_token_id=None,
            eos_token_id=list(self.eos_token_ids),
        )
        cfg._attn_implementation = self.attn_implementation
        return cfg

    def vision_config(self) -> Qwen2VLVisionConfig:
        cfg = Qwen2VLVisionConfig(
            depth=self.vision_depth,
            embed_dim=self.vision_embed_dim,
            hidden_size=self.hidden_size,
            mlp_ratio=self.vision_mlp_ratio,
            num_heads=self.vision_num_heads,
            patch_size=self.patch_size,
            temporal_patch_size=self.temporal_patch_size,
            spatial_merge_size=self.spatial_merge_size,
        )
        cfg._attn_implementation = self.attn_implementation
        return cfg

    def qwen2vl_config(self) -> Qwen2VLConfig:
        """The transformers config of the equivalent Qwen2-VL model (parity tests, loading)."""
        cfg = Qwen2VLConfig(
            text_config=self.text_config().to_dict(),
            vision_config=self.vision_config().to_dict(),
            image_token_id=self.image_token_id,
            video_token_id=self.video_token_id,
            tie_word_embeddings=self.tie_word_embeddings,
        )
        cfg._attn_implementation = self.attn_implementation
        return cfg

    def whisper_config(self) -> WhisperConfig:
        cfg = WhisperConfig(
            d_model=self.audio_dim,
            encoder_layers=self.audio_layers,
            encoder_attention_heads=self.audio_heads,
            encoder_ffn_dim=self.audio_ffn_dim,
            num_mel_bins=self.num_mel_bins,
            max_source_positions=1500,
            # Only the encoder is built; a one-layer decoder keeps the config valid.
            decoder_layers=1,
            decoder_attention_heads=self.audio_heads,
            decoder_ffn_dim=self.audio_ffn_dim,
        )
        cfg._attn_implementation = self.attn_implementation
        return cfg


# Shapes of Qwen2-VL-2B / 7B / 72B (LLM + ViT) and of the Whisper encoders: whisper-large-v3-turbo
# (Mini) and whisper-large-v3 (Base, Pro) share the encoder shape (d 1280, 32 layers, 20 heads).
# The speech generator is two Qwen2-VL-2B-shaped layers for every size (docs/method.md: 2 layers; their
# width need not grow with the LLM), fed through a projection from the LLM's hidden size.
_WHISPER_LARGE = dict(audio_dim=1280, audio_layers=32, audio_heads=20, audio_ffn_dim=5120,
                      num_mel_bins=128, audio_window_batch=16)
_VIT_600M = dict(vision_depth=32, vision_embed_dim=1280, vision_num_heads=16, vision_mlp_ratio=4)
_GENERATOR = dict(generator_hidden=1536, generator_layers=2, generator_heads=12,
                  generator_kv_heads=2, generator_intermediate=8960)
_PROJECTORS = dict(speech_projector_hidden=2048, sound_tokens=4, sound_projector_hidden=2048)
# Qwen2-VL-2B has a 151936-row vocabulary, 7B and 72B 152064.
_QWEN_LLM = dict(rope_theta=1_000_000.0, mrope_section=(16, 24, 24),
                 rms_norm_eps=1e-6, max_position_embeddings=32768)

PRESETS: dict[str, dict[str, Any]] = {
    # A few million parameters, same architecture, trains on 2 CPU cores. The field defaults.
    "tiny": dict(lmme_min_keep=4),
    "mini": dict(**_QWEN_LLM, **_QWEN_TOKENS, **_VIT_600M, **_WHISPER_LARGE, **_GENERATOR,
                 **_PROJECTORS, vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                 num_heads=12, num_kv_heads=2, tie_word_embeddings=True),
    "base": dict(**_QWEN_LLM, **_QWEN_TOKENS, **_VIT_600M, **_WHISPER_LARGE, **_GENERATOR,
                 **_PROJECTORS, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                 num_heads=28, num_kv_heads=4, tie_word_embeddings=False),
    "pro": dict(**_QWEN_LLM, **_QWEN_TOKENS, **_VIT_600M, **_WHISPER_LARGE, **_GENERATOR,
                **_PROJECTORS, vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_layers=80,
                num_heads=64, num_kv_heads=8, tie_word_embeddings=False),
}
