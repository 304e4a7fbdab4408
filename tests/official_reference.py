"""An independent, functional transcription of the official TIPS PyTorch forward passes.

It follows google-deepmind/tips ``pytorch/image_encoder.py`` and ``pytorch/text_encoder.py`` step by
step (explicit softmax attention with pre-scaled queries for vision; ``F.multi_head_attention_forward``
with a -inf key mask in sequence-first layout for text, as ``nn.MultiheadAttention`` does) and reads
weights straight from official-layout arrays, so it shares no code with tipstorch's modules.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _layer_norm(x, weights, name, eps):
    return F.layer_norm(x, x.shape[-1:], weights[f"{name}.weight"], weights[f"{name}.bias"], eps)


def _linear(x, weights, name):
    return F.linear(x, weights[f"{name}.weight"], weights[f"{name}.bias"])


def official_image_forward(weights: dict[str, torch.Tensor], images: torch.Tensor, num_heads: int):
    """Returns (CLS1 [B, D], CLS2 [B, D], patch tokens [B, N, D]) after the final norm."""
    eps = 1e-6
    batch, _, height, width = images.shape
    x = F.conv2d(images, weights["patch_embed.proj.weight"], weights["patch_embed.proj.bias"], stride=14)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat((weights["cls_token"].expand(batch, -1, -1), x), dim=1)
    pos = weights["pos_embed"]
    stored = pos.shape[1] - 1
    if not (x.shape[1] - 1 == stored and height == width):
        side = int(math.sqrt(stored))
        grid = pos[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(height // 14, width // 14), mode="bilinear", antialias=True)
        pos = torch.cat((pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])), dim=1)
    x = x + pos
    x = torch.cat((x[:, :1], weights["register_tokens"].expand(batch, -1, -1), x[:, 1:]), dim=1)
    dim = x.shape[-1]
    depth = len({key.split(".")[1] for key in weights if key.startswith("blocks.")})
    for index in range(depth):
        prefix = f"blocks.{index}"
        h = _layer_norm(x, weights, f"{prefix}.norm1", eps)
        qkv = _linear(h, weights, f"{prefix}.attn.qkv").reshape(batch, -1, 3, num_heads, dim // num_heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (dim // num_heads) ** -0.5, qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        h = (attn @ v).transpose(1, 2).reshape(batch, -1, dim)
        x = x + _linear(h, weights, f"{prefix}.attn.proj") * weights[f"{prefix}.ls1.gamma"]
        h = _layer_norm(x, weights, f"{prefix}.norm2", eps)
        if f"{prefix}.mlp.w12.weight" in weights:
            a, b = _linear(h, weights, f"{prefix}.mlp.w12").chunk(2, dim=-1)
            h = _linear(F.silu(a) * b, weights, f"{prefix}.mlp.w3")
        else:
            h = _linear(F.gelu(_linear(h, weights, f"{prefix}.mlp.fc1")), weights, f"{prefix}.mlp.fc2")
        x = x + h * weights[f"{prefix}.ls2.gamma"]
    x = _layer_norm(x, weights, "norm", eps)
    return x[:, 0], x[:, 1], x[:, 2:]


def official_text_forward(weights: dict[str, torch.Tensor], ids: torch.Tensor, num_heads: int):
    """Pooled text embedding [B, D] of ids [B, L] (paddings = ids == 0)."""
    paddings = (ids == 0).float()
    mask = 1.0 - paddings  # [B, L]
    dim = weights["token_embedding.weight"].shape[1]
    length = ids.shape[1]
    x = F.embedding(ids, weights["token_embedding.weight"]) * dim**0.5
    timescales = dim // 2
    increment = math.log(10000.0) / max(timescales - 1, 1)
    inv = torch.exp(torch.arange(timescales, dtype=torch.float32) * -increment)
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    x = x + torch.cat((torch.sin(angles), torch.cos(angles)), dim=1)[None]
    x = x.permute(1, 0, 2)  # L, B, D
    depth = len({key.split(".")[2] for key in weights if key.startswith("transformer.resblocks.")})
    for index in range(depth):
        prefix = f"transformer.resblocks.{index}"
        attn_mask = mask[:, None, None, :].repeat(1, num_heads, length, 1).flatten(0, 1)
        attn_mask = torch.where(attn_mask == 0, float("-inf"), 0.0)
        h = _layer_norm(x, weights, f"{prefix}.ln_1", 1e-5)
        h = F.multi_head_attention_forward(
            h, h, h, dim, num_heads,
            weights[f"{prefix}.attn.in_proj_weight"], weights[f"{prefix}.attn.in_proj_bias"],
            None, None, False, 0.0,
            weights[f"{prefix}.attn.out_proj.weight"], weights[f"{prefix}.attn.out_proj.bias"],
            training=False, need_weights=False, attn_mask=attn_mask,
        )[0]
        x = x + h
        h = _layer_norm(x, weights, f"{prefix}.ln_2", 1e-5)
        h = F.relu(_linear(h, weights, f"{prefix}.mlp.c_fc")) * mask.T[..., None]
        x = x + _linear(h, weights, f"{prefix}.mlp.c_proj") * mask.T[..., None]
    x = _layer_norm(x.permute(1, 0, 2), weights, "ln_final", 1e-5)
    x = torch.where(paddings[..., None] > 0, torch.zeros_like(x), x)
    return x.sum(dim=1) / (mask.sum(dim=1, keepdim=True) + 1e-8)


def official_vision_arrays(width: int, depth: int, mlp: int, grid: int, swiglu: bool, seed: int = 0):
    """Random float32 arrays under the official vision key names and layouts."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.05, offset=0.0):
        return (torch.randn(shape, generator=generator) * scale + offset).numpy()

    arrays = {
        "cls_token": rand(1, 1, width), "register_tokens": rand(1, 1, width), "mask_token": rand(1, width),
        "pos_embed": rand(1, 1 + grid * grid, width), "patch_embed.proj.weight": rand(width, 3, 14, 14),
        "patch_embed.proj.bias": rand(width), "norm.weight": rand(width, offset=1.0), "norm.bias": rand(width),
    }
    for index in range(depth):
        prefix = f"blocks.{index}"
        arrays.update({
            f"{prefix}.norm1.weight": rand(width, offset=1.0), f"{prefix}.norm1.bias": rand(width),
            f"{prefix}.attn.qkv.weight": rand(3 * width, width), f"{prefix}.attn.qkv.bias": rand(3 * width),
            f"{prefix}.attn.proj.weight": rand(width, width), f"{prefix}.attn.proj.bias": rand(width),
            f"{prefix}.ls1.gamma": rand(width, offset=0.5), f"{prefix}.ls2.gamma": rand(width, offset=0.5),
            f"{prefix}.norm2.weight": rand(width, offset=1.0), f"{prefix}.norm2.bias": rand(width),
        })
        if swiglu:
            arrays.update({
                f"{prefix}.mlp.w12.weight": rand(2 * mlp, width), f"{prefix}.mlp.w12.bias": rand(2 * mlp),
                f"{prefix}.mlp.w3.weight": rand(width, mlp), f"{prefix}.mlp.w3.bias": rand(width),
            })
        else:
            arrays.update({
                f"{prefix}.mlp.fc1.weight": rand(mlp, width), f"{prefix}.mlp.fc1.bias": rand(mlp),
                f"{prefix}.mlp.fc2.weight": rand(width, mlp), f"{prefix}.mlp.fc2.bias": rand(width),
            })
    return arrays


