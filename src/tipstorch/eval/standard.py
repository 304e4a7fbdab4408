"""The paper's tasks on the standard datasets, as ``tipstorch eval`` runs them.

Each runner takes the dataset root named by ``--data KEY=PATH``, runs a frozen model through
the library pieces (``features``, ``zeroshot``, ``retrieval``, ``knn``, ``probes``) and returns
``TaskResult`` (headline metrics named as in ``tipstorch.eval.report`` + raw details).

| task         | --data key                 | split(s) read                                   | protocol                                  |
|--------------|----------------------------|-------------------------------------------------|-------------------------------------------|
| zeroshot-cls | imagenet                   | val/<wnid>/                                     | global CLS, 80 CLIP templates             |
| zeroshot-seg | ade20k (ADE150), voc (VOC20)| validation / val                               | official notebook: values readout, TCL-9, |
|              |                            |                                                 | windows = image size, stride 3/4 window   |
| retrieval    | coco, flickr30k, docci     | Karpathy test (5k / 1k), DOCCI test             | spatial CLS, recall@1/5/10                |
| knn          | imagenet                   | train/ (bank), val/                             | global CLS, 20-NN, T = 0.07, 224 px       |
| linear       | imagenet                   | train/, val/                                    | global CLS, 10 epochs, lr grid, 224 px    |
| seg-probe    | voc (21 cl.), ade20k (150) | train / val, training / validation              | linear on patch tokens + spatial CLS      |
| depth-probe  | nyu                        | official_splits/{train,test} (BTS)              | linear, 256 bins, x4, Eigen crop at test  |
| depth-dpt    | nyu                        | official_splits/{train,test} (BTS)              | DPT on 4 evenly spaced blocks             |

Dense probes resize images to a square ``image_size`` and their targets (nearest) to the same
square, train on cached features and score at that size (the paper trains on 512 / 480x640
crops with augmentation and tests at full resolution). ``max_samples`` keeps a seeded random
subset of every split (for smoke runs; never for reported numbers).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset, Subset

from tipstorch.data.formats import (
    ADE20KSegmentation,
    DOCCIDescriptions,
    ImageFolderDataset,
    KarpathyCaptions,
    NYUDepthV2,
    VOCSegmentation,
)
from tipstorch.data.transforms import image_transform
from tipstorch.eval.features import (
    ExtractedFeatures,
    extract_features,
    intermediates_encoder,
    patch_features_encoder,
)
from tipstorch.eval.knn import KNNConfig, knn_classification
from tipstorch.eval.metrics import nyu_eigen_crop_mask
from tipstorch.eval.probes import (
    DPT_RECIPE,
    LINEAR_DEPTH_RECIPE,
    LINEAR_SEGMENTATION_RECIPE,
    IntermediateFeatures,
    LinearClassifierConfig,
    PatchFeatures,
    ProbeOptimConfig,
    dpt_depth_probe,
    linear_depth_probe,
    linear_segmentation_probe,
    train_linear_classifier,
)
from tipstorch.eval.report import headline
from tipstorch.eval.retrieval import evaluate_retrieval
from tipstorch.eval.templates import get_templates
from tipstorch.eval.zeroshot import (
    ZeroShotSegConfig,
    build_text_classifier,
    evaluate_zero_shot_segmentation,
    segmentation_classifier,
    values_readout,
    zero_shot_classification,
)
from tipstorch.models.dense import DepthBinsConfig, DPTConfig, dpt_layer_indices

CLASSIFICATION_IMAGE_SIZE = 224  # paper A.4.2: kNN and linear classification at 224x224
WNID = re.compile(r"n\d{8}")


@dataclass
class EvalSettings:
    """Run-wide settings of ``tipstorch eval`` (None = the protocol's own value)."""

    image_size: int | None = None
    batch_size: int = 32
    max_samples: int | None = None
    probe_iterations: int | None = None
    probe_batch_size: int | None = None
    class_names: Path | None = None
    seed: int = 0
    progress: bool = True


@dataclass
class TaskResult:
    """Headline metrics ``{"<task>/<metric>": value}``, raw outputs and the protocol actually used."""

    metrics: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)
    protocol: dict[str, Any] = field(default_factory=dict)


