"""Zero-shot classification / segmentation: classifier, values readout, sliding windows, evaluation."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from tests.helpers import assert_close_to_scale
from tipstorch.data.sample import CorruptSampleError
from tipstorch.eval.zeroshot import (
    ZeroShotSegConfig,
    build_text_classifier,
    evaluate_zero_shot_segmentation,
    probs_to_labels,
    segmentation_classifier,
    short_side_resize,
    sliding_window_probs,
    sliding_windows,
    values_readout,
    zero_shot_classification,
)

# ------------------------------------------------------------------ text classifier


def test_text_classifier_is_the_renormalised_mean_of_normalised_prompts(text_tower):
    encoder, tokenizer = text_tower
    templates = ("a photo of a {}.", "art of the {}.", "{}")
    classifier = build_text_classifier(encoder, tokenizer, ["cat", "dog house"], templates, batch_size=2)
    with torch.no_grad():
        for row, name in enumerate(["cat", "dog house"]):
            prompts = F.normalize(encoder(tokenizer([t.format(name) for t in templates])), dim=-1)
            expected = F.normalize(prompts.mean(0), dim=-1)
            assert torch.allclose(classifier[row], expected, atol=1e-6)
    assert classifier.shape == (2, 8)


def test_template_without_slot_is_rejected(text_tower):
    encoder, tokenizer = text_tower
    with pytest.raises(ValueError, match="a photo"):
        build_text_classifier(encoder, tokenizer, ["cat"], ["a photo"])


def test_segmentation_classifier_uses_the_configured_template_set(text_tower):
    encoder, tokenizer = text_tower
    tcl = segmentation_classifier(encoder, tokenizer, ["cat"], ZeroShotSegConfig())
    imagenet = segmentation_classifier(encoder, tokenizer, ["cat"], ZeroShotSegConfig(templates="imagenet80"))
    assert not torch.allclose(tcl, imagenet)


def test_zero_shot_classification_picks_the_most_similar_class():
    classifier = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    features = torch.tensor([[2.0, 0.1], [0.1, 3.0], [1.0, 1.2], [5.0, 0.0]])
    labels = torch.tensor([0, 1, 2, 1])
    # predictions 0, 1, 2, 0 -> 3/4 top-1; the last label 1 is the 3rd choice (cos 0 < cos 0.707)
    assert zero_shot_classification(features, labels, classifier, ks=(1, 2, 3)) == pytest.approx(
        {"top1": 0.75, "top2": 0.75, "top3": 1.0}
    )


# ------------------------------------------------------------------ values readout


def test_values_readout_equals_last_block_with_self_only_attention(tiny_vit):
    images = torch.rand(2, 3, 28, 42)
    with torch.no_grad():
        readout = values_readout(tiny_vit, images)
        tiny_vit.blocks[-1].attn.self_only = True
        reference = tiny_vit.forward_tokens(images)[:, 2:].reshape(2, 2, 3, -1)
    assert readout.shape == (2, 2, 3, 16)
    assert_close_to_scale(readout, reference)


def test_values_readout_differs_from_the_ordinary_forward(tiny_vit):
    images = torch.rand(1, 3, 28, 28)
    with torch.no_grad():
        ordinary = tiny_vit.forward_tokens(images)[:, 2:].reshape(1, 2, 2, -1)
        assert not torch.allclose(values_readout(tiny_vit, images), ordinary, atol=1e-3)


# ------------------------------------------------------------------ windows and resizing


def test_sliding_windows_match_the_notebook_grid_for_an_ade_image():
    # ADE image resized to 448 x 597 (notebook log): one row, two columns, the last shifted back
    assert sliding_windows(448, 597, window=448, stride=336) == [(0, 448, 0, 448), (0, 448, 149, 597)]


@pytest.mark.parametrize(("height", "width", "window", "stride"), [(448, 1000, 448, 336), (50, 30, 28, 14), (20, 90, 28, 14)])
def test_sliding_windows_cover_the_image_with_equal_boxes(height, width, window, stride):
    covered = np.zeros((height, width), dtype=int)
    boxes = sliding_windows(height, width, window, stride)
    for y1, y2, x1, x2 in boxes:
        assert (y2 - y1, x2 - x1) == (min(window, height), min(window, width))
        covered[y1:y2, x1:x2] += 1
    assert covered.min() >= 1


@pytest.mark.parametrize(("size", "expected"), [((600, 400), (672, 448)), ((400, 601), (448, 673)), ((448, 500), (448, 500))])
def test_short_side_resize_matches_notebook_rounding(size, expected):
    assert short_side_resize(Image.new("RGB", size), 448).size == expected


def _window_mean_colour(images):
    """Dense stand-in: every patch of a window gets the window's mean colour."""
    b, _, h, w = images.shape
    return images.mean(dim=(2, 3))[:, None, None, :].expand(b, h // 14, w // 14, 3)


RED_GREEN = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), dim=-1)


