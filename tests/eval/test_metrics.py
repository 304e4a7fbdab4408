"""Metrics against hand-computed cases."""

import math

import numpy as np
import pytest
import torch

from tipstorch.eval.metrics import (
    DepthMetric,
    DepthMetricConfig,
    NormalsMetric,
    SegmentationMetric,
    confusion_matrix,
    image_to_text_ranks,
    nyu_eigen_crop_mask,
    recall_at_k,
    text_to_image_ranks,
    topk_accuracy,
)
from tipstorch.eval.retrieval import retrieval_recall

# target / prediction worked by hand:
#   valid pixels: (t0,p0) (t0,p1) (t1,p1) (t1,p1) (t2,p0); the 255 pixel is ignored
#   IoU0 = 1/3 (inter 1, union 2+2-1), IoU1 = 2/3 (inter 2, union 2+3-2), IoU2 = 0 (inter 0, union 1)
SEG_TARGET = np.array([[0, 0, 1], [1, 2, 255]])
SEG_PRED = np.array([[0, 1, 1], [1, 0, 2]])


def test_confusion_matrix_rows_are_ground_truth():
    cm = confusion_matrix(SEG_PRED, SEG_TARGET, num_classes=3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_segmentation_scores_match_hand_computation():
    metric = SegmentationMetric(num_classes=3)
    metric.update(SEG_PRED, SEG_TARGET)
    scores = metric.compute()
    assert scores["per_class_iou"] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert scores["miou"] == pytest.approx(1 / 3)
    assert scores["pixel_accuracy"] == pytest.approx(3 / 5)
    assert scores["mean_accuracy"] == pytest.approx((1 / 2 + 1 + 0) / 3)


def test_class_absent_from_prediction_and_truth_is_excluded_from_miou():
    metric = SegmentationMetric(num_classes=5)
    metric.update(SEG_PRED, SEG_TARGET)
    scores = metric.compute()
    assert scores["per_class_iou"][3] is None and scores["per_class_iou"][4] is None
    assert scores["miou"] == pytest.approx(1 / 3)


def test_class_predicted_but_absent_from_truth_counts_as_zero():
    pred = SEG_PRED.copy()
    pred[0, 0] = 3  # was a correct class-0 pixel
    metric = SegmentationMetric(num_classes=4)
    metric.update(pred, SEG_TARGET)
    scores = metric.compute()
    # IoU0: inter 0, union 2+1 = 3 -> 0 ; IoU1 2/3 ; IoU2 0 ; IoU3: inter 0, union 1 -> 0
    assert scores["per_class_iou"] == pytest.approx([0.0, 2 / 3, 0.0, 0.0])
    assert scores["miou"] == pytest.approx((2 / 3) / 4)


def test_segmentation_metric_streams_over_batches():
    whole = SegmentationMetric(num_classes=3)
    whole.update(SEG_PRED, SEG_TARGET)
    parts = SegmentationMetric(num_classes=3)
    parts.update(SEG_PRED[:1], SEG_TARGET[:1])
    parts.update(torch.from_numpy(SEG_PRED[1:]), torch.from_numpy(SEG_TARGET[1:]))
    assert torch.equal(whole.confusion, parts.confusion)


def test_out_of_range_label_is_an_error():
    with pytest.raises(ValueError, match=r"target labels must be in \[0, 3\)"):
        confusion_matrix(np.zeros((2, 2)), np.full((2, 2), 7), num_classes=3)


# Depth case by hand: target [1, 1, 2, 2], prediction [1, 1.2, 3, 5]
#   errors 0, .2, 1, 3 -> RMSE sqrt(10.04 / 4); AbsRel (0 + .2 + .5 + 1.5) / 4
#   ratios 1, 1.2, 1.5, 2.5 -> delta1 2/4, delta2 (1.5625) 3/4, delta3 (1.953) 3/4
DEPTH_TARGET = torch.tensor([[1.0, 1.0, 2.0, 2.0]])
DEPTH_PRED = torch.tensor([[1.0, 1.2, 3.0, 5.0]])


def test_depth_metrics_match_hand_computation():
    metric = DepthMetric()
    metric.update(DEPTH_PRED, DEPTH_TARGET)
    result = metric.compute()
    assert result["rmse"] == pytest.approx(math.sqrt(10.04 / 4))
    assert result["abs_rel"] == pytest.approx(0.55)
    assert result["log10"] == pytest.approx((math.log10(1.2) + math.log10(1.5) + math.log10(2.5)) / 4)
    assert (result["delta1"], result["delta2"], result["delta3"]) == pytest.approx((0.5, 0.75, 0.75))


def test_depth_pixels_outside_range_or_mask_are_ignored():
    target = torch.tensor([[1.0, 1.0, 2.0, 2.0, 0.0, 20.0, 1.0]])
    pred = torch.tensor([[1.0, 1.2, 3.0, 5.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[True] * 6 + [False]])
    metric = DepthMetric()
    metric.update(pred, target, valid_mask=mask)
    assert metric.compute()["rmse"] == pytest.approx(math.sqrt(10.04 / 4))
    assert metric.num_pixels == 4


def test_depth_prediction_is_clamped_to_range():
    metric = DepthMetric(DepthMetricConfig(min_depth=0.5, max_depth=10.0))
    metric.update(torch.tensor([[0.0, 50.0]]), torch.tensor([[1.0, 8.0]]))
    # clamped predictions 0.5 and 10 -> errors .5 and 2
    assert metric.compute()["rmse"] == pytest.approx(math.sqrt((0.25 + 4.0) / 2))


def test_depth_per_image_average_differs_from_pixel_pooling():
    second_pred, second_target = torch.tensor([[2.0]]), torch.tensor([[1.0]])
    per_image = DepthMetric()
    pooled = DepthMetric(DepthMetricConfig(per_image=False))
    for metric in (per_image, pooled):
        metric.update(DEPTH_PRED, DEPTH_TARGET)
        metric.update(second_pred, second_target)
    assert per_image.compute()["rmse"] == pytest.approx((math.sqrt(10.04 / 4) + 1.0) / 2)
    assert pooled.compute()["rmse"] == pytest.approx(math.sqrt((10.04 + 1.0) / 5))
    assert pooled.compute()["abs_rel"] == pytest.approx((2.2 + 1.0) / 5)


def test_depth_image_without_valid_pixels_is_counted_not_averaged():
    metric = DepthMetric()
    metric.update(DEPTH_PRED, DEPTH_TARGET)
    metric.update(torch.ones(1, 4), torch.zeros(1, 4))
    result = metric.compute()
    assert result["num_images"] == 1 and result["num_empty_images"] == 1
    assert result["rmse"] == pytest.approx(math.sqrt(10.04 / 4))


def test_eigen_crop_covers_the_standard_rows_and_columns():
    mask = nyu_eigen_crop_mask()
    assert mask.sum() == (471 - 45) * (601 - 41)
    assert mask[45, 41] and not mask[44, 41] and not mask[45, 601]


def _normals_case():
    # target +x everywhere; prediction at 0, 45 and 90 degrees, last pixel has an invalid target
    pred = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    target = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    as_map = lambda v: v.T.reshape(1, 3, 1, 4)  # noqa: E731
    return as_map(pred), as_map(target)


def test_normals_metrics_match_hand_computation():
    pred, target = _normals_case()
    metric = NormalsMetric()
    metric.update(pred, target)
    result = metric.compute()
    assert result["num_pixels"] == 3
    assert result["mean"] == pytest.approx(45.0)
    assert result["median"] == pytest.approx(45.0, abs=0.01)
    assert result["rmse"] == pytest.approx(math.sqrt((0 + 45**2 + 90**2) / 3))
    assert (result["within_11.25"], result["within_22.5"], result["within_30"]) == pytest.approx((1 / 3,) * 3)


def test_normals_valid_mask_removes_pixels():
    pred, target = _normals_case()
    metric = NormalsMetric()
    metric.update(pred, target, valid_mask=torch.tensor([[[True, True, False, True]]]))
    assert metric.compute()["mean"] == pytest.approx(22.5)


def test_normals_median_of_many_values_is_within_histogram_resolution():
    angles = torch.tensor([3.0, 10.0, 17.5, 40.0, 88.0])
    rad = torch.deg2rad(angles)
    pred = torch.stack([torch.cos(rad), torch.sin(rad), torch.zeros(5)]).reshape(1, 3, 1, 5)
    target = torch.tensor([1.0, 0.0, 0.0]).reshape(1, 3, 1, 1).expand(1, 3, 1, 5)
    metric = NormalsMetric()
    metric.update(pred, target)
    assert metric.compute()["median"] == pytest.approx(17.5, abs=0.01)


def test_topk_accuracy_matches_hand_computation():
    scores = torch.tensor([[0.9, 0.1, 0.0, 0.0], [0.2, 0.3, 0.5, 0.0], [0.1, 0.2, 0.3, 0.4]])
    labels = torch.tensor([0, 1, 0])
    # sample 0 top-1 hit; sample 1 label ranked 2nd; sample 2 label ranked last (4th)
    result = topk_accuracy(scores, labels, ks=(1, 2, 4, 5))
    assert result == pytest.approx({"top1": 1 / 3, "top2": 2 / 3, "top4": 1.0})


# 2 images with 2 captions each; rows images, columns texts
RETRIEVAL_SIM = torch.tensor([[0.1, 0.9, 0.8, 0.2], [0.7, 0.6, 0.3, 0.5]])
TEXT_TO_IMAGE = torch.tensor([0, 0, 1, 1])


def test_image_to_text_hit_when_any_own_caption_is_in_top_k():
    ranks = image_to_text_ranks(RETRIEVAL_SIM, TEXT_TO_IMAGE)
    # image 0: own caption 0.9 is first; image 1: best own caption 0.5 beaten by 0.7 and 0.6
    assert ranks.above.tolist() == [0, 2] and ranks.tied.tolist() == [0, 0]
    assert recall_at_k(ranks, ks=(1, 2, 3)) == pytest.approx({1: 0.5, 2: 0.5, 3: 1.0})


def test_text_to_image_rank_of_own_image():
    ranks = text_to_image_ranks(RETRIEVAL_SIM, TEXT_TO_IMAGE)
    assert ranks.above.tolist() == [1, 0, 1, 0] and ranks.tied.tolist() == [0, 0, 0, 0]
    assert recall_at_k(ranks, ks=(1, 2)) == pytest.approx({1: 0.5, 2: 1.0})


def test_image_to_text_ranks_on_a_row_chunk_use_global_image_ids():
    ranks = image_to_text_ranks(RETRIEVAL_SIM[1:], TEXT_TO_IMAGE, image_ids=torch.tensor([1]))
    assert ranks.above.tolist() == [2]


def test_image_without_caption_is_an_error():
    with pytest.raises(ValueError, match="images without any caption"):
        image_to_text_ranks(RETRIEVAL_SIM, torch.tensor([0, 0, 0, 0]))


def test_collapsed_embeddings_score_chance_recall_not_perfect_recall():
    # every image embedding equal (a collapsed model): all similarities of a text are tied
    num_images = 8
    images = torch.ones(num_images, 4)
    texts = torch.randn(2 * num_images, 4)
    text_to_image = torch.arange(num_images).repeat_interleave(2)
    result = retrieval_recall(images, texts, text_to_image, ks=(1, 4))
    assert result["text_to_image_r1"] == pytest.approx(1 / num_images)
    assert result["text_to_image_r4"] == pytest.approx(4 / num_images)
    # image->text: all rows are the same, so the single best text is a hit for its own image only
    assert result["image_to_text_r1"] == pytest.approx(1 / num_images)
    # both towers collapsed: each image's 2 captions are tied with 14 others (counted as one place)
    fully = retrieval_recall(images, torch.ones(2 * num_images, 4), text_to_image, ks=(1,))
    assert fully["image_to_text_r1"] == pytest.approx(1 / 15)
    assert fully["text_to_image_r1"] == pytest.approx(1 / num_images)


def test_ties_share_the_places_they_occupy():
    similarity = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.1]])  # right answer (column 0) tied with 2 others
    ranks = text_to_image_ranks(similarity.T, torch.tensor([0]))
    assert (ranks.above.item(), ranks.tied.item()) == (1, 2)
    assert recall_at_k(ranks, ks=(1, 2, 3, 4)) == pytest.approx({1: 0.0, 2: 1 / 3, 3: 2 / 3, 4: 1.0})


def test_topk_accuracy_of_constant_scores_is_chance():
    scores = torch.zeros(6, 3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    assert topk_accuracy(scores, labels, ks=(1, 2)) == pytest.approx({"top1": 1 / 3, "top2": 2 / 3})
