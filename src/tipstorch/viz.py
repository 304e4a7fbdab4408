"""Pictures of features and predictions: PCA maps of patch tokens and label-map overlays."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def pca_rgb(patch_tokens: torch.Tensor, num_components: int = 3, quantile: float = 0.01) -> torch.Tensor:
    """Project patch tokens on their first principal components, as colours.

    patch_tokens: [B, h, w, D] (or [h, w, D]); the components are fitted jointly over all patches of
    the batch, so colours are comparable across its images. Returns [B, h, w, num_components] in
    [0, 1]: each component is rescaled between its ``quantile`` and ``1 - quantile`` values.
    """
    single = patch_tokens.ndim == 3
    tokens = patch_tokens[None] if single else patch_tokens
    flat = tokens.reshape(-1, tokens.shape[-1]).float()
    if flat.shape[0] < num_components:
        raise ValueError(f"PCA needs at least {num_components} patches, got {flat.shape[0]}")
    centred = flat - flat.mean(dim=0)
    _, _, right = torch.linalg.svd(centred, full_matrices=False)
    projected = centred @ right[:num_components].T
    low = projected.quantile(quantile, dim=0)
    high = projected.quantile(1 - quantile, dim=0)
    colours = ((projected - low) / (high - low).clamp_min(1e-8)).clamp(0, 1)
    colours = colours.reshape(*tokens.shape[:-1], num_components)
    return colours[0] if single else colours


def palette(num_classes: int, seed: int = 0) -> np.ndarray:
    """Distinct-looking uint8 RGB colours [num_classes, 3] (class 0 is dark grey)."""
    generator = np.random.default_rng(seed)
    colours = generator.integers(40, 256, size=(num_classes, 3), dtype=np.uint8)
    colours[0] = (40, 40, 40)
    return colours


def overlay_labels(image: Image.Image, labels: torch.Tensor, alpha: float = 0.55) -> Image.Image:
    """The image blended with a colour per label; labels long [H, W] at the image's size."""
    colours = palette(int(labels.max()) + 1)[labels.cpu().numpy()]
    return Image.blend(image.convert("RGB"), Image.fromarray(colours), alpha)


def side_by_side(images: Sequence[Image.Image], height: int = 448) -> Image.Image:
    """Images resized to a common height (nearest for small maps) and joined left to right."""
    resized = [
        image.resize((round(image.width * height / image.height), height), Image.Resampling.NEAREST)
        for image in images
    ]
    canvas = Image.new("RGB", (sum(image.width for image in resized), height))
    left = 0
    for image in resized:
        canvas.paste(image.convert("RGB"), (left, 0))
        left += image.width
    return canvas


def colours_to_image(colours: torch.Tensor) -> Image.Image:
    """float [h, w, 3] in [0, 1] -> PIL RGB image of h x w pixels."""
    return Image.fromarray((colours.cpu().numpy() * 255).round().astype(np.uint8))
