"""Non-speech sound events synthesized with numpy, one caption each.

Frequencies stay below 3 kHz so the clips survive the corpus's 8 kHz storage. Every call with
a different generator gives a different rendering (pitch, length, loudness jitter).
"""
from __future__ import annotations

import numpy as np


def _tone(freq: np.ndarray | float, seconds: float, rate: int) -> np.ndarray:
    """A sine of constant or per-sample frequency with 10 ms fades."""
    n = round(seconds * rate)
    f = np.broadcast_to(np.asarray(freq, dtype=np.float64), (n,))
    x = np.sin(2 * np.pi * np.cumsum(f) / rate)
    fade = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.01 * rate))
    return x * fade


def high_beep(g: np.random.Generator, rate: int) -> np.ndarray:
    return _tone(g.uniform(1500, 2500), g.uniform(0.3, 0.5), rate)


def low_hum(g: np.random.Generator, rate: int) -> np.ndarray:
    f0, seconds = g.uniform(90, 160), g.uniform(0.45, 0.6)
    return (_tone(f0, seconds, rate) + 0.5 * _tone(2 * f0, seconds, rate)
            + 0.25 * _tone(3 * f0, seconds, rate)) / 1.75


def rising_chirp(g: np.random.Generator, rate: int) -> np.ndarray:
    n = round(g.uniform(0.4, 0.6) * rate)
    return _tone(np.linspace(g.uniform(250, 400), g.uniform(2000, 2800), n), n / rate, rate)


def falling_chirp(g: np.random.Generator, rate: int) -> np.ndarray:
    return rising_chirp(g, rate)[::-1].copy()


def noise_burst(g: np.random.Generator, rate: int) -> np.ndarray:
    n = round(g.uniform(0.25, 0.4) * rate)
    return g.uniform(-1.0, 1.0, n) * np.exp(-np.arange(n) / (0.15 * rate))


def two_beeps(g: np.random.Generator, rate: int) -> np.ndarray:
    f, beep = g.uniform(700, 1300), g.uniform(0.1, 0.15)
    gap = np.zeros(round(g.uniform(0.08, 0.15) * rate))
    return np.concatenate([_tone(f, beep, rate), gap, _tone(f, beep, rate)])


SOUND_EVENTS = {
    "high beep": high_beep,
    "low hum": low_hum,
    "rising chirp": rising_chirp,
    "falling chirp": falling_chirp,
    "noise burst": noise_burst,
    "two short beeps": two_beeps,
}
"""caption -> generator(np.random.Generator, rate) -> float waveform. Each caption's first word
is its own, so the event is decided at the answer's first token, as the tiny base model's
one-word image answers are (the rest then follows the words, which stage 0 teaches it)."""


def sound_event(caption: str, g: np.random.Generator, rate: int = 8000) -> np.ndarray:
    """One rendering of the event ``caption`` as float32 in [-1, 1], peak 0.3..0.8."""
    x = SOUND_EVENTS[caption](g, rate)
    return (x / np.abs(x).max() * g.uniform(0.3, 0.8)).astype(np.float32)
