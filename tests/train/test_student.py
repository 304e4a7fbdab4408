"""The real TIPSStudent and one real step (step.py) on a 2-block model: passes, gradients, accumulation."""

import functools

import pytest
import torch

from tests.helpers import assert_close_to_scale, tiny_config
from tipstorch.models.tips import TIPSModel
from tipstorch.train.config import HeadCfg, LossCfg, LossWeights
from tipstorch.train.losses import TIPSLoss
from tipstorch.train.outputs import supervised_patches
from tipstorch.train.schedules import ScheduleValues
from tipstorch.train.step import forward_backward
from tipstorch.train.student import TIPSStudent
from tipstorch.train.teacher import EMATeacher

HEADS = HeadCfg(num_prototypes=32, hidden_dim=32, bottleneck_dim=16, mlp_layers=3)
VALUES = ScheduleValues(
    lr=1e-3, weight_decay=0.0, teacher_momentum=0.99, dino_teacher_temp=0.07, ibot_teacher_temp=0.05
)


def real_student(seed: int = 0, **loss: object) -> tuple[TIPSStudent, LossCfg]:
    """A 2-block, width-48 TIPS model (4x4 patches at 56 px, 16 text tokens) with 32-prototype heads."""
    torch.manual_seed(seed)
    cfg = LossCfg(**loss)
    return TIPSStudent(TIPSModel(tiny_config()), HEADS, cfg), cfg


def real_batch(batch: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, 16, generator=generator) < 0.5
    mask[:, 0] = True
    tokens = torch.randint(1, 300, (2, batch, 16), generator=generator)
    tokens[:, :, 10:] = 0  # padding
    return {
        "global_crop": torch.rand(batch, 3, 56, 56, generator=generator),
        "local_crops": torch.rand(batch, 2, 3, 28, 28, generator=generator),
        "patch_mask": mask,
        "alt_tokens": tokens[0],
        "synthetic_tokens": tokens[1],
    }


def test_forward_gives_every_enabled_term_its_values_with_their_shapes():
    student, _ = real_student(weights=LossWeights(koleo=0.1))
    outputs = student(real_batch())
    embeddings = outputs.embeddings
    assert all(
        value.shape == (4, 48)
        for value in (
            embeddings.global_cls,
            embeddings.alt_text,
            embeddings.spatial_cls,
            embeddings.synthetic_text,
        )
    )
    masked_tokens = int(real_batch()["patch_mask"].sum())
    assert outputs.local_scores.shape == (4 * 2, 32) and outputs.patch_scores.shape == (masked_tokens, 32)
    assert outputs.koleo_cls.shape == (4, 48) and outputs.koleo_cls.requires_grad
    assert (
        outputs.unmasked.patch_tokens.shape == (4, 4, 4, 48) and not outputs.unmasked.global_cls.requires_grad
    )


@pytest.mark.parametrize("all_tokens", [False, True])
def test_the_ibot_head_runs_on_the_supervised_tokens_only(all_tokens):
    student, _ = real_student(ibot_all_tokens=all_tokens)
    batch = real_batch()
    inputs = []
    student.ibot_head.register_forward_hook(lambda module, args, output: inputs.append(args[0]))
    outputs = student(batch)
    masked = student.model.visual.forward_features(batch["global_crop"], batch["patch_mask"]).flat
    expected = masked.flatten(0, 1) if all_tokens else masked[batch["patch_mask"]]
    assert len(inputs) == 1 and inputs[0].shape == expected.shape
    assert_close_to_scale(inputs[0].detach(), expected.detach())
    assert outputs.patch_scores.shape == (expected.shape[0], HEADS.num_prototypes)


@pytest.mark.parametrize("all_tokens", [False, True])
def test_ibot_loss_equals_the_loss_of_the_head_on_all_tokens_weighted_by_the_mask(all_tokens):
    # the formula of the head run on all N tokens of the masked pass (what the step computed before the head
    # ran on the supervised tokens only): per-token cross-entropy, weights mask / masked count per image
    student, cfg = real_student(ibot_all_tokens=all_tokens)
    teacher = EMATeacher(student.parts(), mode="full")
    tips_loss = TIPSLoss(cfg, HEADS.num_prototypes)
    tips_loss.ibot.centering.center.copy_(torch.linspace(-0.3, 0.3, HEADS.num_prototypes))
    batch = real_batch()
    outputs = student(batch)
    supervised = tips_loss.supervised_rows(batch["patch_mask"])
    scores = teacher.scores(batch["global_crop"], outputs.unmasked, supervised)
    part = tips_loss.self_supervised_parts(outputs, scores, batch["patch_mask"], 0.07, 0.05)["ibot"]
    masked = student.model.visual.forward_features(batch["global_crop"], batch["patch_mask"])
    student_log_probs = torch.log_softmax(student.ibot_head(masked.flat) / cfg.student_temp, dim=-1)
    with torch.no_grad():  # the teacher's head on all N tokens too
        teacher_scores = teacher["ibot_head"](teacher["backbone"].forward_features(batch["global_crop"]).flat)
    torch.testing.assert_close(scores.patch_scores, supervised(teacher_scores))  # its rows, and only those
    targets = torch.softmax((teacher_scores - tips_loss.ibot.centering.center) / 0.05, dim=-1)
    per_token = -(targets * student_log_probs).sum(-1)  # [B, N]
    supervised = torch.ones_like(batch["patch_mask"]) if all_tokens else batch["patch_mask"]
    weights = supervised.float() / supervised.sum(-1, keepdim=True)
    assert_close_to_scale(part.detach(), ((per_token * weights).sum() / supervised.shape[0]).detach())


