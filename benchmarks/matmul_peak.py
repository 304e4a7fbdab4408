"""The machine's matmul peak, measured beside the figures it scales (shared by the benchmark scripts)."""

from __future__ import annotations

import time
from collections.abc import Callable

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


def interleaved_rounds(rounds: int, timers: list[Callable[[], None]]) -> dict[torch.dtype, list[float]]:
    """Run every timer once per round, then time the bf16 and fp32 matmuls in the same round, so that the
    timed rows and the peak see the same machine load; returns each dtype's peak (FLOP/s) per round."""
    peaks: dict[torch.dtype, list[float]] = {torch.bfloat16: [], torch.float32: []}
    for _ in range(rounds):
        for timer in timers:
            timer()
        for dtype, rates in peaks.items():
            seconds, flops = matmul_seconds(dtype)
            rates.append(flops / seconds)
    return peaks