class FrozenModel:
    """A TIPS model seen by the evaluation: inputs moved to its device, optional bf16 autocast."""

    def __init__(self, model: nn.Module, tokenizer: Callable, device: str | torch.device, bf16: bool) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.device = torch.device(device)
        self.bf16 = bf16
        self.image_size: int = model.image_size

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def encode_image(self, images: torch.Tensor):
        """ImageFeatures of images [B, 3, H, W] (on the model's device)."""
        with self.autocast():
            return self.model.encode_image(images.to(self.device))

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model.encode_text(token_ids.to(self.device))

    def global_cls(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_image(images).global_cls

    def spatial_cls(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_image(images).spatial_cls

    def values_readout(self, images: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return values_readout(self.model.visual, images.to(self.device))

    def intermediates(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        indices = dpt_layer_indices(len(self.model.visual.blocks))
        with self.autocast():
            return intermediates_encoder(self.model.visual, indices)(images.to(self.device))


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


def limit(dataset: Dataset, max_samples: int | None, seed: int) -> Dataset:
    """A seeded random subset of ``max_samples`` samples (in dataset order), or the dataset itself."""
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(dataset), generator=generator)[:max_samples].sort().values
    return Subset(dataset, chosen.tolist())


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
    return ImageFolderDataset(folder, class_names)


def _karpathy(root: Path, name: str) -> KarpathyCaptions:
    json_path = root if root.is_file() else root / f"dataset_{name}.json"
    folder = json_path.parent
    candidates = [folder / "images", folder / "flickr30k-images", folder]
    image_root = next(c for c in candidates if c.is_dir())
    return KarpathyCaptions(json_path, image_root, split="test")


def _docci(root: Path) -> DOCCIDescriptions:
    jsonl = root if root.is_file() else root / "docci_descriptions.jsonlines"
    return DOCCIDescriptions(jsonl, split="test")


def _segmentation_splits(key: str, root: Path, include_background: bool) -> tuple[Dataset, Dataset, int]:
    """(train, test, num_classes) of a segmentation set: VOC (21 or 20 classes) or ADE20K (150)."""
    if key == "voc":
        train = VOCSegmentation(root, "train", include_background)
        return train, VOCSegmentation(root, "val", include_background), len(train.class_names)
    return ADE20KSegmentation(root, "training"), ADE20KSegmentation(root, "validation"), 150


# --------------------------------------------------------------------------------------------
# Runners
# --------------------------------------------------------------------------------------------


@dataclass
class TaskContext:
    """One ``tipstorch eval`` run: the frozen model, the settings and a cache of extracted features."""

    model: FrozenModel
    settings: EvalSettings
    cache: dict[tuple, ExtractedFeatures] = field(default_factory=dict)

    def size(self, protocol_size: int | None = None) -> int:
        return self.settings.image_size or protocol_size or self.model.image_size

    def limited(self, dataset: Dataset) -> Dataset:
        return limit(dataset, self.settings.max_samples, self.settings.seed)

    def features(self, key: tuple, dataset: Dataset, encode: Callable, size: int, desc: str) -> ExtractedFeatures:
        """Extract (once per key) features of ``dataset`` resized to a ``size`` square."""
        if key not in self.cache:
            self.cache[key] = extract_features(
                dataset, image_transform(size), encode, self.settings.batch_size, self.settings.progress, desc
            )
        return self.cache[key]

    def probe_recipe(self, paper_recipe: ProbeOptimConfig) -> ProbeOptimConfig:
        iterations = self.settings.probe_iterations or paper_recipe.iterations
        return replace(paper_recipe.scaled(iterations, self.settings.probe_batch_size), seed=self.settings.seed)


def _skipped(*extracted: ExtractedFeatures) -> int:
    return sum(e.skipped.count for e in extracted)


def _imagenet_global(ctx: TaskContext, root: Path, split: str) -> tuple[ExtractedFeatures, ImageFolderDataset]:
    dataset = _imagenet_split(root, split)
    size = ctx.size(CLASSIFICATION_IMAGE_SIZE)
    extracted = ctx.features(
        ("imagenet", split, size, "global_cls"), ctx.limited(dataset), ctx.model.global_cls, size, f"imagenet {split}"
    )
    return extracted, dataset


def run_zeroshot_cls(ctx: TaskContext, key: str, root: Path) -> TaskResult:
    dataset = _imagenet_split(root, "val", ctx.settings.class_names)
    if ctx.settings.class_names is None and all(WNID.fullmatch(c) for c in dataset.classes):
        raise ValueError(
            "zeroshot-cls on imagenet needs human-readable class names for the prompts: pass "
            "--class-names FILE (JSON {\"n01440764\": \"tench\", ...})"
        )
    size = ctx.size()
    extracted = ctx.features(
        ("imagenet", "val", size, "global_cls"), ctx.limited(dataset), ctx.model.global_cls, size, "imagenet val"
    )
    classifier = build_text_classifier(
        ctx.model.encode_text, ctx.model.tokenizer, dataset.class_names, get_templates("imagenet80")
    )
    result = zero_shot_classification(extracted.features, torch.tensor(extracted.targets), classifier)
    return TaskResult(
        headline("zeroshot_cls", result),
        {"num_images": len(extracted.targets), "num_skipped": _skipped(extracted)},
        {"image_size": size, "templates": "imagenet80", "embedding": "global_cls"},
    )


def run_knn(ctx: TaskContext, key: str, root: Path) -> TaskResult:
    (train, train_set), (test, _) = _imagenet_global(ctx, root, "train"), _imagenet_global(ctx, root, "val")
    knn = KNNConfig()
    result = knn_classification(
        train.features, torch.tensor(train.targets), test.features, torch.tensor(test.targets), len(train_set.classes), knn
    )
    return TaskResult(
        headline("knn", result),
        {"num_train": len(train.targets), "num_test": len(test.targets), "num_skipped": _skipped(train, test)},
        {"image_size": ctx.size(CLASSIFICATION_IMAGE_SIZE), "k": knn.k, "temperature": knn.temperature},
    )


def run_linear(ctx: TaskContext, key: str, root: Path) -> TaskResult:
    (train, train_set), (test, _) = _imagenet_global(ctx, root, "train"), _imagenet_global(ctx, root, "val")
    config = LinearClassifierConfig(seed=ctx.settings.seed)
    result = train_linear_classifier(
        train.features, torch.tensor(train.targets), test.features, torch.tensor(test.targets),
        len(train_set.classes), config, ctx.settings.progress,
    )
    details = {
        "best_learning_rate": result.best_learning_rate,
        "top1_per_learning_rate": {str(lr): v for lr, v in result.top1_per_learning_rate.items()},
        "num_train": len(train.targets), "num_test": len(test.targets), "num_skipped": _skipped(train, test),
    }
    protocol = {"image_size": ctx.size(CLASSIFICATION_IMAGE_SIZE), "epochs": config.epochs, "batch_size": config.batch_size}
    return TaskResult(headline("linear", result.metrics), details, protocol)


def run_zeroshot_seg(ctx: TaskContext, key: str, root: Path) -> TaskResult:
    # VOC without background ("VOC20") and ADE150: the official notebook's no-background protocol
    dataset = VOCSegmentation(root, "val", include_background=False) if key == "voc" else ADE20KSegmentation(root)
    size = ctx.size()
    config = ZeroShotSegConfig(short_side=size, window=size, stride=size * 3 // 4)
    classifier = segmentation_classifier(ctx.model.encode_text, ctx.model.tokenizer, dataset.class_names, config)
    result = evaluate_zero_shot_segmentation(
        ctx.model.values_readout, ctx.limited(dataset), classifier, config, progress=ctx.settings.progress
    )
    details = {k: result[k] for k in ("miou", "per_class_iou", "mean_accuracy", "num_images", "num_skipped")}
    details["class_names"] = list(dataset.class_names)
    protocol = {"short_side": size, "window": size, "stride": config.stride, "templates": config.templates}
    return TaskResult(headline("zeroshot_seg", result), details, protocol)


def run_retrieval(ctx: TaskContext, key: str, root: Path) -> TaskResult:
    dataset = _docci(root) if key == "docci" else _karpathy(root, key)
    size = ctx.size()
    result = evaluate_retrieval(
        ctx.limited(dataset), image_transform(size), ctx.model.spatial_cls, ctx.model.encode_text,
        ctx.model.tokenizer, batch_size=ctx.settings.batch_size, progress=ctx.settings.progress,
    )
    details = {k: result[k] for k in ("num_images", "num_texts", "num_skipped")}
    return TaskResult(headline("retrieval", result), details, {"image_size": size, "embedding": "spatial_cls"})


def _dense_features(
    ctx: TaskContext, key: str, split: str, dataset: Dataset, kind: str, eigen_crop: bool = False
) -> ExtractedFeatures:
    """Features of a dense split: kind "patch" (patch tokens, spatial CLS) or "dpt" (4 intermediates)."""
    size = ctx.size()
    encode = patch_features_encoder(ctx.model.encode_image) if kind == "patch" else ctx.model.intermediates
    wrapped = SquareTargets(ctx.limited(dataset), size, eigen_crop)
    return ctx.features((key, split, size, kind), wrapped, encode, size, f"{key} {split}")


def _patch_features(extracted: ExtractedFeatures) -> tuple[PatchFeatures, torch.Tensor]:
    return PatchFeatures(*extracted.features), torch.stack(extracted.targets)


def _dense_details(result: dict, *extracted: ExtractedFeatures) -> dict[str, Any]:
    details = {k: v for k, v in result.items() if k != "per_class_iou"}
    details.update(num_train=len(extracted[0].targets), num_test=len(extracted[1].targets), num_skipped=_skipped(*extracted))
    if "per_class_iou" in result:
        details["per_class_iou"] = result["per_class_iou"]
    return details


def _probe_protocol(ctx: TaskContext, recipe: ProbeOptimConfig) -> dict[str, Any]:
    return {"image_size": ctx.size(), "iterations": recipe.iterations, "batch_size": recipe.batch_size,
            "learning_rate": recipe.learning_rate, "weight_decay": recipe.weight_decay}


def run_seg_probe(ctx: TaskContext, key: str, root: Path) -> TaskResult:
    train_set, test_set, num_classes = _segmentation_splits(key, root, include_background=True)
    train = _dense_features(ctx, key, "train", train_set, "patch")
    test = _dense_features(ctx, key, "test", test_set, "patch")
    recipe = ctx.probe_recipe(LINEAR_SEGMENTATION_RECIPE)
    result = linear_segmentation_probe(
        _patch_features(train), _patch_features(test), num_classes, recipe, progress=ctx.settings.progress
    )
    return TaskResult(headline("seg_probe", result), _dense_details(result, train, test), _probe_protocol(ctx, recipe))


def _nyu_features(ctx: TaskContext, root: Path, kind: str) -> tuple[ExtractedFeatures, ExtractedFeatures]:
    train = _dense_features(ctx, "nyu", "train", NYUDepthV2(root, "train"), kind)
    test = _dense_features(ctx, "nyu", "test", NYUDepthV2(root, "test"), kind, eigen_crop=True)
    return train, test


def run_depth_probe(ctx: TaskContext, key: str, root: Path) -> TaskResult:
    train, test = _nyu_features(ctx, root, "patch")
    recipe = ctx.probe_recipe(LINEAR_DEPTH_RECIPE)
    result = linear_depth_probe(
        _patch_features(train), _patch_features(test), DepthBinsConfig(), recipe, progress=ctx.settings.progress
    )
    return TaskResult(headline("depth_probe", result), _dense_details(result, train, test), _probe_protocol(ctx, recipe))


def run_depth_dpt(ctx: TaskContext, key: str, root: Path) -> TaskResult:
    train, test = _nyu_features(ctx, root, "dpt")
    recipe = ctx.probe_recipe(DPT_RECIPE)
    as_dpt = lambda e: (IntermediateFeatures(*e.features), torch.stack(e.targets))  # noqa: E731
    dpt = DPTConfig(train.features[0].shape[2], readout_index=1)
    result = dpt_depth_probe(as_dpt(train), as_dpt(test), dpt, DepthBinsConfig(), recipe, progress=ctx.settings.progress)
    protocol = {**_probe_protocol(ctx, recipe), "layers": dpt_layer_indices(len(ctx.model.model.visual.blocks))}
    return TaskResult(headline("depth_dpt", result), _dense_details(result, train, test), protocol)


Runner = Callable[[TaskContext, str, Path], TaskResult]

# CLI task -> runner; the --data keys each task reads are ``tipstorch.cli.eval.TASK_DATA``
STANDARD_TASKS: dict[str, Runner] = {
    "zeroshot-cls": run_zeroshot_cls,
    "zeroshot-seg": run_zeroshot_seg,
    "retrieval": run_retrieval,
    "knn": run_knn,
    "linear": run_linear,
    "seg-probe": run_seg_probe,
    "depth-probe": run_depth_probe,
    "depth-dpt": run_depth_dpt,
}
