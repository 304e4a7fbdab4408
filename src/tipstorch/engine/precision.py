"""Which autocast to run inference under: bfloat16 where the device computes it natively."""

from __future__ import annotations

import contextlib

import torch

from tipstorch.models.precision import native_bf16

PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp32")


def inference_bf16(device: str | torch.device, precision: str = "auto") -> bool:
    """Whether to autocast to bfloat16: "bf16" always, "fp32" never, "auto" where the device has bf16 matmuls
    (``native_bf16``: CUDA with bf16, AVX512-BF16 or AMX CPUs; elsewhere CPU bf16 is emulated and slower)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision == "bf16"
    return native_bf16(device)


def inference_autocast(
    device: str | torch.device, precision: str = "auto"
) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to bfloat16 when ``inference_bf16``, else a no-op context."""
    if not inference_bf16(device, precision):
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
