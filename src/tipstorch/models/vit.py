"""The TIPS image encoder: a ViT with patch size 14 and two [CLS] tokens.

The token sequence is ``[CLS1 + pos[0], CLS2, patch_1 + pos[1], ..., patch_N + pos[N]]``:

* CLS1 (``cls_token``) is trained against noisy web alt-text. We call its output ``global_cls``.
* CLS2 (stored as ``register_tokens``, as in DINOv2-with-registers) carries no positional
  embedding and is trained against synthetic, spatially rich captions: ``spatial_cls``.
* the patch tokens form an ``h x w`` grid with ``h = H / 14`` and ``w = W / 14``.

Parameter names follow the official PyTorch release (``google-deepmind/tips``, ``pytorch/image_encoder.py``)
so that official checkpoints load without renaming. Attention runs through
``F.scaled_dot_product_attention`` or its written-out form, chosen per call (``models/attention.py``;
``set_fused_attention`` fixes the choice).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tipstorch.models.attention import attention
from tipstorch.models.fused_linear import linear

NUM_PREFIX_TOKENS = 2  # CLS1 (global) and CLS2 (spatial)


@dataclass
class VisionConfig:
    """Shape of a TIPS vision tower.

    ``mlp_hidden_dim`` is the hidden width of the feed-forward block; for ``ffn="swiglu"`` it is the
    width of each of the two SwiGLU branches (4096 for g/14). ``pos_grid`` is the side of the stored
    positional-embedding grid (32 for the 448 px models, 16 for 224 px ones); other input sizes
    resample it.
    """

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_hidden_dim: int = 3072
    ffn: str = "mlp"
    patch_size: int = 14
    pos_grid: int = 32
    layer_scale_init: float = 1e-5
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.ffn not in ("mlp", "swiglu"):
            raise ValueError(f"ffn must be 'mlp' or 'swiglu', got {self.ffn!r}")


@dataclass
class ImageFeatures:
    """Outputs of the image encoder, all after the final LayerNorm.

    global_cls:   [B, D]  CLS1, aligned to alt-text; used for zero-shot classification.
    spatial_cls:  [B, D]  CLS2, aligned to synthetic spatial captions.
    patch_tokens: [B, h, w, D] dense features, one per 14x14 patch.
    """

    global_cls: torch.Tensor
    spatial_cls: torch.Tensor
    patch_tokens: torch.Tensor

    @property
    def flat(self) -> torch.Tensor:
        """Patch tokens as a sequence: [B, h*w, D], row-major over the grid."""
        return self.patch_tokens.flatten(1, 2)

    def normalized(self) -> ImageFeatures:
        """The same features, each vector L2-normalised along D."""
        return ImageFeatures(
            F.normalize(self.global_cls, dim=-1),
            F.normalize(self.spatial_cls, dim=-1),
            F.normalize(self.patch_tokens, dim=-1),
        )


class PatchEmbed(nn.Module):
    """Non-overlapping 14x14 patches to tokens: [B, 3, H, W] -> [B, h*w, D].

    ``proj`` is the convolution of the checkpoints (weight [D, 3, p, p]); since its stride is its kernel
    size it is applied as one matmul over the flattened patches, the same values several times faster
    than a convolution's forward and backward on a CPU."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = images.shape
        size = self.patch_size
        patches = images.reshape(batch, channels, height // size, size, width // size, size)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, -1, channels * size * size)
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection: [B, N, D] -> [B, N, D]."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fused_attn: bool | None = None  # fused / written out / chosen per call (models/attention.py)

    def split_heads(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values, each [B, heads, N, D/heads]."""
        batch, length, dim = tokens.shape
        qkv = linear(tokens, self.qkv).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return query, key, value

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        query, key, value = self.split_heads(tokens)
        attended = attention(query, key, value, fused=self.fused_attn)
        return linear(attended.transpose(1, 2).flatten(2), self.proj)


class Mlp(nn.Module):
    """Feed-forward block with exact (erf) GELU: [.., D] -> [.., D]."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return linear(linear(tokens, self.fc1, "gelu"), self.fc2)


class SwiGLU(nn.Module):
    """SwiGLU feed-forward block (g/14): ``w3(silu(a) * b)`` with ``[a, b] = w12(x)``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        gate, value = linear(tokens, self.w12).chunk(2, dim=-1)
        return linear(F.silu(gate) * value, self.w3)


class LayerScale(nn.Module):
    """Per-channel residual-branch scale ``gamma`` (CaiT / DINOv2)."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: zeroes a residual branch for a random subset of samples while training."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, branch: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return branch
        keep_prob = 1.0 - self.drop_prob
        keep = branch.new_empty((branch.shape[0],) + (1,) * (branch.ndim - 1)).bernoulli_(keep_prob)
        return branch * keep / keep_prob


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale: [B, N, D] -> [B, N, D]."""

    def __init__(self, config: VisionConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn = Attention(dim, config.num_heads)
        self.ls1 = LayerScale(dim, config.layer_scale_init)
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)
        ffn = SwiGLU if config.ffn == "swiglu" else Mlp
        self.mlp = ffn(dim, config.mlp_hidden_dim)
        self.ls2 = LayerScale(dim, config.layer_scale_init)
        self.drop_path = DropPath(drop_path)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.drop_path(self.ls1(self.attn(self.norm1(tokens))))
        return tokens + self.drop_path(self.ls2(self.mlp(self.norm2(tokens))))


def resample_pos_embed(patch_pos: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Resample a square grid of positional embeddings to ``grid_hw``.

    patch_pos: [1, G*G, D] -> [1, h*w, D]. Bilinear with antialiasing, computed in float32 and
    returned in the input dtype, as the official code does.
    """
    side = math.isqrt(patch_pos.shape[1])
    if (side, side) == tuple(grid_hw):
        return patch_pos
    grid = patch_pos.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=grid_hw, mode="bilinear", antialias=True, align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, grid_hw[0] * grid_hw[1], -1).to(patch_pos.dtype)


class VisionTransformer(nn.Module):
    """TIPS ViT/14 with a global and a spatial [CLS] token.

    Accepts images [B, 3, H, W] (RGB in [0, 1], no mean/std normalisation) of any H and W that are
    multiples of 14.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = config.embed_dim
        self.patch_size = config.patch_size
        dim = config.embed_dim
        self.patch_embed = PatchEmbed(config.patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.pos_grid**2, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        drop_rates = torch.linspace(0, config.drop_path_rate, config.depth, device="cpu").tolist()  # also on meta
        self.blocks = nn.ModuleList(Block(config, rate) for rate in drop_rates)
        self.norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.grad_checkpointing = False
        self.init_weights()

    def init_weights(self) -> None:
        """Random initialisation for training from scratch (timm / DINOv2 ViT scheme)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.normal_(self.register_tokens, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass to save memory (timm naming)."""
        self.grad_checkpointing = enable

    def set_fused_attention(self, enable: bool | None = True) -> None:
        """Fused (``F.scaled_dot_product_attention``), written-out or per-call chosen (None, the default)
        attention in every block (``models/attention.py``; the same values, a speed choice)."""
        for block in self.blocks:
            block.attn.fused_attn = enable

    def grid_size(self, images: torch.Tensor) -> tuple[int, int]:
        """The patch grid (h, w) of images [B, 3, H, W]; raises if H or W is not a multiple of 14."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W], got {list(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}; "
                "resize with tipstorch.image_transform or crop to a multiple of 14"
            )
        return height // self.patch_size, width // self.patch_size

    def prepare_tokens(self, images: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Embed images into the input sequence [B, 2 + h*w, D].

        patch_mask: optional bool [B, h*w]; True replaces that patch embedding by ``mask_token``
        before the positional embedding is added (iBOT masking).
        """
        grid_hw = self.grid_size(images)
        patches = self.patch_embed(images.to(self.patch_embed.proj.weight.dtype))
        if patch_mask is not None:
            if patch_mask.shape != patches.shape[:2]:
                raise ValueError(
                    f"patch_mask must have shape {list(patches.shape[:2])}, got {list(patch_mask.shape)}"
                )
            patches = torch.where(patch_mask.unsqueeze(-1), self.mask_token.to(patches.dtype), patches)
        batch = patches.shape[0]
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        global_cls = self.cls_token + cls_pos
        patches = patches + resample_pos_embed(patch_pos, grid_hw).to(patches.dtype)
        return torch.cat(
            (
                global_cls.expand(batch, -1, -1).to(patches.dtype),
                self.register_tokens.expand(batch, -1, -1).to(patches.dtype),
                patches,
            ),
            dim=1,
        )

    def run_block(self, block: Block, tokens: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, tokens, use_reentrant=False)
        return block(tokens)

    def split_tokens(self, tokens: torch.Tensor, grid_hw: tuple[int, int]) -> ImageFeatures:
        """[B, 2 + h*w, D] -> ImageFeatures (no normalisation applied here)."""
        patch_tokens = tokens[:, NUM_PREFIX_TOKENS:].unflatten(1, grid_hw)
        return ImageFeatures(tokens[:, 0], tokens[:, 1], patch_tokens)

    def forward_features(self, images: torch.Tensor, patch_mask: torch.Tensor | None = None) -> ImageFeatures:
        """Encode images [B, 3, H, W] into normed global/spatial CLS and patch tokens."""
        grid_hw = self.grid_size(images)
        tokens = self.prepare_tokens(images, patch_mask)
        for block in self.blocks:
            tokens = self.run_block(block, tokens)
        return self.split_tokens(self.norm(tokens), grid_hw)

    def forward(self, images: torch.Tensor, patch_mask: torch.Tensor | None = None) -> ImageFeatures:
        return self.forward_features(images, patch_mask)

    def forward_intermediates(
        self,
        images: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        return_prefix_tokens: bool = False,
        intermediates_only: bool = False,
    ) -> list | tuple[ImageFeatures, list]:
        """Outputs of selected blocks, for dense heads (timm's ``forward_intermediates``).

        indices: an int n takes the last n blocks; a sequence takes those block indices (0-based,
        negative counts from the end); None takes all blocks.
        norm: apply the final LayerNorm to each intermediate (the official DPT heads do).
        Each intermediate is a patch map [B, D, h, w] ("NCHW") or [B, h, w, D] ("NHWC"), or with
        ``return_prefix_tokens`` a pair (patch map, prefix [B, 2, D]) where prefix holds CLS1, CLS2.
        Returns the list, or (final ImageFeatures, list) unless ``intermediates_only``.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        depth = len(self.blocks)
        if indices is None:
            wanted = list(range(depth))
        elif isinstance(indices, int):
            wanted = list(range(depth - indices, depth))
        else:
            wanted = [index + depth if index < 0 else index for index in indices]
        if not wanted or any(index < 0 or index >= depth for index in wanted):
            raise ValueError(f"block indices {list(indices)} out of range for a {depth}-block model")
        last_needed = max(wanted) if intermediates_only else depth - 1
        grid_hw = self.grid_size(images)
        tokens = self.prepare_tokens(images)
        intermediates = []
        for index, block in enumerate(self.blocks[: last_needed + 1]):
            tokens = self.run_block(block, tokens)
            if index in wanted:
                features = self.split_tokens(self.norm(tokens) if norm else tokens, grid_hw)
                patch_map = features.patch_tokens
                if output_fmt == "NCHW":
                    patch_map = patch_map.permute(0, 3, 1, 2)
                prefix = torch.stack((features.global_cls, features.spatial_cls), dim=1)
                intermediates.append((patch_map, prefix) if return_prefix_tokens else patch_map)
        if intermediates_only:
            return intermediates
        return self.split_tokens(self.norm(tokens), grid_hw), intermediates
