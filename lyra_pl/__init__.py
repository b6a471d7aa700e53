"""lyra_pl: a PyTorch Lightning training library for Lyra (arXiv 2412.09501)."""
from lyra_pl import ops

__all__ = ["ops"]
__version__ = "0.1.0"
