"""Why do (or don't) the self-supervised and dense terms learn? Train a recipe and measure, every few steps:

- every loss part and its gradient norm on the vision backbone (one backward per term);
- the teacher's DINO / iBOT targets on held-out scenes: mean entropy of a target (log K = uniform, the
  target says nothing about the image) and entropy of the batch-mean target (0 = one prototype for
  every image: collapse), and the norm of each centre;
- CLS similarity across images (mean off-diagonal cosine of ``global_cls`` / ``spatial_cls``), patch
  token similarity within an image, and the effective rank (participation ratio) of centred patch tokens;
- the mean |gamma| of the LayerScales.

    PYTHONPATH=src python benchmarks/recipe_diagnostics.py --config tiny_cpu --steps 200 --every 20 \
        --set loss.weights.dino=1.0 --out runs/diag/baseline.json

Prints one line per diagnostic step, writes the series as JSON and the trained model beside it
(``OUT`` with the suffix ``.safetensors``, for ``tipstorch eval --tasks quick``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tipstorch.data.scenes import ScenesConfig, ScenesDataset
from tipstorch.data.transforms import pil_to_tensor
from tipstorch.train.config import load_config, resolve_config
from tipstorch.train.loop import Trainer
from tipstorch.weights.factory import get_tokenizer
from tipstorch.weights.tipstorch_file import save_model


def held_out_images(count: int, size: int, seed: int = 4321) -> torch.Tensor:
    """[count, 3, size, size] scenes the training stream never draws (another seed)."""
    scenes = ScenesDataset(ScenesConfig(seed=seed, image_size=size), length=count)
    return torch.stack([pil_to_tensor(scenes[i].image) for i in range(count)])


def mean_off_diagonal_cosine(vectors: torch.Tensor) -> float:
    """vectors [B, D] -> mean cosine between different rows."""
    unit = F.normalize(vectors.float(), dim=-1)
    similarity = unit @ unit.T
    count = vectors.shape[0]
    return float((similarity.sum() - similarity.diagonal().sum()) / (count * (count - 1)))


def participation_ratio(features: torch.Tensor) -> float:
    """features [M, D] -> (sum eigenvalues)^2 / sum eigenvalues^2 of their covariance, in [1, D]."""
    centred = features.float() - features.float().mean(dim=0)
    eigenvalues = torch.linalg.svdvals(centred) ** 2
    return float(eigenvalues.sum() ** 2 / (eigenvalues**2).sum())


def target_entropies(probabilities: torch.Tensor) -> tuple[float, float]:
    """probabilities [M, K] -> (mean entropy of a row, entropy of the mean row), in nats."""
    rows = probabilities.float().clamp_min(1e-12)
    per_row = -(rows * rows.log()).sum(dim=-1).mean()
    mean = rows.mean(dim=0)
    return float(per_row), float(-(mean * mean.log()).sum())


@torch.no_grad()
def feature_statistics(trainer: Trainer, images: torch.Tensor) -> dict[str, float]:
    """Similarity, rank, LayerScale and teacher-target statistics on held-out images."""
    visual = trainer.model.visual
    was_training = visual.training
    visual.eval()
    features = visual.forward_features(images)
    stats = {
        "cos_global_cls": mean_off_diagonal_cosine(features.global_cls),
        "cos_spatial_cls": mean_off_diagonal_cosine(features.spatial_cls),
        "pr_patches": participation_ratio(features.flat.flatten(0, 1)),
        "pr_global_cls": participation_ratio(features.global_cls),
    }
    patches = F.normalize(features.flat.float(), dim=-1)
    tokens = patches.shape[1]
    within = patches @ patches.transpose(1, 2)
    stats["cos_patches_within"] = float(((within.sum((1, 2)) - tokens) / (tokens * (tokens - 1))).mean())
    gammas = [block.ls1.gamma.abs().mean() for block in visual.blocks] + [block.ls2.gamma.abs().mean() for block in visual.blocks]
    stats["layerscale_mean"] = float(torch.stack(gammas).mean())
    if trainer.teacher is not None:
        scores = trainer.teacher.scores(images, None, lambda tokens: tokens.flatten(0, 1))  # every patch token
        values = trainer.schedules.at(trainer.step)
        for name, loss, teacher_scores, temp in (
            ("dino", trainer.loss.dino, scores.global_scores, values.dino_teacher_temp),
            ("ibot", trainer.loss.ibot, scores.patch_scores, values.ibot_teacher_temp),
        ):
            if loss is None or teacher_scores is None:
                continue
            rows = teacher_scores.float().reshape(-1, teacher_scores.shape[-1])
            probs = loss.centering.probabilities(rows, temp)
            stats[f"{name}_target_entropy"], stats[f"{name}_mean_target_entropy"] = target_entropies(probs)
            stats[f"{name}_center_norm"] = float(loss.centering.center.norm())
            stats[f"{name}_score_std_images"] = float(rows.std(0).mean())
    visual.train(was_training)
    return stats


def term_gradient_norms(trainer: Trainer, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Gradient norm on the vision backbone of each weighted loss term, for one batch (no update, no centring)."""
    student, loss = trainer.student, trainer.loss
    values = trainer.schedules.at(trainer.step)
    backbone = [p for p in student.model.visual.parameters() if p.requires_grad]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=trainer.bf16):
        outputs = student(batch)
        parts = loss.contrastive_parts(outputs.embeddings, student.model.temperature)
        if trainer.teacher is not None:  # the targets without recording them for the centres
            targets = trainer.teacher.scores(batch["global_crop"], outputs.unmasked, loss.supervised_rows(batch["patch_mask"]))
            if loss.dino is not None:
                probs = loss.dino.centering.probabilities(targets.global_scores, values.dino_teacher_temp)
                parts["dino"] = loss.dino(outputs.local_scores, probs)
            if loss.ibot is not None:
                probs = loss.ibot.centering.probabilities(targets.patch_scores, values.ibot_teacher_temp)
                parts["ibot"] = loss.ibot(outputs.patch_scores, probs, batch["patch_mask"])
    norms = {}
    for name, value in parts.items():
        grads = torch.autograd.grad(loss.weights[name] * value, backbone, retain_graph=True, allow_unused=True)
        norms[f"gradnorm_{name}"] = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))
    student.zero_grad(set_to_none=True)
    return norms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny_cpu")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    overrides = [f"loop.steps={args.steps}", "eval.quick=false", f"loop.out_dir={args.out.with_suffix('')}",
                 "loop.checkpoint_every=100000", *args.overrides]
    cfg = load_config(resolve_config(args.config), overrides)
    trainer = Trainer(cfg, get_tokenizer)
    images = held_out_images(args.images, cfg.data.global_size)
    series, losses = [], []
    start = time.perf_counter()
    for batch in trainer.batches():
        if trainer.step >= args.steps:
            break
        if trainer.step % args.every == 0:
            row = {"step": trainer.step} | feature_statistics(trainer, images) | term_gradient_norms(trainer, batch)
            if losses:
                recent = losses[-args.every :]
                row |= {f"loss_{k}": sum(r[k] for r in recent) / len(recent) for k in recent[0] if k != "step"}
            series.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        metrics = trainer.train_step(batch)
        losses.append({k: v for k, v in metrics.items() if k in ("total", "clip_global", "clip_spatial", "dino", "ibot")})
    row = {"step": trainer.step} | feature_statistics(trainer, images)
    recent = losses[-args.every :]
    row |= {f"loss_{k}": sum(r[k] for r in recent) / len(recent) for k in recent[0]}
    series.append(row)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_model(trainer.model, args.out.with_suffix(".safetensors"))
    args.out.write_text(json.dumps({"config": args.config, "overrides": args.overrides, "seconds": time.perf_counter() - start,
                                    "log_k": math.log(cfg.heads.num_prototypes), "series": series}, indent=1))


if __name__ == "__main__":
    main()
