"""Helpers for the model tests: tiny configs and randomised parameters."""

from __future__ import annotations

import torch

from tipstorch.models.text import TextConfig
from tipstorch.models.tips import TIPSConfig
from tipstorch.models.vit import VisionConfig


def tiny_config(ffn: str = "mlp", pos_grid: int = 4, width: int = 48) -> TIPSConfig:
    """A 2-block model small enough for fast tests (heads = width / 16)."""
    heads = width // 16
    hidden = 96 if ffn == "swiglu" else 4 * width
    return TIPSConfig(
        vision=VisionConfig(embed_dim=width, depth=2, num_heads=heads, mlp_hidden_dim=hidden, ffn=ffn,
                            pos_grid=pos_grid, layer_scale_init=0.5),
        text=TextConfig(width=width, depth=2, num_heads=heads, mlp_dim=2 * width, vocab_size=300, context_length=16),
        image_size=pos_grid * 14,
        temperature=0.02,
    )


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
