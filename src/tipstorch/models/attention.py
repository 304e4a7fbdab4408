"""Scaled dot-product attention of both towers, fused or written out (timm's ``fused_attn`` switch).

``fused=True`` calls ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels: the choice for
long sequences and on GPUs). ``fused=False`` writes the same maths as two matmuls and a softmax (whose
kernels accumulate in float32 for bfloat16 / float16 inputs):
on a CPU it is several times faster than the fused kernel's backward for short sequences in bfloat16
(measured at 18-66 tokens, ``benchmarks/attention.py``), at the cost of an explicit [B, H, L, L] score
tensor. Both give the same values to float tolerance.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v: query [B, H, Lq, d], key / value [B, H, Lk, d] -> [B, H, Lq, d].

    key_mask: optional bool broadcastable to [B, H, Lq, Lk], True where a key may be attended.
    """
    if fused:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=key_mask)
    scores = (query * (1.0 / math.sqrt(query.shape[-1]))) @ key.transpose(-2, -1)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    return scores.softmax(dim=-1) @ value
