"""The machine's matmul peak, measured beside the figures it scales (shared by the benchmark scripts)."""

from __future__ import annotations

import time

import torch


def matmul_seconds(dtype: torch.dtype, size: int = 1024) -> tuple[float, float]:
    """(seconds, FLOPs) of a [size, size] @ [size, size] matmul in ``dtype``: the best of 3 after a warm-up
    (one round's peak; the rounds' median is the figure)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best, 2 * size**3
