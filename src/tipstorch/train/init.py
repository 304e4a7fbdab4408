"""Building the model, its starting weights and the teacher from a TrainCfg.

Starting points (``model.init`` / ``tipstorch train --init``):

- None: from scratch, the architecture of ``model.name`` with the ``model.vision`` / ``model.text``
  overrides (and ``model.init_pixel_mean`` / ``init_pixel_std`` folded into the patch embedding);
- a registered name with official weights (``tipstorch.list_models(pretrained=True)``), a tipstorch
  ``.safetensors`` export, an official ``*_vision.npz`` or a transformers directory: anything
  ``tipstorch.load_model`` reads. The image and text towers and the temperature are loaded; the DINO /
  iBOT heads start new (released models ship none);
- a training checkpoint ``.pt`` (``last.pt``, ``step-<N>.pt``): the same, and its heads are loaded too
  when their shapes fit (e.g. the high-resolution stage continuing a low-resolution run).

With a starting model the architecture (and tokenizer) is that model's, with the ``model.vision`` /
``model.text`` overrides applied: ``vision.pos_grid`` may differ (224 -> 448 px fine-tuning), the
position embeddings are then resampled; overrides that change other shapes fail with the key and shapes.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tipstorch.models.heads import ProjectionHead
from tipstorch.models.registry import get_model_spec
from tipstorch.models.text import TextConfig
from tipstorch.models.tips import TIPSConfig, TIPSModel
from tipstorch.models.vit import VisionConfig, resample_pos_embed
from tipstorch.train.config import ConfigError, ModelCfg, TrainCfg
from tipstorch.train.run_state import LAST, load_checkpoint
from tipstorch.train.student import TIPSStudent
from tipstorch.train.teacher import BACKBONE, EMATeacher, FrozenTeacher
from tipstorch.weights.factory import load_model
from tipstorch.weights.state_io import CheckpointError, load_checked

logger = logging.getLogger("tipstorch.train")

HEAD_NAMES = ("dino_head", "ibot_head")


@dataclass
class StartingPoint:
    """Weights to start from: a model and, from a training checkpoint, the student's heads state."""

    model: TIPSModel
    heads: dict[str, dict[str, torch.Tensor]]
    source: str


def _override(base: Any, fields: dict[str, Any], section: str) -> Any:
    known = {field.name for field in dataclasses.fields(base)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"model.{section}: unknown field(s) {unknown} (known: {', '.join(sorted(known))})")
    return dataclasses.replace(base, **fields)


def model_config(cfg: ModelCfg, base: TIPSConfig | None = None) -> TIPSConfig:
    """The TIPSConfig to train: ``base`` (the starting model's), else ``model.name``'s, else built from
    ``model.vision`` / ``model.text`` alone; with the overrides of ``cfg`` applied."""
    if base is None and cfg.name is not None:
        base = get_model_spec(cfg.name).config
    if base is None:
        vision, text = VisionConfig(**cfg.vision), TextConfig(**cfg.text)
        return TIPSConfig(vision=vision, text=text, image_size=vision.pos_grid * vision.patch_size,
                          temperature=cfg.temperature if cfg.temperature is not None else TIPSConfig.temperature)
    vision = _override(base.vision, cfg.vision, "vision")
    return dataclasses.replace(
        base,
        vision=vision,
        text=_override(base.text, cfg.text, "text"),
        image_size=vision.pos_grid * vision.patch_size,
        temperature=cfg.temperature if cfg.temperature is not None else base.temperature,
    )


def load_starting_point(source: str) -> StartingPoint:
    """A model from a registered name, an exported file, or a training checkpoint (``.pt``)."""
    if Path(source).suffix == ".pt" or (Path(source).is_dir() and (Path(source) / LAST).exists()):
        state, path = load_checkpoint(source)
        model = TIPSModel(TIPSConfig(**state["model_config"]))
        student = state["student"]
        load_checked(model, {key[len("model."):]: value for key, value in student.items() if key.startswith("model.")},
                     str(path))
        heads = {
            name: {key[len(name) + 1:]: value for key, value in student.items() if key.startswith(f"{name}.")}
            for name in HEAD_NAMES
        }
        return StartingPoint(model, {name: state for name, state in heads.items() if state}, str(path))
    return StartingPoint(load_model(source), {}, source)


