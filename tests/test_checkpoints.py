"""Checkpoint folders laid out as on the hub, checked before anything is built: every field
that changes the numbers (not only the shapes), every shard present, every file complete.
Fixtures are written here: transformers 4.4x-era Qwen2-VL config.json files (text fields at
the top level, ``rope_scaling: {type: mrope}``, ``in_chans``), old key names, two shards and an
index, tied and untied embeddings, Whisper's fp16 ``model.safetensors`` beside fp32 shards."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import Qwen2VLForConditionalGeneration, WhisperForConditionalGeneration

from lyra_pl.model import LyraConfig, LyraInputs, LyraModel
from lyra_pl.model.checkpoints import CheckpointError, check_qwen2vl, check_whisper

ROOT = Path(__file__).resolve().parents[1]


def old_qwen2vl_config(cfg: LyraConfig) -> dict:
    """config.json as the hub's Qwen2-VL-*-Instruct folders have it (transformers 4.4x)."""
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "vocab_size": cfg.vocab_size,
        "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": {"type": "mrope", "mrope_section": list(cfg.mrope_section)},
        "max_position_embeddings": 32768, "tie_word_embeddings": cfg.tie_word_embeddings,
        "image_token_id": cfg.image_token_id, "video_token_id": cfg.video_token_id,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653, "torch_dtype": "bfloat16",
        "vision_config": {"depth": cfg.vision_depth, "embed_dim": cfg.vision_embed_dim,
                          "mlp_ratio": cfg.vision_mlp_ratio, "num_heads": cfg.vision_num_heads,
                          "in_chans": 3, "hidden_size": cfg.hidden_size,
                          "patch_size": cfg.patch_size, "spatial_merge_size": 2,
                          "spatial_patch_size": cfg.patch_size, "temporal_patch_size": 2},
    }


def old_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's keys as the hub's 4.4x files name them: model.*, visual.*, lm_head."""
    out = {}
    for key, value in state.items():
        for new, old in (("model.language_model.", "model."), ("model.visual.", "visual."),
                         ("lm_head.", "lm_head.")):
            if key.startswith(new):
                out[old + key[len(new):]] = value
    return out


def write_shards(directory: Path, state: dict[str, torch.Tensor], shards: int = 2,
                 prefix: str = "model") -> None:
    """``state`` in ``shards`` files and an index, named as the hub names them."""
    directory.mkdir(parents=True, exist_ok=True)
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"{prefix}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: state[k].contiguous() for k in part}, str(directory / name),
                  metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (directory / f"{prefix}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def hub_qwen2vl(directory: Path, cfg: LyraConfig, seed: int = 0) -> Qwen2VLForConditionalGeneration:
    torch.manual_seed(seed)
    hf = Qwen2VLForConditionalGeneration(cfg.qwen2vl_config()).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    state = old_keys(hf.state_dict())
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight")  # the 2B folder: tied, no lm_head tensor
    write_shards(directory, state)
    (directory / "config.json").write_text(json.dumps(old_qwen2vl_config(cfg)))
    return hf


@pytest.mark.parametrize("tied", [False, True])
def test_old_hub_layout_loads_exactly(tmp_path, tied):
    """A 4.4x-era folder (old config and keys, two shards, tied or not) passes the check and
    loads to the logits transformers computes from the same folder."""
    cfg = LyraConfig.from_preset("tiny", tie_word_embeddings=tied)
    hub_qwen2vl(tmp_path / "qwen", cfg)
    check_qwen2vl(tmp_path / "qwen", cfg)
    ours = LyraModel.from_pretrained(cfg, qwen2vl=str(tmp_path / "qwen")).eval()
    theirs = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "qwen",
                                                             dtype=torch.float32).eval()
    ids = torch.randint(0, 400, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ours(LyraInputs(input_ids=ids), return_logits=True).logits
        b = theirs(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_whisper_fp16_file_beside_fp32_shards(tmp_path):
    """whisper-large-v3's folder: model.safetensors (fp16) plus model.fp32-*.safetensors shards
    and their index: the fp16 file is the one read."""
    cfg = LyraConfig.from_preset("tiny")
    torch.manual_seed(1)
    whisper = WhisperForConditionalGeneration(cfg.whisper_config())
    d = tmp_path / "whisper"
    whisper.half().save_pretrained(d)
    write_shards(d, {k: v.float() for k, v in whisper.state_dict().items()}, prefix="model.fp32")
    assert check_whisper(d, cfg) == [d / "model.safetensors"]
    model = LyraModel.from_pretrained(cfg, whisper=str(d))
    for k, v in whisper.model.encoder.state_dict().items():
        assert torch.equal(model.audio_encoder.whisper.state_dict()[k], v.float()), k


# ----------------------------------------------------------------------------- mismatches
MINI = LyraConfig.from_preset("mini")


def mini_folder(root: Path, **changes) -> Path:
    """A mini-shaped (Qwen2-VL-2B) folder: its real config.json with ``changes`` (dotted keys
    for the vision config) and two small stand-in shards: what the check reads, no weights."""
    config = old_qwen2vl_config(MINI)
    for key, value in changes.items():
        target = config["vision_config"] if key.startswith("vision.") else config
        target[key.removeprefix("vision.")] = value
    write_shards(root, {"model.embed_tokens.weight": torch.zeros(4, 4),
                        "visual.patch_embed.proj.weight": torch.zeros(2, 2)})
    (root / "config.json").write_text(json.dumps(config))
    return root


_PROBE = """
import resource, sys, time
from lyra_pl.model import LyraConfig, LyraModel
from lyra_pl.model.checkpoints import CheckpointError
config = LyraConfig.from_preset("mini")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    LyraModel.from_pretrained(config, qwen2vl=sys.argv[1])
    print("LOADED")
