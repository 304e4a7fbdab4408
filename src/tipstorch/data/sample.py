"""The sample every data source yields (an image, its captions and, scenes only, its dense targets), and
the error every reader raises for a sample it cannot use."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from tipstorch.data.scenes import SceneObject


class CorruptSampleError(ValueError):
    """A sample that exists but cannot be used: undecodable image, bad label file, no caption, bad
    metadata. Readers skip it and count it (training: ``ReadStats``; evaluation:
    ``eval.features.SkippedSamples``), never drop it silently.

    ``where``: the sample's file or key; ``reason``: what is wrong with it.
    """

    def __init__(self, where: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = str(where)
        self.reason = reason


@dataclass
class ImageTextSample:
    """One image with its captions, as every source yields it (scenes, shards, image folders); the
    dense fields are filled by the scenes generator only.

    image: PIL RGB image, size (W, H).
    captions: caption source -> text, sources among alt/object/spatial/detailed/caption.
    class_mask: int64 [H, W], 0 = background, 1..C = index in ScenesDataset.class_names.
    instance_mask: int64 [H, W], 0 = background, 1..K = instance id (1 = largest visible object).
    depth: float32 [H, W], metres, > 0 (background = floor plane).
    normals: float32 [H, W, 3], unit, camera axes x right, y up, z towards camera (z > 0).
    label: scene-level class = shape of the object with the most visible pixels, index in
        ScenesDataset.label_names (shard/folder samples: optional ``label`` field of their json).
    key: identifier of the sample (``scenes-<seed>-<index>`` or the shard/folder key).
    pixel_size: metres per pixel of the orthographic camera (scenes only).
    objects: per-instance metadata, ordered by instance id (scenes only).
    """

    image: Image.Image
    captions: dict[str, str]
    class_mask: np.ndarray | None = None
    instance_mask: np.ndarray | None = None
    depth: np.ndarray | None = None
    normals: np.ndarray | None = None
    label: int | None = None
    key: str = ""
    pixel_size: float | None = None
    objects: list[SceneObject] = field(default_factory=list)