def official_text_arrays(width: int, depth: int, mlp: int, vocab: int, temperature: float, seed: int = 1):
    """Random float32 arrays under the official text key names, with the ``temperature`` scalar."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.05, offset=0.0):
        return (torch.randn(shape, generator=generator) * scale + offset).numpy()

    arrays = {"token_embedding.weight": rand(vocab, width, scale=0.3), "ln_final.weight": rand(width, offset=1.0),
              "ln_final.bias": rand(width), "temperature": torch.tensor(temperature).numpy()}
    for index in range(depth):
        prefix = f"transformer.resblocks.{index}"
        arrays.update({
            f"{prefix}.attn.in_proj_weight": rand(3 * width, width), f"{prefix}.attn.in_proj_bias": rand(3 * width),
            f"{prefix}.attn.out_proj.weight": rand(width, width), f"{prefix}.attn.out_proj.bias": rand(width),
            f"{prefix}.ln_1.weight": rand(width, offset=1.0), f"{prefix}.ln_1.bias": rand(width),
            f"{prefix}.ln_2.weight": rand(width, offset=1.0), f"{prefix}.ln_2.bias": rand(width),
            f"{prefix}.mlp.c_fc.weight": rand(mlp, width), f"{prefix}.mlp.c_fc.bias": rand(mlp),
            f"{prefix}.mlp.c_proj.weight": rand(width, mlp), f"{prefix}.mlp.c_proj.bias": rand(width),
        })
    return arrays
