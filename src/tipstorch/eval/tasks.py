"""The paper's evaluation tasks: one runner per task, for every dataset it reads (``TASKS``).

A runner takes the run's ``EvalContext``, a ``--data`` key and its root folder (None for the
built-in scenes), reads the set through ``tipstorch.eval.datasets``, runs the frozen model through
the library pieces (``features``, ``zeroshot``, ``retrieval``, ``knn``, ``probes``) and returns a
``TaskResult`` (headline metrics named as in ``tipstorch.eval.report`` + raw details + protocol).

| task         | --data keys                        | protocol                                            |
|--------------|------------------------------------|-----------------------------------------------------|
| zeroshot-cls | imagenet (val/), scenes            | global CLS, 80 CLIP templates                       |
| zeroshot-seg | ade20k (ADE150), voc (VOC20), scenes| official notebook: values readout, TCL-9, windows = |
|              |                                    | image size, stride 3/4 window; no background class  |
| retrieval    | coco, flickr30k, docci, scenes     | spatial CLS, recall@1/5/10 (scenes: + alt-texts with |
|              |                                    | the global CLS, ``retrieval_alt``)                  |
| knn          | imagenet (train/ bank, val/), scenes| global CLS, 20-NN, T = 0.07, 224 px                |
| linear       | imagenet, scenes                   | global CLS, 10 epochs, lr grid, 224 px              |
| seg-probe    | voc (21 cl.), ade20k (150), scenes | linear on patch tokens + spatial CLS                |
| depth-probe  | nyu, scenes                        | linear, 256 bins, x4, Eigen crop at test (NYU)      |
| normals-dpt  | scenes                             | DPT on 4 evenly spaced blocks, angular loss         |
| depth-dpt    | nyu, scenes                        | DPT on 4 evenly spaced blocks                       |

Dense probes resize images to a square ``image_size`` and their targets (nearest) to the same
square, train on cached features and score at that size (the paper trains on 512 / 480x640
crops with augmentation and tests at full resolution). ``max_samples`` keeps a seeded random
subset of every split (for smoke runs; never for reported numbers).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from tipstorch.data.transforms import image_transform
from tipstorch.eval.context import EvalContext, TaskResult
from tipstorch.eval.datasets import (
    DEPTH_BINS,
    classification_set,
    depth_splits,
    normals_splits,
    retrieval_sets,
    segmentation_splits,
    zeroshot_segmentation_set,
)
from tipstorch.eval.features import ExtractedFeatures, patch_features_encoder
from tipstorch.eval.knn import KNNConfig, knn_classification
from tipstorch.eval.probes import (
    DPT_RECIPE,
    LINEAR_DEPTH_RECIPE,
    LINEAR_SEGMENTATION_RECIPE,
    IntermediateFeatures,
    LinearClassifierConfig,
    PatchFeatures,
    ProbeOptimConfig,
    dpt_depth_probe,
    dpt_normals_probe,
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
    zero_shot_classification,
)
from tipstorch.models.dense import DPTConfig, DPTDepthDecoder, DPTNormalsDecoder, dpt_layer_indices

CLASSIFICATION_IMAGE_SIZE = 224  # paper A.4.2: kNN and linear classification at 224x224
WNID = re.compile(r"n\d{8}")


def _skipped(*extracted: ExtractedFeatures) -> int:
    return sum(e.skipped.count for e in extracted)


def _global_cls(ctx: EvalContext, key: str, root: Path | None, split: str, size: int,
                dataset: Dataset | None = None) -> tuple[ExtractedFeatures, Dataset]:
    dataset = dataset if dataset is not None else classification_set(ctx, key, root, split)
    extracted = ctx.features((key, split, size, "global_cls"), ctx.limited(dataset), ctx.model.global_cls, size,
                             f"{key} {split}")
    return extracted, dataset


def run_zeroshot_cls(ctx: EvalContext, key: str, root: Path | None) -> TaskResult:
    dataset = classification_set(ctx, key, root, "test", class_names=True)
    if ctx.settings.class_names is None and all(WNID.fullmatch(c) for c in dataset.classes):
        raise ValueError(
            f"zeroshot-cls on {key} needs human-readable class names for the prompts: pass "
            "--class-names FILE (JSON {\"n01440764\": \"tench\", ...})"
        )
    size = ctx.size()
    extracted, _ = _global_cls(ctx, key, root, "test", size, dataset)
    classifier = build_text_classifier(
        ctx.model.encode_text, ctx.model.tokenizer, dataset.class_names, get_templates("imagenet80")
    )
    result = zero_shot_classification(extracted.features, torch.tensor(extracted.targets), classifier)
    return TaskResult(
        headline("zeroshot_cls", result),
        {"num_images": len(extracted.targets), "num_skipped": _skipped(extracted)},
        {"image_size": size, "templates": "imagenet80", "embedding": "global_cls"},
    )


def run_knn(ctx: EvalContext, key: str, root: Path | None) -> TaskResult:
    size = ctx.size(CLASSIFICATION_IMAGE_SIZE)
    (train, train_set), (test, _) = _global_cls(ctx, key, root, "train", size), _global_cls(ctx, key, root, "test", size)
    knn = KNNConfig()
    result = knn_classification(
        train.features, torch.tensor(train.targets), test.features, torch.tensor(test.targets), len(train_set.classes), knn
    )
    return TaskResult(
        headline("knn", result),
        {"num_train": len(train.targets), "num_test": len(test.targets), "num_skipped": _skipped(train, test)},
        {"image_size": size, "k": knn.k, "temperature": knn.temperature},
    )


def run_linear(ctx: EvalContext, key: str, root: Path | None) -> TaskResult:
    size, settings = ctx.size(CLASSIFICATION_IMAGE_SIZE), ctx.settings
    (train, train_set), (test, _) = _global_cls(ctx, key, root, "train", size), _global_cls(ctx, key, root, "test", size)
    shortened = {"epochs": settings.linear_epochs, "batch_size": settings.linear_batch_size}
    config = LinearClassifierConfig(seed=settings.seed, **{k: v for k, v in shortened.items() if v is not None})
    result = train_linear_classifier(
        train.features, torch.tensor(train.targets), test.features, torch.tensor(test.targets),
        len(train_set.classes), config, settings.progress,
    )
    details = {
        "best_learning_rate": result.best_learning_rate,
        "top1_per_learning_rate": {str(lr): v for lr, v in result.top1_per_learning_rate.items()},
        "num_train": len(train.targets), "num_test": len(test.targets), "num_skipped": _skipped(train, test),
    }
    protocol = {"image_size": size, "epochs": config.epochs, "batch_size": config.batch_size}
    return TaskResult(headline("linear", result.metrics), details, protocol)


def run_zeroshot_seg(ctx: EvalContext, key: str, root: Path | None) -> TaskResult:
    dataset = zeroshot_segmentation_set(ctx, key, root)
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


def run_retrieval(ctx: EvalContext, key: str, root: Path | None) -> TaskResult:
    size = ctx.size()
    metrics, details, protocol = {}, {}, {"image_size": size}
    for prefix, embedding, dataset in retrieval_sets(ctx, key, root):
        result = evaluate_retrieval(
            ctx.limited(dataset), image_transform(size), getattr(ctx.model, embedding), ctx.model.encode_text,
            ctx.model.tokenizer, batch_size=ctx.settings.batch_size, progress=ctx.settings.progress,
        )
        metrics.update(headline(prefix, result))
        counts = {k: result[k] for k in ("num_images", "num_texts", "num_skipped")}
        if prefix == "retrieval":
            details.update(counts)
            protocol["embedding"] = embedding
        else:
            details[prefix], protocol[f"{prefix}_embedding"] = counts, embedding
    return TaskResult(metrics, details, protocol)


def _dense_features(ctx: EvalContext, key: str, split: str, dataset: Dataset, kind: str, target: str) -> ExtractedFeatures:
    """Features of a square dense split: kind "patch" (patch tokens, spatial CLS) or "dpt" (4 intermediates)."""
    size = ctx.size()
    encode = patch_features_encoder(ctx.model.encode_image) if kind == "patch" else ctx.model.intermediates
    return ctx.features((key, split, size, kind, target), dataset, encode, size, f"{key} {split}")


def _patch_features(extracted: ExtractedFeatures) -> tuple[PatchFeatures, torch.Tensor]:
    return PatchFeatures(*extracted.features), torch.stack(extracted.targets)


def _intermediates(extracted: ExtractedFeatures) -> tuple[IntermediateFeatures, torch.Tensor]:
    return IntermediateFeatures(*extracted.features), torch.stack(extracted.targets)


def _dense_details(result: dict, *extracted: ExtractedFeatures) -> dict[str, Any]:
    details = {k: v for k, v in result.items() if k != "per_class_iou"}
    details.update(num_train=len(extracted[0].targets), num_test=len(extracted[1].targets), num_skipped=_skipped(*extracted))
    if "per_class_iou" in result:
        details["per_class_iou"] = result["per_class_iou"]
    return details


def _probe_protocol(ctx: EvalContext, recipe: ProbeOptimConfig) -> dict[str, Any]:
    return {"image_size": ctx.size(), "iterations": recipe.iterations, "batch_size": recipe.batch_size,
            "learning_rate": recipe.learning_rate, "weight_decay": recipe.weight_decay}


def _dpt(ctx: EvalContext, train: ExtractedFeatures) -> DPTConfig:
    # readout = spatial CLS (index 1), the paper's choice for dense tasks; features[0]: [N, L, D, h, w]
    channels = {"channels": ctx.settings.dpt_channels} if ctx.settings.dpt_channels else {}
    layers = dpt_layer_indices(len(ctx.model.model.visual.blocks))  # the blocks ctx.model.intermediates reads
    return DPTConfig(train.features[0].shape[2], readout_index=1, layer_indices=layers, **channels)


def _dpt_protocol(ctx: EvalContext, recipe: ProbeOptimConfig, dpt: DPTConfig) -> dict[str, Any]:
    layers = dpt_layer_indices(len(ctx.model.model.visual.blocks))
    return {**_probe_protocol(ctx, recipe), "layers": layers, "channels": dpt.channels}


def run_seg_probe(ctx: EvalContext, key: str, root: Path | None) -> TaskResult:
    train_set, test_set, num_classes = segmentation_splits(ctx, key, root)
    train = _dense_features(ctx, key, "train", train_set, "patch", "class_mask")
    test = _dense_features(ctx, key, "test", test_set, "patch", "class_mask")
    recipe = ctx.probe_recipe(LINEAR_SEGMENTATION_RECIPE, ctx.settings.seg_probe_lr)
    result = linear_segmentation_probe(
        _patch_features(train), _patch_features(test), num_classes, recipe, progress=ctx.settings.progress
    )
    return TaskResult(headline("seg_probe", result), _dense_details(result, train, test), _probe_protocol(ctx, recipe))


def run_depth_probe(ctx: EvalContext, key: str, root: Path | None) -> TaskResult:
    train_set, test_set = depth_splits(ctx, key, root)
    train = _dense_features(ctx, key, "train", train_set, "patch", "depth")
    test = _dense_features(ctx, key, "test", test_set, "patch", "depth")
    recipe = ctx.probe_recipe(LINEAR_DEPTH_RECIPE, ctx.settings.depth_probe_lr)
    result = linear_depth_probe(
        _patch_features(train), _patch_features(test), DEPTH_BINS[key], recipe, progress=ctx.settings.progress
    )
    return TaskResult(headline("depth_probe", result), _dense_details(result, train, test), _probe_protocol(ctx, recipe))


def run_normals_dpt(ctx: EvalContext, key: str, root: Path | None) -> TaskResult:
    train_set, test_set = normals_splits(ctx, key, root)
    train = _dense_features(ctx, key, "train", train_set, "dpt", "normals")
    test = _dense_features(ctx, key, "test", test_set, "dpt", "normals")
    recipe, dpt = ctx.probe_recipe(DPT_RECIPE, ctx.settings.dpt_lr), _dpt(ctx, train)
    head = DPTNormalsDecoder(dpt)
    restarts = ctx.settings.normals_restarts
    result = dpt_normals_probe(_intermediates(train), _intermediates(test), dpt, recipe, progress=ctx.settings.progress,
                               head=head, restarts=restarts)
    protocol = {**_dpt_protocol(ctx, recipe, dpt), "restarts": restarts}
    return TaskResult(headline("normals_dpt", result), _dense_details(result, train, test), protocol,
                      heads={"normals_dpt": head})


def run_depth_dpt(ctx: EvalContext, key: str, root: Path | None) -> TaskResult:
    train_set, test_set = depth_splits(ctx, key, root)
    train = _dense_features(ctx, key, "train", train_set, "dpt", "depth")
    test = _dense_features(ctx, key, "test", test_set, "dpt", "depth")
    recipe, dpt = ctx.probe_recipe(DPT_RECIPE, ctx.settings.dpt_lr), _dpt(ctx, train)
    head = DPTDepthDecoder(dpt, DEPTH_BINS[key])
    result = dpt_depth_probe(_intermediates(train), _intermediates(test), dpt, DEPTH_BINS[key], recipe,
                             progress=ctx.settings.progress, head=head)
    return TaskResult(headline("depth_dpt", result), _dense_details(result, train, test), _dpt_protocol(ctx, recipe, dpt),
                      heads={"depth_dpt": head})


Runner = Callable[[EvalContext, str, Path | None], TaskResult]


@dataclass(frozen=True)
class Task:
    """A task's runner, the name its metrics and report entries carry (``<data key>/<name>/...``) and
    the ``--data`` keys it reads, in the order of the paper's tables."""

    run: Runner
    name: str
    data: tuple[str, ...]


