"""PCA maps and overlays."""

from __future__ import annotations

import torch
from PIL import Image

from tipstorch.viz import overlay_labels, palette, pca_rgb


def test_first_component_separates_two_clusters_of_patches():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 4, 6, 32, generator=generator) * 0.05
    direction = torch.randn(32, generator=generator)
    tokens[:, :, :3] += direction  # left half of every image is one "object"
    colours = pca_rgb(tokens)
    assert colours.shape == (2, 4, 6, 3)
    assert colours.min() >= 0 and colours.max() <= 1
    first = colours[..., 0]
    left, right = first[:, :, :3], first[:, :, 3:]
    assert (left.mean() - right.mean()).abs() > 0.8  # the two halves get opposite ends of the scale
    assert pca_rgb(tokens[0]).shape == (4, 6, 3)


def test_overlay_colours_each_label():
    image = Image.new("RGB", (4, 2), (255, 255, 255))
    labels = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 2]])
    blended = overlay_labels(image, labels, alpha=1.0)
    colours = palette(3)
    assert blended.getpixel((0, 0)) == tuple(colours[0])
    assert blended.getpixel((3, 0)) == tuple(colours[1])
    assert blended.getpixel((1, 1)) == tuple(colours[2])
