"""Linear layers with their bias and activation in one kernel for bf16 inference on a CPU.

On a CPU, ``F.linear`` with a bias first copies the broadcast bias into the output, then accumulates the
GEMM onto it (``addmm``), and a following GELU is one more pass over the output: for B/14 at 448 px in
bf16 the bias copies alone were 10% of a forward. oneDNN's ``mkldnn._linear_pointwise`` adds the bias and
applies the (exact, erf) GELU inside its GEMM. Measured on an AMX Xeon, 2 threads, B/14 shapes at 448 px,
batch 2 (7 interleaved rounds): fc1 + GELU 47.6 -> 31.9 ms, fc2 39.8 -> 32.0 ms.

Used only where all of this holds: a CPU tensor in bfloat16 with bfloat16 weights, a CPU that computes
bf16 natively (``precision.native_bf16``), and no backward to follow (oneDNN's op has no autograd
formula). Everything else (training, float32, autocast with float32 weights, GPUs) keeps ``F.linear``, so
float32 outputs stay bit-identical to transformers' and the official code's.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from tipstorch.models.precision import native_bf16

ACTIVATIONS = ("none", "gelu")


@functools.cache
def _cpu_has_fused_linear() -> bool:
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and native_bf16("cpu")
    )


def uses_fused_linear(tokens: torch.Tensor, layer: nn.Linear) -> bool:
    """Whether ``linear`` runs ``layer`` on ``tokens`` as one oneDNN kernel (see the module docstring)."""
    if tokens.device.type != "cpu" or tokens.dtype != torch.bfloat16 or layer.weight.dtype != torch.bfloat16:
        return False
    if torch.is_grad_enabled() and any(
        tensor is not None and tensor.requires_grad for tensor in (tokens, layer.weight, layer.bias)
    ):
        return False
    return _cpu_has_fused_linear()


def linear(tokens: torch.Tensor, layer: nn.Linear, activation: str = "none") -> torch.Tensor:
    """``activation(layer(tokens))``: tokens [..., in] -> [..., out]; ``activation`` "none" or "gelu" (erf)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"linear: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if uses_fused_linear(tokens, layer):
        return torch.ops.mkldnn._linear_pointwise(tokens, layer.weight, layer.bias, activation, [], "none")
    out = F.linear(tokens, layer.weight, layer.bias)
    return F.gelu(out) if activation == "gelu" else out