TASKS: dict[str, Task] = {
    "zeroshot-cls": Task(run_zeroshot_cls, "zeroshot_cls", ("imagenet", "scenes")),
    "zeroshot-seg": Task(run_zeroshot_seg, "zeroshot_seg", ("ade20k", "voc", "scenes")),
    "retrieval": Task(run_retrieval, "retrieval", ("coco", "flickr30k", "docci", "scenes")),
    "knn": Task(run_knn, "knn", ("imagenet", "scenes")),
    "linear": Task(run_linear, "linear", ("imagenet", "scenes")),
    "seg-probe": Task(run_seg_probe, "seg_probe", ("voc", "ade20k", "scenes")),
    "depth-probe": Task(run_depth_probe, "depth_probe", ("nyu", "scenes")),
    "normals-dpt": Task(run_normals_dpt, "normals_dpt", ("scenes",)),  # no reader for NYUv2 surface normals yet
    "depth-dpt": Task(run_depth_dpt, "depth_dpt", ("nyu", "scenes")),
}


class TaskDataError(ValueError):
    """A task could not read or use its data; the message names the task and the data key."""


def run_tasks(ctx: EvalContext, runs: Sequence[tuple[str, str, Path | None]], desc: str = "eval") -> dict[str, TaskResult]:
    """Run every (task, data key, root) of ``runs`` in order; results keyed ``"<data key>/<task name>"``.

    The model runs in eval mode and is put back in its previous mode; the global torch RNG is seeded
    with ``settings.seed`` at the start of every task (probe heads draw their initial weights from it)
    and restored afterwards, so a task's results depend only on the model, the settings and the task,
    not on the tasks run before it.
    """
    unknown = sorted({task for task, _, _ in runs if task not in TASKS})
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    model = ctx.model.model
    was_training = model.training
    model.eval()
    results: dict[str, TaskResult] = {}
    try:
        with torch.random.fork_rng(devices=[]):
            progress = tqdm(runs, desc=desc, unit="task", disable=not ctx.settings.progress)
            for task, key, root in progress:
                name = f"{key}/{TASKS[task].name}"
                progress.set_postfix_str(name)
                torch.manual_seed(ctx.settings.seed)
                start = time.perf_counter()
                try:
                    result = TASKS[task].run(ctx, key, root)
                except (FileNotFoundError, KeyError, ValueError) as error:
                    raise TaskDataError(f"{task} on {key}: {error}") from error
                result.seconds = round(time.perf_counter() - start, 2)
                results[name] = result
    finally:
        model.train(was_training)
    return results
