"""Helpers for the tests: the one tiny TIPS model builder and randomised parameters."""

from __future__ import annotations

import torch

from tipstorch.models.text import TextConfig
from tipstorch.models.tips import TIPSConfig, TIPSModel
from tipstorch.models.tokenizer import SCENES_TOKENIZER
from tipstorch.models.vit import VisionConfig


def tiny_config(
    ffn: str = "mlp", pos_grid: int = 4, width: int = 48, depth: int = 2, text_depth: int = 2, scenes: bool = False
) -> TIPSConfig:
    """A model small enough for fast tests: heads = width / 16, vision MLP 4 x width (SwiGLU 96),
    text MLP 2 x width, input side pos_grid x 14. ``scenes``: the shipped scenes tokenizer drives the
    text tower (1024 pieces, 64 tokens); else a 300-piece vocabulary and 16 tokens."""
    heads = width // 16
    hidden = 96 if ffn == "swiglu" else 4 * width
    vocab, context = (1024, 64) if scenes else (300, 16)
    return TIPSConfig(
        vision=VisionConfig(embed_dim=width, depth=depth, num_heads=heads, mlp_hidden_dim=hidden, ffn=ffn,
                            pos_grid=pos_grid, layer_scale_init=0.5),
        text=TextConfig(width=width, depth=text_depth, num_heads=heads, mlp_dim=2 * width, vocab_size=vocab,
                        context_length=context),
        image_size=pos_grid * 14,
        temperature=0.02,
        **({"tokenizer": SCENES_TOKENIZER} if scenes else {}),
    )


def tiny_tips(seed: int = 0) -> TIPSModel:
    """The evaluation tests' model (eval mode, seeded): width 32, 4 vision blocks (the fewest a 4-layer
    DPT needs), 1 text block, 28 px input, the scenes tokenizer."""
    torch.manual_seed(seed)
    return TIPSModel(tiny_config(pos_grid=2, width=32, depth=4, text_depth=1, scenes=True)).eval()


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter with random values so that no term (biases, gammas, norms) is trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1 + (0.5 if parameter.ndim == 1 else 0.0))
    return module


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, scale_tol: float = 2e-5, **kwargs) -> None:
    """assert_close with an absolute tolerance of ``scale_tol`` times the largest |expected|: float32 sums
    taken in another order (micro-batches, ranks, CPU kernels) differ by about 1e-6 of the values' scale,
    whatever the scale (gradients of a few hundred differ by 1e-4)."""
    atol = scale_tol * float(expected.abs().max()) + 1e-12
    torch.testing.assert_close(actual, expected, atol=atol, rtol=kwargs.pop("rtol", 1e-4), **kwargs)