def test_overlapping_window_probabilities_are_averaged():
    image = torch.zeros(3, 28, 56)
    image[0, :, :28] = 1.0  # red left half
    image[1, :, 28:] = 1.0  # green right half
    config = ZeroShotSegConfig(window=28, stride=14, window_batch_size=2)
    probs = sliding_window_probs(_window_mean_colour, image, RED_GREEN, config)
    e = math.e
    red, mixed, green = e / (1 + e), 0.5, 1 / (1 + e)  # P(red) in windows at x = 0, 14, 28
    expected_red = [red, (red + mixed) / 2, (mixed + green) / 2, green]
    for block, value in enumerate(expected_red):
        assert torch.allclose(probs[0, :, 14 * block : 14 * (block + 1)], torch.tensor(value), atol=1e-6)
    assert torch.allclose(probs.sum(0), torch.ones(28, 56), atol=1e-6)


def test_windows_are_resized_to_a_multiple_of_the_patch_size():
    seen = []

    def encoder(images):
        seen.append(tuple(images.shape[-2:]))
        return _window_mean_colour(images)

    probs = sliding_window_probs(encoder, torch.rand(3, 30, 40), RED_GREEN, ZeroShotSegConfig(window=30, stride=20))
    assert seen == [(42, 42)] and probs.shape == (2, 30, 40)


def test_background_threshold_marks_uncertain_pixels_as_background():
    probs = torch.tensor([[[0.9, 0.4]], [[0.1, 0.35]], [[0.0, 0.25]]])  # [C=3, 1, 2]
    assert probs_to_labels(probs, (1, 2)).tolist() == [[0, 0]]
    assert probs_to_labels(probs, (1, 2), background_threshold=0.5).tolist() == [[1, 0]]


# ------------------------------------------------------------------ evaluation loop


class RedGreenScenes(Dataset):
    """Red-left / green-right images with exact labels (offset + 0 red, offset + 1 green); sample 1 is corrupt."""

    def __init__(self, label_offset=0):
        self.label_offset = label_offset

    def __len__(self):
        return 3

    def __getitem__(self, index):
        if index == 1:
            raise CorruptSampleError("scene_1.jpg", "truncated")
        array = np.zeros((28, 56, 3), dtype=np.uint8)
        array[:, :28, 0] = 255
        array[:, 28:, 1] = 255
        labels = np.full((28, 56), self.label_offset, dtype=np.int64)
        labels[:, 28:] += 1
        labels[0, 0] = 255
        return Image.fromarray(array), labels


def _patch_colour(images):
    return F.avg_pool2d(images, 14).permute(0, 2, 3, 1)


def test_zero_shot_segmentation_evaluation_with_a_perfect_encoder():
    config = ZeroShotSegConfig(short_side=28, window=28, stride=14)
    result = evaluate_zero_shot_segmentation(_patch_colour, RedGreenScenes(), RED_GREEN, config)
    assert result["miou"] == pytest.approx(1.0)
    assert result["num_images"] == 2 and result["num_skipped"] == 1


@pytest.mark.parametrize(("threshold", "expected_miou"), [(0.6, 1.0), (0.99999, 0.0)])
def test_zero_shot_segmentation_with_background_shifts_classes(threshold, expected_miou):
    # ground truth 0 = background, 1 = red, 2 = green; at logit scale 10 the best class has p ~ 0.99995
    config = ZeroShotSegConfig(short_side=28, window=28, stride=14, logit_scale=10.0, background_threshold=threshold)
    result = evaluate_zero_shot_segmentation(_patch_colour, RedGreenScenes(label_offset=1), RED_GREEN, config)
    assert len(result["per_class_iou"]) == 3
    assert result["miou"] == pytest.approx(expected_miou)
