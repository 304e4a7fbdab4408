"""Probes on cached features: linear classifier, losses, schedules, dense probes on synthetic tasks."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from tipstorch.eval.metrics import NormalsMetric
from tipstorch.eval.probes import (
    DPT_RECIPE,
    LINEAR_SEGMENTATION_RECIPE,
    IntermediateFeatures,
    LinearClassifierConfig,
    PatchFeatures,
    ProbeOptimConfig,
    angular_loss,
    dpt_normals_probe,
    evaluate_dense_probe,
    fit_dense_probe,
    linear_depth_probe,
    linear_segmentation_probe,
    segmentation_loss,
    silog_loss,
    train_linear_classifier,
)
from tipstorch.models.dense import DepthBinsConfig, DPTConfig, DPTNormalsDecoder, DPTSegmentationDecoder


def _blobs(n_per_class, num_classes=3, dim=6, seed=0):
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99)) * 3
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centres[labels] + torch.randn(len(labels), dim, generator=gen) * 0.5, labels


def test_linear_classifier_learns_separable_classes_and_reports_every_grid_point():
    train_x, train_y = _blobs(30)
    test_x, test_y = _blobs(10, seed=1)
    config = LinearClassifierConfig(epochs=10, batch_size=32, learning_rates=(1e-5, 0.1))
    result = train_linear_classifier(train_x, train_y, test_x, test_y, 3, config)
    assert set(result.top1_per_learning_rate) == {1e-5, 0.1}
    assert result.best_learning_rate == 0.1
    assert result.metrics["top1"] == result.top1_per_learning_rate[0.1] >= 0.9
    assert "top5" not in result.metrics  # only 3 classes


def test_probe_schedule_warms_up_then_decays_linearly_to_zero():
    config = ProbeOptimConfig(iterations=10, batch_size=2, learning_rate=1.0, weight_decay=0.0, warmup_iterations=4)
    factors = [config.lr_factor(step) for step in range(10)]
    assert factors == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])


def test_scaled_recipe_keeps_the_optimiser_and_shrinks_warmup():
    small = LINEAR_SEGMENTATION_RECIPE.scaled(iterations=400, batch_size=4)
    assert (small.iterations, small.batch_size, small.warmup_iterations) == (400, 4, 15)
    assert small.learning_rate == LINEAR_SEGMENTATION_RECIPE.learning_rate


def test_silog_loss_of_a_constant_scale_error():
    target = torch.tensor([[[1.0, 2.0, 4.0, 0.0]]])  # last pixel invalid
    depth = (target * 2).unsqueeze(1)
    g = math.log(2.0)
    assert silog_loss(depth, target, DepthBinsConfig()).item() == pytest.approx(math.sqrt(0.15 * g * g), rel=1e-4)


def test_angular_loss_ignores_missing_normals():
    target = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]).reshape(1, 3, 1, 2)
    normals = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]).reshape(1, 3, 1, 2)  # 90 degrees, then a zero target
    assert angular_loss(normals, target).item() == pytest.approx(math.pi / 2, rel=1e-4)


def test_segmentation_loss_skips_ignored_pixels():
    logits = torch.tensor([[[[5.0, 0.0]], [[0.0, 5.0]]]])  # [1, 2, 1, 2]
    assert segmentation_loss(logits, torch.tensor([[[0, 255]]])).item() == pytest.approx(
        F.cross_entropy(torch.tensor([[5.0, 0.0]]), torch.tensor([0])).item()
    )


def _patch_task(n, seed, num_classes=3, grid=4, patch=4, dim=8):
    """Patch tokens = noisy class embeddings; masks = class grid upsampled to pixels."""
    gen = torch.Generator().manual_seed(seed)
    class_grid = torch.randint(0, num_classes, (n, grid, grid), generator=gen)
    embeddings = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99)) * 2
    tokens = embeddings[class_grid] + 0.3 * torch.randn(n, grid, grid, dim, generator=gen)
    masks = class_grid.repeat_interleave(patch, 1).repeat_interleave(patch, 2)
    return PatchFeatures(tokens, torch.randn(n, dim, generator=gen)), masks


def test_linear_segmentation_probe_learns_a_separable_task():
    config = replace(LINEAR_SEGMENTATION_RECIPE.scaled(iterations=100, batch_size=8), learning_rate=1e-2)
    result = linear_segmentation_probe(_patch_task(24, 0), _patch_task(8, 1), num_classes=3, config=config)
    assert result["miou"] > 0.8
    assert len(result["per_class_iou"]) == 3


def test_linear_depth_probe_learns_depth_per_patch_class():
    features, classes = _patch_task(24, 0, num_classes=2)
    test_features, test_classes = _patch_task(8, 1, num_classes=2)
    depth_of = torch.tensor([1.0, 3.0])
    bins = DepthBinsConfig(num_bins=16, min_depth=0.1, max_depth=4.0)
    config = ProbeOptimConfig(iterations=200, batch_size=8, learning_rate=0.05, weight_decay=0.0)
    result = linear_depth_probe((features, depth_of[classes]), (test_features, depth_of[test_classes]), bins, config)
    assert result["abs_rel"] < 0.2 and result["delta1"] > 0.7


def _normals_task(n, seed, dim=16, grid=4):
    """Two regions facing +z or +x, readable from the first token channel."""
    gen = torch.Generator().manual_seed(seed)
    side = torch.randint(0, 2, (n, grid, grid), generator=gen)
    maps = torch.randn(n, 4, dim, grid, grid, generator=gen) * 0.1
    maps[:, :, 0] += side[:, None].float() * 3
    normals = torch.stack([side.float(), torch.zeros_like(side).float(), 1.0 - side.float()], dim=1)
    normals = normals.repeat_interleave(8, 2).repeat_interleave(8, 3)
    return IntermediateFeatures(maps, torch.randn(n, 4, 2, dim, generator=gen)), normals


def test_dpt_normals_probe_training_beats_the_untrained_decoder():
    dpt = DPTConfig(embed_dim=16, channels=16, readout_index=1)
    test_features, test_normals = _normals_task(4, 1)
    torch.manual_seed(0)
    untrained = evaluate_dense_probe(DPTNormalsDecoder(dpt), test_features, test_normals, NormalsMetric(), lambda n: n)
    torch.manual_seed(0)  # same initial decoder inside the probe
    config = replace(DPT_RECIPE.scaled(iterations=40, batch_size=4), learning_rate=1e-3)
    result = dpt_normals_probe(_normals_task(8, 0), (test_features, test_normals), dpt, config)
    assert result["mean"] < untrained["mean"] - 20.0
    assert result["num_pixels"] == untrained["num_pixels"] == 4 * 32 * 32


def _unlearning(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every gradient zeroed: it keeps (about) its random initialisation when trained."""
    for parameter in module.parameters():
        parameter.register_hook(torch.zeros_like)
    return module


