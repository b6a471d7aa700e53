"""Loading real checkpoints (Qwen2-VL, Whisper), our saved parts and LoRA adapters.

Checkpoints are written by transformers' own `save_pretrained` from tiny random models, so the
key layout and sharding are what users' local checkpoints have.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import Qwen2VLForConditionalGeneration, WhisperForConditionalGeneration

from lyra_pl.model import LyraConfig, LyraInputs, LyraModel, lora
from lyra_pl.model.loading import (load_parts, load_qwen2vl, load_whisper, save_parts,
                                   save_qwen2vl, save_whisper)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Perturb every parameter (zero-initialized biases too), so a missed tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _hf_qwen(cfg: LyraConfig, seed: int = 0) -> Qwen2VLForConditionalGeneration:
    torch.manual_seed(seed)
    hf = Qwen2VLForConditionalGeneration(cfg.qwen2vl_config())
    _randomize(hf, seed)
    return hf.eval()


def _mapped(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in hf_state.items():
        for prefix, target in (("model.language_model.", "llm."), ("model.visual.", "visual."),
                               ("lm_head.", "lm_head.")):
            if key.startswith(prefix):
                out[target + key[len(prefix):]] = value
                break
        else:
            raise AssertionError(f"unexpected Qwen2-VL key {key}")
    return out


def _ours(model: LyraModel) -> dict[str, torch.Tensor]:
    state = {}
    for prefix, module in (("llm.", model.llm), ("visual.", model.visual),
                           ("lm_head.", model.lm_head)):
        state.update({prefix + k: v for k, v in module.state_dict().items()})
    return state


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.fixture(scope="module")
def cfg() -> LyraConfig:
    return LyraConfig.from_preset("tiny")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, cfg):
    """(hf_qwen, hf_whisper, qwen_dir, whisper_dir, sharded_qwen_dir)."""
    root = tmp_path_factory.mktemp("ckpt")
    hf = _hf_qwen(cfg)
    hf.save_pretrained(root / "qwen")
    hf.save_pretrained(root / "qwen_sharded", max_shard_size="50KB")
    torch.manual_seed(1)
    whisper = WhisperForConditionalGeneration(cfg.whisper_config())
    _randomize(whisper, 1)
    whisper.save_pretrained(root / "whisper")
    return hf, whisper.eval(), root / "qwen", root / "whisper", root / "qwen_sharded"


@pytest.fixture(scope="module")
def loaded(ckpt, cfg) -> LyraModel:
    hf, whisper, qwen_dir, whisper_dir, _ = ckpt
    torch.manual_seed(123)
    return LyraModel.from_pretrained(cfg, qwen2vl=str(qwen_dir), whisper=str(whisper_dir)).eval()


def test_qwen2vl_tensors_equal(ckpt, loaded):
    hf = ckpt[0]
    _assert_same(_ours(loaded), _mapped(hf.state_dict()))


def test_whisper_encoder_tensors_equal(ckpt, loaded):
    whisper = ckpt[1]
    _assert_same(loaded.audio_encoder.whisper.state_dict(), whisper.model.encoder.state_dict())


def test_text_logits_parity(ckpt, loaded, cfg):
    hf = ckpt[0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 400, (2, 11), generator=g)  # below the special-token ids
    with torch.no_grad():
        ours = loaded(LyraInputs(input_ids=ids), return_logits=True).logits
        ref = hf(input_ids=ids).logits
    assert ours.dtype == torch.float32 and ours.shape == ref.shape == (2, 11, cfg.vocab_size)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_sharded_checkpoint(ckpt, cfg):
    hf, _, _, _, sharded = ckpt
    index = sharded / "model.safetensors.index.json"
    assert index.exists()
    assert len(set(json.loads(index.read_text())["weight_map"].values())) > 1
    model = LyraModel.from_pretrained(cfg, qwen2vl=str(sharded))
    _assert_same(_ours(model), _mapped(hf.state_dict()))


def test_language_model_key_layout(tmp_path, ckpt, cfg):
    """transformers 5 saves the hub layout (``model.layers.*``, ``visual.*``); a checkpoint in
    the in-memory layout (``model.language_model.*``, ``model.visual.*``) loads too."""
    hf, _, qwen_dir, _, _ = ckpt
    d = tmp_path / "new_layout"
    d.mkdir()
    shutil.copy(qwen_dir / "config.json", d / "config.json")
    state = {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in state)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    model = LyraModel.from_pretrained(cfg, qwen2vl=str(d))
    _assert_same(_ours(model), _mapped(hf.state_dict()))


def test_tied_embeddings(tmp_path):
    cfg = LyraConfig.from_preset("tiny", tie_word_embeddings=True)
    hf = _hf_qwen(cfg, seed=2)
    assert hf.lm_head.weight is hf.model.language_model.embed_tokens.weight
    hf.save_pretrained(tmp_path / "qwen")
    model = LyraModel.from_pretrained(cfg, qwen2vl=str(tmp_path / "qwen"))
    assert model.lm_head.weight is model.llm.embed_tokens.weight
    assert torch.equal(model.llm.embed_tokens.weight, hf.model.language_model.embed_tokens.weight)
    _assert_same(_ours(model), _mapped(hf.state_dict()))


# ---------------------------------------------------------------------------- errors


def test_missing_directory(tmp_path, cfg):
    missing = tmp_path / "does_not_exist"
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        LyraModel.from_pretrained(cfg, qwen2vl=str(missing))
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        LyraModel.from_pretrained(cfg, whisper=str(missing))


def test_mismatched_hidden_size(tmp_path, cfg):
    other = LyraConfig.from_preset("tiny", hidden_size=64, mrope_section=(2, 3, 3))
    Qwen2VLForConditionalGeneration(other.qwen2vl_config()).save_pretrained(tmp_path / "q64")
    with pytest.raises(ValueError, match="hidden_size"):
        LyraModel.from_pretrained(cfg, qwen2vl=str(tmp_path / "q64"))


def test_tied_config_untied_checkpoint(ckpt):
    hf, _, qwen_dir, _, _ = ckpt  # untied checkpoint
    tied = LyraConfig.from_preset("tiny", tie_word_embeddings=True)
    try:
        model = LyraModel.from_pretrained(tied, qwen2vl=str(qwen_dir))
    except ValueError as err:  # refusing the mismatch is fine
        assert "tie_word_embeddings" in str(err)
        return
    # otherwise the input embeddings must be the checkpoint's, not its lm_head
    assert torch.equal(model.llm.embed_tokens.weight,
                       hf.model.language_model.embed_tokens.weight)


def test_directory_without_safetensors(tmp_path, ckpt, cfg):
    d = tmp_path / "config_only"
    d.mkdir()
    shutil.copy(ckpt[2] / "config.json", d / "config.json")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LyraModel.from_pretrained(cfg, qwen2vl=str(d))


# ---------------------------------------------------------------------------- meta device


def test_meta_device_load(ckpt, cfg):
    hf, _, qwen_dir, _, _ = ckpt
    with torch.device("meta"):
        model = LyraModel(cfg)
    assert model.llm.embed_tokens.weight.is_meta
    load_qwen2vl(model, qwen_dir)
    for name, module in (("llm", model.llm), ("visual", model.visual),
                         ("lm_head", model.lm_head)):
        meta = [n for n, p in module.named_parameters() if p.is_meta]
        assert not meta, (name, meta[:3])
    _assert_same(_ours(model), _mapped(hf.state_dict()))


def test_meta_device_model_runs_after_loading(ckpt, cfg, tmp_path):
    hf, _, qwen_dir, whisper_dir, _ = ckpt
    save_parts(LyraModel(cfg), tmp_path / "parts")
    with torch.device("meta"):
        model = LyraModel(cfg)
    load_qwen2vl(model, qwen_dir)
    load_whisper(model, whisper_dir)
    load_parts(model, tmp_path / "parts")
    assert not [n for n, p in model.named_parameters() if p.is_meta]
    ids = torch.randint(0, 400, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.eval()(LyraInputs(input_ids=ids), return_logits=True).logits
        ref = hf(input_ids=ids).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- our parts


def test_parts_roundtrip(tmp_path, loaded, cfg):
    save_parts(loaded, tmp_path / "parts")
    torch.manual_seed(999)
    fresh = LyraModel(cfg)
    assert not torch.equal(fresh.speech_generator.head.weight,
                           loaded.speech_generator.head.weight)
    assert load_parts(fresh, tmp_path / "parts") == [
        "speech_projector", "sound_projector", "speech_generator"]
    for part in ("speech_projector", "sound_projector", "speech_generator"):
        _assert_same(getattr(fresh, part).state_dict(), getattr(loaded, part).state_dict())

    # the same through from_pretrained(parts=...)
    again = LyraModel.from_pretrained(cfg, parts=str(tmp_path / "parts"))
    _assert_same(again.speech_generator.state_dict(), loaded.speech_generator.state_dict())


def test_parts_wrong_shape(tmp_path, loaded, cfg):
    save_parts(loaded, tmp_path / "parts")
    other = LyraModel(cfg.replace(generator_hidden=64))
    with pytest.raises(ValueError, match="speech_generator.safetensors"):
        load_parts(other, tmp_path / "parts")


# ---------------------------------------------------------------------------- adapters


def test_adapter_roundtrip(tmp_path, ckpt, cfg):
    qwen_dir = ckpt[2]
    torch.manual_seed(5)
    model = LyraModel.from_pretrained(cfg, qwen2vl=str(qwen_dir))
    lora.add_adapter(model.llm, "speech", lora.LoraSpec(r=4, alpha=8))
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if "lora_B.speech" in name:
                p.normal_(0, 0.1)
    saved = {n: p.detach().clone() for n, p in model.llm.named_parameters() if ".speech." in n}
    assert saved and any("lora_B" in n for n in saved)
    lora.save_adapter(model.llm, "speech", tmp_path / "speech")

    torch.manual_seed(6)  # a different lora_A init: it must come from the file
    loaded = LyraModel.from_pretrained(cfg, qwen2vl=str(qwen_dir),
                                       adapters=(str(tmp_path / "speech"),))
    assert lora.adapter_names(loaded.llm) == ["speech"]
    got = {n: p.detach() for n, p in loaded.llm.named_parameters() if ".speech." in n}
    _assert_same(got, saved)


def test_save_qwen2vl_and_whisper_round_trip(tmp_path, cfg):
    """The tiny preset's stage-0 hand-off: our LLM + ViT + lm_head written as a Qwen2-VL
    checkpoint that transformers loads with nothing missing and that loads back into a fresh
    model exactly; the audio encoder as a Whisper checkpoint, likewise."""
    torch.manual_seed(3)
    model = LyraModel(cfg)
    _randomize(model, 3)
    save_qwen2vl(model, tmp_path / "q")
    save_whisper(model, tmp_path / "w")

    hf, info = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "q",
                                                                output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    _assert_same(_mapped(hf.state_dict()), _ours(model))

    fresh = LyraModel(cfg)
    load_qwen2vl(fresh, tmp_path / "q")
    load_whisper(fresh, tmp_path / "w")
    _assert_same(_ours(fresh), _ours(model))
    a, b = fresh.audio_encoder.whisper.state_dict(), model.audio_encoder.whisper.state_dict()
    _assert_same(a, b)


# ---------------------------------------------------------------------------- byte ranges


def test_safetensors_file_reads_rows_as_safetensors_slices(tmp_path):
    """Whole tensors and ranges of rows, every dtype the checkpoints use, against
    safetensors' own slicing."""
    from safetensors import safe_open

    from lyra_pl.model.safetensors_file import SafetensorsFile

    g = torch.Generator().manual_seed(0)
    tensors = {"bf16": torch.randn(7, 3, 2, generator=g).bfloat16(),
               "f32": torch.randn(5, 4, generator=g), "i64": torch.arange(9),
               "bool": torch.rand(4, 3, generator=g) > 0.5, "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 3)}
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"format": "pt"})
    with SafetensorsFile(tmp_path / "t.safetensors") as ours, \
            safe_open(str(tmp_path / "t.safetensors"), framework="pt") as ref:
        assert sorted(ours.keys()) == sorted(tensors)
        for key in tensors:
            assert ours.shape(key) == tuple(ref.get_slice(key).get_shape())
            whole = ours.read(key)
            assert whole.dtype == tensors[key].dtype and torch.equal(whole, ref.get_tensor(key))
            if whole.dim():
                for rows in (slice(0, 1), slice(2, 4), slice(3, None), slice(9, 12)):
                    assert torch.equal(ours.read(key, rows), ref.get_slice(key)[rows]), (key, rows)
        with pytest.raises(ValueError, match="contiguous"):
            ours.read("f32", slice(0, 4, 2))
        with pytest.raises(ValueError, match="scalar"):
            ours.read("scalar", slice(0, 1))


def test_safetensors_file_errors(tmp_path):
    from lyra_pl.model.safetensors_file import SafetensorsFile

    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        SafetensorsFile(tmp_path / "junk.safetensors")
    save_file({"w": torch.ones(64, 64)}, str(tmp_path / "t.safetensors"))
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated"):
        SafetensorsFile(tmp_path / "cut.safetensors")
