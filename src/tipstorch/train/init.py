"""Building the model, its starting weights and the teacher from a TrainCfg.

Starting points (``model.init`` / ``tipstorch train --init``):

- None: from scratch, the architecture of ``model.name`` with the ``model.vision`` / ``model.text``
  overrides (and ``model.init_pixel_mean`` / ``init_pixel_std`` folded into the patch embedding);
- a registered name with official weights (``tipstorch.list_models(pretrained=True)``), a tipstorch
  ``.safetensors`` export, an official ``*_vision.npz`` or a transformers directory: anything
  ``tipstorch.load_model`` reads. The image and text towers and the temperature are loaded; the DINO /
  iBOT heads start new (released models ship none);
- a training checkpoint ``.pt`` (``last.pt``, ``step-<N>.pt``): the same, and where shapes fit its heads
  are loaded too, and its EMA teacher and DINO / iBOT centres continue (e.g. the high-resolution stage
  continuing a low-resolution run); the optimiser, schedules and step start afresh.

With a starting model the architecture (and tokenizer) is that model's, with the ``model.vision`` /
``model.text`` overrides applied: ``vision.pos_grid`` may differ (224 -> 448 px fine-tuning), the
position embeddings are then resampled; overrides that change other shapes fail with the key and shapes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tipstorch.models.registry import get_model_spec
from tipstorch.models.text import TextConfig
from tipstorch.models.tips import TIPSConfig, TIPSModel
from tipstorch.models.vit import VisionConfig, VisionTransformer, resample_pos_embed
from tipstorch.train.config import ConfigError, ModelCfg, TrainCfg
from tipstorch.train.losses import TIPSLoss
from tipstorch.train.run_state import FINAL, LAST, load_checkpoint
from tipstorch.train.sharded_checkpoint import SHARDED_LAST
from tipstorch.train.student import TIPSStudent, projection_head
from tipstorch.train.teacher import BACKBONE, DINO_HEAD, IBOT_HEAD, EMATeacher, FrozenTeacher, Teacher
from tipstorch.weights.factory import load_model
from tipstorch.weights.state_io import CheckpointError, load_checked

logger = logging.getLogger("tipstorch.train")

HEAD_NAMES = (DINO_HEAD, IBOT_HEAD)


@dataclass
class StartingPoint:
    """Weights to start from: a model and, from a training checkpoint, the states of the student's heads
    (by head name), of the EMA teacher's parts (by part name) and of the loss (its centres)."""

    model: TIPSModel
    heads: dict[str, dict[str, torch.Tensor]]
    source: str
    teacher_parts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    loss: dict[str, torch.Tensor] = field(default_factory=dict)


def _sub_states(
    state: Mapping[str, torch.Tensor], prefix: str, names: Iterable[str]
) -> dict[str, dict[str, torch.Tensor]]:
    """{name: the entries of ``state`` under ``<prefix><name>.``, without that prefix} (names present only)."""
    parts = {}
    for name in names:
        head = f"{prefix}{name}."
        part = {key[len(head) :]: value for key, value in state.items() if key.startswith(head)}
        if part:
            parts[name] = part
    return parts


def _override(base: Any, fields: dict[str, Any], section: str) -> Any:
    known = {field.name for field in dataclasses.fields(base)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"model.{section}: unknown field(s) {unknown} (known: {', '.join(sorted(known))})")
    return dataclasses.replace(base, **fields)


