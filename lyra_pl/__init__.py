"""lyra_pl: a PyTorch Lightning training library for Lyra (arXiv 2412.09501)."""
from lyra_pl import ops

__all__ = ["ops", "LyraConfig", "LyraModel", "LyraInputs"]
__version__ = "0.1.0"

_MODEL_NAMES = {"LyraConfig", "LyraModel", "LyraInputs", "LyraOutput", "Sample", "collate"}


def __getattr__(name: str):
    # The model pulls in transformers (seconds to import); the kernels alone do not need it.
    if name in _MODEL_NAMES:
        from lyra_pl import model

        return getattr(model, name)
    raise AttributeError(f"module 'lyra_pl' has no attribute {name!r}")
