"""Speech generator (CTC over units, streaming decode) and the unit vocoder interface."""

import json
import warnings

import pytest
import torch
from torch import nn

from lyra_pl.model.speech_generator import (
    SpeechGenerator,
    ctc_collapse,
    format_units,
    parse_units,
)
from lyra_pl.model.vocoder import UnitVocoder

N_UNITS = 50
LLM = 32


def make_generator(upsample: int = 25, dtype: torch.dtype = torch.float32,
                   seed: int = 0) -> SpeechGenerator:
    torch.manual_seed(seed)
    gen = SpeechGenerator(LLM, 32, num_heads=4, num_kv_heads=2, intermediate=64,
                          upsample=upsample, n_units=N_UNITS)
    return gen.to(dtype).eval()


def hidden(b: int, n: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, LLM, generator=g, dtype=dtype)


def offline_full(gen: SpeechGenerator, h: torch.Tensor) -> list[list[int]]:
    """ctc_collapse(argmax(forward(all))) over every frame of every row."""
    b, n = h.shape[:2]
    logits, _ = gen(h, torch.full((b,), n))
    return ctc_collapse(logits.argmax(-1), torch.full((b,), n * gen.upsample), gen.blank)


# ------------------------------------------------------------------------ shapes, loss


def test_shapes():
    gen = make_generator()
    logits, frame_lengths = gen(hidden(2, 3), torch.tensor([3, 2]))
    assert logits.shape == (2, 75, N_UNITS + 1)
    assert frame_lengths.tolist() == [75, 50]
    assert gen.blank == N_UNITS


def test_loss_finite_and_backward_reaches_all_parts():
    gen = make_generator().train()
    units = torch.randint(0, N_UNITS, (2, 10))
    loss = gen.loss(hidden(2, 3), torch.tensor([3, 2]), units, torch.tensor([10, 7]))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for name in ("input_proj.weight", "layers.0.self_attn.q_proj.weight",
                 "layers.1.mlp.down_proj.weight", "head.weight"):
        grad = gen.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_loss_float32_under_bf16():
    gen = make_generator(upsample=5).to(torch.bfloat16)
    loss = gen.loss(hidden(2, 4), torch.tensor([4, 3]), torch.randint(0, N_UNITS, (2, 6)),
                    torch.tensor([6, 5]))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_padded_batch_loss_equals_per_sample_losses():
    gen = make_generator(upsample=5, dtype=torch.float64)
    h = hidden(3, 6, torch.float64)
    lengths = torch.tensor([6, 4, 2])
    units = torch.randint(0, N_UNITS, (3, 9))
    unit_lengths = torch.tensor([9, 5, 3])
    units[1, 5:] = -100  # padding values must not matter
    batch = gen.loss(h, lengths, units, unit_lengths)
    alone = [gen.loss(h[i:i + 1, :lengths[i]], lengths[i:i + 1], units[i:i + 1, :unit_lengths[i]],
                      unit_lengths[i:i + 1]) for i in range(3)]
    torch.testing.assert_close(batch, torch.stack(alone).mean())


def test_too_long_target_names_the_sample():
    gen = make_generator(upsample=2)
    units = torch.randint(0, N_UNITS, (2, 5))
    with pytest.raises(ValueError, match=r"sample 1:.*5 units.*2 hidden states x 2 = 4 frames"):
        gen.loss(hidden(2, 3), torch.tensor([3, 2]), units, torch.tensor([5, 5]))


def test_repeats_need_a_blank_between_them():
    gen = make_generator(upsample=2)
    units = torch.tensor([[3, 3, 3, 4]])  # 4 units + 2 repeats = 6 frames > 2 * 2
    with pytest.raises(ValueError, match=r"sample 0:.*2 adjacent repeats.*needs 6 frames"):
        gen.loss(hidden(1, 2), torch.tensor([2]), units, torch.tensor([4]))
    assert torch.isfinite(gen.loss(hidden(1, 3), torch.tensor([3]), units, torch.tensor([4])))


def test_unit_out_of_range_names_the_sample():
    gen = make_generator(upsample=2)
    units = torch.tensor([[1, 2, 3], [4, N_UNITS, 0]])
    with pytest.raises(ValueError, match=rf"sample 1: unit id {N_UNITS} out of range"):
        gen.loss(hidden(2, 3), torch.tensor([3, 3]), units, torch.tensor([3, 3]))


# ---------------------------------------------------------------------------- collapse


