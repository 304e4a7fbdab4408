"""Evaluation metrics: segmentation (confusion matrix), depth, surface normals, top-k, retrieval.

Dense metrics are streaming accumulators (``update`` per batch, ``compute`` at the end) so a
whole evaluation set never has to sit in memory. All results are python floats; accuracies,
IoUs and ratios are fractions in [0, 1] (multiply by 100 for the paper's percentages).

Conventions (checked against the sources named in each docstring):
- segmentation: confusion matrix with rows = ground truth, columns = prediction; a class absent
  from both prediction and ground truth over the whole set (union 0) is left out of the mean,
  as mmseg does (its IoU is 0/0 = NaN and it takes ``nanmean``) and as the official TIPS
  zero-shot notebook does (``iou[union > 0].mean()``). A class present in the ground truth but
  never predicted counts with IoU 0; a class predicted but absent from the ground truth too.
- depth: pixels are valid when ``min_depth < target < max_depth`` (and inside an optional mask);
  predictions are clamped to ``[min_depth, max_depth]`` (BTS / Monocular-Depth-Estimation-Toolbox
  protocol used by DINOv2 and TIPS). Metrics are averaged per image by default (the toolbox's
  protocol); ``per_image=False`` pools all pixels instead.
- normals: angular error in degrees between unit vectors, pooled over all valid pixels of the
  set (El Banani et al. / Bae et al. protocol); the median comes from a histogram with
  ``bins_per_degree`` resolution (default 0.01 deg) so the accumulator has fixed memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from tipstorch.models.dense import unit_vectors

ArrayLike = torch.Tensor | np.ndarray


def _as_tensor(x: ArrayLike) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x)) if isinstance(x, np.ndarray) else x


def _check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} shape {tuple(a.shape)} does not match {name_b} shape {tuple(b.shape)}")


# --------------------------------------------------------------------------------------------
# Semantic segmentation
# --------------------------------------------------------------------------------------------


def confusion_matrix(
    pred: ArrayLike, target: ArrayLike, num_classes: int, ignore_index: int | None = 255
) -> torch.Tensor:
    """Confusion matrix of integer label maps.

    Args:
        pred: predicted labels, any shape (e.g. [B, H, W]), values in [0, num_classes).
        target: ground-truth labels, same shape; ``ignore_index`` pixels are skipped.
    Returns:
        int64 [num_classes, num_classes], entry [g, p] = number of pixels with truth g and
        prediction p.
    """
    pred_t, target_t = _as_tensor(pred).long(), _as_tensor(target).long()
    _check_same_shape("prediction", pred_t, "target", target_t)
    keep = torch.ones_like(target_t, dtype=torch.bool) if ignore_index is None else target_t != ignore_index
    pred_t, target_t = pred_t[keep], target_t[keep]
    for name, labels in (("target", target_t), ("prediction", pred_t)):
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"{name} labels must be in [0, {num_classes}) (ignore index {ignore_index}); "
                f"got values in [{int(labels.min())}, {int(labels.max())}]"
            )
    flat = target_t * num_classes + pred_t
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_scores(confusion: torch.Tensor) -> dict[str, float | list[float | None]]:
    """mIoU, per-class IoU, pixel accuracy and mean class accuracy from a confusion matrix [C, C].

    ``per_class_iou[c]`` is None for a class absent from both prediction and ground truth; such
    classes are excluded from ``miou``. ``mean_accuracy`` averages recall over classes present in
    the ground truth.
    """
    confusion = confusion.double()
    intersection = confusion.diag()
    gt_count, pred_count = confusion.sum(dim=1), confusion.sum(dim=0)
    union = gt_count + pred_count - intersection
    present = union > 0
    iou = torch.where(present, intersection / union.clamp(min=1), torch.zeros_like(union))
    in_gt = gt_count > 0
    recall = torch.where(in_gt, intersection / gt_count.clamp(min=1), torch.zeros_like(gt_count))
    total = confusion.sum()
    return {
        "miou": float(iou[present].mean()) if present.any() else float("nan"),
        "per_class_iou": [float(v) if p else None for v, p in zip(iou.tolist(), present.tolist(), strict=True)],
        "pixel_accuracy": float(intersection.sum() / total) if total > 0 else float("nan"),
        "mean_accuracy": float(recall[in_gt].mean()) if in_gt.any() else float("nan"),
    }


class SegmentationMetric:
    """Streaming confusion matrix for semantic segmentation (mIoU, per-class IoU, accuracies)."""

    def __init__(self, num_classes: int, ignore_index: int | None = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, pred: ArrayLike, target: ArrayLike) -> None:
        """Add label maps pred / target (same shape, e.g. [B, H, W] or [H, W])."""
        self.confusion += confusion_matrix(pred, target, self.num_classes, self.ignore_index).cpu()

    def compute(self) -> dict[str, float | list[float | None]]:
        return segmentation_scores(self.confusion)


# --------------------------------------------------------------------------------------------
# Monocular depth
# --------------------------------------------------------------------------------------------


@dataclass
class DepthMetricConfig:
    """Depth evaluation range in metres. Defaults: NYUv2 range 1e-3..10 m (BTS, DINOv2, TIPS DPT)."""

    min_depth: float = 1e-3
    max_depth: float = 10.0
    per_image: bool = True


_DEPTH_KEYS = ("rmse", "abs_rel", "log10", "delta1", "delta2", "delta3")


def _depth_pixel_sums(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel sums [6] over 1-D valid pixels: squared error, abs rel, |log10|, 3 delta hits."""
    ratio = torch.maximum(pred / target, target / pred)
    return torch.stack([
        ((pred - target) ** 2).sum(),
        ((pred - target).abs() / target).sum(),
        (torch.log10(pred) - torch.log10(target)).abs().sum(),
        (ratio < 1.25).sum(),
        (ratio < 1.25**2).sum(),
        (ratio < 1.25**3).sum(),
    ]).double()


