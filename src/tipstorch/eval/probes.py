"""Probes trained on frozen, precomputed features.

Protocols (paper A.4.1-A.4.2) and the source of every default:

| probe                    | features                          | paper                               | not in the paper (source)                         |
|--------------------------|-----------------------------------|-------------------------------------|---------------------------------------------------|
| linear classifier        | global CLS [N, D]                 | 10 epochs, batch 1024, grid search, | SGD momentum 0.9, wd 0, cosine lr, lr x batch/256, |
|                          |                                   | best of the grid is reported        | lr grid (DINOv2 linear eval)                       |
| linear segmentation      | patch tokens (+ spatial CLS)      | 40k iterations, batch 16, 512 px    | AdamW lr 1e-3, wd 1e-4, 1500 warm-up, poly decay,  |
|                          |                                   |                                     | BatchNorm before the linear layer (DINOv2 mmseg)   |
| linear depth (256 bins)  | patch tokens + spatial CLS, x4    | 50k iterations, batch 8, 480x640    | AdamW lr 1e-4, wd 0.01, SILog loss (depth toolbox) |
| DPT depth / normals      | 4 evenly spaced layers            | 50k iterations, batch 8             | AdamW lr 1e-4, wd 0.01; angular loss for normals   |

Deviations from the paper, on purpose and documented: features are computed once and cached, so
no training-time augmentation (the paper's mmseg-style pipelines crop, flip and jitter); the
linear classifier grid searches the learning rate only (DINOv2 also searches over the number of
blocks and avg-pooling, which do not apply to a single CLS embedding); the DINOv2 depth head's
gradient loss term is omitted. Scale every schedule down for CPU with ``ProbeOptimConfig.scaled``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from tipstorch.eval.metrics import (
    DepthMetric,
    DepthMetricConfig,
    NormalsMetric,
    SegmentationMetric,
    topk_accuracy,
)
from tipstorch.models.dense import (
    DepthBinsConfig,
    DPTConfig,
    DPTDepthDecoder,
    DPTNormalsDecoder,
    LinearDepthHead,
    LinearSegmentationHead,
    unit_vectors,
)

# --------------------------------------------------------------------------------------------
# Linear classifier on global features
# --------------------------------------------------------------------------------------------

DINOV2_LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)


@dataclass
class LinearClassifierConfig:
    epochs: int = 10  # paper A.4.2
    batch_size: int = 1024  # paper A.4.2
    learning_rates: tuple[float, ...] = DINOV2_LEARNING_RATES
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0


@dataclass
class LinearClassifierResult:
    best_learning_rate: float
    metrics: dict[str, float]  # top-k of the best classifier on the evaluation features
    top1_per_learning_rate: dict[float, float]


def _cosine_factor(step: int, total: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * step / total))


def train_linear_classifier(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    eval_features: torch.Tensor,
    eval_labels: torch.Tensor,
    num_classes: int,
    config: LinearClassifierConfig | None = None,
    progress: bool = False,
) -> LinearClassifierResult:
    """Train one linear classifier per learning rate on the same batches; report the best.

    Features [N, D] / [M, D] (global CLS, not normalised), labels long [N] / [M]. As in the
    paper, the best grid point is chosen on the evaluation set itself.
    """
    config = config or LinearClassifierConfig()
    generator = torch.Generator().manual_seed(config.seed)
    dim = train_features.shape[1]
    heads = nn.ModuleList([nn.Linear(dim, num_classes) for _ in config.learning_rates])
    for head in heads:
        nn.init.normal_(head.weight, std=0.01, generator=generator)
        nn.init.zeros_(head.bias)
    base_lrs = [lr * config.batch_size / 256.0 for lr in config.learning_rates]
    optimizer = torch.optim.SGD(
        [{"params": head.parameters(), "lr": lr} for head, lr in zip(heads, base_lrs, strict=True)],
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    steps_per_epoch = math.ceil(len(train_features) / config.batch_size)
    total = config.epochs * steps_per_epoch
    step = 0
    for _ in tqdm(range(config.epochs), desc="linear classifier", disable=not progress):
        order = torch.randperm(len(train_features), generator=generator)
        for start in range(0, len(order), config.batch_size):
            index = order[start : start + config.batch_size]
            features, labels = train_features[index].float(), train_labels[index]
            loss = sum(F.cross_entropy(head(features), labels) for head in heads)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = lr * _cosine_factor(step, total)
    with torch.no_grad():
        scores = [head(eval_features.float()) for head in heads]
    top1 = {lr: topk_accuracy(s, eval_labels, (1,))["top1"] for lr, s in zip(config.learning_rates, scores, strict=True)}
    best = max(top1, key=top1.get)
    best_scores = scores[config.learning_rates.index(best)]
    return LinearClassifierResult(best, topk_accuracy(best_scores, eval_labels, (1, 5)), top1)


# --------------------------------------------------------------------------------------------
# Cached dense features
# --------------------------------------------------------------------------------------------


@dataclass
class PatchFeatures:
    """Inputs of the linear dense probes: patch_tokens [N, h, w, D], spatial_cls [N, D] or None."""

    patch_tokens: torch.Tensor
    spatial_cls: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.patch_tokens)

    @property
    def embed_dim(self) -> int:
        return self.patch_tokens.shape[-1]

    def select(self, index: torch.Tensor) -> PatchFeatures:
        return PatchFeatures(self.patch_tokens[index], None if self.spatial_cls is None else self.spatial_cls[index])

    def apply(self, head: nn.Module, image_size: tuple[int, int]) -> torch.Tensor:
        return head(self.patch_tokens, self.spatial_cls, image_size)


@dataclass
class IntermediateFeatures:
    """Inputs of the DPT probes: patch_maps [N, L, D, h, w] and prefixes [N, L, 2, D] for L layers."""

    patch_maps: torch.Tensor
    prefixes: torch.Tensor

    @classmethod
    def stack(cls, intermediates: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> IntermediateFeatures:
        """From ``forward_intermediates(..., return_prefix_tokens=True)``: L x (patch_map [N, D, h, w], prefix [N, 2, D])."""
        return cls(torch.stack([m for m, _ in intermediates], 1), torch.stack([p for _, p in intermediates], 1))

    def __len__(self) -> int:
        return len(self.patch_maps)

    @property
    def embed_dim(self) -> int:
        return self.patch_maps.shape[2]

    def select(self, index: torch.Tensor) -> IntermediateFeatures:
        return IntermediateFeatures(self.patch_maps[index], self.prefixes[index])

    def apply(self, head: nn.Module, image_size: tuple[int, int]) -> torch.Tensor:
        layers = [(self.patch_maps[:, i], self.prefixes[:, i]) for i in range(self.patch_maps.shape[1])]
        return head(layers, image_size)


class DenseFeatures(Protocol):
    def __len__(self) -> int: ...
    def select(self, index: torch.Tensor) -> DenseFeatures: ...
    def apply(self, head: nn.Module, image_size: tuple[int, int]) -> torch.Tensor: ...


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Cross-entropy of logits [B, C, H, W] against labels long [B, H, W]."""
    return F.cross_entropy(logits, labels.long(), ignore_index=ignore_index)


