"""How many context tokens a pruning step keeps: the rule of ``select_tokens``, shared by the
plain-PyTorch reference and the memory planner. Its C++ twin, used by the CPU and CUDA
kernels, is ``csrc/prune/keep_count.h``; the two compute the same doubles in the same order.
"""
from __future__ import annotations

import math

# A product less than this below an integer counts as that integer. For n < 2**31 the double
# product keep_ratio * n is within n * 2**-52 < 4.8e-7 of the exact one, and for a ratio of at
# most 5 decimal places the exact product is an integer or at least 1e-5 below the next one.
KEEP_COUNT_EPS = 1e-6


def keep_count(n: int, keep_ratio: float, min_keep: int) -> int:
    """``n`` if ``n < min_keep``, else ``max(min_keep, floor(keep_ratio * n))`` with the floor of
    exact decimal arithmetic: 70% of 90 is 63, though ``0.7 * 90`` is 62.99999999999999."""
    if n < min_keep:
        return n
    product = keep_ratio * n
    k = math.floor(product)
    if product >= k + (1.0 - KEEP_COUNT_EPS):
        k += 1
    return max(min_keep, k)