def _depth_from_sums(sums: torch.Tensor, count: float) -> torch.Tensor:
    """Turn per-pixel sums [6] into metric values [6] (RMSE takes the square root)."""
    means = sums / count
    means[0] = means[0].sqrt()
    return means


def nyu_eigen_crop_mask(height: int = 480, width: int = 640) -> torch.Tensor:
    """bool [H, W] mask of the Eigen et al. evaluation crop of 480x640 NYUv2 frames (rows 45:471, cols 41:601)."""
    if (height, width) != (480, 640):
        raise ValueError(f"the Eigen crop is defined for 480x640 NYUv2 frames, got {height}x{width}")
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[45:471, 41:601] = True
    return mask


class DepthMetric:
    """Streaming depth metrics: RMSE (m), AbsRel, log10, delta1/2/3 (thresholds 1.25, 1.25^2, 1.25^3)."""

    def __init__(self, config: DepthMetricConfig | None = None) -> None:
        self.config = config or DepthMetricConfig()
        self.sums = torch.zeros(len(_DEPTH_KEYS), dtype=torch.float64)
        self.num_images = 0
        self.num_pixels = 0
        self.num_empty_images = 0

    def update(self, pred: ArrayLike, target: ArrayLike, valid_mask: ArrayLike | None = None) -> None:
        """Add predictions and ground truth in metres, [B, H, W] or [H, W]; valid_mask bool, same shape."""
        pred_t, target_t = _as_tensor(pred).double(), _as_tensor(target).double()
        _check_same_shape("depth prediction", pred_t, "depth target", target_t)
        if pred_t.dim() == 2:
            pred_t, target_t = pred_t[None], target_t[None]
            valid_mask = None if valid_mask is None else _as_tensor(valid_mask)[None]
        cfg = self.config
        valid = (target_t > cfg.min_depth) & (target_t < cfg.max_depth)
        if valid_mask is not None:
            mask_t = _as_tensor(valid_mask).bool()
            _check_same_shape("valid mask", mask_t, "depth target", target_t)
            valid &= mask_t
        pred_t = pred_t.clamp(cfg.min_depth, cfg.max_depth)
        for image_pred, image_target, image_valid in zip(pred_t, target_t, valid, strict=True):
            count = int(image_valid.sum())
            if count == 0:
                self.num_empty_images += 1
                continue
            sums = _depth_pixel_sums(image_pred[image_valid], image_target[image_valid])
            self.sums += _depth_from_sums(sums, count) if cfg.per_image else sums
            self.num_images += 1
            self.num_pixels += count

    def compute(self) -> dict[str, float]:
        if self.num_images == 0:
            raise ValueError("no valid depth pixels were accumulated (check the depth range and masks)")
        if self.config.per_image:
            values = self.sums / self.num_images
        else:
            values = _depth_from_sums(self.sums, self.num_pixels)
        result = dict(zip(_DEPTH_KEYS, (float(v) for v in values), strict=True))
        result.update(num_images=self.num_images, num_pixels=self.num_pixels, num_empty_images=self.num_empty_images)
        return result


