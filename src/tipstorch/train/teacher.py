"""Teachers of the self-distillation losses, addressed by part name (``backbone``, ``dino_head``, ``ibot_head``).

- ``EMATeacher(mode="full")`` (TIPS, section 3.2): every part is an EMA copy of the student's part.
- ``EMATeacher(mode="heads")`` (TIPSv2 head-only EMA): the heads are EMA copies, the backbone IS the
  student's backbone module (shared, not copied, not in the teacher's state_dict).
- ``FrozenTeacher`` (appendix A.1 distillation): fixed pretrained parts, never updated.

The teacher needs no text tower. Call its parts under ``torch.no_grad()``: its own parameters never
require gradients, and a shared backbone run without grad passes none to the student. Pass the
unwrapped student modules (not the DDP wrapper) to the constructor and to ``update``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

BACKBONE = "backbone"


def _frozen_copy(module: nn.Module) -> nn.Module:
    clone = copy.deepcopy(module)
    return clone.requires_grad_(False)


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

    def train(self, mode: bool = True) -> EMATeacher:
        """The EMA copies always stay in eval mode (no dropout / drop-path in the teacher)."""
        return self

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
            for teacher_buffer, student_buffer in zip(teacher_part.buffers(), student_part.buffers(), strict=True):
                teacher_buffer.copy_(student_buffer)
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)


class FrozenTeacher(nn.Module):
    """Fixed teacher (e.g. TIPS-g/14 distilled into a smaller student): parts by name, never updated.

    The parts are taken as given (not copied) and frozen; the released checkpoints ship no DINO/iBOT
    heads, so a teacher built from them has freshly initialised heads that stay fixed.
    """

    def __init__(self, parts: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(dict(parts))
        self.parts.requires_grad_(False)
        self.parts.eval()

    def __getitem__(self, name: str) -> nn.Module:
        return self.parts[name]

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Always in eval mode."""
        return self

    def update(self, student_parts: Mapping[str, nn.Module], momentum: float) -> None:
        """Nothing to update: the teacher is fixed."""