def test_a_disabled_term_gets_no_values_and_no_pass():
    student, _ = real_student(weights=LossWeights(clip_spatial=0.0, dino=0.0))
    outputs = student(real_batch())
    assert outputs.embeddings.spatial_cls is None and outputs.embeddings.synthetic_text is None
    assert outputs.local_scores is None and student.dino_head is None and outputs.koleo_cls is None


@pytest.mark.parametrize("on_masked", [False, True])
def test_contrastive_embeddings_come_from_the_pass_contrastive_on_masked_names(on_masked):
    student, _ = real_student(contrastive_on_masked=on_masked)
    batch = real_batch()
    outputs = student(batch)
    visual = student.model.visual
    masked = visual.forward_features(batch["global_crop"], batch["patch_mask"])
    unmasked = visual.forward_features(batch["global_crop"])
    expected, other = (masked, unmasked) if on_masked else (unmasked, masked)
    torch.testing.assert_close(outputs.embeddings.global_cls, expected.global_cls)
    torch.testing.assert_close(outputs.embeddings.spatial_cls, expected.spatial_cls)
    assert not torch.allclose(outputs.embeddings.global_cls, other.global_cls, atol=1e-3)
    assert (outputs.unmasked is None) == on_masked  # the masked pass serves both: no unmasked pass


@pytest.mark.parametrize("on_masked", [False, True])
@pytest.mark.parametrize("mode", ["full", "heads"])
def test_a_real_step_gives_every_trainable_parameter_a_gradient_and_the_teacher_none(mode, on_masked):
    student, cfg = real_student(contrastive_on_masked=on_masked, ibot_all_tokens=mode == "heads")
    teacher = EMATeacher(student.parts(), mode=mode)
    parts = forward_backward(student, teacher, TIPSLoss(cfg, HEADS.num_prototypes), real_batch(), VALUES)
    assert set(parts) == {"clip_global", "clip_spatial", "dino", "ibot", "total"}
    assert all(torch.isfinite(value) for value in parts.values())
    missing = [
        name
        for name, p in student.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert missing == []
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())


def test_the_head_only_teacher_reads_its_targets_from_the_students_unmasked_pass(monkeypatch):
    student, cfg = real_student()
    teacher = EMATeacher(student.parts(), mode="heads")
    batch = real_batch()
    outputs = student(batch)
    visual = student.model.visual
    supervised = functools.partial(supervised_patches, patch_mask=batch["patch_mask"], all_tokens=student.ibot_all_tokens)
    expected = teacher["ibot_head"](supervised(visual.forward_features(batch["global_crop"]).flat))
    calls = []
    backbone_pass = visual.forward_features
    monkeypatch.setattr(visual, "forward_features", lambda *args: calls.append(1) or backbone_pass(*args))
    scores = teacher.scores(batch["global_crop"], outputs.unmasked, supervised)
    assert calls == []  # no extra backbone pass
    torch.testing.assert_close(scores.patch_scores, expected)
    teacher.scores(batch["global_crop"], None, supervised)
    assert calls == [1]  # without the student's unmasked pass the shared backbone runs


def twin_steps(micro_batches: int, mode: str, **loss: object):
    """The same student, teacher and loss (centres set to non-zero values) after one forward_backward."""
    student, cfg = real_student(**loss)
    teacher = EMATeacher(student.parts(), mode=mode)
    tips_loss = TIPSLoss(cfg, HEADS.num_prototypes)
    for term in (tips_loss.dino, tips_loss.ibot):
        term.centering.center.copy_(torch.linspace(-0.3, 0.3, HEADS.num_prototypes))
    parts = forward_backward(student, teacher, tips_loss, real_batch(batch=4), VALUES, micro_batches)
    tips_loss.step_centers()
    grads = {name: p.grad for name, p in student.named_parameters() if p.grad is not None}
    return parts, grads, tips_loss


@pytest.mark.parametrize("mode, on_masked", [("full", False), ("heads", True), ("heads", False)])
def test_two_accumulated_micro_batches_equal_one_full_batch_on_the_real_student(mode, on_masked):
    full_parts, full_grads, full_loss = twin_steps(1, mode, contrastive_on_masked=on_masked)
    accum_parts, accum_grads, accum_loss = twin_steps(2, mode, contrastive_on_masked=on_masked)
    assert accum_grads.keys() == full_grads.keys() and "model.temperature" in full_grads
    for name, grad in full_grads.items():
        assert_close_to_scale(accum_grads[name], grad, msg=name)
    for name, value in full_parts.items():
        assert_close_to_scale(accum_parts[name], value, msg=name)
    for name, centre in full_loss.state_dict().items():
        assert_close_to_scale(accum_loss.state_dict()[name], centre, msg=name)


def test_under_bf16_autocast_the_scores_and_loss_parts_are_float32():
    student, cfg = real_student()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = student(real_batch())
    assert outputs.local_scores.dtype == outputs.patch_scores.dtype == torch.float32
    teacher = EMATeacher(student.parts(), mode="heads")
    parts = forward_backward(
        student,
        teacher,
        TIPSLoss(cfg, HEADS.num_prototypes),
        real_batch(),
        VALUES,
        autocast_dtype=torch.bfloat16,
    )
    assert all(value.dtype == torch.float32 and torch.isfinite(value) for value in parts.values())
