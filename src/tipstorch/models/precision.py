"""Whether a device computes bfloat16 natively: the one test behind every "auto" precision choice (training's
``loop.bf16: auto``, the data engine's ``precision="auto"``)."""

from __future__ import annotations

import torch


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware: a CUDA device with bf16 support, or a CPU with
    AVX512-BF16 or AMX. Elsewhere oneDNN emulates bf16 (an AVX2-only AMD EPYC: 0.6 GFLOP/s bf16 vs 83 fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False