def test_dpt_normals_probe_scores_the_restart_with_the_lowest_training_loss():
    dpt = DPTConfig(embed_dim=16, channels=16, readout_index=1)
    config = replace(DPT_RECIPE.scaled(iterations=40, batch_size=4), learning_rate=1e-3)
    test = _normals_task(4, 1)
    torch.manual_seed(0)
    stuck = _unlearning(DPTNormalsDecoder(dpt))  # restart 0 cannot learn
    result = dpt_normals_probe(_normals_task(8, 0), test, dpt, config, head=stuck, restarts=2)
    assert result["chosen_restart"] == 1
    assert result["restart_train_losses"][1] < result["restart_train_losses"][0]
    torch.manual_seed(0)
    alone = dpt_normals_probe(_normals_task(8, 0), test, dpt, config, head=_unlearning(DPTNormalsDecoder(dpt)))
    assert result["mean"] < alone["mean"] - 20.0
    # the head handed in now holds the chosen decoder: it scores what the probe reported
    again = evaluate_dense_probe(stuck, *test, NormalsMetric(), lambda n: n)
    assert again["mean"] == pytest.approx(result["mean"], rel=1e-5)
    with pytest.raises(ValueError, match="restarts >= 1, got 0"):
        dpt_normals_probe(_normals_task(8, 0), test, dpt, config, restarts=0)


def test_intermediate_features_feed_the_decoder_like_forward_intermediates():
    layers = [(torch.randn(2, 16, 2, 3), torch.randn(2, 2, 16)) for _ in range(4)]
    decoder = DPTSegmentationDecoder(DPTConfig(embed_dim=16, channels=8), num_classes=3).eval()
    with torch.no_grad():
        assert torch.equal(IntermediateFeatures.stack(layers).apply(decoder, (28, 42)), decoder(layers, (28, 42)))


def test_fit_rejects_features_and_targets_of_different_length():
    features, masks = _patch_task(4, 0)
    with pytest.raises(ValueError, match="4 feature rows but 3 targets"):
        fit_dense_probe(torch.nn.Identity(), features, masks[:3], segmentation_loss, LINEAR_SEGMENTATION_RECIPE)