# --------------------------------------------------------------------------------------------
# Surface normals
# --------------------------------------------------------------------------------------------

NORMALS_THRESHOLDS_DEG = (11.25, 22.5, 30.0)


def angular_error_deg(pred: torch.Tensor, target: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Angle in degrees between normal fields (normalised here), reduced over ``dim``."""
    cos = (unit_vectors(pred, dim) * unit_vectors(target, dim)).sum(dim=dim)
    return torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))


class NormalsMetric:
    """Streaming angular-error metrics for surface normals: mean, median, RMSE (deg), % within thresholds."""

    def __init__(self, bins_per_degree: int = 100) -> None:
        self.bins_per_degree = bins_per_degree
        self.histogram = torch.zeros(180 * bins_per_degree, dtype=torch.float64)
        self.sum_error = 0.0
        self.sum_squared_error = 0.0
        self.count = 0
        self.within = torch.zeros(len(NORMALS_THRESHOLDS_DEG), dtype=torch.float64)

    def update(self, pred: ArrayLike, target: ArrayLike, valid_mask: ArrayLike | None = None) -> None:
        """pred / target [B, 3, H, W] (any scale; zero-length targets are invalid); valid_mask bool [B, H, W]."""
        pred_t, target_t = _as_tensor(pred).double(), _as_tensor(target).double()
        _check_same_shape("normals prediction", pred_t, "normals target", target_t)
        if pred_t.dim() != 4 or pred_t.shape[1] != 3:
            raise ValueError(f"normals must be [B, 3, H, W], got {tuple(pred_t.shape)}")
        valid = ((target_t * target_t).sum(dim=1) > 1e-12) & torch.isfinite(target_t).all(dim=1)
        if valid_mask is not None:
            mask_t = _as_tensor(valid_mask).bool()
            _check_same_shape("valid mask", mask_t, "normals target (without channel)", valid)
            valid &= mask_t
        errors = angular_error_deg(pred_t, target_t, dim=1)[valid]
        self.sum_error += float(errors.sum())
        self.sum_squared_error += float((errors**2).sum())
        self.count += errors.numel()
        self.within += torch.stack([(errors < t).sum() for t in NORMALS_THRESHOLDS_DEG]).double()
        bins = (errors * self.bins_per_degree).long().clamp(max=self.histogram.numel() - 1)
        self.histogram += torch.bincount(bins, minlength=self.histogram.numel()).double()

    def _median(self) -> float:
        cumulative = self.histogram.cumsum(0)
        half = self.count / 2.0
        index = int(torch.searchsorted(cumulative, torch.tensor(half, dtype=torch.float64)))
        before = float(cumulative[index - 1]) if index > 0 else 0.0
        fraction = (half - before) / float(self.histogram[index])
        return (index + fraction) / self.bins_per_degree

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("no valid normal pixels were accumulated")
        result = {
            "mean": self.sum_error / self.count,
            "median": self._median(),
            "rmse": math.sqrt(self.sum_squared_error / self.count),
        }
        for threshold, hits in zip(NORMALS_THRESHOLDS_DEG, self.within.tolist(), strict=True):
            result[f"within_{threshold:g}"] = hits / self.count
        result["num_pixels"] = self.count
        return result


# --------------------------------------------------------------------------------------------
# Classification and retrieval
# --------------------------------------------------------------------------------------------


class TiedRanks(NamedTuple):
    """Where the right answer ranks for each of Q queries: ``above`` long [Q] candidates score strictly
    higher, ``tied`` long [Q] other candidates score exactly the same. Under a uniformly random order of
    the tied group the rank is uniform on ``above .. above + tied``, so a model whose scores are all
    equal scores recall@1 = 1/N, not 1 (and not 0)."""

    above: torch.Tensor
    tied: torch.Tensor

    @staticmethod
    def cat(parts: Sequence[TiedRanks]) -> TiedRanks:
        return TiedRanks(torch.cat([part.above for part in parts]), torch.cat([part.tied for part in parts]))


def _ranks_against(scores: torch.Tensor, right: torch.Tensor, dim: int) -> TiedRanks:
    """Ranks of ``right`` (the right answer's score, broadcastable to ``scores``) along ``dim``; the right
    answer itself is one of the equal scores and is not counted as a tie."""
    return TiedRanks((scores > right).sum(dim=dim), (scores == right).sum(dim=dim) - 1)


def recall_at_k(ranks: TiedRanks, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Expected fraction of queries whose right answer is among the top k, for each k, ties broken at
    random: a query counts ``clamp(k - above, 0, tied + 1) / (tied + 1)``."""
    above, group = ranks.above.float(), ranks.tied.float() + 1
    return {k: float(((k - above).clamp(0, None).minimum(group) / group).mean()) for k in ks}


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy of class scores [N, C] against labels [N]; keys ``top{k}``. Classes scoring the same
    as the right one share the places they occupy (see ``recall_at_k``).

    A k larger than the number of classes is left out (it would always be 1).
    """
    if scores.dim() != 2 or labels.shape != scores.shape[:1]:
        raise ValueError(f"expected scores [N, C] and labels [N], got {tuple(scores.shape)} and {tuple(labels.shape)}")
    num_classes = scores.shape[1]
    valid_ks = [k for k in ks if k <= num_classes]
    if not valid_ks:
        return {}
    right = scores.gather(1, labels[:, None].to(scores.device))
    recalls = recall_at_k(_ranks_against(scores, right, dim=1), valid_ks)
    return {f"top{k}": recalls[k] for k in valid_ks}


def text_to_image_ranks(similarity: torch.Tensor, text_to_image: torch.Tensor) -> TiedRanks:
    """Rank of each text's own image among all images.

    Args:
        similarity: [I, T'] image-text scores for all I images and T' texts (a chunk is fine).
        text_to_image: long [T'], index of each text's image in [0, I).
    Returns:
        ``TiedRanks`` over the T' texts: images scoring higher than / the same as the right one.
    """
    own = similarity.gather(0, text_to_image[None, :])
    return _ranks_against(similarity, own, dim=0)


def image_to_text_ranks(
    similarity: torch.Tensor, text_to_image: torch.Tensor, image_ids: torch.Tensor | None = None
) -> TiedRanks:
    """Rank of each image's best-scoring own caption among all texts (COCO/Flickr protocol).

    Args:
        similarity: [I', T] scores for I' images (rows, possibly a chunk) against all T texts.
        text_to_image: long [T], image index of every text.
        image_ids: long [I'], global image index of each row (default 0..I'-1).
    Returns:
        ``TiedRanks`` over the I' images: an image is a hit at k when any of its captions is in the top
        k. Ties count other images' captions scoring the same as the best own one (own captions tied
        with it are one place: a slight underestimate of the expected recall).
    """
    if image_ids is None:
        image_ids = torch.arange(similarity.shape[0], device=similarity.device)
    own = text_to_image[None, :] == image_ids[:, None]
    if not bool(own.any(dim=1).all()):
        missing = image_ids[~own.any(dim=1)].tolist()
        raise ValueError(f"images without any caption: {missing[:10]}")
    best_own = similarity.masked_fill(~own, float("-inf")).max(dim=1, keepdim=True).values
    others = similarity.masked_fill(own, float("-inf"))
    return TiedRanks((others > best_own).sum(dim=1), (others == best_own).sum(dim=1))
