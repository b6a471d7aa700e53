"""Adapters that make peer soft-DTW libraries time the same dynamic program as our op.

Each adapter imports its library lazily and returns `fn(D) -> Tensor[B]`, the soft-DTW values
of a batch of full-length cost matrices D (B, L, S), differentiable w.r.t. D. Both peers take
two series and a distance function; we hand them dummy series of the right lengths and a
distance function that returns our precomputed D, so every implementation runs the same DP
on the same numbers. Peers take equal lengths only, so the benchmark times full-length batches.

Checked against the installed sources of pysdtw 0.0.5 and tslearn 0.10.0 (numba 0.68.1):
- pysdtw.SoftDTW(gamma, dist_func, use_cuda, bandwidth): numba CPU (prange over the batch) or
  numba CUDA (one block per sample, anti-diagonal sweep). `dist_func(X, Y)` gives D.
- tslearn.metrics.SoftDTWLossPyTorch(gamma, normalize, dist_func, ...): numba CPU only (the
  forward copies D to numpy), so we skip it on CUDA.
Both return R to torch through `torch.Tensor(ndarray)`, i.e. rounded to float32 whatever the
input dtype; the max-gradient-error column shows what that costs.
"""
from __future__ import annotations

import importlib.metadata
from typing import Callable

import torch

SoftDtwFn = Callable[[torch.Tensor], torch.Tensor]


class Unavailable(Exception):
    """The peer library is not installed or cannot run on the requested device."""


def _dummy_series(D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, L, S = D.shape
    return D.new_empty(B, L, 1), D.new_empty(B, S, 1)


def pysdtw_soft_dtw(gamma: float, device: torch.device) -> SoftDtwFn:
    try:
        import pysdtw
    except ImportError as e:
        raise Unavailable(f"pysdtw not installed ({e})") from None
    use_cuda = device.type == "cuda"
    if use_cuda:
        from numba import cuda

        if not cuda.is_available():
            raise Unavailable("numba reports no CUDA device")

    def run(D: torch.Tensor) -> torch.Tensor:
        x, y = _dummy_series(D)
        return pysdtw.SoftDTW(gamma=gamma, dist_func=lambda _x, _y: D, use_cuda=use_cuda)(x, y)

    return run


def tslearn_soft_dtw(gamma: float, device: torch.device) -> SoftDtwFn:
    if device.type != "cpu":
        raise Unavailable("tslearn's SoftDTWLossPyTorch computes on the CPU in numpy")
    try:
        from tslearn.metrics import SoftDTWLossPyTorch
    except ImportError as e:
        raise Unavailable(f"tslearn not installed ({e})") from None

    def run(D: torch.Tensor) -> torch.Tensor:
        x, y = _dummy_series(D)
        return SoftDTWLossPyTorch(gamma=gamma, dist_func=lambda _x, _y: D)(x, y)

    return run


SOFT_DTW_PEERS: dict[str, Callable[[float, torch.device], SoftDtwFn]] = {
    "pysdtw": pysdtw_soft_dtw,
    "tslearn": tslearn_soft_dtw,
}


def versions() -> dict[str, str | None]:
    """Installed versions of the peer libraries and their helpers (None when missing)."""
    out: dict[str, str | None] = {}
    for name in ("pysdtw", "tslearn", "numba", "matplotlib"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out
