"""How much shape identity can the main job's ViT put into its patch tokens at a given compute, when told to?

A control for the recipe's dense figures: the tiny_cpu model, from the same initialisation as the main job,
is trained with direct supervision instead of the recipe's losses: a 1x1 linear head on the patch tokens,
upsampled to the pixels, per-pixel cross-entropy against the scenes' class masks (floor + 8 shapes), the
main job's optimiser settings (AdamW, lr 3e-4 with 30 warm-up steps and linear decay, weight decay 0.05,
gradient clipping 1.0, bf16 autocast), ``--steps`` steps of 32 scenes at 112 px (training seed 0). It then
scores the quick evaluation's linear segmentation probe on the trained patch tokens (without the spatial
CLS) and prints its mIoU, the mean IoU of the eight shapes and every class's IoU.

If this bound barely moves at N steps, no self-supervised rung trained for N steps can show a gain on the
segmentation probe: the figure then measures the compute, not the recipe.

    PYTHONPATH=src python benchmarks/supervised_bound.py --steps 200     # the main job's compute (~2 min)
    PYTHONPATH=src python benchmarks/supervised_bound.py --steps 1000    # 5x (~8 min on 2 cores)
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from seg_probe_variants import NUM_CLASSES, model_features, probe, quick_scenes

from tipstorch.data.scenes import SHAPES, ScenesConfig, ScenesDataset
from tipstorch.data.transforms import image_transform
from tipstorch.eval.quick import QUICK_SETTINGS
from tipstorch.train.config import load_config, resolve_config
from tipstorch.train.loop import Trainer
from tipstorch.train.schedules import warmup_then_decay
from tipstorch.weights.factory import get_tokenizer

BATCH, IMAGE_SIZE = 32, 112


def scene_batch(dataset: ScenesDataset, step: int, transform) -> tuple[torch.Tensor, torch.Tensor]:
    """Scenes [step * BATCH, (step + 1) * BATCH): images [B, 3, S, S] and class masks long [B, S, S]."""
    samples = [dataset.sample(step * BATCH + row) for row in range(BATCH)]
    images = torch.stack([transform(sample.image) for sample in samples])
    return images, torch.stack([torch.from_numpy(sample.class_mask) for sample in samples])


def train_supervised(steps: int) -> torch.nn.Module:
    """The tiny_cpu model after ``steps`` steps of per-pixel cross-entropy (see the module docstring)."""
    cfg = load_config(resolve_config("tiny_cpu"), ["eval.quick=false", "loop.out_dir=/tmp/supervised_bound"])
    model = Trainer(cfg, get_tokenizer).model
    head = torch.nn.Conv2d(model.visual.embed_dim, NUM_CLASSES, 1)
    parameters = [*model.visual.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    dataset, transform = ScenesDataset(ScenesConfig(image_size=IMAGE_SIZE, seed=0)), image_transform(IMAGE_SIZE)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = warmup_then_decay(step, steps, cfg.schedule.warmup_steps, cfg.optim.lr)
        images, masks = scene_batch(dataset, step, transform)
        with torch.autocast("cpu", torch.bfloat16):
            patch_tokens = model.encode_image(images).patch_tokens  # [B, h, w, D]
            logits = head(patch_tokens.permute(0, 3, 1, 2))
        logits = F.interpolate(logits.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, cfg.optim.grad_clip_norm)
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}: pixel cross-entropy {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = train_supervised(args.steps)
    images, masks = quick_scenes()
    features = {split: (patch_tokens, None) for split, (patch_tokens, _) in model_features(model, images).items()}
    result = probe(features, masks, use_cls=False, batch_norm=True, learning_rate=QUICK_SETTINGS.seg_probe_lr)
    ious = result["per_class_iou"]
    print(f"supervised, {args.steps} steps: seg probe mIoU {result['miou']:.3f}, shapes {sum(ious[1:]) / len(SHAPES):.3f}")
    print("IoU " + ", ".join(f"{name} {iou:.2f}" for name, iou in zip(("floor", *SHAPES), ious, strict=True)))


if __name__ == "__main__":
    main()
