"""Each loss against a small case computed by hand."""

import math

import pytest
import torch

from tests.train.train_fakes import tips_loss
from tipstorch.train import losses
from tipstorch.train.losses import (
    ContrastiveLoss,
    DINOLoss,
    IBOTPatchLoss,
    KoLeoLoss,
    ScoreCentering,
    _cross_entropy,
)
from tipstorch.train.outputs import ContrastiveEmbeddings, StudentOutputs, TeacherScores


def ce(logits: list[float], target: int) -> float:
    """-log softmax(logits)[target]."""
    return -logits[target] + math.log(sum(math.exp(value) for value in logits))


def soft_ce(teacher: list[float], logits: list[float]) -> float:
    """-sum_k t_k log softmax(logits)_k."""
    return sum(t * ce(logits, k) for k, t in enumerate(teacher))


def softmax(values: list[float]) -> list[float]:
    total = sum(math.exp(v) for v in values)
    return [math.exp(v) / total for v in values]


# ------------------------------------------------------------------------------------------ contrastive


def test_contrastive_loss_matches_2x2_hand_computation():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # cosines [[1, 0.6], [0, 0.8]] / temperature 0.5 -> logits [[2, 1.2], [0, 1.6]]
    image_to_text = (ce([2.0, 1.2], 0) + ce([0.0, 1.6], 1)) / 2
    text_to_image = (ce([2.0, 0.0], 0) + ce([1.2, 1.6], 1)) / 2
    expected = (image_to_text + text_to_image) / 2
    loss = ContrastiveLoss()(image, text, torch.tensor(0.5))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_contrastive_loss_uses_cosine_not_raw_dot_product():
    image, text = torch.randn(3, 4), torch.randn(3, 4)
    loss = ContrastiveLoss()
    scaled = loss(image * 7.0, text * 0.3, torch.tensor(0.1))
    assert scaled.item() == pytest.approx(loss(image, text, torch.tensor(0.1)).item(), rel=1e-5)


def test_contrastive_loss_gives_temperature_a_gradient():
    temperature = torch.tensor(0.2, requires_grad=True)
    ContrastiveLoss()(torch.randn(4, 8), torch.randn(4, 8), temperature).backward()
    assert temperature.grad is not None and temperature.grad.abs().item() > 0


def test_contrastive_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\[b, D\].*\(3, 4\).*\(2, 4\)"):
        ContrastiveLoss()(torch.randn(3, 4), torch.randn(2, 4), torch.tensor(0.1))


# ------------------------------------------------------------------------------------------ centering


def test_centering_is_ema_of_batch_means_with_momentum():
    centering = ScoreCentering(num_prototypes=2, momentum=0.9)
    centering.accumulate(torch.tensor([[1.0, 3.0], [3.0, 5.0]]))  # mean [2, 4]
    centering.step()
    assert centering.center.tolist() == pytest.approx([0.2, 0.4])
    centering.accumulate(torch.tensor([[2.0, 4.0]]))
    centering.step()
    assert centering.center.tolist() == pytest.approx([0.9 * 0.2 + 0.1 * 2.0, 0.9 * 0.4 + 0.1 * 4.0])


def test_centering_weighs_every_row_of_all_accumulated_micro_batches_equally():
    centering = ScoreCentering(num_prototypes=1, momentum=0.0)
    centering.accumulate(torch.tensor([[1.0], [2.0], [3.0]]))
    centering.accumulate(torch.tensor([[10.0]]))
    centering.step()
    assert centering.center.item() == pytest.approx(4.0)


def test_centering_probabilities_subtract_centre_then_sharpen():
    centering = ScoreCentering(num_prototypes=2, momentum=0.9)
    centering.center.copy_(torch.tensor([0.5, -0.5]))
    probs = centering.probabilities(torch.tensor([[1.0, 0.0]]), teacher_temp=0.5)
    assert probs[0].tolist() == pytest.approx(softmax([(1.0 - 0.5) / 0.5, (0.0 + 0.5) / 0.5]))


def test_centre_is_a_state_dict_buffer():
    loss = DINOLoss(num_prototypes=3, student_temp=0.1, center_momentum=0.9)
    loss.centering.center.fill_(0.25)
    restored = DINOLoss(num_prototypes=3, student_temp=0.1, center_momentum=0.9)
    restored.load_state_dict(loss.state_dict())
    assert restored.centering.center.tolist() == [0.25, 0.25, 0.25]


# ------------------------------------------------------------------------------------------ soft cross-entropy


def _log_softmax_cross_entropy(teacher_probs, student_scores, student_temp):
    """The textbook form the fused one replaces."""
    return -(teacher_probs * torch.log_softmax(student_scores / student_temp, dim=-1)).sum(dim=-1)


