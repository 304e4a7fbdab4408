"""A test-side transcription of the official ``pytorch/decoders.py`` (google-deepmind/tips, 4db271d):
the DPT forward pass written as plain functions over a state dict in the official key names, so the
library's modules can be checked against it. Inputs are the official ``(cls_token [B, D],
patch_map [B, D, h, w])`` pairs, one per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Weights = dict[str, torch.Tensor]


def _conv(w: Weights, name: str, x: torch.Tensor, stride: int = 1, padding: int = 0) -> torch.Tensor:
    return F.conv2d(x, w[name + ".weight"], w.get(name + ".bias"), stride=stride, padding=padding)


def _pre_activation_unit(w: Weights, name: str, x: torch.Tensor) -> torch.Tensor:
    y = _conv(w, name + ".conv1", F.relu(x), padding=1)
    return x + _conv(w, name + ".conv2", F.relu(y), padding=1)


def _fusion(w: Weights, index: int, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    name = f"dpt.fusion_blocks.{index}"
    if residual is not None:
        if residual.shape != x.shape:
            residual = F.interpolate(residual, size=x.shape[2:], mode="bilinear", align_corners=False)
        x = x + _pre_activation_unit(w, name + ".residual_unit", residual)
    x = _pre_activation_unit(w, name + ".main_unit", x)
    x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
    return _conv(w, name + ".out_conv", x)


def _reassemble(w: Weights, index: int, cls_token: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    b, d, h, w_ = x.shape
    flat = x.flatten(2).transpose(1, 2)
    joined = torch.cat([flat, cls_token[:, None].expand(-1, flat.shape[1], -1)], dim=-1)
    name = f"dpt.reassemble.readout_projects.{index}"
    projected = F.gelu(F.linear(joined, w[name + ".weight"], w[name + ".bias"]), approximate="tanh")
    x = _conv(w, f"dpt.reassemble.out_projections.{index}", projected.transpose(1, 2).reshape(b, d, h, w_))
    resize = f"dpt.reassemble.resize_layers.{index}"
    if index in (0, 1):
        stride = 4 if index == 0 else 2
        return F.conv_transpose2d(x, w[resize + ".weight"], w[resize + ".bias"], stride=stride)
    if index == 3:
        return _conv(w, resize, x, stride=2, padding=1)
    return x


def official_decoder_forward(
    w: Weights,
    features: list[tuple[torch.Tensor, torch.Tensor]],
    task: str,
    image_size: tuple[int, int] | None = None,
    output_activation: bool = False,
    min_depth: float = 1e-3,
    max_depth: float = 10.0,
) -> torch.Tensor:
    """Decoder(...).forward of decoders.py: segmentation/normals [B, C, H, W], depth [B, 1, H, W]."""
    maps = [
        _conv(w, f"dpt.convs.{i}", _reassemble(w, i, cls, x), padding=1)
        for i, (cls, x) in enumerate(features)
    ]
    out = _fusion(w, 0, maps[-1], None)
    for i in range(1, 4):
        out = _fusion(w, i, out, maps[-(i + 1)])
    out = _conv(w, "dpt.project", out, padding=1)
    if output_activation:
        out = F.relu(out)
    out = F.linear(out.permute(0, 2, 3, 1), w["head.weight"], w["head.bias"]).permute(0, 3, 1, 2)
    if task != "depth":
        return (
            F.interpolate(out, size=image_size, mode="bilinear", align_corners=False) if image_size else out
        )
    weights = torch.relu(out) + min_depth
    probs = weights / weights.sum(dim=1, keepdim=True)
    centres = torch.linspace(min_depth, max_depth, out.shape[1])
    depth = torch.einsum("bchw,c->bhw", probs, centres)
    if image_size is not None:
        depth = F.interpolate(depth[:, None], size=image_size, mode="bilinear", align_corners=False)[:, 0]
    return depth[:, None]
