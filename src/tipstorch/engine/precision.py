"""Which autocast to run inference under: bfloat16 where the device computes it natively."""

from __future__ import annotations

import contextlib

import torch

PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp32")


def use_bf16(device: str | torch.device, precision: str = "auto") -> bool:
    """Whether to autocast to bfloat16: "bf16" always, "fp32" never, "auto" on CUDA devices with
    bf16 support (CPU bf16 autocast works but is emulated and slower on most x86 CPUs)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision == "bf16"
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def inference_autocast(
    device: str | torch.device, precision: str = "auto"
) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to bfloat16 when ``use_bf16``, else a no-op context."""
    if not use_bf16(device, precision):
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