@pytest.mark.parametrize("chunk_elements", [2**18, 64], ids=["one chunk", "a row per chunk"])
@pytest.mark.parametrize("target_shape", [(3, 5, 64), (3, 1, 64)], ids=["same shape", "broadcast (DINO)"])
def test_soft_cross_entropy_value_and_gradient_match_the_log_softmax_form(target_shape, chunk_elements, monkeypatch):
    monkeypatch.setattr(losses, "ROW_CHUNK_ELEMENTS", chunk_elements)
    assert len(losses.row_chunks(torch.empty(3, 5, 64))) == (1 if chunk_elements > 3 * 5 * 64 else 3)
    generator = torch.Generator().manual_seed(0)
    scores = (torch.rand(3, 5, 64, generator=generator) * 2 - 1).requires_grad_(True)  # cosines
    targets = torch.softmax(torch.randn(target_shape, generator=generator) / 0.04, dim=-1)
    upstream = torch.rand(3, 5, generator=generator)
    fused = _cross_entropy(targets, scores, 0.1)
    (fused * upstream).sum().backward()
    fused_grad, scores.grad = scores.grad, None
    reference = _log_softmax_cross_entropy(targets, scores, 0.1)
    (reference * upstream).sum().backward()
    assert fused.shape == (3, 5)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
    torch.testing.assert_close(fused_grad, scores.grad, rtol=1e-4, atol=1e-6 * scores.grad.abs().max().item())


@pytest.mark.parametrize("chunk_elements", [2**18, 10], ids=["one chunk", "a row per chunk"])
def test_teacher_probabilities_are_the_softmax_of_centred_sharpened_scores(chunk_elements, monkeypatch):
    monkeypatch.setattr(losses, "ROW_CHUNK_ELEMENTS", chunk_elements)
    generator = torch.Generator().manual_seed(2)
    scores = torch.rand(7, 3, 10, generator=generator) * 2 - 1
    centering = ScoreCentering(num_prototypes=10, momentum=0.9)
    centering.center.copy_(torch.linspace(-0.2, 0.2, 10))
    expected = torch.softmax((scores - centering.center) / 0.04, dim=-1)
    torch.testing.assert_close(centering.probabilities(scores, 0.04), expected, rtol=1e-5, atol=1e-7)
    assert centering.probabilities(scores.bfloat16(), 0.04).dtype == torch.float32


def test_soft_cross_entropy_gradient_passes_gradcheck_in_float64():
    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(2, 3, 7, dtype=torch.float64, generator=generator).requires_grad_(True)
    targets = torch.softmax(torch.randn(2, 3, 7, dtype=torch.float64, generator=generator), dim=-1)
    # the forward computes in float32, so compare the analytic gradient with float32-scale finite differences
    assert torch.autograd.gradcheck(lambda s: _cross_entropy(targets, s, 0.5).double(), (scores,), eps=1e-3,
                                    atol=1e-3, rtol=1e-3)


def test_soft_cross_entropy_refuses_targets_that_require_grad():
    with pytest.raises(ValueError, match="targets must not require grad"):
        _cross_entropy(torch.rand(2, 4, requires_grad=True), torch.rand(2, 4), 0.1)


# ------------------------------------------------------------------------------------------ DINO


def test_dino_loss_matches_hand_computation_for_two_local_crops():
    loss = DINOLoss(num_prototypes=2, student_temp=0.5, center_momentum=0.9)
    targets = loss.teacher_targets(torch.tensor([[1.0, 0.0]]), teacher_temp=0.5)  # centre 0
    teacher = softmax([2.0, 0.0])
    student = torch.tensor([[0.0, 1.0], [1.0, 1.0]])  # B=1, M=2; / 0.5 -> [0, 2], [2, 2]
    expected = (soft_ce(teacher, [0.0, 2.0]) + soft_ce(teacher, [2.0, 2.0])) / 2
    assert loss(student, targets).item() == pytest.approx(expected, rel=1e-6)


def test_dino_loss_pairs_each_local_crop_with_its_own_image():
    loss = DINOLoss(num_prototypes=2, student_temp=1.0, center_momentum=0.9)
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # B=2 one-hot targets
    student = torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])  # image-major, M=2
    expected = (ce([3.0, 0.0], 0) + ce([1.0, 0.0], 0) + ce([0.0, 2.0], 1) + ce([0.0, 0.0], 1)) / 4
    assert loss(student, targets).item() == pytest.approx(expected, rel=1e-6)


def test_dino_teacher_targets_record_scores_for_the_next_centre():
    loss = DINOLoss(num_prototypes=2, student_temp=0.1, center_momentum=0.5)
    loss.teacher_targets(torch.tensor([[2.0, 4.0]]), teacher_temp=0.07)
    assert loss.centering.center.tolist() == [0.0, 0.0]
    loss.centering.step()
    assert loss.centering.center.tolist() == pytest.approx([1.0, 2.0])


