"""What every evaluation task reads: the frozen model, the run's settings and a cache of features.

The task runners (``tipstorch.eval.tasks``) take an ``EvalContext``; the quick evaluation
(``tipstorch.eval.quick``) is one preset of ``EvalSettings`` and tasks on the built-in scenes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from tipstorch.data.scene_splits import SceneSplits
from tipstorch.data.transforms import image_transform
from tipstorch.eval.features import ExtractedFeatures, extract_features, intermediates_encoder
from tipstorch.eval.probes import ProbeOptimConfig
from tipstorch.eval.zeroshot import values_readout
from tipstorch.models.dense import dpt_layer_indices

SCENES = "scenes"  # the --data key of the built-in scenes (no path)


@dataclass(frozen=True)
class EvalSettings:
    """Run-wide settings (None = the protocol's own value).

    image_size: square input side (multiple of 14); None = per protocol (the model's size; kNN /
        linear 224).
    max_samples: seeded random subset of at most N samples per split (smoke runs only).
    probe_iterations, probe_batch_size: dense probe schedule (paper: 40k-50k iterations, batch 16 / 8).
    seed: seed of the subsets and the probes: the global RNG is seeded with it at the start of every
        task (probe heads draw their initial weights from it), so a task's result does not depend on
        the tasks run before it.
    seg_probe_lr, depth_probe_lr, dpt_lr: learning rates replacing the paper's (short schedules).
    linear_epochs, linear_batch_size: the linear classifier (paper: 10 epochs, batch 1024).
    dpt_channels: DPT fusion channels (official: 256).
    normals_restarts: DPT normals decoders trained per evaluation; the one with the lowest training loss
        is scored (``probes.dpt_normals_probe``; the paper trains one over 50k iterations).
    scenes_train, scenes_test: number of built-in scenes that train / score (``--data scenes``).
    scenes_seed: seed of the built-in scenes rendered for evaluation (training draws seed 0 by default).
    """

    image_size: int | None = None
    batch_size: int = 32
    max_samples: int | None = None
    probe_iterations: int | None = None
    probe_batch_size: int | None = None
    class_names: Path | None = None
    seed: int = 0
    progress: bool = True
    seg_probe_lr: float | None = None
    depth_probe_lr: float | None = None
    dpt_lr: float | None = None
    linear_epochs: int | None = None
    linear_batch_size: int | None = None
    dpt_channels: int | None = None
    normals_restarts: int = 1
    scenes_train: int = 512
    scenes_test: int = 256
    scenes_seed: int = 1234

    def __post_init__(self) -> None:
        if self.image_size is not None and (self.image_size <= 0 or self.image_size % 14):
            raise ValueError(f"EvalSettings.image_size must be a positive multiple of 14, got {self.image_size}")
        if self.scenes_train < 2 or self.scenes_test < 2:
            raise ValueError(f"EvalSettings needs scenes_train, scenes_test >= 2, got {self.scenes_train}, {self.scenes_test}")
        for name in ("batch_size", "max_samples", "probe_iterations", "probe_batch_size", "linear_epochs",
                     "linear_batch_size", "dpt_channels", "normals_restarts"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"EvalSettings.{name} must be >= 1, got {value}")


@dataclass
class TaskResult:
    """Headline metrics ``{"<task>/<metric>": value}``, raw outputs, the protocol actually used, seconds,
    and the trained probe heads worth keeping (DPT decoders, by task name) for ``--save-probes``."""

    metrics: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)
    protocol: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    heads: dict[str, nn.Module] = field(default_factory=dict)


class FrozenModel:
    """A TIPS model seen by the evaluation: inputs moved to its device, optional bf16 autocast."""

    def __init__(self, model: nn.Module, tokenizer: Callable, device: str | torch.device, bf16: bool) -> None:
        self.model, self.tokenizer = model, tokenizer
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


def limit(dataset: Dataset, max_samples: int | None, seed: int) -> Dataset:
    """A seeded random subset of ``max_samples`` samples (in dataset order), or the dataset itself."""
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(dataset), generator=generator)[:max_samples].sort().values
    return Subset(dataset, chosen.tolist())


@dataclass
class EvalContext:
    """One evaluation run: the frozen model, the settings, the rendered scenes and extracted features."""

    model: FrozenModel
    settings: EvalSettings
    cache: dict[tuple, ExtractedFeatures] = field(default_factory=dict)
    rendered: dict[int, SceneSplits] = field(default_factory=dict)

    def size(self, protocol_size: int | None = None) -> int:
        return self.settings.image_size or protocol_size or self.model.image_size

    def limited(self, dataset: Dataset) -> Dataset:
        return limit(dataset, self.settings.max_samples, self.settings.seed)

    def scenes(self) -> SceneSplits:
        """The built-in scenes at ``size()``, rendered once per run."""
        size = self.size()
        if size not in self.rendered:
            settings = self.settings
            self.rendered[size] = SceneSplits(size, settings.scenes_seed, settings.scenes_train, settings.scenes_test)
        return self.rendered[size]

    def features(self, key: tuple, dataset: Dataset, encode: Callable, size: int, desc: str) -> ExtractedFeatures:
        """Extract (once per key) features of ``dataset`` resized to a ``size`` square."""
        if key not in self.cache:
            self.cache[key] = extract_features(
                dataset, image_transform(size), encode, self.settings.batch_size, self.settings.progress, desc
            )
        return self.cache[key]

    def probe_recipe(self, paper_recipe: ProbeOptimConfig, learning_rate: float | None = None) -> ProbeOptimConfig:
        """The paper's recipe cut to ``probe_iterations`` / ``probe_batch_size``, with the run's seed."""
        iterations = self.settings.probe_iterations or paper_recipe.iterations
        recipe = replace(paper_recipe.scaled(iterations, self.settings.probe_batch_size), seed=self.settings.seed)
        return recipe if learning_rate is None else replace(recipe, learning_rate=learning_rate)
