"""Loads the compiled ops (torch.ops.lyra.*): the CPU extension always, the CUDA one if built."""
import importlib

import torch  # noqa: F401  (the extensions link against libtorch: load it first)

_BUILD_HINT = (
    "lyra_pl's C++ extension is not built. From the repository root, after installing torch:\n"
    "    pip install -e . --no-build-isolation\n"
    "(see README.md; LYRA_CUDA=0 skips the CUDA part)."
)

try:
    importlib.import_module("lyra_pl._C")
except ImportError as e:
    raise ImportError(f"{_BUILD_HINT}\nOriginal error: {e}") from e

try:
    importlib.import_module("lyra_pl._C_cuda")
    HAS_CUDA_OPS = True
except ModuleNotFoundError:
    HAS_CUDA_OPS = False
