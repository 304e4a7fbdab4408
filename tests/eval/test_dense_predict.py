"""Per-image dense predictions as arrays (depth, normals, zero-shot segmentation, PCA, image-text
similarity), untrusted image files, and the colour mapping of depth / normals / label maps."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import tiny_tips
from tipstorch.data.image_files import ImageFileError, read_image
from tipstorch.eval.dense_predict import (
    clean_labels,
    first_component,
    image_tensor,
    image_text_similarity,
    interior_up,
    pca_map,
    predict_depth,
    predict_normals,
    resize_to_patches,
    zero_shot_segmentation,
)
from tipstorch.models.dense import DepthBinsConfig, DPTConfig, DPTDepthDecoder, DPTNormalsDecoder
from tipstorch.viz import colour_map, depth_to_rgb, legend, normals_to_rgb, palette, segmentation_figure
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


# ------------------------------------------------------------------ untrusted image files


def _png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_read_image_decodes_rgb(tmp_path):
    (tmp_path / "a.png").write_bytes(_png_bytes(Image.new("L", (5, 4), 128)))
    image = read_image(tmp_path / "a.png")
    assert image.mode == "RGB" and image.size == (5, 4)
    assert read_image(_png_bytes(Image.new("RGB", (3, 2)))).size == (3, 2)


def test_read_image_refuses_what_is_not_an_image(tmp_path):
    (tmp_path / "notes.png").write_text("hello, not a picture")
    with pytest.raises(ImageFileError, match="notes.png: not an image file"):
        read_image(tmp_path / "notes.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageFileError, match="empty.jpg: the file is empty"):
        read_image(tmp_path / "empty.jpg")
    with pytest.raises(ImageFileError, match="no such file"):
        read_image(tmp_path / "absent.png")
    whole = _png_bytes(_photo(64, 64))
    with pytest.raises(ImageFileError, match="damaged or truncated"):
        read_image(whole[: len(whole) // 2], name="cut.png")


def test_read_image_refuses_a_decompression_bomb_before_decoding_it():
    bomb = _png_bytes(Image.new("1", (9_000, 5_000)))  # 45 Mpx of zeros: a few kB of PNG
    assert len(bomb) < 100_000
    with pytest.raises(ImageFileError, match="9000 x 5000 = 45,000,000 pixels is more than the limit"):
        read_image(bomb, name="bomb.png")
    with pytest.raises(ImageFileError, match="more than the limit of 100"):
        read_image(_png_bytes(Image.new("RGB", (20, 20))), max_pixels=100)


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