def _vision_state(source: TIPSModel, target: TIPSModel) -> dict[str, torch.Tensor]:
    """The source's vision weights, position embeddings resampled to the target's grid."""
    state = dict(source.visual.state_dict())
    pos_embed, grid = state["pos_embed"], target.config.vision.pos_grid
    if pos_embed.shape[1] != 1 + grid * grid and pos_embed.shape[-1] == target.visual.embed_dim:
        cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
        state["pos_embed"] = torch.cat([cls_pos, resample_pos_embed(patch_pos, (grid, grid))], dim=1)
    return state


@torch.no_grad()
def fold_pixel_normalization(
    patch_projection: nn.Conv2d, mean: tuple[float, float, float], std: tuple[float, float, float]
) -> None:
    """Change the patch projection (weight [D, 3, p, p], bias [D]) so that on [0, 1] pixels it computes what
    it computed on ``(pixels - mean) / std``: weight / std, bias - sum(weight * mean / std)."""
    mean_t = patch_projection.weight.new_tensor(mean).view(1, 3, 1, 1)
    std_t = patch_projection.weight.new_tensor(std).view(1, 3, 1, 1)
    patch_projection.weight.div_(std_t)
    patch_projection.bias.sub_((patch_projection.weight * mean_t).sum(dim=(1, 2, 3)))


def build_model(cfg: ModelCfg) -> tuple[TIPSModel, StartingPoint | None]:
    """The model to train (train mode) and the starting point it was loaded from (None = from scratch)."""
    if cfg.init is None:
        model = TIPSModel(model_config(cfg))
        if cfg.init_pixel_mean is not None and cfg.init_pixel_std is not None:
            fold_pixel_normalization(model.visual.patch_embed.proj, cfg.init_pixel_mean, cfg.init_pixel_std)
        start = None
    else:
        start = load_starting_point(cfg.init)
        config = model_config(dataclasses.replace(cfg, name=None), base=start.model.config)
        if cfg.name is not None and get_model_spec(cfg.name).config.vision.embed_dim != config.vision.embed_dim:
            logger.warning("model.name %s is ignored: the architecture follows the starting model %s", cfg.name, cfg.init)
        model = TIPSModel(config)
        load_checked(model.visual, _vision_state(start.model, model), start.source)
        load_checked(model.text, start.model.text.state_dict(), start.source)
        if cfg.temperature is None:
            with torch.no_grad():
                model.temperature.copy_(start.model.temperature)
    return trainable(model, cfg), start


def trainable(model: TIPSModel, cfg: ModelCfg) -> TIPSModel:
    """The model in train mode, with activation checkpointing as ``model.grad_checkpointing`` says."""
    model.visual.set_grad_checkpointing(cfg.grad_checkpointing)
    model.text.set_grad_checkpointing(cfg.grad_checkpointing)
    return model.train()


def load_heads(student: TIPSStudent, start: StartingPoint | None) -> list[str]:
    """Load the heads of a training-checkpoint starting point into the student where shapes fit;
    returns the names of the heads loaded (the others keep their fresh initialisation)."""
    loaded = []
    for name, state in (start.heads if start else {}).items():
        head = getattr(student, name)
        if head is None:
            continue
        try:
            load_checked(head, state, f"{start.source} ({name})")
        except CheckpointError as error:
            logger.warning("%s starts new: %s", name, error)
            continue
        loaded.append(name)
    return loaded


def build_teacher(cfg: TrainCfg, student: TIPSStudent) -> EMATeacher | FrozenTeacher | None:
    """The teacher of the self-distillation terms (None when DINO and iBOT are off): an EMA of the
    student (``full`` / ``heads``), or a frozen pretrained image encoder (``frozen``, appendix A.1)
    with fixed, freshly initialised heads (released models ship no DINO / iBOT heads)."""
    if not student.self_distillation:
        return None
    if cfg.teacher.mode != "frozen":
        return EMATeacher(student.parts(), mode=cfg.teacher.mode)
    visual = load_starting_point(cfg.teacher.frozen_model).model.visual
    heads = cfg.heads
    parts = {BACKBONE: visual} | {
        name: ProjectionHead(visual.embed_dim, heads.num_prototypes, heads.hidden_dim, heads.bottleneck_dim,
                             heads.mlp_layers)
        for name in student.parts()
        if name != BACKBONE
    }
    return FrozenTeacher(parts)
