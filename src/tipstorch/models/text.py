"""The TIPS text encoder: a pre-norm transformer over SentencePiece ids with masked mean pooling.

Token ids equal to 0 are padding. Embeddings are scaled by sqrt(D) and summed with fixed sinusoidal
positions; padded keys are masked in attention, the MLP output is zeroed at padded positions, and the
final states are averaged over the real tokens; the empty text (all padding) pools to zeros, as in the
official code. Parameter names follow the official PyTorch release
(``pytorch/text_encoder.py``), so official checkpoints load without renaming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tipstorch.models.attention import attention

PAD_ID = 0


@dataclass
class TextConfig:
    """Shape of a TIPS text tower. ``width`` equals the vision tower's embed_dim."""

    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    vocab_size: int = 32000
    context_length: int = 64
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """Fixed positional signal [length, dim]: ``concat(sin(p * f), cos(p * f))`` with frequencies
    ``f`` geometric from 1 to 1/10000 over dim/2 channels (zero-padded when dim is odd)."""
    num_timescales = dim // 2
    log_increment = math.log(10_000.0) / max(num_timescales - 1, 1)
    inv_timescales = torch.exp(torch.arange(num_timescales, dtype=torch.float32) * -log_increment)
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv_timescales[None, :]
    signal = torch.cat((torch.sin(angles), torch.cos(angles)), dim=1)
    return F.pad(signal, (0, dim % 2))


class MaskedSelfAttention(nn.Module):
    """Self-attention that ignores padded keys: [B, L, D] -> [B, L, D].

    The packed ``in_proj_weight`` [3D, D] holds the query, key and value projections in that order,
    the layout of ``nn.MultiheadAttention``.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        self.fused_attn: bool | None = None  # fused / written out / chosen per call (models/attention.py)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The packed projection's initialisation (``nn.MultiheadAttention``'s: Xavier weights, zero bias)."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """tokens [B, L, D]; valid bool [B, L], True for real (non-pad) tokens."""
        batch, length, dim = tokens.shape
        qkv = F.linear(tokens, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        key_mask = valid[:, None, None, :]
        attended = attention(query, key, value, key_mask, fused=self.fused_attn)
        return self.out_proj(attended.transpose(1, 2).flatten(2))


class MaskedMlp(nn.Module):
    """ReLU feed-forward block whose hidden and output activations are zeroed at padded positions."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden_dim)
        self.c_proj = nn.Linear(hidden_dim, dim)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(self.c_fc(tokens))
        keep = valid.unsqueeze(-1).to(hidden.dtype)  # the activations' dtype: 0 / 1 is exact in any, no cast
        hidden = hidden * keep
        return self.c_proj(hidden) * keep


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: attention then MLP, each added to the residual stream."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.attn = MaskedSelfAttention(config.width, config.num_heads)
        self.ln_2 = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.mlp = MaskedMlp(config.width, config.mlp_dim)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.attn(self.ln_1(tokens), valid)
        return tokens + self.mlp(self.ln_2(tokens), valid)


class TransformerStack(nn.Module):
    """The ``transformer.resblocks`` container of the official checkpoints."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(config) for _ in range(config.depth))


class TextTransformer(nn.Module):
    """Token ids [B, L] (L <= context_length, pad id 0) -> pooled text embedding [B, D]."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.width = config.width
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.transformer = TransformerStack(config)
        self.ln_final = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.register_buffer(
            "positions", sinusoidal_positions(config.context_length, config.width), persistent=False
        )
        self.grad_checkpointing = False
        nn.init.normal_(self.token_embedding.weight, std=self.width**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def set_fused_attention(self, enable: bool | None = True) -> None:
        """Fused, written-out or per-call chosen (None, the default) attention in every block
        (``models/attention.py``)."""
        for block in self.transformer.resblocks:
            block.attn.fused_attn = enable

    def check_ids(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Validate ids [B, L] and return the bool mask of real tokens [B, L]."""
        if token_ids.ndim != 2 or token_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"expected integer token ids [B, L], got {token_ids.dtype} {list(token_ids.shape)}")
        if token_ids.shape[1] > self.config.context_length:
            raise ValueError(
                f"token sequence length {token_ids.shape[1]} exceeds the context length "
                f"{self.config.context_length}"
            )
        return token_ids != PAD_ID

    def forward_tokens(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final normed token states [B, L, D] and the real-token mask [B, L]. A row of padding only (an
        empty text) attends to its own padding, so its states are finite (torch < 2.5 gives NaN for a
        query with no key to attend to); they carry no meaning and pooling ignores them."""
        valid = self.check_ids(token_ids)
        attended = valid | ~valid.any(dim=1, keepdim=True)
        tokens = self.token_embedding(token_ids) * math.sqrt(self.width)
        tokens = tokens + self.positions[: token_ids.shape[1]].to(tokens.dtype)
        for block in self.transformer.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, attended, use_reentrant=False)
            else:
                tokens = block(tokens, attended)
        return self.ln_final(tokens), valid

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Masked mean of the final token states: [B, L] -> [B, D]. A row of padding only (the empty text)
        gives zeros, as the official ``sum / (count + 1e-8)`` over no tokens does.

        The columns after the last real token of every row are dropped first: they change nothing (padded
        keys are masked, padded states are not pooled), so a batch costs what its longest text does."""
        real_columns = self.check_ids(token_ids).any(dim=0).nonzero()
        kept = int(real_columns.max()) + 1 if real_columns.numel() else 1
        states, valid = self.forward_tokens(token_ids[:, :kept])
        weights = valid.unsqueeze(-1).to(states.dtype)
        return (states * weights).sum(dim=1) / (weights.sum(dim=1) + 1e-8)
