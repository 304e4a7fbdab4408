"""Per-image dense predictions as arrays (depth, normals, zero-shot segmentation, PCA, image-text
similarity) and the colour mapping of depth / normals / label maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import tiny_tips
from tipstorch.eval.dense_predict import (
    class_areas,
    clean_labels,
    first_component,
    image_tensor,
    image_text_similarity,
    interior_up,
    pca_map,
    predict_depth,
    predict_normals,
    predict_segmentation,
    resize_to_patches,
    segmentation_class_names,
    upsampled_argmax,
    zero_shot_segmentation,
)
from tipstorch.models.dense import (
    DepthBinsConfig,
    DPTConfig,
    DPTDepthDecoder,
    DPTNormalsDecoder,
    DPTSegmentationDecoder,
)
from tipstorch.viz import (
    class_legend,
    class_map_figure,
    colour_map,
    depth_to_rgb,
    legend,
    normals_to_rgb,
    palette,
    segmentation_figure,
)
from tipstorch.weights.factory import get_tokenizer


@pytest.fixture(scope="module")
def model():
    return tiny_tips()


@pytest.fixture(scope="module")
def tokenizer(model):
    return get_tokenizer(model)


def _photo(width=45, height=31, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_resize_to_patches_keeps_the_whole_image_at_patch_multiples():
    resized = resize_to_patches(Image.new("RGB", (640, 480)), 224)
    assert resized.size == (294, 224)
    assert resize_to_patches(Image.new("RGB", (20, 500)), 14).size == (14, 350)


def test_predict_depth_is_the_head_on_the_resized_image_resized_back(model):
    torch.manual_seed(0)
    head = DPTDepthDecoder(
        DPTConfig(32, channels=8), DepthBinsConfig(num_bins=16, min_depth=0.5, max_depth=4.0)
    ).eval()
    image = _photo()
    depth = predict_depth(model, head, image)
    assert depth.shape == (31, 45) and depth.dtype == np.float32
    assert depth.min() >= 0.5 and depth.max() <= 4.0
    with torch.no_grad():
        layers = model.visual.forward_intermediates(
            image_tensor(model, image),
            indices=[0, 1, 2, 3],
            norm=True,
            return_prefix_tokens=True,
            intermediates_only=True,
        )
        expected = head(layers, image_size=(31, 45))[0, 0].numpy()
    np.testing.assert_allclose(depth, expected, rtol=1e-5, atol=1e-6)


def test_predict_normals_gives_unit_vectors_per_pixel(model):
    torch.manual_seed(0)
    normals = predict_normals(model, DPTNormalsDecoder(DPTConfig(32, channels=8)).eval(), _photo())
    assert normals.shape == (31, 45, 3)
    np.testing.assert_allclose(np.linalg.norm(normals, axis=-1), 1.0, atol=1e-5)


def test_a_head_of_another_width_is_refused(model):
    with pytest.raises(ValueError, match="reads 64-wide features but the model is 32 wide"):
        predict_depth(model, DPTDepthDecoder(DPTConfig(64, channels=8)).eval(), _photo())
    with pytest.raises(TypeError, match="expected a DPTNormalsDecoder"):
        predict_normals(model, DPTDepthDecoder(DPTConfig(32, channels=8)).eval(), _photo())


def test_upsampled_argmax_is_the_argmax_of_the_upsampled_logits():
    logits = torch.randn(11, 5, 7, generator=torch.Generator().manual_seed(0))
    full = torch.nn.functional.interpolate(logits[None], size=(23, 31), mode="bilinear", align_corners=False)
    for chunk in (1, 4, 11, 16):
        assert torch.equal(upsampled_argmax(logits, (23, 31), chunk=chunk), full[0].argmax(dim=0))
    tied = torch.zeros(3, 2, 2)
    assert upsampled_argmax(tied, (4, 4), chunk=1).eq(0).all()  # ties: the first class, as argmax


def test_predict_segmentation_is_the_head_on_the_resized_image_resized_back(model):
    torch.manual_seed(0)
    head = DPTSegmentationDecoder(DPTConfig(32, channels=8), num_classes=7).eval()
    image = _photo()
    classes = predict_segmentation(model, head, image)
    with torch.no_grad():
        layers = model.visual.forward_intermediates(
            image_tensor(model, image), indices=[0, 1, 2, 3], norm=True, return_prefix_tokens=True,
            intermediates_only=True,
        )  # fmt: skip
        logits = head(layers, image_size=(31, 45))[0]
    assert classes.shape == (31, 45) and classes.dtype == np.int64
    # bilinear upsampling of a chunk equals that of the whole; float noise may flip near-ties only
    assert (classes == logits.argmax(dim=0).numpy()).mean() > 0.99
    with pytest.raises(TypeError, match="expected a DPTSegmentationDecoder"):
        predict_segmentation(model, DPTDepthDecoder(DPTConfig(32, channels=8)).eval(), image)


def test_segmentation_classes_are_named_and_measured():
    names = segmentation_class_names(150)
    assert names[:3] == ["wall", "building", "sky"] and names[149] == "flag"
    assert segmentation_class_names(3) == ["class 0", "class 1", "class 2"]
    class_map = np.array([[2, 2, 2], [0, 2, 0]])
    assert class_areas(class_map, ["a", "b", "c"]) == {"c": 4 / 6, "a": 2 / 6}  # b is absent


def test_a_many_class_legend_lists_the_largest_classes_and_groups_the_rest():
    names = [f"n{i}" for i in range(150)]
    class_map = np.repeat(np.array([149, 3, 3, 3, 7, 7, 50, 60]), 4).reshape(4, 8)
    legend_map, labels, notes, colours = class_legend(class_map, names, max_legend=3)
    assert labels == ["n3", "n7", "3 other classes"] and notes == ["37.5%", "25.0%", "37.5%"]
    np.testing.assert_array_equal(colours[:2], palette(150)[[3, 7]])  # each class keeps its colour
    np.testing.assert_array_equal(legend_map, np.select([class_map == 3, class_map == 7], [0, 1], 2))
    _, labels, _, _ = class_legend(class_map, names)
    assert labels == ["n3", "n7", "n50", "n60", "n149"]  # ties: lower class first
    figure = class_map_figure(Image.new("RGB", (8, 4)), class_map, names, max_legend=3)
    assert figure.height == 448 and figure.width == 2 * 896 + legend(labels[:3], colours).width


def test_zero_shot_segmentation_probabilities_map_and_scores(model, tokenizer):
    result = zero_shot_segmentation(model, tokenizer, _photo(), ["red square", " blue circle ", "", "green"])
    assert result.labels == ["red square", "blue circle", "green"]
    assert result.label_map.shape == (31, 45) and result.probabilities.shape == (3, 31, 45)
    np.testing.assert_allclose(result.probabilities.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(result.label_map, result.probabilities.argmax(axis=0))
    scores = result.scores()
    assert sum(s["area"] for s in scores.values()) == pytest.approx(1.0)
    for index, label in enumerate(result.labels):
        assert scores[label]["mean_probability"] == pytest.approx(
            float(result.probabilities[index].mean()), rel=1e-5
        )


def test_zero_shot_segmentation_follows_the_label_order(model, tokenizer):
    forward = zero_shot_segmentation(model, tokenizer, _photo(), ["sky", "tree"])
    backward = zero_shot_segmentation(model, tokenizer, _photo(), ["tree", "sky"])
    np.testing.assert_array_equal(forward.label_map, 1 - backward.label_map)


@pytest.mark.parametrize("labels", [[], ["", "  "], ["cat", "cat "]])
def test_fewer_than_two_labels_is_an_error(labels):
    with pytest.raises(ValueError, match="at least 2 different non-empty labels"):
        clean_labels(labels)


def test_pca_map_covers_the_patch_grid(model):
    result = pca_map(model, _photo(70, 42), image_size=42)
    assert result.colours.shape == (3, 5, 3) and result.foreground is None
    assert result.colours.min() >= 0 and result.colours.max() <= 1


def test_foreground_is_the_interior_whatever_the_sign_of_the_component():
    expected = torch.zeros(6, 7, dtype=torch.bool)
    expected[2:4, 2:5] = True
    for sign in (1.0, -1.0):
        score = torch.where(expected, sign * 3.0, -sign * 1.0)
        assert torch.equal(interior_up(score) > 0.5, expected)
        assert interior_up(score).min() == 0 and interior_up(score).max() == 1
    generator = torch.Generator().manual_seed(0)
    foreground, background = torch.randn(16, generator=generator), torch.randn(16, generator=generator)
    tokens = background.expand(6, 7, 16).clone()
    tokens[expected] = foreground
    assert torch.equal(
        first_component(tokens + 0.01 * torch.randn(6, 7, 16, generator=generator)) > 0.5, expected
    )


def test_pca_foreground_threshold_blacks_out_the_background(model):
    result = pca_map(model, _photo(98, 98), image_size=98, fg_threshold=0.5)
    assert result.foreground is not None and result.foreground.any() and not result.foreground.all()
    assert (result.colours[~result.foreground] == 0).all()
    with pytest.raises(ValueError, match="lower the threshold"):
        pca_map(model, _photo(98, 98), image_size=98, fg_threshold=0.999999)


def test_image_text_similarity_is_the_cosine_of_the_cls_tokens(model, tokenizer):
    result = image_text_similarity(model, tokenizer, _photo(56, 56), ["a red square", "a blue circle"])
    assert result.probabilities.sum() == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        features = model.encode_image(image_tensor(model, _photo(56, 56)), normalize=True)
        text = torch.nn.functional.normalize(
            model.encode_text(tokenizer(["a red square", "a blue circle"])), dim=-1
        )
    np.testing.assert_allclose(result.global_cosine, (features.global_cls @ text.T)[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(result.spatial_cosine, (features.spatial_cls @ text.T)[0].numpy(), atol=1e-5)


# ------------------------------------------------------------------ colour mapping


def test_colour_map_runs_from_dark_to_light():
    colours = colour_map(np.linspace(0, 1, 50)).astype(int)
    brightness = colours.sum(axis=-1)
    assert brightness[0] < 20 and brightness[-1] > 600
    assert (np.diff(brightness) >= -2).all()


def test_depth_colours_put_near_dark_and_far_light():
    depth = np.tile(np.linspace(1.0, 5.0, 32), (8, 1))
    rgb = depth_to_rgb(depth)
    assert rgb.shape == (8, 32, 3) and rgb.dtype == np.uint8
    assert rgb[:, 0].sum() < rgb[:, -1].sum()


def test_normals_colours_are_half_plus_half_n():
    normals = np.array([[[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]]])
    np.testing.assert_array_equal(normals_to_rgb(normals), [[[128, 128, 255], [0, 128, 128]]])


def test_segmentation_figure_has_a_legend_row_per_label():
    labels = ["sky", "tree", "road"]
    key = legend(labels, palette(3))
    assert key.height == 8 + 22 * 3
    label_map = np.zeros((40, 60), dtype=np.int64)
    label_map[20:, :] = 2
    figure = segmentation_figure(Image.new("RGB", (60, 40), "white"), label_map, labels)
    assert figure.size == (2 * round(60 * 448 / 40) + key.width, 448)
    swatch = np.asarray(key)[4 + 2 * 22 + 10, 15]
    np.testing.assert_array_equal(swatch, palette(3)[2])
