"""Speech synthesis with espeak-ng: text -> trimmed mono float waveform.

espeak-ng is a formant synthesizer: robotic, but offline, small, and deterministic (the same
text, voice, speed and pitch give the same bytes), which makes a reproducible corpus.
It writes 22050 Hz audio; :func:`synthesize` resamples to the rate asked for.
"""
from __future__ import annotations

import random
import re
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np

from lyra_pl.data.media import load_audio

ESPEAK = "espeak-ng"


class CorpusError(RuntimeError):
    """A corpus build that cannot proceed (no espeak-ng, a synthesis failure, a bad output
    directory); the message says what to do."""


@dataclass(frozen=True)
class Voice:
    """An espeak-ng voice (``-v``, e.g. "en-us+f3"), speed in words per minute (``-s``) and
    pitch 0..99 (``-p``)."""

    name: str
    speed: int = 160
    pitch: int = 50

    @property
    def tag(self) -> str:
        """A file-name-safe label: "en-us-f3_s150_p65"."""
        return f"{self.file_name}_s{self.speed}_p{self.pitch}"

    @property
    def file_name(self) -> str:
        """The voice name, file-name safe: "en-us-f3"."""
        return self.name.replace("+", "-")


# Fixed voices: three speak the spoken questions of training, one is held out for validation;
# ``VOICE_NAMES`` (with random speed and pitch) speak the sentences of stages 1 and 3.
TRAIN_VOICES = (Voice("en-us", 165, 50), Voice("en-gb", 180, 40), Voice("en-us+f3", 155, 65))
VAL_VOICE = Voice("en-gb+f4", 170, 55)
VOICE_NAMES = ("en-us", "en-gb", "en-us+f3", "en-us+m3", "en-gb-x-rp", "en-us+f2")
ANSWER_VOICE = Voice("en-us", 165, 50)  # the one voice of stage-4 answers (unit targets)


def require_espeak() -> str:
    """The espeak-ng executable's path; a clear error when it is not installed."""
    path = shutil.which(ESPEAK)
    if path is None:
        raise CorpusError(
            "espeak-ng was not found on PATH; the tiny corpus is spoken by it. Install it "
            "(Debian/Ubuntu: apt-get install espeak-ng; macOS: brew install espeak-ng) and retry.")
    return path


def espeak_version() -> str:
    """espeak-ng's version, e.g. "1.51"."""
    out = subprocess.run([require_espeak(), "--version"], capture_output=True, text=True,
                         check=False).stdout
    m = re.search(r"text-to-speech:\s*(\S+)", out)
    return m.group(1) if m else out.strip()


def random_voice(rng: random.Random) -> Voice:
    """A voice from ``VOICE_NAMES`` with speed 150..190 and pitch 30..70."""
    return Voice(rng.choice(VOICE_NAMES), rng.randrange(150, 191, 5), rng.randrange(30, 71, 5))


def trim_silence(x: np.ndarray, rate: int, threshold: float = 0.01, pad: float = 0.03,
                 ) -> np.ndarray:
    """Cuts leading and trailing samples quieter than ``threshold``, keeping ``pad`` seconds."""
    loud = np.flatnonzero(np.abs(x) > threshold)
    if len(loud) == 0:
        return x
    keep = round(pad * rate)
    return x[max(0, loud[0] - keep): loud[-1] + 1 + keep]


def synthesize(text: str, voice: Voice, rate: int = 8000) -> np.ndarray:
    """Speaks ``text`` -> float32 mono waveform at ``rate`` Hz, silence trimmed."""
    cmd = [require_espeak(), "--stdout", "-v", voice.name, "-s", str(voice.speed),
           "-p", str(voice.pitch), text]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0 or not proc.stdout:
        raise CorpusError(f"espeak-ng failed (exit {proc.returncode}) on {text!r} with voice "
                           f"{voice.tag}: {proc.stderr.decode(errors='replace').strip()}")
    x, _ = load_audio(proc.stdout, f"espeak-ng output for {text!r}", rate)
    return trim_silence(x, rate)


