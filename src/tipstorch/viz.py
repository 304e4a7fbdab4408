"""Pictures of features and predictions: PCA maps of patch tokens, label-map overlays with legends,
colour-mapped depth and surface normals."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


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


# anchor colours of the depth colour map, dark (near) to light (far): black-purple-red-orange-pale yellow
_DEPTH_ANCHORS = np.array(
    [
        (0, 0, 4),
        (40, 11, 84),
        (101, 21, 110),
        (159, 42, 99),
        (212, 72, 66),
        (245, 125, 21),
        (250, 193, 39),
        (252, 255, 164),
    ],
    dtype=np.float64,
)


def colour_map(values: np.ndarray, anchors: np.ndarray = _DEPTH_ANCHORS) -> np.ndarray:
    """float [...] in [0, 1] -> uint8 RGB [..., 3], linear between evenly spaced anchor colours."""
    positions = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * (len(anchors) - 1)
    low = np.minimum(positions.astype(np.int64), len(anchors) - 2)
    frac = (positions - low)[..., None]
    return np.round(anchors[low] * (1 - frac) + anchors[low + 1] * frac).astype(np.uint8)


def depth_to_rgb(depth: np.ndarray, quantile: float = 0.02) -> np.ndarray:
    """Depth [H, W] -> uint8 RGB [H, W, 3]: near dark, far light, scaled between the ``quantile`` and
    ``1 - quantile`` depths of the map (so a few outliers do not flatten it)."""
    low, high = np.quantile(depth, [quantile, 1 - quantile])
    return colour_map((depth - low) / max(high - low, 1e-8))


def normals_to_rgb(normals: np.ndarray) -> np.ndarray:
    """Unit normals [H, W, 3] (x, y, z in [-1, 1]) -> uint8 RGB [H, W, 3] = (n + 1) / 2 (the usual picture)."""
    return np.round((np.clip(normals, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def legend(
    labels: Sequence[str], colours: np.ndarray, notes: Sequence[str] | None = None, width: int = 260
) -> Image.Image:
    """A white strip with one colour swatch and name per label (and ``notes[i]`` after it)."""
    font = ImageFont.load_default()
    row = 22
    canvas = Image.new("RGB", (width, 8 + row * len(labels)), "white")
    draw = ImageDraw.Draw(canvas)
    for index, label in enumerate(labels):
        top = 4 + index * row
        draw.rectangle(
            (6, top + 2, 24, top + 18), fill=tuple(int(c) for c in colours[index]), outline="black"
        )
        text = label if notes is None else f"{label}  {notes[index]}"
        draw.text((32, top + 4), text, fill="black", font=font)
    return canvas


def segmentation_figure(
    image: Image.Image,
    label_map: np.ndarray,
    labels: Sequence[str],
    notes: Sequence[str] | None = None,
    height: int = 448,
    colours: np.ndarray | None = None,
) -> Image.Image:
    """Image | overlay of the label map [H, W] (indices into ``labels``) | legend, ``height`` pixels high.
    ``colours``: uint8 [len(labels), 3] (default ``palette(len(labels))``)."""
    colours = palette(len(labels)) if colours is None else colours
    overlay = Image.blend(image.convert("RGB"), Image.fromarray(colours[label_map]), 0.55)
    joined = side_by_side([image, overlay], height=height)
    key = legend(labels, colours, notes)
    canvas = Image.new("RGB", (joined.width + key.width, max(joined.height, key.height)), "white")
    canvas.paste(joined, (0, 0))
    canvas.paste(key, (joined.width, 0))
    return canvas


OTHER_CLASSES_COLOUR = (128, 128, 128)


def class_legend(
    class_map: np.ndarray, class_names: Sequence[str], max_legend: int = 20
) -> tuple[np.ndarray, list[str], list[str], np.ndarray]:
    """What the legend of a many-class map shows (ADE20K: 150 classes): the classes present in
    ``class_map`` [H, W] (indices into ``class_names``), largest area first, each with its area and its
    colour of ``palette(len(class_names))`` (the same from image to image); beyond ``max_legend - 1``
    classes the smaller ones share one grey "N other classes" entry.

    Returns (legend map int64 [H, W] of indices into the entries, entry labels, area notes, colours
    uint8 [entries, 3]).
    """
    counts = np.bincount(class_map.ravel(), minlength=len(class_names))
    present = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
    shown = present if len(present) <= max_legend else present[: max_legend - 1]
    entry = np.full(len(class_names), len(shown), dtype=np.int64)  # default: the "other classes" entry
    entry[shown] = np.arange(len(shown))
    colours = palette(len(class_names))[shown]
    labels = [class_names[i] for i in shown]
    notes = [f"{counts[i] / class_map.size:.1%}" for i in shown]
    if len(shown) < len(present):
        rest = present[len(shown) :]
        colours = np.concatenate([colours, np.array([OTHER_CLASSES_COLOUR], dtype=np.uint8)])
        labels.append(f"{len(rest)} other classes")
        notes.append(f"{counts[rest].sum() / class_map.size:.1%}")
    return entry[class_map], labels, notes, colours


def class_map_figure(
    image: Image.Image,
    class_map: np.ndarray,
    class_names: Sequence[str],
    max_legend: int = 20,
    height: int = 448,
) -> Image.Image:
    """``segmentation_figure`` of a many-class map with the legend of ``class_legend``."""
    legend_map, labels, notes, colours = class_legend(class_map, class_names, max_legend)
    return segmentation_figure(image, legend_map, labels, notes, height, colours)
