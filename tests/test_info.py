"""Parameter counts (`lyra_pl.model.info`), the `lyra-pl info` CLI and `LyraConfig` validation.

The expected counts are derived here in closed form from the config's shapes (independently of
the model code), then cross-checked against transformers' own models built on the meta device
and against the published Qwen2-VL sizes.
"""
from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen2VLForConditionalGeneration, WhisperModel

from lyra_pl import cli
from lyra_pl.model.config import PRESETS, LyraConfig
from lyra_pl.model.info import parameter_counts

BIG = ("mini", "base", "pro")
COMPONENTS = ("llm", "lm_head", "vision", "audio_encoder", "speech_projector",
              "sound_projector", "speech_generator")


def linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def qwen2_layer(h: int, heads: int, kv_heads: int, inter: int) -> int:
    """One Qwen2(-VL) decoder layer: q/k/v with bias, o without, SwiGLU MLP, two RMSNorms."""
    hd = h // heads
    attn = linear(h, h) + 2 * linear(h, kv_heads * hd) + linear(h, h, bias=False)
    mlp = 3 * h * inter  # gate, up, down; no biases
    return attn + mlp + 2 * h


def expected_counts(c: LyraConfig) -> dict[str, int]:
    h, V = c.hidden_size, c.vocab_size
    # LLM: embeddings, layers, final RMSNorm; lm_head unless tied to the embeddings
    llm = V * h + c.num_layers * qwen2_layer(h, c.num_heads, c.num_kv_heads,
                                             c.intermediate_size) + h
    lm_head = 0 if c.tie_word_embeddings else V * h
    # ViT: Conv3d patch embedding without bias (3 channels, temporal x patch x patch kernel)
    e = c.vision_embed_dim
    patch = 3 * c.temporal_patch_size * c.patch_size * c.patch_size * e
    block = (2 * 2 * e  # norm1, norm2 (LayerNorm weight + bias)
             + linear(e, 3 * e) + linear(e, e)  # qkv, proj
             + linear(e, c.vision_mlp_ratio * e) + linear(c.vision_mlp_ratio * e, e))
    m = c.spatial_merge_size ** 2 * e
    merger = 2 * e + linear(m, m) + linear(m, h)
    vision = patch + c.vision_depth * block + merger
    # Whisper encoder
    d, f = c.audio_dim, c.audio_ffn_dim
    conv = (c.num_mel_bins * d * 3 + d) + (d * d * 3 + d)
    positions = 1500 * d
    wlayer = (3 * linear(d, d) + linear(d, d, bias=False)  # q, v, out with bias; k without
              + 2 * 2 * d  # self_attn_layer_norm, final_layer_norm
              + linear(d, f) + linear(f, d))
    audio = conv + positions + c.audio_layers * wlayer + 2 * d
    speech_projector = linear(d * c.speech_downsample, c.speech_projector_hidden) \
        + linear(c.speech_projector_hidden, h)
    sound_projector = (2 * d  # LayerNorm over the encoder's features
                       + linear(d, c.sound_projector_hidden) + linear(c.sound_projector_hidden, h))
    g = c.generator_hidden
    generator = (linear(h, g)  # input_proj
                 + c.generator_layers * qwen2_layer(g, c.generator_heads, c.generator_kv_heads,
                                                    c.generator_intermediate)
                 + g  # final RMSNorm
                 + linear(g, c.n_units + 1))  # head: units + CTC blank
    counts = dict(llm=llm, lm_head=lm_head, vision=vision, audio_encoder=audio,
                  speech_projector=speech_projector, sound_projector=sound_projector,
                  speech_generator=generator)
    counts["total"] = sum(counts.values())
    return counts


@pytest.fixture(scope="module")
def counts() -> dict[str, dict[str, int]]:
    return {p: parameter_counts(LyraConfig.from_preset(p)) for p in ("tiny",) + BIG}


def _meta_numel(build) -> int:
    with torch.device("meta"):
        module = build()
    return sum(p.numel() for p in module.parameters())  # parameters() counts tied ones once


