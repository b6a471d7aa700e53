"""Benchmarks: `python -m lyra_pl.bench kernels` (also `lyra-pl bench kernels`).

See docs/benchmarks.md for the methodology and measured results.
"""