def silog_loss(
    depth: torch.Tensor, target: torch.Tensor, bins: DepthBinsConfig, variance_focus: float = 0.85
) -> torch.Tensor:
    """Scale-invariant log loss sqrt(mean(g^2) - 0.85 mean(g)^2), g = log pred - log gt, on valid pixels.

    depth [B, 1, H, W] (metres), target [B, H, W]; pixels outside (min_depth, max_depth) are ignored.
    """
    depth = depth[:, 0]
    valid = (target > bins.min_depth) & (target < bins.max_depth)
    if not valid.any():
        return depth.sum() * 0.0
    g = torch.log(depth[valid].clamp(min=bins.min_depth)) - torch.log(target[valid])
    return torch.sqrt((g**2).mean() - variance_focus * g.mean() ** 2 + 1e-8)


def angular_loss(normals: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean angle (radians) between unit normals [B, 3, H, W] and targets (zero vectors ignored)."""
    valid = (target * target).sum(dim=1) > 1e-12
    if not valid.any():
        return normals.sum() * 0.0
    cos = (unit_vectors(normals) * unit_vectors(target)).sum(dim=1)[valid]
    return torch.acos(cos.clamp(-1 + 1e-6, 1 - 1e-6)).mean()


# --------------------------------------------------------------------------------------------
# Training loop and evaluation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeOptimConfig:
    """AdamW with linear warm-up, then linear ("poly", power 1) decay to zero (immutable: use ``scaled``/``replace``)."""

    iterations: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    warmup_iterations: int = 0
    seed: int = 0

    def scaled(self, iterations: int, batch_size: int | None = None) -> ProbeOptimConfig:
        """Same recipe over fewer iterations (warm-up shrinks proportionally), e.g. for CPU."""
        warmup = round(self.warmup_iterations * iterations / self.iterations)
        return replace(self, iterations=iterations, batch_size=batch_size or self.batch_size, warmup_iterations=warmup)

    def lr_factor(self, step: int) -> float:
        if step < self.warmup_iterations:
            return (step + 1) / self.warmup_iterations
        return max(0.0, 1.0 - (step - self.warmup_iterations) / max(1, self.iterations - self.warmup_iterations))


# iterations and batch sizes: paper A.4.1; optimiser settings: see the module docstring
LINEAR_SEGMENTATION_RECIPE = ProbeOptimConfig(40_000, 16, 1e-3, 1e-4, warmup_iterations=1500)
LINEAR_DEPTH_RECIPE = ProbeOptimConfig(50_000, 8, 1e-4, 1e-2)
DPT_RECIPE = ProbeOptimConfig(50_000, 8, 1e-4, 1e-2)


def fit_dense_probe(
    head: nn.Module,
    features: DenseFeatures,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    config: ProbeOptimConfig,
    progress: bool = False,
) -> list[float]:
    """Train ``head`` on cached features against targets [N, ...] (last two dims = H, W); returns losses."""
    if len(features) != len(targets):
        raise ValueError(f"{len(features)} feature rows but {len(targets)} targets")
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    image_size = tuple(targets.shape[-2:])
    order, cursor, losses = torch.randperm(len(targets), generator=generator), 0, []
    head.train()
    for step in tqdm(range(config.iterations), desc="probe", disable=not progress):
        if cursor + config.batch_size > len(order):
            order, cursor = torch.randperm(len(targets), generator=generator), 0
        index = order[cursor : cursor + config.batch_size]
        cursor += config.batch_size
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * config.lr_factor(step)
        loss = loss_fn(features.select(index).apply(head, image_size), targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    head.eval()
    return losses


class StreamingMetric(Protocol):
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None: ...
    def compute(self) -> dict: ...


@torch.no_grad()
def evaluate_dense_probe(
    head: nn.Module,
    features: DenseFeatures,
    targets: torch.Tensor,
    metric: StreamingMetric,
    to_prediction: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 8,
) -> dict:
    """Run ``head`` over cached features in batches and feed ``to_prediction(output)`` to ``metric``."""
    head.eval()
    image_size = tuple(targets.shape[-2:])
    for start in range(0, len(targets), batch_size):
        index = torch.arange(start, min(start + batch_size, len(targets)))
        metric.update(to_prediction(features.select(index).apply(head, image_size)), targets[index])
    return metric.compute()


def run_dense_probe(
    head: nn.Module,
    train: tuple[DenseFeatures, torch.Tensor],
    test: tuple[DenseFeatures, torch.Tensor],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    metric: StreamingMetric,
    to_prediction: Callable[[torch.Tensor], torch.Tensor],
    config: ProbeOptimConfig,
    progress: bool = False,
) -> dict:
    """Fit on (train features, targets), evaluate on (test features, targets); metrics + final loss."""
    losses = fit_dense_probe(head, train[0], train[1], loss_fn, config, progress)
    result = evaluate_dense_probe(head, test[0], test[1], metric, to_prediction, config.batch_size)
    return {**result, "final_train_loss": losses[-1]}


# --------------------------------------------------------------------------------------------
# The paper's dense probes
# --------------------------------------------------------------------------------------------


def linear_segmentation_probe(
    train: tuple[PatchFeatures, torch.Tensor],
    test: tuple[PatchFeatures, torch.Tensor],
    num_classes: int,
    config: ProbeOptimConfig = LINEAR_SEGMENTATION_RECIPE,
    ignore_index: int = 255,
    progress: bool = False,
    batch_norm: bool = True,
) -> dict:
    """Linear segmentation probe; masks long [N, H, W]; uses the CLS token when features carry one;
    ``batch_norm`` False drops the BatchNorm of the DINOv2 head (for studying the probe)."""
    head = LinearSegmentationHead(
        train[0].embed_dim, num_classes, use_cls=train[0].spatial_cls is not None, batch_norm=batch_norm
    )
    return run_dense_probe(
        head,
        train,
        test,
        lambda logits, labels: segmentation_loss(logits, labels, ignore_index),
        SegmentationMetric(num_classes, ignore_index),
        lambda logits: logits.argmax(dim=1),
        config,
        progress,
    )


def _depth_probe(head: nn.Module, train, test, bins: DepthBinsConfig, config: ProbeOptimConfig, progress: bool) -> dict:
    metric = DepthMetric(DepthMetricConfig(min_depth=bins.min_depth, max_depth=bins.max_depth))
    loss = lambda depth, target: silog_loss(depth, target, bins)  # noqa: E731
    return run_dense_probe(head, train, test, loss, metric, lambda depth: depth[:, 0], config, progress)


def linear_depth_probe(
    train: tuple[PatchFeatures, torch.Tensor],
    test: tuple[PatchFeatures, torch.Tensor],
    bins: DepthBinsConfig | None = None,
    config: ProbeOptimConfig = LINEAR_DEPTH_RECIPE,
    progress: bool = False,
) -> dict:
    """Linear 256-bin depth probe; depths float [N, H, W] in metres (0 = missing)."""
    bins = bins or DepthBinsConfig()
    head = LinearDepthHead(train[0].embed_dim, bins, use_cls=train[0].spatial_cls is not None)
    return _depth_probe(head, train, test, bins, config, progress)


def dpt_depth_probe(
    train: tuple[IntermediateFeatures, torch.Tensor],
    test: tuple[IntermediateFeatures, torch.Tensor],
    dpt: DPTConfig | None = None,
    bins: DepthBinsConfig | None = None,
    config: ProbeOptimConfig = DPT_RECIPE,
    progress: bool = False,
    head: DPTDepthDecoder | None = None,
) -> dict:
    """DPT depth probe on 4 layers; depths float [N, H, W] in metres.

    Default readout = spatial CLS (the paper's dense-task choice), unlike the released heads.
    ``head``: the decoder to train in place (to keep it, e.g. to save it); default a new one from
    ``dpt`` and ``bins``.
    """
    bins = bins or DepthBinsConfig()
    head = head or DPTDepthDecoder(dpt or DPTConfig(train[0].embed_dim, readout_index=1), bins)
    return _depth_probe(head, train, test, bins, config, progress)


def dpt_normals_probe(
    train: tuple[IntermediateFeatures, torch.Tensor],
    test: tuple[IntermediateFeatures, torch.Tensor],
    dpt: DPTConfig | None = None,
    config: ProbeOptimConfig = DPT_RECIPE,
    progress: bool = False,
    head: DPTNormalsDecoder | None = None,
    restarts: int = 1,
) -> dict:
    """DPT surface-normals probe; normals float [N, 3, H, W] (zero vectors = no ground truth).

    ``head``: the decoder to train in place; default a new one from ``dpt``.
    ``restarts``: train this many decoders (``head`` first, then fresh ones; batch-order seeds
    ``config.seed + r``) and score the one with the lowest training loss (mean over the last tenth of
    its iterations). A short schedule can leave part of a decoder's predictions mirrored in x/y (a
    concave reading of convex objects) at twice the training loss; selecting on training loss, never
    on the test set, keeps such a run out of the figure.
    """
    if restarts < 1:
        raise ValueError(f"dpt_normals_probe needs restarts >= 1, got {restarts}")
    dpt = dpt or DPTConfig(train[0].embed_dim, readout_index=1)
    head = head or DPTNormalsDecoder(dpt)
    tail = max(1, config.iterations // 10)
    tail_losses, last_losses, states = [], [], []
    for restart in range(restarts):
        candidate = head if restart == 0 else DPTNormalsDecoder(dpt)
        losses = fit_dense_probe(candidate, train[0], train[1], angular_loss,
                                 replace(config, seed=config.seed + restart), progress)
        tail_losses.append(sum(losses[-tail:]) / tail)
        last_losses.append(losses[-1])
        states.append(candidate.state_dict())
    chosen = min(range(restarts), key=tail_losses.__getitem__)
    head.load_state_dict(states[chosen])
    result = evaluate_dense_probe(head, test[0], test[1], NormalsMetric(), lambda normals: normals, config.batch_size)
    return {**result, "final_train_loss": last_losses[chosen], "restart_train_losses": tail_losses,
            "chosen_restart": chosen}