def model_config(cfg: ModelCfg, base: TIPSConfig | None = None) -> TIPSConfig:
    """The TIPSConfig to train: ``base`` (the starting model's), else ``model.name``'s, else built from
    ``model.vision`` / ``model.text`` alone; with the overrides of ``cfg`` applied.

    Without ``base`` the model trains from scratch: its LayerScale gammas start at DINOv2's small value
    (``VisionConfig.layer_scale_init``, 1e-5) unless ``model.vision.layer_scale_init`` says otherwise. The
    registry's 1.0 of the released models only describes weights that are loaded over it."""
    if base is None and cfg.name is not None:
        released = get_model_spec(cfg.name).config
        base = dataclasses.replace(
            released, vision=dataclasses.replace(released.vision, layer_scale_init=VisionConfig.layer_scale_init)
        )
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
    if Path(source).suffix == ".dcp" or (Path(source).is_dir() and (Path(source) / SHARDED_LAST).exists()
                                         and not (Path(source) / LAST).exists()):
        raise CheckpointError(
            f"{source}: a sharded (FSDP) training checkpoint cannot start a new run; use --resume to continue "
            f"it, or start from the run's {FINAL} (its heads then start new)"
        )
    if Path(source).suffix == ".pt" or (Path(source).is_dir() and (Path(source) / LAST).exists()):
        state, path = load_checkpoint(source)
        model = TIPSModel(TIPSConfig(**state["model_config"]))
        student = state["student"]
        load_checked(model, _sub_states(student, "", ["model"])["model"], str(path))
        return StartingPoint(
            model,
            _sub_states(student, "", HEAD_NAMES),
            str(path),
            teacher_parts=_sub_states(state["teacher"], "ema_parts.", (BACKBONE, *HEAD_NAMES)),
            loss=dict(state["loss"]),
        )
    return StartingPoint(load_model(source), {}, source)


def _vision_state(state: Mapping[str, torch.Tensor], target: VisionTransformer) -> dict[str, torch.Tensor]:
    """A vision tower's weights for the ``target`` tower, position embeddings resampled to its grid."""
    state = dict(state)
    pos_embed, grid = state["pos_embed"], target.config.pos_grid
    if pos_embed.shape[1] != 1 + grid * grid and pos_embed.shape[-1] == target.embed_dim:
        cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
        state["pos_embed"] = torch.cat([cls_pos, resample_pos_embed(patch_pos, (grid, grid))], dim=1)
    return state


@torch.no_grad()
def fold_pixel_normalization(
    weight: torch.Tensor, bias: torch.Tensor, mean: tuple[float, float, float], std: tuple[float, float, float]
) -> None:
    """Change a patch projection's weight [D, 3, p, p] and bias [D] in place so that on [0, 1] pixels it
    computes what it computed on ``(pixels - mean) / std``: weight / std, bias - sum(weight * mean / std).
    Row d of both depends on row d alone, so a rank may fold its own rows of sharded tensors."""
    weight.div_(weight.new_tensor(std).view(1, 3, 1, 1))
    bias.sub_((weight * weight.new_tensor(mean).view(1, 3, 1, 1)).sum(dim=(1, 2, 3)))


def build_model(cfg: ModelCfg) -> tuple[TIPSModel, StartingPoint | None]:
    """The model to train (train mode) and the starting point it was loaded from (None = from scratch)."""
    if cfg.init is None:
        model = TIPSModel(model_config(cfg))
        if cfg.init_pixel_mean is not None and cfg.init_pixel_std is not None:
            projection = model.visual.patch_embed.proj
            fold_pixel_normalization(projection.weight, projection.bias, cfg.init_pixel_mean, cfg.init_pixel_std)
        start = None
    else:
        start = load_starting_point(cfg.init)
        config = model_config(dataclasses.replace(cfg, name=None), base=start.model.config)
        if cfg.name is not None and get_model_spec(cfg.name).config.vision.embed_dim != config.vision.embed_dim:
            logger.warning("model.name %s is ignored: the architecture follows the starting model %s", cfg.name, cfg.init)
        model = TIPSModel(config)
        load_checked(model.visual, _vision_state(start.model.visual.state_dict(), model.visual), start.source)
        load_checked(model.text, start.model.text.state_dict(), start.source)
        if cfg.temperature is None:
            with torch.no_grad():
                model.temperature.copy_(start.model.temperature)
    return trainable(model, cfg), start


