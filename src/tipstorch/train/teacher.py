"""Teachers of the self-distillation losses, addressed by part name (``backbone``, ``dino_head``, ``ibot_head``).

- ``EMATeacher(mode="full")`` (TIPS, section 3.2): every part is an EMA copy of the student's part.
- ``EMATeacher(mode="heads")`` (TIPSv2 head-only EMA): the heads are EMA copies, the backbone IS the
  student's backbone module (shared, not copied, not in the teacher's state_dict).
- ``FrozenTeacher`` (appendix A.1 distillation): fixed pretrained parts, never updated.

All three follow the ``Teacher`` protocol the training step uses. The teacher needs no text tower. Its
parameters never require gradients, and ``scores`` runs without grad, so a shared backbone passes
none to the student. Pass the unwrapped student modules (not the DDP wrapper) to the constructor and
to ``update``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Literal, Protocol

import torch
from torch import nn

from tipstorch.models.vit import ImageFeatures
from tipstorch.train.config import ConfigError
from tipstorch.train.outputs import SupervisedRows, TeacherScores

BACKBONE = "backbone"
DINO_HEAD = "dino_head"
IBOT_HEAD = "ibot_head"


class Teacher(Protocol):
    """What the training step and the loop ask of a teacher."""

    def scores(
        self, global_crop: torch.Tensor, student_unmasked: ImageFeatures | None, supervised: SupervisedRows | None
    ) -> TeacherScores:
        """global_crop [b, 3, G, G] (unmasked) -> the prototype scores of the enabled heads;
        ``student_unmasked`` is the student's detached unmasked pass of that crop, when it ran;
        ``supervised`` picks the patch tokens the iBOT head scores (required when the teacher has one)."""

    def update(self, student_parts: Mapping[str, nn.Module], momentum: float) -> None:
        """Follow the student after an optimiser step (EMA with ``momentum``; nothing for a fixed teacher)."""

    def training_state(self) -> dict[str, torch.Tensor]:
        """The tensors a training checkpoint keeps of the teacher."""

    def load_training_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore ``training_state``; a state that does not fit is an error naming its keys."""

    def to(self, device: torch.device | str) -> Teacher: ...


def _frozen_copy(module: nn.Module) -> nn.Module:
    clone = copy.deepcopy(module)
    return clone.requires_grad_(False)


def _head_scores(
    teacher: EMATeacher | FrozenTeacher, features: ImageFeatures, supervised: SupervisedRows | None
) -> TeacherScores:
    """The scores of the heads the teacher holds (one per enabled self-distillation term); the iBOT head
    runs on the supervised patch tokens only (dinov2: the masked ones), not on all b*N."""
    dino = teacher[DINO_HEAD](features.global_cls) if teacher.has(DINO_HEAD) else None
    ibot = None
    if teacher.has(IBOT_HEAD):
        if supervised is None:
            raise ValueError("the teacher's iBOT head needs the supervised rows (scores(..., supervised=...))")
        ibot = teacher[IBOT_HEAD](supervised(features.flat))
    return TeacherScores(global_scores=dino, patch_scores=ibot)


