"""One initialization rule (``LyraModel.init_weights``): the model built on one process, the
model built on the meta device and materialized (``parallelize.materialize``, as under FSDP2)
and the prefill benchmark's model start from the same weights; each part gets its rule
(transformers' for the base VLM and Whisper, PyTorch's defaults for the projectors and the
speech generator, peft's for LoRA); the speech generator's RoPE base follows the LLM's."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.models.whisper.modeling_whisper import sinusoids

from lyra_pl import LyraConfig, LyraModel
from lyra_pl.model import lora
from lyra_pl.training.parallelize import materialize


def tiny(**overrides) -> LyraConfig:
    return LyraConfig.from_preset("tiny", **overrides)


def eager(cfg: LyraConfig, seed: int = 0) -> LyraModel:
    torch.manual_seed(seed)
    return LyraModel(cfg)


def meta_built(cfg: LyraConfig, seed: int = 0, adapter: bool = False) -> LyraModel:
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = LyraModel(cfg)
    if adapter:
        lora.add_adapter(model.llm, "speech", lora.LoraSpec(r=4, alpha=8))
    return materialize(model, "cpu")


def groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Module, torch.Tensor]]]:
    """Parameters by the rule they follow: (name, owning module, tensor)."""
    out: dict[str, list] = {}
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            name = f"{mname}.{pname}"
            if ".lora_" in name:
                group = "lora"
            elif "norm" in type(module).__name__.lower():
                group = "norms"
            elif name.startswith(("speech_projector.", "sound_projector.")):
                group = "projectors"
            elif name.startswith("speech_generator."):
                group = "generator"
            elif name == "audio_encoder.whisper.embed_positions.weight":
                group = "positions"
            elif isinstance(module, nn.Embedding):
                group = "embeddings"
            else:
                group = "linears"  # linears and convolutions of the LLM, lm_head, ViT, Whisper
            out.setdefault(group, []).append((name, module, p.detach()))
    return out


def group_stats(model: nn.Module) -> dict[str, tuple[float, float]]:
    """(mean, std) of each group's weights (biases apart: most are zero)."""
    out = {}
    for group, items in groups(model).items():
        values = torch.cat([p.flatten() for name, _, p in items if not name.endswith(".bias")])
        out[group] = (values.mean().item(), values.std().item())
    return out


def check_rules(model: LyraModel, padding_row: bool = True) -> None:
    """Each group against its rule, computed here from the shapes alone. ``padding_row``: the
    embeddings' padding row is zero (transformers' rule; a sharded init does not zero it)."""
    g = groups(model)
    assert set(g) >= {"norms", "projectors", "generator", "positions", "embeddings", "linears"}
    for name, _, p in g["norms"]:
        assert torch.all(p == (0.0 if name.endswith(".bias") else 1.0)), name
    for name, module, p in g["embeddings"] + g["linears"]:
        if name.endswith(".bias"):
            assert torch.all(p == 0), name
            continue
        values = p
        pad = getattr(module, "padding_idx", None)
        if pad is not None:
            assert not padding_row or torch.all(p[pad] == 0), f"{name}: padding row"
            values = torch.cat([p[:pad], p[pad + 1:]])
        # transformers' init, normal(0, 0.02): with n >= 1000 values the sample std is within
        # 2.2% (one sigma) of 0.02 and the mean within 0.02 / sqrt(n); 5 sigma allowed
        if values.numel() >= 1000:
            assert abs(values.std().item() / 0.02 - 1) < 0.11, name
            assert abs(values.mean().item()) < 5 * 0.02 / values.numel() ** 0.5, name
    for name, module, p in g["projectors"] + g["generator"]:
        # PyTorch's Linear default: uniform(+-1/sqrt(fan_in)) for weight and bias
        bound = 1 / math.sqrt(module.in_features)
        assert p.abs().max() <= bound, name
        if p.numel() >= 1000:
            assert abs(p.std().item() / (bound / math.sqrt(3)) - 1) < 0.1, name
    (_, _, positions), = g["positions"]
    torch.testing.assert_close(positions, sinusoids(*positions.shape), rtol=0, atol=1e-6)


def test_eager_and_materialized_models_are_identical():
    a, b = eager(tiny()), meta_built(tiny())
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for (k, x), (_, y) in zip(a.named_buffers(), b.named_buffers()):
        assert torch.equal(x, y), k
    check_rules(a)
    check_rules(b)


def test_prefill_benchmark_starts_from_the_same_weights():
    from lyra_pl.bench.prefill import build_model

    torch.manual_seed(0)
    bench = build_model("tiny", torch.device("cpu"), torch.float32)
    ref = eager(tiny()).state_dict()
    for k, v in bench.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_tied_embeddings_stay_tied_both_ways():
    for model in (eager(tiny(tie_word_embeddings=True)),
                  meta_built(tiny(tie_word_embeddings=True))):
        assert model.lm_head.weight is model.llm.embed_tokens.weight
        check_rules(model)


def test_lora_adapters_get_peft_init_after_materialize():
    model = meta_built(tiny(), adapter=True)
    check_rules(model)
    ref = eager(tiny())
    lora.add_adapter(ref.llm, "speech", lora.LoraSpec(r=4, alpha=8))
    for (name, module, p), (ref_name, _, q) in zip(groups(model)["lora"], groups(ref)["lora"]):
        assert name == ref_name
        if ".lora_B." in name:
            assert torch.all(p == 0) and torch.all(q == 0), name  # a new adapter is a no-op
        else:  # A: kaiming_uniform(a=sqrt(5)), as peft's init gives the eager model
            # (>= 512 values each: the two sample stds agree within 3% at one sigma)
            assert p.abs().max() <= 1 / math.sqrt(module.in_features), name
            assert abs(p.std() / q.std() - 1) < 0.15, name


def _rope_base(inv_freq: torch.Tensor, head_dim: int) -> float:
    """The base b of a RoPE table inv_freq[i] = b^(-2i/d), recovered from its second entry."""
    return inv_freq[1].double().item() ** (-head_dim / 2)


@pytest.mark.parametrize("configured", [None, 5e4])
def test_generator_rope_theta_follows_the_llm_unless_configured(configured):
    cfg = tiny(rope_theta=2e5, generator_rope_theta=configured)
    want = 2e5 if configured is None else configured
    head_dim = cfg.generator_hidden // cfg.generator_heads
    for model in (eager(cfg), meta_built(cfg)):
        gen = model.speech_generator
        assert gen.config.rope_parameters["rope_theta"] == want
        assert _rope_base(gen.rotary_emb.inv_freq, head_dim) == pytest.approx(want, rel=1e-4)
        assert _rope_base(model.llm.rotary_emb.inv_freq, cfg.head_dim) == pytest.approx(2e5, rel=1e-4)


def test_bad_generator_rope_theta_is_named():
    with pytest.raises(ValueError, match="generator_rope_theta"):
        tiny(generator_rope_theta=0.0)