def test_ctc_collapse_hand_made():
    b = 9
    ids = torch.tensor([
        [1, 1, 2, 2, 2, 3, b, b],   # repeats merge
        [b, 4, b, 4, 4, b, b, 5],   # a blank separates two equal units
        [b, b, b, b, b, b, b, b],   # all blank
        [7, 7, b, 8, 8, 8, 6, 6],   # length 4 cuts after the first 8
    ])
    out = ctc_collapse(ids, torch.tensor([8, 8, 8, 4]), blank=b)
    assert out == [[1, 2, 3], [4, 4, 5], [], [7, 8]]


# --------------------------------------------------------------------------- streaming


def test_stream_one_token_at_a_time_equals_offline():
    gen = make_generator(dtype=torch.float64)
    h = hidden(1, 6, torch.float64)
    stream = gen.stream(1)
    emitted = [stream.step(h[:, t:t + 1])[0] for t in range(6)]
    expected = offline_full(gen, h)
    assert stream.units == expected
    assert sum(emitted, []) == expected[0]
    assert stream.frames_seen == 6 * 25
    assert stream.cache.get_seq_length() == 6 * 25  # each step added only its own frames
    assert expected == gen.decode(h, torch.tensor([6]))


@pytest.mark.parametrize("upsample", [25, 2])
def test_stream_chunks_and_batch_equal_alone(upsample):
    gen = make_generator(upsample=upsample, dtype=torch.float64)
    h = hidden(3, 6, torch.float64, seed=7)
    stream = gen.stream(3)
    start = 0
    for n_new in (1, 3, 2):
        stream.step(h[:, start:start + n_new])
        start += n_new
    assert stream.units == offline_full(gen, h)
    for i in range(3):
        alone = gen.stream(1)
        for t in range(6):
            alone.step(h[i:i + 1, t:t + 1])
        assert alone.units[0] == stream.units[i]


def test_stream_collapses_across_step_boundaries():
    """With upsample 1 and a head that copies a fixed class per token, repeats split by a
    step boundary must be emitted once, and a blank must separate equal units."""
    gen = make_generator(upsample=1, dtype=torch.float64)
    classes = [3, 3, N_UNITS, 3, 5, 5]
    stream = gen.stream(1)
    logits = torch.full((1, len(classes), N_UNITS + 1), -1.0, dtype=torch.float64)
    logits[0, torch.arange(len(classes)), torch.tensor(classes)] = 1.0
    gen._logits = lambda frames, start=0, cache=None: logits[:, start:start + frames.shape[1]]
    out = [stream.step(hidden(1, 1, torch.float64))[0] for _ in classes]
    assert out == [[3], [], [], [3], [5], []]


def test_stream_inactive_samples_are_dropped():
    gen = make_generator(dtype=torch.float64)
    h = hidden(2, 5, torch.float64, seed=3)
    stream = gen.stream(2)
    stream.step(h[:, :2])
    new = stream.step(h[:, 2:], active=torch.tensor([True, False]))
    assert new[1] == []
    assert stream.units[0] == offline_full(gen, h)[0]
    assert stream.units[1] == offline_full(gen, h[1:, :2])[0]
    with pytest.raises(ValueError, match="cannot become active again"):
        stream.step(h[:, :1], active=torch.tensor([True, True]))


# ------------------------------------------------------------------------- unit strings


def test_units_round_trip_and_malformed():
    units = [12, 873, 0, 999]
    assert format_units(units) == "<12><873><0><999>"
    assert parse_units(format_units(units)) == units
    assert parse_units(" <5>\n") == [5] and parse_units("") == []
    for bad, offset in (("<12><87a>", 4), ("<12>873", 4), ("12", 0), ("<12><>", 4), ("<-1>", 0)):
        with pytest.raises(ValueError, match=f"offset {offset}"):
            parse_units(bad)
    with pytest.raises(ValueError, match="out of range"):
        parse_units("<1><1000>", n_units=1000)
    with pytest.raises(ValueError):
        format_units([1, -2])


# ----------------------------------------------------------------------------- vocoder


VOC_CFG = {
    "resblock": "1",
    "upsample_rates": [5, 4, 2],
    "upsample_kernel_sizes": [11, 8, 4],
    "upsample_initial_channel": 32,
    "resblock_kernel_sizes": [3, 7],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5]],
    "num_embeddings": 20,
    "embedding_dim": 16,
    "model_in_dim": 16,
    "sampling_rate": 16000,
}
DUR = {"encoder_embed_dim": 16, "var_pred_hidden_dim": 16, "var_pred_kernel_size": 3,
       "var_pred_dropout": 0.5}


