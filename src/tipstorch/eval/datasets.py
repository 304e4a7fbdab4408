"""The evaluation sets of every task, by ``--data`` key: the standard layouts and the built-in scenes.

Each function takes the run's context (for the image size, the subset and the rendered scenes),
the data key and its root folder (None for the scenes) and returns torch Datasets of (PIL image,
target) as ``tipstorch.data.formats`` and ``tipstorch.data.scene_splits`` read them. Dense sets are
returned square at ``context.size()`` (images resized by the feature transform, targets here).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from tipstorch.data.formats import (
    ADE20KSegmentation,
    DOCCIDescriptions,
    ImageFolderDataset,
    KarpathyCaptions,
    NYUDepthV2,
    VOCSegmentation,
    check_same_classes,
)
from tipstorch.eval.context import SCENES, EvalContext
from tipstorch.eval.metrics import nyu_eigen_crop_mask
from tipstorch.models.dense import DepthBinsConfig

# Scenes depth: the floor spans 5-7 m (bottom row) to 9-11 m (top row), objects stand in front of
# it (ScenesConfig defaults), so the paper's 256 bins are spread over 0.001..12 m instead of NYU's 10 m.
DEPTH_BINS: dict[str, DepthBinsConfig] = {
    "nyu": DepthBinsConfig(),
    SCENES: DepthBinsConfig(num_bins=256, min_depth=1e-3, max_depth=12.0),
}


class SquareTargets(Dataset):
    """(PIL image, dense target [H, W]) -> (image, target resized (nearest) to size x size).

    Labels (integers <= 255) stay int64, depths float32; ``eigen_crop`` zeroes (= invalid) depth
    outside the Eigen crop of 480x640 NYUv2 frames before resizing.
    """

    def __init__(self, dataset: Dataset, size: int, eigen_crop: bool = False) -> None:
        self.dataset, self.size, self.eigen_crop = dataset, size, eigen_crop

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Image.Image, torch.Tensor]:
        image, target = self.dataset[index]
        target = np.asarray(target)
        if target.dtype.kind == "f":
            if self.eigen_crop and target.shape == (480, 640):
                target = np.where(nyu_eigen_crop_mask().numpy(), target, 0.0).astype(np.float32)
            resized = Image.fromarray(target.astype(np.float32), mode="F").resize((self.size, self.size), Image.NEAREST)
            return image, torch.from_numpy(np.array(resized, dtype=np.float32))
        resized = Image.fromarray(target.astype(np.uint8), mode="L").resize((self.size, self.size), Image.NEAREST)
        return image, torch.from_numpy(np.array(resized, dtype=np.int64))


def _imagenet_split(root: Path, split: str, class_names: Path | None = None) -> ImageFolderDataset:
    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(f"imagenet: expected {folder}/<class>/<image> (e.g. {split}/n01440764/*.JPEG)")
    other = root / ("val" if split == "train" else "train")
    if other.is_dir():
        check_same_classes(root / "train", root / "val")
    return ImageFolderDataset(folder, class_names)


def classification_set(ctx: EvalContext, key: str, root: Path | None, split: str, class_names: bool = False) -> Dataset:
    """(image, label int) of split "train" / "test"; ``.classes`` and ``.class_names`` name the labels.

    ImageNet: ``train/`` and ``val/`` folders; ``class_names`` reads ``--class-names`` for the prompts.
    """
    if key == SCENES:
        return ctx.scenes().targets(split, "label")
    names = ctx.settings.class_names if class_names else None
    return _imagenet_split(root, "train" if split == "train" else "val", names)


def zeroshot_segmentation_set(ctx: EvalContext, key: str, root: Path | None) -> Dataset:
    """(image, labels int64 [H, W], 255 = ignored) without a background class: ADE150, VOC20, scene shapes."""
    if key == SCENES:
        return ctx.scenes().targets("test", "objects")
    if key == "voc":
        return VOCSegmentation(root, "val", include_background=False)
    return ADE20KSegmentation(root)


def retrieval_sets(ctx: EvalContext, key: str, root: Path | None) -> list[tuple[str, str, Dataset]]:
    """(metric prefix, image embedding, dataset of (image, [captions])) for each retrieval of ``key``.

    The paper retrieves with the spatial CLS; on the scenes the alt-texts are also retrieved with the
    global CLS (``retrieval_alt``).
    """
    if key == SCENES:
        scenes = ctx.scenes()
        return [("retrieval", "spatial_cls", scenes.targets("test", "spatial")),
                ("retrieval_alt", "global_cls", scenes.targets("test", "alt"))]
    if key == "docci":
        jsonl = root if root.is_file() else root / "docci_descriptions.jsonlines"
        return [("retrieval", "spatial_cls", DOCCIDescriptions(jsonl, split="test"))]
    json_path = root if root.is_file() else root / f"dataset_{key}.json"
    folder = json_path.parent
    image_root = next(c for c in (folder / "images", folder / "flickr30k-images", folder) if c.is_dir())
    return [("retrieval", "spatial_cls", KarpathyCaptions(json_path, image_root, split="test"))]


def segmentation_splits(ctx: EvalContext, key: str, root: Path | None) -> tuple[Dataset, Dataset, int]:
    """(train, test, num_classes), square label maps with the background class: VOC (21), ADE20K (150),
    scenes (9: floor + 8 shapes)."""
    if key == SCENES:
        scenes = ctx.scenes()
        return scenes.targets("train", "class_mask"), scenes.targets("test", "class_mask"), len(scenes.class_names)
    if key == "voc":
        train, test = VOCSegmentation(root, "train"), VOCSegmentation(root, "val")
        num_classes = len(train.class_names)
    else:
        train, test, num_classes = ADE20KSegmentation(root, "training"), ADE20KSegmentation(root, "validation"), 150
    size = ctx.size()
    return SquareTargets(ctx.limited(train), size), SquareTargets(ctx.limited(test), size), num_classes


def depth_splits(ctx: EvalContext, key: str, root: Path | None) -> tuple[Dataset, Dataset]:
    """(train, test) square metric depth maps: NYUv2 (BTS splits, Eigen crop at test) or the scenes."""
    if key == SCENES:
        scenes = ctx.scenes()
        return scenes.targets("train", "depth"), scenes.targets("test", "depth")
    size = ctx.size()
    train = SquareTargets(ctx.limited(NYUDepthV2(root, "train")), size)
    return train, SquareTargets(ctx.limited(NYUDepthV2(root, "test")), size, eigen_crop=True)


def normals_splits(ctx: EvalContext, key: str, root: Path | None) -> tuple[Dataset, Dataset]:
    """(train, test) surface normals [3, S, S], zero where unscored (scenes only: no NYUv2 normals reader)."""
    if key != SCENES:
        raise KeyError(f"no surface normals reader for {key!r}; only {SCENES!r}")
    scenes = ctx.scenes()
    return scenes.targets("train", "normals"), scenes.targets("test", "normals")
