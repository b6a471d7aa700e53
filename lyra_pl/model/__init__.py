"""The Lyra model: config and presets, encoders, assembly, decoder with LMME, generation."""
from lyra_pl.model.config import PRESETS, LyraConfig
from lyra_pl.model.inputs import LyraInputs, Sample, collate
from lyra_pl.model.lyra import LyraModel, LyraOutput

__all__ = ["PRESETS", "LyraConfig", "LyraInputs", "LyraModel", "LyraOutput", "Sample", "collate"]
