"""Evaluation: metrics now; the task runners of issue 5 build on them."""
