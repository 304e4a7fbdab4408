"""Scaled dot-product attention of both towers, fused or written out (timm's ``fused_attn`` switch), chosen
per call by device, dtype, sequence length and whether a backward follows (``fused=None``, the default).

``fused=True`` calls ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels); ``fused=False``
writes the same maths as two matmuls and a softmax (whose kernels accumulate in float32 for bfloat16 /
float16 inputs), at the cost of an explicit [B, H, Lq, Lk] score tensor. Both give the same values to
float tolerance. ``use_fused_attention`` (``fused=None``) picks the form that costs less where it was
measured (``benchmarks/attention.py``, 5 rounds: 6 heads x 64, B x L ~ 16k tokens, one thread of an AMX
Xeon; written-out CPU time / fused):

======================  =======  =======  =======  ========
CPU, Lk tokens          18       66       258      1026
======================  =======  =======  =======  ========
bf16, forward+backward  0.11     0.13     0.57     1.18
fp32, forward+backward  0.73     0.89     1.68     1.90
bf16, forward           0.93     0.82     1.13     3.46
fp32, forward           0.99     1.09     2.43     2.90
======================  =======  =======  =======  ========

The rule (``WRITTEN_OUT_MAX_TOKENS``): on a CPU, written out for at most 512 keys when a backward follows
in bf16 / fp16 (the fused kernel's CPU backward in bf16 is several times slower), 128 keys for a backward
in fp32 or a bf16 / fp16 forward, never for an fp32 forward; fused on every other device (CUDA's flash
kernels) and for longer sequences, where the written-out [Lq, Lk] scores grow as L^2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

HALF_DTYPES = (torch.bfloat16, torch.float16)
# (a backward follows, bf16 / fp16) -> the longest key sequence written out on a CPU (0: always fused)
WRITTEN_OUT_MAX_TOKENS = {(True, True): 512, (True, False): 128, (False, True): 128, (False, False): 0}


def use_fused_attention(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether ``attention`` with ``fused=None`` calls the fused kernel for these queries / keys
    [B, H, L, d] (see the module docstring for the measurement behind the rule)."""
    if query.device.type != "cpu":
        return True
    backward = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)
    return key.shape[-2] > WRITTEN_OUT_MAX_TOKENS[(backward, query.dtype in HALF_DTYPES)]


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    fused: bool | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v: query [B, H, Lq, d], key / value [B, H, Lk, d] -> [B, H, Lq, d].

    key_mask: optional bool broadcastable to [B, H, Lq, Lk], True where a key may be attended.
    fused: the fused kernel (True), the written-out form (False) or ``use_fused_attention``'s choice (None).
    """
    if fused is None:
        fused = use_fused_attention(query, key)
    if fused:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=key_mask)
    scores = (query * (1.0 / math.sqrt(query.shape[-1]))) @ key.transpose(-2, -1)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    return scores.softmax(dim=-1) @ value