except CheckpointError as e:
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(f"{time.perf_counter() - start:.3f} {grew} {e}")
"""


@pytest.mark.parametrize("changes,words", [
    ({"vision.num_heads": 8}, "vision_config.num_heads is 8 in the checkpoint, 16 in the model"),
    ({"rope_theta": 10000.0}, "rope_theta is 10000.0 in the checkpoint, 1000000.0 in the model"),
    ({"rms_norm_eps": 1e-5}, "rms_norm_eps is 1e-05 in the checkpoint, 1e-06 in the model"),
    ({"rope_scaling": {"type": "mrope", "mrope_section": [16, 16, 32]}},
     "mrope_section is [16, 16, 32] in the checkpoint, [16, 24, 24] in the model"),
    ({"vision.in_chans": 4}, "vision_config.in_channels is 4"),
    ({"vision.spatial_merge_size": 4}, "vision_config.spatial_merge_size is 4"),
    ({"image_token_id": 7}, "image_token_id is 7"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings is False in the checkpoint, True"),
])
def test_silent_mismatches_fail_before_anything_is_built(tmp_path, changes, words):
    """Fields that change no tensor shape: each fails at once, in one line naming the file and
    the field with both values, before the 3B model is built (no memory to speak of)."""
    d = mini_folder(tmp_path / "qwen", **changes)
    out = subprocess.run([sys.executable, "-c", _PROBE, str(d)], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    seconds, grew_kib, message = out.stdout.strip().split(" ", 2)
    assert float(seconds) < 5 and int(grew_kib) < 100_000, out.stdout  # Mini: ~12 GB built
    assert "\n" not in message and str(d / "config.json") in message and words in message


def test_missing_and_truncated_shards_are_named(tmp_path):
    d = mini_folder(tmp_path / "missing")
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json names shard "
                                              r"model-00002-of-00002.safetensors, which is missing"):
        check_qwen2vl(d, MINI)
    d = mini_folder(tmp_path / "truncated")
    shard = d / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])  # an interrupted download
    with pytest.raises(CheckpointError, match=rf"{shard}: truncated: .* its header describes"):
        check_qwen2vl(d, MINI)
    shard.write_bytes(shard.read_bytes()[:6])
    with pytest.raises(CheckpointError, match="truncated: 6 bytes, not even a safetensors header"):
        check_qwen2vl(d, MINI)
    d = mini_folder(tmp_path / "fine")
    assert len(check_qwen2vl(d, MINI)) == 2


def test_whisper_mismatch_names_the_field(tmp_path):
    cfg = LyraConfig.from_preset("tiny")
    d = tmp_path / "whisper"
    WhisperForConditionalGeneration(cfg.whisper_config()).save_pretrained(d)
    config = json.loads((d / "config.json").read_text())
    config["num_mel_bins"] = 80  # whisper-large-v2 and earlier
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="num_mel_bins is 80 in the checkpoint, 128 in the model"):
        check_whisper(d, cfg)


def test_the_cli_names_a_mismatch_in_one_line_before_anything_starts(tmp_path, monkeypatch,
                                                                       capsys):
    from test_cli import _fit_error

    d = mini_folder(tmp_path / "qwen", rope_theta=10000.0)
    config = str(ROOT / "configs/mini/stage1_speech_align.yaml")
    err = _fit_error(["--config", config, f"--model.init_args.qwen2vl={d}",
                      "--model.init_args.whisper=null", "--model.init_args.init_from=null",
                      "--trainer.accelerator=cpu", "--trainer.devices=1"],
                     tmp_path, monkeypatch, capsys)
    assert err.startswith("error: --model.init_args.qwen2vl:") and "rope_theta is 10000.0" in err
