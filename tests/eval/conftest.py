"""Stand-ins for the model contract (VisionTransformer pieces, tokenizer, text encoder)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn


class TinyAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.self_only = False  # reference path: every token attends only to itself

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        mask = torch.eye(n, dtype=torch.bool) if self.self_only else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        return x * self.gamma


class TinyBlock(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = TinyAttention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.ls2 = LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class TinyViT(nn.Module):
    """prepare_tokens -> [B, 2 + h*w, D] (CLS1, CLS2, patches), blocks, norm, patch_size 14."""

    def __init__(self, dim=16, depth=3, num_heads=2):
        super().__init__()
        self.patch_size = 14
        self.embed_dim = dim
        self.patch_embed = nn.Conv2d(3, dim, 14, stride=14)
        self.prefix = nn.Parameter(torch.randn(1, 2, dim))
        self.blocks = nn.ModuleList([TinyBlock(dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def prepare_tokens(self, images):
        patches = self.patch_embed(images).flatten(2).transpose(1, 2)
        return torch.cat([self.prefix.expand(len(images), -1, -1), patches], dim=1)

    def forward_tokens(self, images):
        x = self.prepare_tokens(images)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


@pytest.fixture
def tiny_vit():
    torch.manual_seed(0)
    return TinyViT().eval()


class CharTokenizer:
    """Deterministic stand-in: characters -> ids, padded with 0 to 12 tokens."""

    def __call__(self, texts):
        ids = torch.zeros(len(texts), 12, dtype=torch.long)
        for row, text in enumerate(texts):
            codes = [ord(c) % 97 + 1 for c in text[:12]]
            ids[row, : len(codes)] = torch.tensor(codes)
        return ids


class BagOfTokensEncoder(nn.Module):
    """Stand-in text tower: mean of token embeddings over non-pad tokens -> [B, D]."""

    def __init__(self, dim=8):
        super().__init__()
        self.embedding = nn.Embedding(98, dim)

    def forward(self, ids):
        mask = (ids != 0).float()[..., None]
        return (self.embedding(ids) * mask).sum(1) / mask.sum(1).clamp(min=1)


@pytest.fixture
def text_tower():
    torch.manual_seed(0)
    return BagOfTokensEncoder(), CharTokenizer()
