"""Weighted k-nearest-neighbour classification on frozen global features (DINO / DINOv2 protocol).

Features are L2-normalised; each of the k most similar training samples votes for its class with
weight exp(cosine / temperature). Defaults k = 20 (paper A.4.2, "soft KNN with 20 neighbours",
after Oquab et al.) and temperature 0.07 (DINO's k-NN evaluation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tipstorch.eval.metrics import topk_accuracy


@dataclass
class KNNConfig:
    k: int = 20
    temperature: float = 0.07
    chunk_size: int = 256


def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    config: KNNConfig | None = None,
) -> torch.Tensor:
    """Class vote scores [M, C] for test_features [M, D] from train_features [N, D], train_labels [N]."""
    config = config or KNNConfig()
    if train_labels.min() < 0 or train_labels.max() >= num_classes:
        raise ValueError(
            f"train labels must be in [0, {num_classes}), got [{int(train_labels.min())}, {int(train_labels.max())}]"
        )
    train = F.normalize(train_features.float(), dim=-1)
    test = F.normalize(test_features.float(), dim=-1)
    k = min(config.k, len(train))
    chunks = []
    for start in range(0, len(test), config.chunk_size):
        similarity, neighbours = (test[start : start + config.chunk_size] @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(similarity), num_classes)
        chunks.append(
            votes.scatter_add_(1, train_labels[neighbours], (similarity / config.temperature).exp())
        )
    return torch.cat(chunks)


def knn_classification(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    config: KNNConfig | None = None,
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Top-k accuracy of weighted k-NN classification."""
    return topk_accuracy(
        knn_scores(train_features, train_labels, test_features, num_classes, config), test_labels, ks
    )
