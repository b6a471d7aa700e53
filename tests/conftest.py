import pytest
import torch

from lyra_pl import _extension


def _devices():
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append(
            pytest.param("cuda", marks=pytest.mark.skipif(
                not _extension.HAS_CUDA_OPS,
                reason="a GPU is present but the CUDA extension was not built (LYRA_CUDA=0?)",
            ))
        )
    return devices


DEVICES = _devices()


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are zero)."""
    a, b = a.double(), b.double()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)
