"""The built-in scenes as an evaluation set, read like the standard layouts of ``formats.py``.

``SceneSplits`` renders two disjoint index ranges of a seeded ``ScenesDataset`` once (train:
``[0, num_train)``, test: ``[num_train, num_train + num_test)``; evaluations use a seed other than
the training default 0, so no test scene was seen in training). ``targets(split, kind)`` is a torch
Dataset of (PIL RGB image, target), one per kind:

| kind       | target                                                                            |
|------------|-----------------------------------------------------------------------------------|
| label      | int, scene label (index in ``label_names``)                                       |
| objects    | int64 [S, S]: shape c (1..8) -> c - 1, floor -> 255 (ignored; the VOC20 convention) |
| class_mask | long [S, S]: 0 = floor, 1..8 = index in ``class_names``                           |
| depth      | float32 [S, S], metres                                                            |
| normals    | float32 [3, S, S], camera axes, zero on the floor (neither trained on nor scored)  |
| spatial    | [spatial caption]                                                                 |
| alt        | [alt-text]                                                                        |
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from tipstorch.data.sample import ImageTextSample
from tipstorch.data.scenes import ScenesConfig, ScenesDataset

SPLITS = ("train", "test")


def _objects(sample: ImageTextSample) -> np.ndarray:
    return np.where(sample.class_mask == 0, 255, sample.class_mask - 1)


def _normals(sample: ImageTextSample) -> torch.Tensor:
    return torch.from_numpy(sample.normals).permute(2, 0, 1) * torch.from_numpy(sample.class_mask > 0)[None]


TARGETS: dict[str, Callable[[ImageTextSample], Any]] = {
    "label": lambda sample: sample.label,
    "objects": _objects,
    "class_mask": lambda sample: torch.from_numpy(sample.class_mask),
    "depth": lambda sample: torch.from_numpy(sample.depth),
    "normals": _normals,
    "spatial": lambda sample: [sample.captions["spatial"]],
    "alt": lambda sample: [sample.captions["alt"]],
}


class SceneTargets(Dataset):
    """(image, target) pairs of one kind over rendered scenes; ``classes`` / ``class_names`` name the labels."""

    def __init__(self, samples: list[ImageTextSample], kind: str, class_names: list[str]) -> None:
        if kind not in TARGETS:
            raise KeyError(f"scenes: unknown target {kind!r}; known: {', '.join(TARGETS)}")
        self.samples, self.target = samples, TARGETS[kind]
        self.classes = self.class_names = class_names

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, Any]:
        sample = self.samples[index]
        return sample.image, self.target(sample)


class SceneSplits:
    """Scenes of side ``image_size`` from ``ScenesDataset(seed)``, ``num_train`` + ``num_test`` of them."""

    label_names: list[str] = ScenesDataset.label_names
    class_names: list[str] = ScenesDataset.class_names  # "background" (the floor) first

    def __init__(self, image_size: int, seed: int, num_train: int, num_test: int) -> None:
        if num_train < 2 or num_test < 2:
            raise ValueError(f"scenes: num_train and num_test must be >= 2, got {num_train}, {num_test}")
        dataset = ScenesDataset(ScenesConfig(image_size=image_size, seed=seed))
        ranges = {"train": range(num_train), "test": range(num_train, num_train + num_test)}
        self.samples = {split: [dataset[i] for i in indices] for split, indices in ranges.items()}

    def targets(self, split: str, kind: str) -> SceneTargets:
        if split not in SPLITS:
            raise KeyError(f"scenes: unknown split {split!r}; known: {', '.join(SPLITS)}")
        names = {"label": self.label_names, "objects": self.class_names[1:]}.get(kind, self.class_names)
        return SceneTargets(self.samples[split], kind, names)
