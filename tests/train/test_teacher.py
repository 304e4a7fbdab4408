"""EMA teachers (full / head-only) and the frozen distillation teacher."""

import pytest
import torch

from tests.train.train_fakes import (
    FakeStudent,
    make_batch,
    make_student,
    student_patch_scores,
    tips_forward,
    tips_loss,
)
from tipstorch.train.outputs import ContrastiveEmbeddings, StudentOutputs, TeacherScores
from tipstorch.train.teacher import EMATeacher, FrozenTeacher


def perturbed(student: FakeStudent, amount: float = 0.5) -> FakeStudent:
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(amount)
    return student


def params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def test_full_ema_moves_every_part_towards_the_student():
    student = make_student()
    teacher = EMATeacher(student.parts(), mode="full")
    before = {name: params(teacher[name]) for name in ("backbone", "dino_head", "ibot_head")}
    perturbed(student)
    teacher.update(student.parts(), momentum=0.75)
    for name in before:
        student_now = params(student.parts()[name])
        for key, old in before[name].items():
            torch.testing.assert_close(params(teacher[name])[key], 0.75 * old + 0.25 * student_now[key])


def test_head_only_ema_shares_the_student_backbone_and_averages_only_heads():
    student = make_student()
    teacher = EMATeacher(student.parts(), mode="heads")
    assert teacher["backbone"] is student.backbone
    head_before = params(teacher["dino_head"])
    perturbed(student)
    teacher.update(student.parts(), momentum=0.75)
    for key, old in head_before.items():
        torch.testing.assert_close(params(teacher["dino_head"])[key], 0.75 * old + 0.25 * params(student.dino_head)[key])
    assert not any(key.startswith("ema_parts.backbone") for key in teacher.state_dict())


def test_update_leaves_the_student_untouched():
    student = make_student()
    teacher = EMATeacher(student.parts(), mode="full")
    perturbed(teacher.ema_parts, amount=1.0)
    before = params(student)
    teacher.update(student.parts(), momentum=0.5)
    for key, value in params(student).items():
        torch.testing.assert_close(value, before[key])


@pytest.mark.parametrize("momentum, expected_source", [(1.0, "teacher"), (0.0, "student")])
def test_momentum_one_keeps_teacher_momentum_zero_copies_student(momentum, expected_source):
    student = make_student()
    teacher = EMATeacher(student.parts(), mode="full")
    teacher_before = params(teacher["ibot_head"])
    perturbed(student)
    teacher.update(student.parts(), momentum=momentum)
    expected = teacher_before if expected_source == "teacher" else params(student.ibot_head)
    for key, value in params(teacher["ibot_head"]).items():
        torch.testing.assert_close(value, expected[key])


def test_teacher_parameters_never_require_grad_and_stay_in_eval_mode():
    student = make_student()
    teacher = EMATeacher(student.parts(), mode="full")
    teacher.train()
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not any(module.training for module in teacher.ema_parts.modules())


@pytest.mark.parametrize("mode", ["full", "heads"])
def test_a_training_step_gives_gradients_to_every_student_parameter_and_none_to_the_teacher(mode):
    student = make_student()
    teacher = EMATeacher(student.parts(), mode=mode)
    loss = tips_loss()
    embeddings, parts = tips_forward(student, teacher, loss, make_batch())
    total = loss.total(loss.contrastive_parts(embeddings, student.temperature) | parts)
    total.backward()
    missing = [name for name, p in student.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert all(p.grad is None for p in teacher.parameters())


def self_distillation_gradients(student: FakeStudent, loss, batch: dict, scores: TeacherScores) -> dict:
    """The student's gradients of the DINO + iBOT loss against the given teacher scores."""
    student.zero_grad(set_to_none=True)
    masked = student.backbone.forward_features(batch["global_crop"], batch["patch_mask"])
    local_cls = student.backbone.forward_features(batch["local_crops"].flatten(0, 1)).global_cls
    outputs = StudentOutputs(ContrastiveEmbeddings(), local_scores=student.dino_head(local_cls),
                             patch_scores=student_patch_scores(student, loss, masked, batch["patch_mask"]))
    loss.total(loss.self_supervised_parts(outputs, scores, batch["patch_mask"], 0.07, 0.05)).backward()
    return {name: p.grad.clone() for name, p in student.backbone.named_parameters()}


def test_head_only_teacher_pass_adds_no_gradient_to_the_shared_backbone():
    # The teacher's targets come from the student's own backbone: the backward of the losses must give that
    # backbone the gradients of the student's passes alone, the same as with targets held as constants.
    student = make_student()
    teacher = EMATeacher(student.parts(), mode="heads")
    loss, batch = tips_loss(clip_global=0.0, clip_spatial=0.0), make_batch()
    supervised = loss.supervised_rows(batch["patch_mask"])
    scores = teacher.scores(batch["global_crop"], None, supervised)  # runs the shared backbone
    assert not scores.global_scores.requires_grad and not scores.patch_scores.requires_grad
    through_teacher = self_distillation_gradients(student, loss, batch, scores)
    constants = TeacherScores(scores.global_scores.detach().clone(), scores.patch_scores.detach().clone())
    as_constants = self_distillation_gradients(student, loss, batch, constants)
    assert all(grad.abs().sum() > 0 for grad in through_teacher.values())
    for name, grad in as_constants.items():
        torch.testing.assert_close(through_teacher[name], grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("mode", ["full", "heads"])
def test_the_ibot_head_scores_only_the_supervised_tokens_and_needs_them_named(mode):
    teacher, batch = EMATeacher(make_student().parts(), mode=mode), make_batch()
    mask = batch["patch_mask"]
    scores = teacher.scores(batch["global_crop"], None, lambda tokens: tokens[mask])
    assert scores.patch_scores.shape[0] == int(mask.sum()) < mask.numel()
    with pytest.raises(ValueError, match="iBOT head needs the supervised rows"):
        teacher.scores(batch["global_crop"], None, None)


def test_update_rejects_a_student_part_of_another_shape():
    teacher = EMATeacher(make_student().parts(), mode="heads")
    other = make_student().parts()
    other["dino_head"] = other["backbone"]
    with pytest.raises(ValueError, match="dino_head"):
        teacher.update(other, momentum=0.9)


def test_frozen_teacher_is_fixed_and_ignores_updates():
    fixed = make_student(seed=1)
    teacher = FrozenTeacher(fixed.parts())
    before = params(teacher["backbone"])
    teacher.update(perturbed(make_student()).parts(), momentum=0.0)
    assert not any(p.requires_grad for p in teacher.parameters())
    for key, value in params(teacher["backbone"]).items():
        torch.testing.assert_close(value, before[key])


def test_a_frozen_teacher_keeps_only_its_heads_in_a_checkpoint_and_loads_them_back():
    teacher = FrozenTeacher(make_student(seed=1).parts())
    state = teacher.training_state()
    assert state and not any(key.startswith("parts.backbone.") for key in state)
    other = FrozenTeacher(make_student(seed=2).parts())
    other.load_training_state(state)
    assert all(torch.equal(value, other.state_dict()[key]) for key, value in state.items())


@pytest.mark.parametrize("mode", ["full", "heads"])
def test_a_teacher_state_that_does_not_fit_is_an_error_naming_its_keys(mode):
    teacher = EMATeacher(make_student().parts(), mode=mode)
    state = teacher.training_state()
    state.pop("ema_parts.dino_head.prototypes.weight")
    with pytest.raises(ValueError, match=r"missing \['ema_parts\.dino_head\.prototypes\.weight'\]"):
        teacher.load_training_state(state)
