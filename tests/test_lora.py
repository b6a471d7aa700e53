"""Multi-modality LoRA on a tiny Qwen2-VL text decoder (CPU, a few seconds)."""

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel

from lyra_pl.model.lora import (
    ADAPTER_NAMES,
    LORA_TARGETS,
    LoraSpec,
    active_adapters,
    add_adapter,
    adapter_names,
    load_adapter,
    merge_adapters,
    save_adapter,
    select_adapters,
    set_active_adapters,
    trainable_adapter_parameters,
)

SPEECH = LoraSpec(r=4, alpha=16, dropout=0.05)
LONG = LoraSpec(r=8, alpha=32, dropout=0.0)


def tiny_decoder(dtype: torch.dtype = torch.float32) -> Qwen2VLTextModel:
    config = Qwen2VLTextConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=100, bos_token_id=None, eos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
    )
    torch.manual_seed(0)
    return Qwen2VLTextModel(config).to(dtype).eval()


INPUT_IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
POSITIONS = torch.arange(7).expand(3, 2, 7)  # (3, B, L) m-rope positions


@torch.no_grad()
def run(model: nn.Module) -> torch.Tensor:
    return model(input_ids=INPUT_IDS, position_ids=POSITIONS).last_hidden_state


def randomize_b(model: nn.Module, name: str, seed: int) -> None:
    """peft inits B to zero (a no-op adapter); give it weights so the adapter shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if f".lora_B.{name}." in key:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.fixture
def model_and_base():
    model = tiny_decoder()
    base = copy.deepcopy(model)
    add_adapter(model, "speech", SPEECH)
    add_adapter(model, "long_speech", LONG)
    randomize_b(model, "speech", 2)
    randomize_b(model, "long_speech", 3)
    return model, base


def test_spec_maps_to_peft_config():
    config = LoraSpec(r=128, alpha=256, dropout=0.1).to_peft()
    assert isinstance(config, peft.LoraConfig)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (128, 256, 0.1)
    assert set(config.target_modules) == set(LORA_TARGETS)


@pytest.mark.parametrize("kwargs", [dict(r=0), dict(alpha=0), dict(dropout=1.0), dict(dropout=-0.1),
                                    dict(targets=()), dict(targets="q_proj"), dict(r=2.5)])
def test_bad_spec_raises(kwargs):
    with pytest.raises(ValueError):
        LoraSpec(**kwargs).to_peft()


def test_adapters_are_added_inactive_and_in_base_dtype(model_and_base):
    model, base = model_and_base
    assert adapter_names(model) == ["speech", "long_speech"]
    assert active_adapters(model) == []
    q = model.layers[0].self_attn.q_proj
    assert q.lora_A["speech"].out_features == 4 and q.lora_A["long_speech"].out_features == 8
    assert torch.equal(run(model), run(base))  # adding changes nothing


def test_no_active_adapter_is_bit_exact_base(model_and_base):
    model, base = model_and_base
    set_active_adapters(model, ["speech", "long_speech"])
    assert not torch.allclose(run(model), run(base))
    set_active_adapters(model, [])
    assert active_adapters(model) == []
    assert torch.equal(run(model), run(base))


def test_activate_switch_and_combine(model_and_base):
    model, base = model_and_base
    out_base = run(base)
    set_active_adapters(model, ["speech"])
    out_speech = run(model)
    set_active_adapters(model, ["long_speech"])
    out_long = run(model)
    assert active_adapters(model) == ["long_speech"]
    assert not torch.allclose(out_speech, out_base)
    assert not torch.allclose(out_long, out_base) and not torch.allclose(out_long, out_speech)
    set_active_adapters(model, ["speech"])
    assert torch.equal(run(model), out_speech)  # switching back is exact

    # two active: canonical order whatever the caller's, and peft sums the deltas per layer
    set_active_adapters(model, ["long_speech", "speech"])
    assert active_adapters(model) == ["speech", "long_speech"]
    assert not torch.allclose(run(model), out_speech) and not torch.allclose(run(model), out_long)
    q = model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    with torch.no_grad():
        both = q(x)
        set_active_adapters(model, ["speech"])
        d_speech = q(x) - q.base_layer(x)
        set_active_adapters(model, ["long_speech"])
        d_long = q(x) - q.base_layer(x)
    torch.testing.assert_close(both, q.base_layer(x) + d_speech + d_long)


def test_trainable_parameters_select_one_adapter_and_keep_base(model_and_base):
    model, _ = model_and_base
    base_flags = {n: p.requires_grad for n, p in model.named_parameters() if "lora_" not in n}
    assert all(base_flags.values())  # adding adapters did not freeze the base
    # new adapters start frozen
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)

    params = trainable_adapter_parameters(model, ["speech"])
    speech = {id(p) for n, p in model.named_parameters() if ".speech." in n}
    assert {id(p) for p in params} == speech
    assert len(params) == 2 * 7 * 2  # A and B x 7 targets x 2 layers
    for n, p in model.named_parameters():
        if ".speech." in n:
            assert p.requires_grad
        elif "lora_" in n:
            assert not p.requires_grad, n
        else:
            assert p.requires_grad == base_flags[n], n

    # switching adapters per batch never changes what trains
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    set_active_adapters(model, ["long_speech"])
    set_active_adapters(model, [])
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}

    model.requires_grad_(False)
    params = trainable_adapter_parameters(model, ["speech"])
    set_active_adapters(model, ["speech"])
    model(input_ids=INPUT_IDS, position_ids=POSITIONS).last_hidden_state.square().mean().backward()
    assert all(p.grad is not None for p in params)
    assert all(p.grad is None for n, p in model.named_parameters() if ".speech." not in n)


def test_save_is_peft_format_and_load_round_trips(model_and_base, tmp_path):
    model, base = model_and_base
    set_active_adapters(model, ["speech"])
    expected = run(model)
    save_adapter(model, "speech", tmp_path / "speech")

    config = peft.LoraConfig.from_pretrained(str(tmp_path / "speech"))
    assert (config.r, config.lora_alpha) == (4, 16)
    assert set(config.target_modules) == set(LORA_TARGETS)
    saved = json.loads((tmp_path / "speech" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["inference_mode"] is True
    keys = set(load_file(tmp_path / "speech" / "adapter_model.safetensors"))
    assert len(keys) == 2 * 7 * 2
    assert "base_model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert all(k.startswith("base_model.model.layers.") and "speech" not in k for k in keys)

    fresh = copy.deepcopy(base)
    assert load_adapter(fresh, tmp_path / "speech") == "speech"
    assert active_adapters(fresh) == [] and torch.equal(run(fresh), run(base))
    set_active_adapters(fresh, ["speech"])
    assert torch.equal(run(fresh), expected)

    # a second adapter under another name, into a model that already has one
    save_adapter(model, "long_speech", tmp_path / "ls")
    assert load_adapter(fresh, tmp_path / "ls", name="long") == "long"
    set_active_adapters(fresh, ["long"])
    set_active_adapters(model, ["long_speech"])
    assert torch.equal(run(fresh), run(model))

    # reloading into an existing adapter of the same shape overwrites its weights
    randomize_b(fresh, "speech", 9)
    load_adapter(fresh, tmp_path / "speech")
    set_active_adapters(fresh, ["speech"])
    assert torch.equal(run(fresh), expected)


def test_saved_adapter_loads_with_peft_model(model_and_base, tmp_path):
    model, base = model_and_base
    set_active_adapters(model, ["speech"])
    save_adapter(model, "speech", tmp_path)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        out = peft_model(input_ids=INPUT_IDS, position_ids=POSITIONS).last_hidden_state
    torch.testing.assert_close(out, run(model), rtol=0, atol=0)


def test_loads_what_peft_model_saves(tmp_path):
    base = tiny_decoder()
    peft_model = peft.get_peft_model(copy.deepcopy(base), SPEECH.to_peft()).eval()
    randomize_b(peft_model, "default", 5)
    peft_model.save_pretrained(str(tmp_path))
    assert load_adapter(base, tmp_path, name="speech") == "speech"
    set_active_adapters(base, ["speech"])
    with torch.no_grad():
        expected = peft_model(input_ids=INPUT_IDS, position_ids=POSITIONS).last_hidden_state
    torch.testing.assert_close(run(base), expected, rtol=0, atol=0)


def test_adapter_dropout_follows_the_wrapped_layer_mode():
    model = tiny_decoder()  # eval
    add_adapter(model, "speech", SPEECH)
    assert not model.layers[0].self_attn.q_proj.lora_dropout["speech"].training
    model.train()
    add_adapter(model, "sound", SPEECH)
    assert model.layers[0].mlp.up_proj.lora_dropout["sound"].training


def test_load_errors_leave_the_module_unchanged(model_and_base, tmp_path):
    model, base = model_and_base
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(model, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(model, tmp_path / "empty")
    save_adapter(model, "speech", tmp_path / "bad-name")
    weights = tmp_path / "bad-name" / "adapter_model.safetensors"
    save_file(load_file(weights), weights)  # no recorded name (PeftModel's files): the basename
    with pytest.raises(ValueError, match="pass name="):
        load_adapter(copy.deepcopy(base), tmp_path / "bad-name")
    (tmp_path / "bad-name" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_adapter(model, tmp_path / "bad-name")

    save_adapter(model, "speech", tmp_path / "speech")
    with pytest.raises(ValueError, match=r"r: module has 8, file has 4"):
        load_adapter(model, tmp_path / "speech", name="long_speech")

    weights = tmp_path / "speech" / "adapter_model.safetensors"
    state = load_file(weights)
    state.pop("base_model.model.layers.0.self_attn.q_proj.lora_A.weight")
    save_file(state, weights)
    fresh = copy.deepcopy(base)
    with pytest.raises(ValueError, match="missing layers.0.self_attn.q_proj.lora_A.weight"):
        load_adapter(fresh, tmp_path / "speech")
    assert adapter_names(fresh) == [] and fresh.state_dict().keys() == base.state_dict().keys()

    state["base_model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(5, 32)
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"file \(5, 32\) vs module \(4, 32\)"):
        load_adapter(fresh, tmp_path / "speech")


def test_merge_matches_active_adapter_and_restores_base_keys(model_and_base):
    model, base = model_and_base
    set_active_adapters(model, ["speech"])
    expected = run(model)
    merge_adapters(model, ["speech"])
    torch.testing.assert_close(run(model), expected, rtol=0, atol=1e-5)
    assert list(model.state_dict()) == list(base.state_dict())
    assert type(model.layers[0].self_attn.q_proj) is nn.Linear
    assert adapter_names(model) == [] and active_adapters(model) == []
    assert not hasattr(model, "peft_config")


def test_merge_two_adapters(model_and_base):
    model, _ = model_and_base
    set_active_adapters(model, ["speech", "long_speech"])
    expected = run(model)
    merge_adapters(model, ["speech", "long_speech"])
    torch.testing.assert_close(run(model), expected, rtol=0, atol=1e-5)


def test_low_precision_base_keeps_adapter_dtype_unless_asked():
    model = tiny_decoder(torch.bfloat16)
    add_adapter(model, "speech", SPEECH)
    add_adapter(model, "sound", LoraSpec(r=4), fp32_weights=True)
    q = model.layers[0].self_attn.q_proj
    assert q.lora_A["speech"].weight.dtype == torch.bfloat16
    assert q.lora_A["sound"].weight.dtype == torch.float32
    randomize_b(model, "sound", 4)
    set_active_adapters(model, ["speech", "sound"])
    assert run(model).dtype == torch.bfloat16


def test_errors(model_and_base):
    model, _ = model_and_base
    with pytest.raises(KeyError, match=r"'sound'.*\['speech', 'long_speech'\]"):
        set_active_adapters(model, ["sound"])
    with pytest.raises(KeyError, match="sound"):
        trainable_adapter_parameters(model, ["sound"])
    with pytest.raises(KeyError, match="sound"):
        merge_adapters(model, ["sound"])
    with pytest.raises(ValueError, match="already exists"):
        add_adapter(model, "speech", SPEECH)
    for bad in ["a.b", "lora_x", "training", "", "base_layer"]:
        with pytest.raises(ValueError, match="invalid adapter name"):
            add_adapter(model, bad, SPEECH)
    with pytest.raises(ValueError, match=r"\['wq', 'wv'\]"):
        add_adapter(model, "sound", LoraSpec(targets=("wq", "wv")))
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match="not supported"):  # peft refuses; we roll back
        add_adapter(model, "sound", LoraSpec(targets=("norm",)))
    assert list(model.state_dict()) == keys and adapter_names(model) == ["speech", "long_speech"]
    with pytest.warns(UserWarning, match="wq"):
        add_adapter(model, "sound", LoraSpec(r=2, targets=("q_proj", "wq")))
    assert adapter_names(model) == ["speech", "long_speech", "sound"]


@pytest.mark.parametrize("modalities, available, expected", [
    ({"text"}, ADAPTER_NAMES, []),
    ({"text", "image", "video"}, ADAPTER_NAMES, []),
    ({"text", "speech"}, ADAPTER_NAMES, ["speech"]),
    ({"image", "long_speech"}, ADAPTER_NAMES, ["long_speech"]),
    ({"speech", "long_speech"}, ADAPTER_NAMES, ["long_speech"]),
    ({"long_speech"}, ["speech"], ["speech"]),  # stage-2 model fed long audio
    ({"speech"}, ["long_speech", "sound"], []),
    ({"sound", "speech"}, ADAPTER_NAMES, ["speech", "sound"]),
    (["sound", "long_speech"], ["sound", "long_speech", "speech"], ["long_speech", "sound"]),
    ({"sound"}, [], []),
])
def test_select_adapters(modalities, available, expected):
    assert select_adapters(modalities, available) == expected


def test_select_adapters_rejects_bad_modalities():
    with pytest.raises(ValueError, match="speach"):
        select_adapters({"speach"}, ADAPTER_NAMES)
    with pytest.raises(TypeError):
        select_adapters("speech", ADAPTER_NAMES)
