"""The machine's matmul peak, measured beside the figures it scales (shared by the benchmark scripts)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

PEAK_SIZES = (1024, 2048)


def matmul_rate(dtype: torch.dtype, sizes: tuple[int, ...] = PEAK_SIZES, window: float = 0.1) -> float:
    """FLOP/s of square [size, size] @ [size, size] matmuls in ``dtype`` into a preallocated output: the
    best over ``sizes`` and 3 windows of at least ``window`` seconds each, after a warm-up. On an AMX Xeon
    (2 threads) 1024^2 in bf16 ran at 450-1180 GFLOP/s and 2048^2 at 950-2170 in the same minutes, so a
    1024^2 peak alone halved the denominator of every bf16 MFU; a single ~2 ms matmul is also too short
    to time alone on a shared machine."""
    best = 0.0
    for size in sizes:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        out = torch.empty(size, size, dtype=dtype)
        torch.matmul(a, b, out=out)
        for _ in range(3):
            count, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < window:
                torch.matmul(a, b, out=out)
                count += 1
            best = max(best, count * 2 * size**3 / elapsed)
    return best


def interleaved_rounds(rounds: int, timers: list[Callable[[], None]]) -> dict[torch.dtype, list[float]]:
    """Run every timer once per round, then time the bf16 and fp32 matmuls in the same round, so that the
    timed rows and the peak see the same machine load; returns each dtype's peak (FLOP/s) per round."""
    peaks: dict[torch.dtype, list[float]] = {torch.bfloat16: [], torch.float32: []}
    for _ in range(rounds):
        for timer in timers:
            timer()
        for dtype, rates in peaks.items():
            rates.append(matmul_rate(dtype))
    return peaks


def fraction_of_peak(flops: float, seconds: Sequence[float], peaks: Sequence[float]) -> float:
    """Median over rounds of (FLOPs / that round's seconds) / that round's peak: each timing is scaled by
    the peak measured right after it, so a change of machine speed between rounds cancels."""
    if len(seconds) != len(peaks):
        raise ValueError(f"fraction_of_peak needs one peak per round: {len(seconds)} timings, {len(peaks)} peaks")
    return statistics.median(flops / s / p for s, p in zip(seconds, peaks, strict=True))


def paired_ratio(reference: Sequence[float], seconds: Sequence[float]) -> float:
    """Median over rounds of reference seconds / seconds, both timed in the same round."""
    return statistics.median(r / s for r, s in zip(reference, seconds, strict=True))
