"""What does the quick evaluation's segmentation probe read from a model? Per-class IoU under probe variants.

Trains the quick evaluation's linear segmentation probe (``tipstorch.eval.quick.QUICK_SETTINGS``: 512 / 256
scenes at 112 px, 300 iterations of batch 8) on the patch tokens of each model given, with and without
the spatial CLS, with and without BatchNorm, at two learning rates, and prints mIoU, the final training
loss and the IoU of every class (floor + 8 shapes). ``--oracle`` adds the best any 8x8 patch grid can
hold: exact per-patch class fractions.

    PYTHONPATH=src python benchmarks/seg_probe_variants.py --model runs/tiny_cpu/final.safetensors --init tiny_cpu --oracle
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
import torch.nn.functional as F

from tipstorch.data.scene_splits import SceneSplits
from tipstorch.data.scenes import SHAPES
from tipstorch.data.transforms import image_transform
from tipstorch.eval.features import patch_features_encoder
from tipstorch.eval.probes import LINEAR_SEGMENTATION_RECIPE, PatchFeatures, linear_segmentation_probe
from tipstorch.eval.quick import QUICK_SETTINGS
from tipstorch.train.config import load_config, resolve_config
from tipstorch.train.loop import Trainer
from tipstorch.weights.factory import get_tokenizer, load_model

NUM_CLASSES = 1 + len(SHAPES)  # floor + shapes
ORACLE_SCALE = 20.0  # the norm of real patch tokens (tens), for which the probe's learning rates are set


def quick_scenes() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The quick evaluation's scenes per split: images [N, 3, S, S] and class masks long [N, S, S]."""
    settings = QUICK_SETTINGS
    splits = SceneSplits(settings.image_size, settings.scenes_seed, settings.scenes_train, settings.scenes_test)
    transform = image_transform(settings.image_size)
    images = {
        split: torch.stack([transform(s.image) for s in samples]) for split, samples in splits.samples.items()
    }
    masks = {
        split: torch.stack([torch.from_numpy(s.class_mask) for s in samples])
        for split, samples in splits.samples.items()
    }
    return images, masks


@torch.no_grad()
def model_features(
    model: torch.nn.Module, images: dict[str, torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per split: (patch_tokens [N, h, w, D], spatial_cls [N, D]) of images [N, 3, H, W]."""
    model.eval()
    encode = patch_features_encoder(model.encode_image)
    features = {}
    for split, batch in images.items():
        tokens, cls = zip(*(encode(chunk) for chunk in batch.split(64)), strict=True)
        features[split] = torch.cat(tokens), torch.cat(cls)
    return features


def oracle_features(masks: torch.Tensor, patch_size: int = 14) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch class fractions [N, h, w, C] of class masks [N, H, W] and their image mean [N, C]."""
    fractions = F.avg_pool2d(F.one_hot(masks, NUM_CLASSES).permute(0, 3, 1, 2).float(), patch_size)
    patches = ORACLE_SCALE * fractions.permute(0, 2, 3, 1)
    return patches, patches.mean(dim=(1, 2))


def probe(features: dict, masks: dict, use_cls: bool, batch_norm: bool, learning_rate: float) -> dict:
    recipe = replace(
        LINEAR_SEGMENTATION_RECIPE.scaled(QUICK_SETTINGS.probe_iterations, QUICK_SETTINGS.probe_batch_size),
        learning_rate=learning_rate,
    )
    train, test = (
        (PatchFeatures(features[split][0], features[split][1] if use_cls else None), masks[split])
        for split in ("train", "test")
    )
    return linear_segmentation_probe(train, test, NUM_CLASSES, recipe, batch_norm=batch_norm)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", action="append", default=[], help="a model file (repeatable)")
    parser.add_argument("--init", help="also the untrained initialisation of this training config")
    parser.add_argument("--oracle", action="store_true", help="also exact per-patch class fractions")
    parser.add_argument("--learning-rates", default="1e-2,1e-3")
    args = parser.parse_args()
    torch.manual_seed(0)
    images, masks = quick_scenes()
    sources = {path: (lambda path=path: model_features(load_model(path), images)) for path in args.model}
    if args.init:
        cfg = load_config(
            resolve_config(args.init), ["eval.quick=false", "loop.out_dir=/tmp/seg_probe_variants"]
        )
        sources["init " + args.init] = lambda: model_features(Trainer(cfg, get_tokenizer).model, images)
    if args.oracle:
        sources["oracle"] = lambda: {split: oracle_features(m) for split, m in masks.items()}
    print("| features | CLS | BatchNorm | lr | mIoU | train loss | IoU floor, " + ", ".join(SHAPES) + " |")
    print("|---|---|---|---:|---:|---:|---|")
    for name, compute in sources.items():
        features = compute()
        for use_cls in (True, False):
            for batch_norm in (True, False):
                for lr in map(float, args.learning_rates.split(",")):
                    r = probe(features, masks, use_cls, batch_norm, lr)
                    ious = ", ".join(f"{v:.2f}" for v in r["per_class_iou"])
                    print(
                        f"| {name} | {use_cls} | {batch_norm} | {lr:g} | {r['miou']:.3f} | {r['final_train_loss']:.3f} | {ious} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