def _load_checked(module: nn.Module, state: Mapping[str, torch.Tensor], not_saved: str | None = None) -> None:
    """Load ``state`` into ``module``; keys under ``not_saved`` are not part of a saved state."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [key for key in missing if not (not_saved and key.startswith(not_saved))]
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint teacher does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


class EMATeacher(nn.Module):
    """EMA teacher: t <- m t + (1 - m) s for each EMA'd part, with momentum m from the schedule.

    Args:
        student_parts: the student's modules by name; must contain ``backbone``.
        mode: ``"full"`` (EMA of every part) or ``"heads"`` (EMA of every part but the backbone, which
            is shared with the student).
    """

    def __init__(self, student_parts: Mapping[str, nn.Module], mode: Literal["full", "heads"]) -> None:
        super().__init__()
        if mode not in ("full", "heads"):
            raise ValueError(f"EMATeacher mode must be 'full' or 'heads', got {mode!r}")
        if BACKBONE not in student_parts:
            raise ValueError(f"EMATeacher needs a '{BACKBONE}' part, got {sorted(student_parts)}")
        self.mode = mode
        shared_keys = {BACKBONE} if mode == "heads" else set()
        self.ema_parts = nn.ModuleDict(
            {name: _frozen_copy(module) for name, module in student_parts.items() if name not in shared_keys}
        )
        self.ema_parts.eval()
        self._shared = {name: student_parts[name] for name in shared_keys}  # plain dict: not registered

    def __getitem__(self, name: str) -> nn.Module:
        if name in self._shared:
            return self._shared[name]
        return self.ema_parts[name]

    def has(self, name: str) -> bool:
        return name in self._shared or name in self.ema_parts

    def train(self, mode: bool = True) -> EMATeacher:
        """The EMA copies always stay in eval mode (no dropout / drop-path in the teacher)."""
        return self

    @torch.no_grad()
    def scores(
        self, global_crop: torch.Tensor, student_unmasked: ImageFeatures | None, supervised: SupervisedRows | None
    ) -> TeacherScores:
        """See ``Teacher.scores``. A head-only teacher's backbone is the student's: its features are then
        the student's unmasked pass when it ran (no extra pass), else that backbone runs here (in the
        student's mode, train: with ``drop_path_rate`` 0, as in every shipped recipe, train and eval modes
        compute the same features)."""
        if self.mode == "heads" and student_unmasked is not None:
            features = student_unmasked
        else:
            features = self[BACKBONE].forward_features(global_crop)
        return _head_scores(self, features, supervised)

    @torch.no_grad()
    def update(self, student_parts: Mapping[str, nn.Module], momentum: float) -> None:
        """Move every EMA part towards the student's same-named part; buffers are copied."""
        teacher_params, student_params = [], []
        for name, teacher_part in self.ema_parts.items():
            student_part = student_parts[name]
            teacher_named = dict(teacher_part.named_parameters())
            student_named = dict(student_part.named_parameters())
            if teacher_named.keys() != student_named.keys():
                raise ValueError(f"EMATeacher.update: parameters of part '{name}' differ from the student's")
            teacher_params += list(teacher_named.values())
            student_params += [student_named[key].detach() for key in teacher_named]
            for teacher_buffer, student_buffer in zip(
                teacher_part.buffers(), student_part.buffers(), strict=True
            ):
                teacher_buffer.copy_(student_buffer)
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)

    def training_state(self) -> dict[str, torch.Tensor]:
        """Every EMA part (a shared backbone is the student's, saved with it)."""
        return self.state_dict()

    def load_training_state(self, state: Mapping[str, torch.Tensor]) -> None:
        _load_checked(self, state)


class FrozenTeacher(nn.Module):
    """Fixed teacher (e.g. TIPS-g/14 distilled into a smaller student): parts by name, never updated.

    The parts are taken as given (not copied) and frozen. A training checkpoint keeps only the heads:
    the backbone is reloaded from ``teacher.frozen_model``.
    """

    _backbone_prefix = f"parts.{BACKBONE}."

    def __init__(self, parts: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(dict(parts))
        self.parts.requires_grad_(False)
        self.parts.eval()

    def __getitem__(self, name: str) -> nn.Module:
        return self.parts[name]

    def has(self, name: str) -> bool:
        return name in self.parts

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Always in eval mode."""
        return self

    @torch.no_grad()
    def scores(
        self, global_crop: torch.Tensor, student_unmasked: ImageFeatures | None, supervised: SupervisedRows | None
    ) -> TeacherScores:
        """See ``Teacher.scores``; the fixed backbone always runs (the student's features are not its own)."""
        return _head_scores(self, self.parts[BACKBONE].forward_features(global_crop), supervised)

    def update(self, student_parts: Mapping[str, nn.Module], momentum: float) -> None:
        """Nothing to update: the teacher is fixed."""

    def training_state(self) -> dict[str, torch.Tensor]:
        """The heads only."""
        return {
            key: value
            for key, value in self.state_dict().items()
            if not key.startswith(self._backbone_prefix)
        }

    def load_training_state(self, state: Mapping[str, torch.Tensor]) -> None:
        _load_checked(self, state, not_saved=self._backbone_prefix)
