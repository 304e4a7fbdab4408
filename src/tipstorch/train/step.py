"""One optimiser step of the TIPS / TIPSv2 recipe, whole and in the order it runs (dinov2's
``forward_backward`` and the update around it).

::

    values = schedules.at(step)              lr, weight decay, teacher momentum and temperatures
    forward_backward(batch):                 over the K micro-batches of the step:
        student passes   -> StudentOutputs   masked / unmasked global crop, local crops, captions
        teacher          -> TeacherScores    unmasked global crop, no grad
        losses           -> parts            clip_global, clip_spatial (whole batch), dino, ibot, koleo
        backward of the weighted sum         gradients accumulate in .grad
    clip the gradient norm; stop if the loss or the gradient is not finite (the loop's job)
    update():
        centres <- EMA of the step's teacher scores; optimiser step; temperature clamp;
        teacher <- EMA of the student (full: every part; heads: the heads; frozen: nothing)

The batch (``data.collate``; b images of this rank, M local crops, N patches, L tokens):
global_crop [b, 3, G, G] in [0, 1], local_crops [b, M, 3, S, S], patch_mask bool [b, N] (True = masked),
alt_tokens / synthetic_tokens long [b, L].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from tipstorch.train.contrastive_accum import accumulate_gradients, split_batch
from tipstorch.train.losses import TIPSLoss
from tipstorch.train.outputs import ContrastiveEmbeddings, StudentOutputs
from tipstorch.train.schedules import ScheduleValues
from tipstorch.train.student import TIPSStudent
from tipstorch.train.teacher import Teacher

Batch = Mapping[str, torch.Tensor]


def micro_batch_losses(
    student_pass: Callable[[Batch], StudentOutputs],
    teacher: Teacher | None,
    loss: TIPSLoss,
    micro_batch: Batch,
    values: ScheduleValues,
) -> tuple[ContrastiveEmbeddings, dict[str, torch.Tensor]]:
    """The student's passes over one micro-batch (with grad), the teacher's scores on its unmasked global
    crop (no grad) and the per-sample loss parts (DINO, iBOT, KoLeo: means over the micro-batch).
    Returns the contrastive embeddings too: their loss needs the whole batch (``accumulate_gradients``)."""
    outputs = student_pass(micro_batch)
    scores = None
    if teacher is not None:
        supervised = loss.supervised_rows(micro_batch["patch_mask"])
        scores = teacher.scores(micro_batch["global_crop"], outputs.unmasked, supervised)
    parts = loss.self_supervised_parts(
        outputs, scores, micro_batch["patch_mask"], values.dino_teacher_temp, values.ibot_teacher_temp
    )
    return outputs.embeddings, parts


def forward_backward(
    student: TIPSStudent,
    teacher: Teacher | None,
    loss: TIPSLoss,
    batch: Batch,
    values: ScheduleValues,
    accumulation_steps: int = 1,
    autocast_dtype: torch.dtype | None = None,
    student_pass: Callable[[Batch], Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Forward and backward of one optimiser step; the gradients land in the student's ``.grad``.

    Args:
        student, teacher, loss: the modules of the run (teacher None when DINO and iBOT are off).
        batch: this rank's batch (see the module docstring), cut into ``accumulation_steps`` micro-batches.
        values: the schedules at this step (the teacher temperatures are used here).
        autocast_dtype: the passes and losses under ``torch.autocast`` of this dtype (None = float32).
        student_pass: what runs the student's forward (its DDP wrapper; default the student itself).

    Returns:
        The detached loss parts of the whole step (contrastive parts over the whole batch, the others
        averaged over micro-batches) and their weighted sum ``total``.
    """
    student_pass = student_pass or student
    return accumulate_gradients(
        split_batch(batch, accumulation_steps),
        embed=student.embed,
        forward=lambda micro_batch: micro_batch_losses(student_pass, teacher, loss, micro_batch, values),
        contrastive=loss.contrastive_parts,
        total=loss.total,
        temperature=student.model.temperature,
        autocast_dtype=autocast_dtype,
        no_sync=getattr(student_pass, "no_sync", None),
    )


def update(
    student: TIPSStudent,
    teacher: Teacher | None,
    loss: TIPSLoss,
    optimizer: torch.optim.Optimizer,
    values: ScheduleValues,
    min_temperature: float,
) -> None:
    """After a finite ``forward_backward``: fold the step's teacher scores into the centres, step the
    optimiser, keep the contrastive temperature >= ``min_temperature``, move the teacher."""
    loss.step_centers()
    optimizer.step()
    with torch.no_grad():
        student.model.temperature.clamp_(min=min_temperature)
    if teacher is not None:
        teacher.update(student.parts(), values.teacher_momentum)
