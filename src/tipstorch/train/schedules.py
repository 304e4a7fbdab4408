"""Step-indexed training schedules: every value is a pure function of the step (0-based), so a resumed
run needs nothing but its step counter.

Paper appendix A.2: learning rate warmed up linearly to its peak, then decayed linearly to 0; teacher
EMA momentum on a cosine from 0.994 to 1; iBOT teacher temperature warmed up linearly 0.04 -> 0.07.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from tipstorch.train.config import OptimCfg, ScheduleCfg


def linear_ramp(step: int, ramp_steps: int, start: float, end: float) -> float:
    """start at step 0, end at step ``ramp_steps`` and after; linear in between (end at once if ramp_steps=0)."""
    if step >= ramp_steps:
        return end
    return start + (end - start) * step / ramp_steps


def cosine_ramp(step: int, total_steps: int, start: float, end: float) -> float:
    """Half cosine from start (step 0) to end (step ``total_steps`` and after)."""
    progress = min(step / total_steps, 1.0) if total_steps > 0 else 1.0
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_then_decay(
    step: int,
    total_steps: int,
    warmup_steps: int,
    peak: float,
    final: float = 0.0,
    decay: Literal["linear", "cosine"] = "linear",
) -> float:
    """0 -> peak linearly over ``warmup_steps``, then peak -> final (linear or cosine) at ``total_steps``."""
    if step < warmup_steps:
        return linear_ramp(step, warmup_steps, 0.0, peak)
    decay_step, decay_steps = step - warmup_steps, total_steps - warmup_steps
    if decay == "cosine":
        return cosine_ramp(decay_step, decay_steps, peak, final)
    return linear_ramp(decay_step, decay_steps, peak, final)


@dataclass(frozen=True)
class ScheduleValues:
    """Hyper-parameters in force at one optimiser step."""

    lr: float
    weight_decay: float
    teacher_momentum: float
    dino_teacher_temp: float
    ibot_teacher_temp: float


class TrainingSchedules:
    """All schedules of a run of ``total_steps`` optimiser steps: ``at(step) -> ScheduleValues``."""

    def __init__(self, schedule: ScheduleCfg, optim: OptimCfg, total_steps: int) -> None:
        if total_steps <= 0:
            raise ValueError(f"TrainingSchedules needs total_steps > 0, got {total_steps}")
        self.schedule, self.optim, self.total_steps = schedule, optim, total_steps

    def at(self, step: int) -> ScheduleValues:
        s, total = self.schedule, self.total_steps
        weight_decay = (
            self.optim.weight_decay
            if s.weight_decay_end is None
            else cosine_ramp(step, total, self.optim.weight_decay, s.weight_decay_end)
        )
        return ScheduleValues(
            lr=warmup_then_decay(step, total, s.warmup_steps, self.optim.lr, s.final_lr, s.decay),
            weight_decay=weight_decay,
            teacher_momentum=cosine_ramp(step, total, s.teacher_momentum_start, s.teacher_momentum_end),
            dino_teacher_temp=s.dino_teacher_temp,
            ibot_teacher_temp=linear_ramp(
                step, s.ibot_teacher_temp_warmup_steps, s.ibot_teacher_temp_start, s.ibot_teacher_temp_end
            ),
        )