@pytest.mark.parametrize("preset", ("tiny",) + BIG)
def test_counts_match_closed_form(counts, preset):
    got = counts[preset]
    want = expected_counts(LyraConfig.from_preset(preset))
    assert list(got) == list(COMPONENTS) + ["total"]
    assert got == want


@pytest.mark.parametrize("preset,published", [("mini", 2.209), ("base", 8.291), ("pro", 73.406)])
def test_qwen2vl_part_matches_transformers(counts, preset, published):
    config = LyraConfig.from_preset(preset)
    c = counts[preset]
    ours = c["llm"] + c["lm_head"] + c["vision"]
    assert ours == _meta_numel(lambda: Qwen2VLForConditionalGeneration(config.qwen2vl_config()))
    assert round(ours / 1e9, 3) == published
    assert c["audio_encoder"] == _meta_numel(lambda: WhisperModel(config.whisper_config()).encoder)


def test_tied_embeddings_counted_once(counts):
    assert counts["mini"]["lm_head"] == 0  # Qwen2-VL-2B ties lm_head to the embeddings
    untied = parameter_counts(LyraConfig.from_preset("mini", tie_word_embeddings=False))
    assert untied["lm_head"] == 151936 * 1536
    assert untied["total"] == counts["mini"]["total"] + 151936 * 1536


@pytest.mark.parametrize("preset,low,high", [("mini", 2.8e9, 3.2e9), ("base", 8.7e9, 9.3e9),
                                             ("pro", 73.5e9, 75e9)])
def test_totals_match_spec(counts, preset, low, high):
    c = counts[preset]
    assert low <= c["total"] <= high
    assert c["total"] == sum(v for k, v in c.items() if k != "total")


# --------------------------------------------------------------------------- CLI


def test_cli_table(capsys):
    assert cli.main(["info", "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for name in COMPONENTS + ("total",):
        assert any(line.split()[:1] == [name] for line in lines), (name, out)
    total = parameter_counts(LyraConfig.from_preset("tiny"))["total"]
    assert f"{total:,}" in out


def test_cli_json(capsys):
    assert cli.main(["info", "--preset", "tiny", "--json"]) == 0
    out = capsys.readouterr().out.strip()
    data = json.loads(out)  # exactly one JSON object, nothing else printed
    assert isinstance(data, dict)
    expected = parameter_counts(LyraConfig.from_preset("tiny"))
    assert "total" in data
    for key, value in expected.items():
        assert data[key] == value, key


def test_cli_unknown_preset(capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["info", "--preset", "nope"])
    assert err.value.code not in (0, None)
    assert "nope" in capsys.readouterr().err


# ------------------------------------------------------------------------ config errors


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="nope") as err:
        LyraConfig.from_preset("nope")
    for name in PRESETS:
        assert name in str(err.value)


@pytest.mark.parametrize("overrides,field", [
    (dict(mrope_section=(4, 6, 7)), "mrope_section"),
    (dict(mrope_section=(8, 8)), "mrope_section"),
    (dict(num_heads=3), "num_heads"),
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(lmme_blocks=5), "lmme_blocks"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(lmme_keep_ratio=0.0), "lmme_keep_ratio"),
    (dict(attn_implementation="flash"), "attn_implementation"),
    (dict(lcmr_normalize="mean"), "lcmr_normalize"),
])
def test_invalid_overrides(overrides, field):
    with pytest.raises(ValueError, match=field):
        LyraConfig.from_preset("tiny", **overrides)


def test_invalid_replace_is_validated():
    with pytest.raises(ValueError, match="lmme_blocks"):
        LyraConfig.from_preset("tiny").replace(lmme_blocks=99)


def test_unknown_field():
    with pytest.raises(TypeError, match="hiden_size"):
        LyraConfig.from_preset("tiny", hiden_size=64)


def test_valid_overrides_accepted():
    c = LyraConfig.from_preset("tiny", hidden_size=64, mrope_section=(2, 3, 3), lmme_blocks=4)
    assert c.head_dim == 16 and c.preset == "tiny" and c.lmme_blocks == 4