def trainable(model: TIPSModel, cfg: ModelCfg) -> TIPSModel:
    """The model in train mode, with activation checkpointing and fused attention as ``model.grad_checkpointing``
    and ``model.fused_attention`` say."""
    for tower in (model.visual, model.text):
        tower.set_grad_checkpointing(cfg.grad_checkpointing)
        tower.set_fused_attention(None if cfg.fused_attention == "auto" else cfg.fused_attention)
    return model.train()


def _load_parts(
    modules: Mapping[str, nn.Module],
    states: Mapping[str, Mapping[str, torch.Tensor]],
    source: str,
    owner: str,
) -> list[str]:
    """Load ``states[name]`` into ``modules[name]`` where both exist and shapes fit; returns the names loaded
    (a part whose shapes differ keeps its fresh state, with a warning)."""
    loaded = []
    for name, module in modules.items():
        if name not in states:
            continue
        state = _vision_state(states[name], module) if name == BACKBONE else states[name]
        try:
            load_checked(module, state, f"{source} ({owner} {name})")
        except CheckpointError as error:
            logger.warning("%s %s starts new: %s", owner, name, error)
            continue
        loaded.append(name)
    return loaded


def load_heads(student: TIPSStudent, start: StartingPoint | None) -> list[str]:
    """Load the heads of a training-checkpoint starting point into the student where shapes fit;
    returns the names of the heads loaded (the others keep their fresh initialisation)."""
    if start is None:
        return []
    heads = {name: module for name, module in student.parts().items() if name != BACKBONE}
    return _load_parts(heads, start.heads, start.source, "student")


def continue_teacher_and_centres(
    start: StartingPoint | None, teacher: Teacher | None, loss: TIPSLoss
) -> list[str]:
    """From a training checkpoint (e.g. the high-resolution stage after the low-resolution run): the EMA
    teacher's parts and the DINO / iBOT centres continue from that run's, where they exist and fit (a
    teacher backbone's position embeddings are resampled to the new grid). Without them the teacher
    would restart as a copy of the student and the centres at zero. Returns what was continued, as
    ``teacher.<part>`` and the loss state keys."""
    if start is None:
        return []
    continued = []
    if isinstance(teacher, EMATeacher):  # a frozen teacher comes from teacher.frozen_model instead
        parts = _load_parts(dict(teacher.ema_parts.items()), start.teacher_parts, start.source, "teacher")
        continued += [f"teacher.{name}" for name in parts]
    own = loss.state_dict()
    fitting = {
        key: value for key, value in start.loss.items() if key in own and own[key].shape == value.shape
    }
    loss.load_state_dict(fitting, strict=False)
    continued += sorted(fitting)
    if continued:
        logger.info("continuing from %s: %s", start.source, ", ".join(continued))
    return continued


def build_teacher(cfg: TrainCfg, student: TIPSStudent) -> Teacher | None:
    """The teacher of the self-distillation terms (None when DINO and iBOT are off): an EMA of the
    student (``full`` / ``heads``), or a frozen pretrained image encoder (``frozen``, appendix A.1).
    A frozen teacher from a training checkpoint gets that checkpoint's (student) heads, matching its
    backbone; from a released model, which ships no DINO / iBOT heads, fixed random heads (warned)."""
    if not student.self_distillation:
        return None
    if cfg.teacher.mode != "frozen":
        return EMATeacher(student.parts(), mode=cfg.teacher.mode)
    start = load_starting_point(cfg.teacher.frozen_model)
    visual = start.model.visual
    heads = {name: projection_head(visual.embed_dim, cfg.heads) for name in student.parts() if name != BACKBONE}
    loaded = _load_parts(heads, start.heads, start.source, "frozen teacher")
    random = [name for name in heads if name not in loaded]
    if random:
        logger.warning(
            "frozen teacher %s: %s random and fixed (%s holds no fitting DINO / iBOT heads): their "
            "targets carry no learned structure; distil from a training checkpoint (.pt) for trained heads",
            start.source, " and ".join(random), start.source,
        )
    return FrozenTeacher({BACKBONE: visual} | heads)
