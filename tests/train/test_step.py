"""The pieces composed into optimiser steps, as the training loop will order them."""

import pytest
import torch

from tests.train.train_fakes import contrastive_embeddings, make_batch, make_student, tips_forward
from tipstorch.train.config import LossCfg, LossWeights, OptimCfg, ScheduleCfg
from tipstorch.train.contrastive_accum import accumulate_gradients, split_batch
from tipstorch.train.losses import TIPSLoss
from tipstorch.train.optim import build_optimizer, clip_gradients, set_hyperparams
from tipstorch.train.schedules import TrainingSchedules
from tipstorch.train.teacher import EMATeacher


def train(mode: str, steps: int, ibot_all_tokens: bool) -> list[dict[str, float]]:
    student = make_student()
    teacher = EMATeacher(student.parts(), mode=mode)
    loss = TIPSLoss(LossCfg(weights=LossWeights(), ibot_all_tokens=ibot_all_tokens), num_prototypes=32)
    optim_cfg = OptimCfg(name="adamw", lr=3e-3, weight_decay=0.01, grad_clip_norm=1.0, temperature_lr_scale=0.1)
    optimizer = build_optimizer(student.named_parameters(), optim_cfg)
    schedules = TrainingSchedules(ScheduleCfg(warmup_steps=3, ibot_teacher_temp_warmup_steps=5), optim_cfg, steps)
    batch = make_batch(batch=8)
    history = []
    for step in range(steps):
        values = schedules.at(step)
        set_hyperparams(optimizer, values.lr, values.weight_decay)
        optimizer.zero_grad(set_to_none=True)
        parts = accumulate_gradients(
            split_batch(batch, 2),
            embed=lambda mb: contrastive_embeddings(student, mb),
            forward=lambda mb, v=values: tips_forward(
                student, teacher, loss, mb, temps=(v.dino_teacher_temp, v.ibot_teacher_temp)
            ),
            contrastive=loss.contrastive_parts,
            total=loss.total,
            temperature=student.temperature,
        )
        loss.step_centers()
        clip_gradients(student.parameters(), optim_cfg.grad_clip_norm)
        optimizer.step()
        teacher.update(student.parts(), values.teacher_momentum)
        history.append({name: value.item() for name, value in parts.items()})
    return history


@pytest.mark.parametrize("mode, ibot_all_tokens", [("full", False), ("heads", True)])
def test_repeated_steps_on_one_batch_lower_the_contrastive_and_total_loss(mode, ibot_all_tokens):
    history = train(mode, steps=30, ibot_all_tokens=ibot_all_tokens)
    first, last = history[0], history[-1]
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
    assert last["clip_global"] < 0.7 * first["clip_global"]
    assert last["total"] < first["total"]
