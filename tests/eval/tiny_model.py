"""A TIPS model small enough for evaluation tests, with the shipped scenes tokenizer."""

from __future__ import annotations

import torch

from tipstorch.models.text import TextConfig
from tipstorch.models.tips import TIPSConfig, TIPSModel
from tipstorch.models.tokenizer import SCENES_TOKENIZER
from tipstorch.models.vit import VisionConfig


def tiny_tips(seed: int = 0) -> TIPSModel:
    """Width 32, 4 vision blocks (the fewest a 4-layer DPT needs), 1 text block, 28 px default input."""
    torch.manual_seed(seed)
    config = TIPSConfig(
        vision=VisionConfig(embed_dim=32, depth=4, num_heads=2, mlp_hidden_dim=64, pos_grid=2),
        text=TextConfig(width=32, depth=1, num_heads=2, mlp_dim=64, vocab_size=1024),
        image_size=28,
        temperature=0.07,
        tokenizer=SCENES_TOKENIZER,
    )
    return TIPSModel(config).eval()
