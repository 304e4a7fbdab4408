"""Small images and a transparent embedder for the data-engine tests."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

COLOURS = {"red": (210, 20, 20), "green": (20, 210, 20), "blue": (20, 20, 210)}


def colour_png(colour: str, seed: int, size: int = 16) -> bytes:
    """A ``size`` x ``size`` PNG of the named colour, shifted per seed (so mean colours differ) and
    with per-pixel noise."""
    rng = np.random.default_rng(seed)
    shade = np.array(COLOURS[colour]) + rng.integers(-20, 21, 3)
    pixels = np.clip(shade + rng.integers(-10, 11, (size, size, 3)), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def colour_record(key: str, colour: str, seed: int) -> dict[str, object]:
    return {
        "__key__": key,
        "png": colour_png(colour, seed),
        "json": json.dumps({"alt": f"a {colour} thing"}).encode(),
    }


class MeanColourEmbedder:
    """Embedding = the L2-normalised mean RGB of an image [B, 3]; counts the images it embeds."""

    fingerprint = "mean-colour-v1"

    def __init__(self, fail_after: int | None = None) -> None:
        self.embedded = 0
        self.fail_after = fail_after

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        if self.fail_after is not None and self.embedded >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.embedded += len(images)
        means = np.stack([np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(0) for image in images])
        return (means / np.linalg.norm(means, axis=1, keepdims=True)).astype(np.float32)