def legacy_state_dict(cfg: dict) -> dict:
    """A random generator state dict under the old weight-norm names (weight_g / weight_v)."""
    torch.manual_seed(0)
    state = UnitVocoder(cfg).generator.state_dict()
    renamed = {}
    for key, value in state.items():
        key = key.replace(".parametrizations.weight.original0", ".weight_g")
        key = key.replace(".parametrizations.weight.original1", ".weight_v")
        renamed[key] = value + 0.01 * torch.randn_like(value)  # not the init values
    return renamed


def save_vocoder(directory, cfg: dict, state: dict, name: str = "g_00000100") -> None:
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    torch.save({"generator": state}, directory / name)


def test_vocoder_keys_match_fairseq_layout():
    state = legacy_state_dict({**VOC_CFG, "dur_predictor_params": DUR})
    expected = {"dict.weight"}
    for prefix in ["conv_pre", "conv_post", "ups.0", "ups.1", "ups.2"] + [
            f"resblocks.{r}.convs{c}.{m}" for r in range(6) for c in (1, 2) for m in range(3)]:
        expected |= {f"{prefix}.weight_g", f"{prefix}.weight_v", f"{prefix}.bias"}
    for part in ("conv1.0", "ln1", "conv2.0", "ln2", "proj"):
        expected |= {f"dur_predictor.{part}.weight", f"dur_predictor.{part}.bias"}
    assert set(state) == expected
    with warnings.catch_warnings():  # the legacy weight_norm is deprecated
        warnings.simplefilter("ignore")
        legacy = torch.nn.utils.weight_norm(nn.ConvTranspose1d(32, 16, 11, 5, padding=3))
    assert state["ups.0.weight_g"].shape == legacy.weight_g.shape
    assert state["ups.0.weight_v"].shape == legacy.weight_v.shape


def test_vocoder_round_trip(tmp_path):
    state = legacy_state_dict(VOC_CFG)
    save_vocoder(tmp_path / "voc", VOC_CFG, state)
    save_vocoder(tmp_path / "voc", VOC_CFG, {}, name="g_00000050")  # older step, ignored
    vocoder = UnitVocoder.from_pretrained(tmp_path / "voc")
    units = [3, 17, 0, 5, 5, 19, 2]
    wav = vocoder(units)
    assert wav.shape == (len(units) * 40,) and vocoder.hop_length == 40
    assert torch.isfinite(wav).all() and wav.abs().max() <= 1
    torch.testing.assert_close(vocoder(torch.tensor(units)), wav, rtol=0, atol=0)
    assert vocoder.sample_rate == 16000
    # The same weights before folding the weight norm give the same audio.
    again = UnitVocoder(VOC_CFG)
    again.generator.load_state_dict({k.replace(".weight_g", ".parametrizations.weight.original0")
                                     .replace(".weight_v", ".parametrizations.weight.original1"): v
                                     for k, v in state.items()})
    torch.testing.assert_close(again(units), wav)
    # A checkpoint file passed directly, config beside it.
    assert torch.equal(UnitVocoder.from_pretrained(tmp_path / "voc" / "g_00000100")(units), wav)


def test_vocoder_duration_predictor(tmp_path):
    cfg = {**VOC_CFG, "dur_predictor_params": DUR}
    save_vocoder(tmp_path, cfg, legacy_state_dict(cfg))
    vocoder = UnitVocoder.from_pretrained(tmp_path)
    units = [1, 2, 3, 4]
    wav = vocoder(units)  # duration prediction is on by default when the predictor exists
    assert wav.numel() % 40 == 0 and wav.numel() >= len(units) * 40
    assert vocoder(units, dur_prediction=False).shape == (len(units) * 40,)


def test_vocoder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        UnitVocoder.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no generator checkpoint"):
        UnitVocoder.from_pretrained(tmp_path)
    (tmp_path / "g_00000001").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="config"):
        UnitVocoder.from_pretrained(tmp_path)
    cfg = {k: v for k, v in VOC_CFG.items() if k != "num_embeddings"}
    with pytest.raises(ValueError, match="num_embeddings"):
        UnitVocoder(cfg)
    state = legacy_state_dict(VOC_CFG)
    del state["conv_post.bias"]
    save_vocoder(tmp_path / "bad", VOC_CFG, state)
    with pytest.raises(ValueError, match="conv_post.bias"):
        UnitVocoder.from_pretrained(tmp_path / "bad")
    vocoder = UnitVocoder(VOC_CFG)
    with pytest.raises(ValueError, match=r"unit 1 is 20, outside \[0, 20\)"):
        vocoder([1, 20])
    with pytest.raises(ValueError, match="non-empty"):
        vocoder([])
