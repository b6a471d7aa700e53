"""Audio path: AudioBatch validation, log-mel parity with Whisper, windowed speech and sound."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperFeatureExtractor

from lyra_pl.model.audio import (
    SAMPLE_RATE,
    SAMPLES_PER_STATE,
    STATES_PER_WINDOW,
    WINDOW_SAMPLES,
    AudioBatch,
    log_mel,
)
from lyra_pl.model.encoders import AudioEncoder
from lyra_pl.model.projectors import SoundProjector, SpeechProjector

D = 32  # tiny encoder width
OUT = 16  # tiny LLM width
LOOSE = dict(atol=1e-4, rtol=1e-4)  # our log-mel vs Hugging Face's, through the encoder


def tiny_whisper_config(**overrides) -> WhisperConfig:
    kwargs = dict(
        d_model=D, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64, vocab_size=128,
        num_mel_bins=128, max_source_positions=1500, max_target_positions=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3,
    )
    kwargs.update(overrides)
    return WhisperConfig(**kwargs)


def frozen_encoder(dtype: torch.dtype = torch.float64, window_batch: int = 3) -> AudioEncoder:
    torch.manual_seed(0)
    encoder = AudioEncoder(tiny_whisper_config(), window_batch=window_batch).to(dtype).eval()
    encoder.whisper.requires_grad_(False)
    return encoder


@pytest.fixture(scope="module")
def encoder() -> AudioEncoder:
    return frozen_encoder()


@pytest.fixture(scope="module")
def speech_projector() -> SpeechProjector:
    torch.manual_seed(1)
    return SpeechProjector(D, OUT, hidden=32).double()


@pytest.fixture(scope="module")
def sound_projector() -> SoundProjector:
    torch.manual_seed(2)
    return SoundProjector(D, OUT, n_tokens=4, hidden=32).double()


def noise(seconds: float, seed: int, scale: float = 0.1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(round(seconds * SAMPLE_RATE), generator=g) * scale


def sine(seconds: float, hz: float = 440.0) -> torch.Tensor:
    t = torch.arange(round(seconds * SAMPLE_RATE), dtype=torch.float64) / SAMPLE_RATE
    return (0.5 * torch.sin(2 * math.pi * hz * t)).float()


def whisper_features(window: torch.Tensor, bins: int = 128) -> torch.Tensor:
    """The Hugging Face reference: features of one (possibly short) window, (bins, 3000)."""
    extractor = WhisperFeatureExtractor(feature_size=bins)
    return extractor(window.numpy(), sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features[0]


def padded(clip: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(clip, (0, WINDOW_SAMPLES - clip.numel()))


# ---------------------------------------------------------------- log-mel


@pytest.mark.parametrize("bins", [128, 80])
def test_log_mel_matches_whisper_feature_extractor(bins):
    windows = [noise(30, seed=0), sine(30, 440.0), sine(2.0, 1000.0), noise(0.5, seed=1)]
    ours = log_mel(torch.stack([padded(w) for w in windows]), num_mel_bins=bins)
    assert ours.shape == (4, bins, 3000) and ours.dtype == torch.float32
    for i, w in enumerate(windows):
        torch.testing.assert_close(ours[i], whisper_features(w, bins), atol=1e-4, rtol=0)


def test_log_mel_rejects_wrong_window_length():
    with pytest.raises(ValueError, match="480000"):
        log_mel(torch.zeros(2, 16000))


# ---------------------------------------------------------------- AudioBatch


def test_audio_batch_from_list_pads_and_counts():
    clips = [noise(2, 0), np.zeros(800, dtype=np.float64), noise(30.01, 1).unsqueeze(0)]
    batch = AudioBatch.from_list(clips)
    assert batch.waveforms.shape == (3, 480160) and batch.waveforms.dtype == torch.float32
    assert batch.lengths.tolist() == [32000, 800, 480160]
    assert batch.num_tokens().tolist() == [20, 1, 301]
    assert batch.num_windows().tolist() == [1, 1, 2]
    assert len(batch) == 3
    assert torch.all(batch.waveforms[0, 32000:] == 0)
    assert batch.to("cpu").lengths.tolist() == batch.lengths.tolist()


@pytest.mark.parametrize(
    "clips, rates, match",
    [
        (
            [noise(1, 0), noise(1, 1)],
            [16000, 22050],
            r"speech clip 1 \(batch sample 7\).*22050 Hz.*16000 Hz.*[Rr]esample",
        ),
        ([noise(1, 0), torch.zeros(0)], 16000, r"speech clip 1 \(batch sample 7\).*empty"),
        (
            [torch.tensor([0.0, float("nan"), 1.0])],
            16000,
            r"speech clip 0 \(batch sample 3\).*NaN.*first at sample 1",
        ),
        ([torch.tensor([0.0, float("inf")])], 16000, r"clip 0.*NaN or inf"),
        ([torch.zeros(2, 100)], 16000, r"clip 0.*\(2, 100\).*mono"),
        ([torch.zeros(100, 2)], 16000, r"clip 0.*mono"),
        ([torch.zeros(1, 2, 3)], 16000, r"clip 0.*mono"),
        ([torch.zeros(100, dtype=torch.int16)], 16000, r"clip 0.*int16.*float"),
        ([np.zeros(100, dtype=np.int16)], 16000, r"clip 0.*int16.*float"),
    ],
)
def test_audio_batch_rejects_bad_clips(clips, rates, match):
    ids = [3] if len(clips) == 1 else [2, 7]
    with pytest.raises(ValueError, match=match):
        AudioBatch.from_list(clips, sample_rates=rates, sample_ids=ids)


def test_audio_batch_error_without_sample_ids_names_kind_and_clip():
    with pytest.raises(ValueError, match=r"^sound clip 0: sample rate is 44100 Hz"):
        AudioBatch.from_list([noise(1, 0)], sample_rates=44100, kind="sound")


def test_audio_batch_post_init_checks_lengths():
    with pytest.raises(ValueError, match=r"speech clip 1: length 11 is outside \[1, 10\]"):
        AudioBatch(torch.zeros(2, 10), torch.tensor([10, 11]))
    with pytest.raises(ValueError, match=r"speech clip 0: length 0"):
        AudioBatch(torch.zeros(2, 10), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="int64"):
        AudioBatch(torch.zeros(2, 10), torch.tensor([1, 3], dtype=torch.int32))


# ---------------------------------------------------------------- speech


LENGTHS_S = [2.0, 0.05, 30.0, 30.01, 65.0]


@pytest.fixture(scope="module")
def speech_clips() -> list[torch.Tensor]:
    return [noise(s, seed=10 + i) for i, s in enumerate(LENGTHS_S)]


@pytest.fixture(scope="module")
def speech_result(encoder, speech_projector, speech_clips):
    return encoder.speech(AudioBatch.from_list(speech_clips), speech_projector)


def test_speech_token_counts(speech_result):
    tokens, counts = speech_result
    assert counts.tolist() == [20, 1, 300, 301, 650]
    assert counts.dtype == torch.int64
    assert tokens.shape == (sum(counts.tolist()), OUT)


def test_speech_matches_per_window_reference(encoder, speech_projector, speech_clips, speech_result):
    """Each window through Hugging Face's feature extractor and Whisper by itself, then the
    first ceil(real / 1600) groups of 5 states through the projector."""
    expected = []
    for clip in speech_clips:
        for start in range(0, clip.numel(), WINDOW_SAMPLES):
            window = clip[start : start + WINDOW_SAMPLES]
            features = whisper_features(window).double()[None]
            states = encoder.whisper(input_features=features).last_hidden_state[0]
            n_tokens = math.ceil(window.numel() / 1600)
            expected.append(speech_projector(states[: 5 * n_tokens]))
    torch.testing.assert_close(speech_result[0], torch.cat(expected), **LOOSE)


def test_speech_batching_does_not_mix_clips(encoder, speech_projector, speech_clips, speech_result):
    tokens, counts = speech_result
    for clip, mine in zip(speech_clips, tokens.split(counts.tolist())):
        alone, alone_counts = encoder.speech(AudioBatch.from_list([clip]), speech_projector)
        assert alone_counts.tolist() == [mine.shape[0]]
        torch.testing.assert_close(mine, alone, atol=1e-10, rtol=1e-10)


def test_speech_ignores_padding_garbage(encoder, speech_projector, speech_clips, speech_result):
    clean = AudioBatch.from_list(speech_clips)
    garbage = torch.randn_like(clean.waveforms) * 100
    garbage[1, 5000:7000] = float("nan")
    pad = torch.arange(clean.waveforms.shape[1]) >= clean.lengths[:, None]
    dirty = AudioBatch(torch.where(pad, garbage, clean.waveforms), clean.lengths)
    tokens, counts = encoder.speech(dirty, speech_projector)
    assert counts.tolist() == speech_result[1].tolist()
    torch.testing.assert_close(tokens, speech_result[0], atol=0, rtol=0)


def test_speech_window_batch_does_not_change_result(speech_projector, speech_clips, speech_result):
    for window_batch in (1, 16):
        encoder = frozen_encoder(window_batch=window_batch)
        tokens, _ = encoder.speech(AudioBatch.from_list(speech_clips), speech_projector)
        torch.testing.assert_close(tokens, speech_result[0], atol=1e-10, rtol=1e-10)


def test_speech_gradients_reach_projector_not_whisper(speech_clips):
    encoder = frozen_encoder(torch.float32)
    torch.manual_seed(3)
    projector = SpeechProjector(D, OUT, hidden=32)
    tokens, _ = encoder.speech(AudioBatch.from_list(speech_clips[:2]), projector)
    assert tokens.requires_grad
    tokens.square().mean().backward()
    for p in projector.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.whisper.parameters())


def test_speech_rejects_mismatched_projector(encoder):
    with pytest.raises(ValueError, match="downsample=5"):
        projector = SpeechProjector(D, OUT, downsample=4, hidden=8)
        encoder.speech(AudioBatch.from_list([noise(1, 0)]), projector)
    with pytest.raises(ValueError, match="encoder_dim=32"):
        encoder.speech(AudioBatch.from_list([noise(1, 0)]), SpeechProjector(64, OUT, hidden=8))


def test_speech_empty_batch_gives_no_tokens(encoder, speech_projector):
    tokens, counts = encoder.speech(AudioBatch.from_list([]), speech_projector)
    assert tokens.shape == (0, OUT) and counts.shape == (0,)


# ---------------------------------------------------------------- sound


SOUND_LENGTHS = [3.0, 2 * SAMPLES_PER_STATE / SAMPLE_RATE, 31.0, 0.5]


@pytest.fixture(scope="module")
def sound_clips() -> list[torch.Tensor]:
    return [noise(s, seed=20 + i) for i, s in enumerate(SOUND_LENGTHS)]


def test_sound_counts_and_independence(encoder, sound_projector, sound_clips):
    tokens, counts = encoder.sound(AudioBatch.from_list(sound_clips, kind="sound"), sound_projector)
    assert counts.tolist() == [4, 4, 4, 4] and tokens.shape == (16, OUT)
    for i, clip in enumerate(sound_clips):
        alone, _ = encoder.sound(AudioBatch.from_list([clip], kind="sound"), sound_projector)
        torch.testing.assert_close(tokens[4 * i : 4 * i + 4], alone, atol=1e-10, rtol=1e-10)


def _states(encoder: AudioEncoder, clip: torch.Tensor) -> torch.Tensor:
    """Real Whisper states of a clip, window by window through the Hugging Face extractor."""
    out = []
    for start in range(0, clip.numel(), WINDOW_SAMPLES):
        window = clip[start : start + WINDOW_SAMPLES]
        features = whisper_features(window).double()[None]
        states = encoder.whisper(input_features=features).last_hidden_state[0]
        out.append(states[: math.ceil(window.numel() / SAMPLES_PER_STATE)])
    return torch.cat(out)


def segment_means(states: torch.Tensor, k: int = 4) -> torch.Tensor:
    segment = torch.arange(states.shape[0]) * k // states.shape[0]
    return torch.stack([states[segment == m].mean(0) for m in range(k)])


def test_sound_pools_equal_segments_of_real_states(encoder, sound_projector, sound_clips):
    tokens, _ = encoder.sound(AudioBatch.from_list(sound_clips, kind="sound"), sound_projector)
    # 3 s = 150 states -> segments of 38, 37, 38, 37 (state i goes to floor(4 i / 150)).
    states = _states(encoder, sound_clips[0])
    assert states.shape[0] == 150
    torch.testing.assert_close(tokens[:4], sound_projector(segment_means(states)), **LOOSE)
    # 2 states, 4 tokens: states repeat as 0, 0, 1, 1.
    states = _states(encoder, sound_clips[1])
    assert states.shape[0] == 2
    torch.testing.assert_close(tokens[4:8], sound_projector(states[[0, 0, 1, 1]]), **LOOSE)
    # 31 s spans two windows: 1500 + 50 states pooled together.
    states = _states(encoder, sound_clips[2])
    assert states.shape[0] == STATES_PER_WINDOW + 50
    torch.testing.assert_close(tokens[8:12], sound_projector(segment_means(states)), **LOOSE)


def test_sound_gradients_reach_projector(sound_clips):
    encoder = frozen_encoder(torch.float32)
    projector = SoundProjector(D, OUT, n_tokens=2, hidden=32)
    tokens, counts = encoder.sound(AudioBatch.from_list(sound_clips[:2], kind="sound"), projector)
    assert counts.tolist() == [2, 2] and tokens.shape == (4, OUT)
    tokens.sum().backward()
    assert all(p.grad is not None for p in projector.parameters())
    assert all(p.grad is None for p in encoder.whisper.parameters())


# ---------------------------------------------------------------- construction


def test_audio_encoder_requires_30_second_windows():
    with pytest.raises(ValueError, match=r"max_source_positions=1000 \(2000 frames\)"):
        AudioEncoder(tiny_whisper_config(max_source_positions=1000))


def test_speech_projector_rejects_partial_groups():
    projector = SpeechProjector(D, OUT, hidden=8)
    assert projector(torch.zeros(2, 10, D)).shape == (2, 2, OUT)
    with pytest.raises(ValueError, match="12 encoder states, not a multiple of downsample k=5"):
        projector(torch.zeros(12, D))