def test_dino_loss_rejects_crop_count_not_multiple_of_batch():
    loss = DINOLoss(num_prototypes=2, student_temp=0.1, center_momentum=0.9)
    with pytest.raises(ValueError, match="B=2"):
        loss(torch.randn(3, 2), torch.rand(2, 2))


# ------------------------------------------------------------------------------------------ iBOT


def _patch_case():
    teacher = torch.tensor([[[0.9, 0.1], [0.2, 0.8]], [[0.5, 0.5], [0.3, 0.7]]])  # B=2, N=2, K=2
    student = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[2.0, 1.0], [0.5, 0.0]]])
    per_token = [[soft_ce(teacher[b, n].tolist(), student[b, n].tolist()) for n in range(2)] for b in range(2)]
    return teacher, student, per_token


def ibot_loss(
    loss: IBOTPatchLoss, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The loss of [B, N, K] student scores and targets, given on their supervised rows as the step does."""
    return loss(loss.supervised(student, mask), loss.supervised(teacher, mask), mask)


def test_ibot_loss_averages_masked_tokens_per_image_then_images():
    teacher, student, token = _patch_case()
    mask = torch.tensor([[True, False], [True, True]])
    expected = (token[0][0] / 1 + (token[1][0] + token[1][1]) / 2) / 2
    loss = IBOTPatchLoss(2, student_temp=1.0, center_momentum=0.9, all_tokens=False)
    assert ibot_loss(loss, student, teacher, mask).item() == pytest.approx(expected, rel=1e-6)


def test_ibot_image_without_masked_tokens_adds_zero_but_counts_in_mean():
    teacher, student, token = _patch_case()
    mask = torch.tensor([[False, False], [True, False]])
    loss = IBOTPatchLoss(2, student_temp=1.0, center_momentum=0.9, all_tokens=False)
    assert ibot_loss(loss, student, teacher, mask).item() == pytest.approx(token[1][0] / 2, rel=1e-6)


def test_ibot_plus_plus_averages_all_tokens_of_each_image():
    teacher, student, token = _patch_case()
    mask = torch.tensor([[True, False], [False, False]])
    expected = ((token[0][0] + token[0][1]) / 2 + (token[1][0] + token[1][1]) / 2) / 2
    loss = IBOTPatchLoss(2, student_temp=1.0, center_momentum=0.9, all_tokens=True)
    assert ibot_loss(loss, student, teacher, mask).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("all_tokens", [False, True])
def test_visible_tokens_get_gradient_only_with_ibot_plus_plus(all_tokens):
    teacher, student, _ = _patch_case()
    student.requires_grad_(True)
    mask = torch.tensor([[True, False], [True, False]])
    loss = IBOTPatchLoss(2, student_temp=0.1, center_momentum=0.9, all_tokens=all_tokens)
    ibot_loss(loss, student, teacher, mask).backward()
    visible_grad = student.grad[:, 1].abs().sum().item()
    assert (visible_grad > 0) == all_tokens
    assert student.grad[:, 0].abs().sum().item() > 0


@pytest.mark.parametrize("all_tokens", [False, True])
def test_ibot_supervises_and_centres_the_masked_rows_or_with_ibot_plus_plus_every_row(all_tokens):
    scores = torch.tensor([[[2.0, 0.0], [0.0, 4.0]], [[1.0, 1.0], [3.0, 0.0]]])  # B=2, N=2, K=2
    mask = torch.tensor([[False, True], [True, False]])
    loss = IBOTPatchLoss(2, student_temp=0.1, center_momentum=0.0, all_tokens=all_tokens)
    rows = loss.supervised(scores, mask)
    expected_rows = scores.flatten(0, 1) if all_tokens else torch.tensor([[0.0, 4.0], [1.0, 1.0]])
    torch.testing.assert_close(rows, expected_rows)
    torch.testing.assert_close(loss.patch_targets(rows, teacher_temp=1.0), torch.softmax(expected_rows, dim=-1))
    loss.centering.step()
    # dinov2 centres on the masked teacher tokens; iBOT++ supervises, and so centres, all 4
    assert loss.centering.center.tolist() == pytest.approx([1.5, 1.25] if all_tokens else [0.5, 2.5])


def test_supervised_rows_are_the_ibot_rows_of_the_mask_and_none_without_ibot():
    tokens = torch.arange(12.0).reshape(2, 3, 2)  # B=2, N=3, D=2
    mask = torch.tensor([[True, False, True], [False, False, True]])
    torch.testing.assert_close(tips_loss().supervised_rows(mask)(tokens), tokens[mask])
    assert tips_loss(ibot=0.0).supervised_rows(mask) is None


def test_ibot_loss_rejects_scores_that_are_not_the_supervised_rows():
    teacher, student, _ = _patch_case()
    loss = IBOTPatchLoss(2, student_temp=0.1, center_momentum=0.9, all_tokens=False)
    with pytest.raises(ValueError, match="S=3 supervised tokens"):
        loss(student.flatten(0, 1), teacher.flatten(0, 1), torch.tensor([[True, False], [True, True]]))


# ------------------------------------------------------------------------------------------ KoLeo


def test_koleo_matches_nearest_neighbour_distances_by_hand():
    angles = [0.0, math.pi / 3, math.pi]  # chord lengths: 0-60deg = 1, 60-180deg = sqrt(3), 0-180deg = 2
    points = torch.tensor([[math.cos(a), math.sin(a)] for a in angles]) * torch.tensor([[2.0], [0.5], [3.0]])
    expected = -(math.log(1.0) + math.log(1.0) + math.log(math.sqrt(3.0))) / 3
    assert KoLeoLoss()(points).item() == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------------------------------ TIPSLoss


def test_total_weighs_parts_as_in_the_paper():
    loss = tips_loss()
    parts = {name: torch.tensor(value) for name, value in
             {"clip_global": 1.0, "clip_spatial": 3.0, "dino": 5.0, "ibot": 7.0}.items()}
    assert loss.total(parts).item() == pytest.approx(0.5 * (1.0 + 3.0) + 1.0 * 5.0 + 2.0 * 7.0)


def test_clip_only_config_builds_no_self_supervised_terms():
    loss = tips_loss(clip_global=1.0, clip_spatial=0.0, dino=0.0, ibot=0.0)
    assert loss.dino is None and loss.ibot is None and loss.koleo is None
    embeddings = ContrastiveEmbeddings(global_cls=torch.randn(3, 4), alt_text=torch.randn(3, 4))
    assert set(loss.contrastive_parts(embeddings, torch.tensor(0.1))) == {"clip_global"}
    assert loss.self_supervised_parts(StudentOutputs(embeddings), None, torch.zeros(3, 4, dtype=torch.bool),
                                      0.07, 0.04) == {}


def test_dual_contrastive_pairs_global_cls_with_alt_text_and_spatial_cls_with_synthetic_text():
    loss = tips_loss(dino=0.0, ibot=0.0)
    embeddings = ContrastiveEmbeddings(*(torch.randn(3, 4) for _ in range(4)))
    parts = loss.contrastive_parts(embeddings, torch.tensor(0.1))
    single = ContrastiveLoss()
    assert parts["clip_global"].item() == pytest.approx(
        single(embeddings.global_cls, embeddings.alt_text, torch.tensor(0.1)).item())
    assert parts["clip_spatial"].item() == pytest.approx(
        single(embeddings.spatial_cls, embeddings.synthetic_text, torch.tensor(0.1)).item())


def test_enabled_term_without_its_inputs_is_a_clear_error():
    student = StudentOutputs(ContrastiveEmbeddings(), local_scores=torch.randn(2, 32))
    with pytest.raises(ValueError, match=r"'dino' term is enabled.*teacher\.global_scores"):
        tips_loss().self_supervised_parts(student, TeacherScores(), torch.zeros(1, 1, dtype=torch.bool), 0.07, 0.04)


def test_step_centers_updates_both_centres_once():
    loss = tips_loss(prototypes=2)
    loss.self_supervised_parts(
        StudentOutputs(
            ContrastiveEmbeddings(), local_scores=torch.zeros(2, 2), patch_scores=torch.zeros(1, 2)
        ),
        TeacherScores(global_scores=torch.tensor([[1.0, 0.0]]), patch_scores=torch.tensor([[0.0, 2.0]])),
        patch_mask=torch.tensor([[True]]), dino_teacher_temp=0.07, ibot_teacher_temp=0.04,
    )
    loss.step_centers()
    assert loss.dino.centering.center.tolist() == pytest.approx([0.1, 0.0])
    assert loss.ibot.centering.center.tolist() == pytest.approx([0.0, 0.2])


def test_contrastive_logits_are_float32_under_bf16_autocast():
    # A sharp temperature makes logits of ~100: in bf16 (8 bits of mantissa) they are off by ~0.5
    generator = torch.Generator().manual_seed(0)
    image, text = torch.randn(16, 32, generator=generator), torch.randn(16, 32, generator=generator)
    temperature = torch.tensor(0.01)
    exact = ContrastiveLoss()(image, text, temperature)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = ContrastiveLoss()(image, text, temperature)
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, exact, rtol=1e-6, atol=0)
