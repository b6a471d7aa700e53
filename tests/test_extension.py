"""The package's import contract around the compiled extension."""
import subprocess
import sys

import torch

from lyra_pl import _extension


def test_ops_are_registered():
    for name in ("soft_dtw_forward", "soft_dtw_backward", "soft_dtw_alignment",
                 "soft_dtw_alignment_backward", "context_scores", "select_tokens", "prune_tokens"):
        assert hasattr(torch.ops.lyra, name)


def test_missing_extension_gives_build_instructions():
    code = (
        "import sys; sys.modules['lyra_pl._C'] = None\n"  # as if the .so had never been built
        "import lyra_pl\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "pip install -e . --no-build-isolation" in proc.stderr
    assert "extension is not built" in proc.stderr


def test_cuda_extension_present_when_gpu_is():
    if torch.cuda.is_available() and torch.version.cuda:
        assert _extension.HAS_CUDA_OPS, "a GPU is present but lyra_pl._C_cuda was not built"
