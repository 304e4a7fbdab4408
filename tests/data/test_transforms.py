"""Inference preprocessing, random resized crops and patch masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tipstorch.data.transforms import (
    CropBox,
    image_transform,
    pil_to_tensor,
    random_patch_mask,
    resized_crop,
    sample_crop_box,
)


@pytest.fixture
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))


def test_square_transform_is_pil_bilinear_resize_then_scaling_to_unit_range(photo):
    out = image_transform(56)(photo)
    expected = np.asarray(photo.resize((56, 56), Image.BILINEAR), dtype=np.float32) / 255.0
    assert out.shape == (3, 56, 56) and out.dtype == torch.float32
    assert torch.equal(out, torch.from_numpy(expected).permute(2, 0, 1))


def test_square_transform_converts_grey_and_rgba_to_rgb(photo):
    transform = image_transform(28)
    assert transform(photo.convert("L")).shape == (3, 28, 28)
    assert torch.equal(transform(photo.convert("RGBA")), transform(photo))


def test_keep_aspect_resizes_the_short_side_and_crops_to_patch_multiples(photo):
    out = image_transform(56, keep_aspect=True)(photo)  # 90x120 -> 56x75 -> 56x70
    assert out.shape == (3, 56, 70)
    resized = pil_to_tensor(photo.resize((75, 56), Image.BILINEAR))
    assert torch.equal(out, resized[:, :, 2:72])


def test_numpy_uint8_input_matches_pil_input(photo):
    transform = image_transform(42)
    assert torch.equal(transform(np.asarray(photo)), transform(photo))


def test_tensor_input_is_close_to_pil_and_keeps_the_batch(photo):
    transform = image_transform(42)
    single = pil_to_tensor(photo)
    out = transform(single)
    assert out.shape == (3, 42, 42)
    assert (out - transform(photo)).abs().mean() < 0.02
    assert transform(torch.stack([single, single])).shape == (2, 3, 42, 42)


def test_transform_refuses_float_numpy_and_non_patch_sizes(photo):
    with pytest.raises(ValueError, match="uint8"):
        image_transform(28)(np.asarray(photo, dtype=np.float32))
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        image_transform(100)


def test_crop_boxes_stay_inside_and_cover_the_scale_range():
    generator = torch.Generator().manual_seed(0)
    fractions = []
    for _ in range(300):
        box = sample_crop_box(90, 120, (0.05, 0.32), generator=generator)
        assert 0 <= box.top and box.top + box.height <= 90
        assert 0 <= box.left and box.left + box.width <= 120
        assert 3 / 4 - 0.05 <= box.width / box.height <= 4 / 3 + 0.05
        fractions.append(box.width * box.height / (90 * 120))
    assert 0.04 < min(fractions) < 0.08 and 0.28 < max(fractions) < 0.34


def test_crop_box_falls_back_to_a_centred_crop_when_nothing_fits():
    box = sample_crop_box(10, 200, (0.9, 1.0), generator=torch.Generator().manual_seed(0))
    assert box == CropBox(top=0, left=(200 - 13) // 2, height=10, width=13)


def test_resized_crop_has_the_size_and_flip_mirrors_it(photo):
    box = CropBox(10, 20, 60, 50)
    plain = np.asarray(resized_crop(photo, box, 28))
    mirrored = np.asarray(resized_crop(photo, box, 28, flip=True))
    assert plain.shape == (28, 28, 3)
    assert np.array_equal(mirrored, plain[:, ::-1])
    assert np.array_equal(plain, np.asarray(photo.crop((20, 10, 70, 70)).resize((28, 28), Image.BILINEAR)))


def test_patch_mask_masks_exactly_the_ratio_at_random_places():
    mask = random_patch_mask(8, 256, 0.75, torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (8, 256)
    assert (mask.sum(1) == 192).all()
    assert len({tuple(row.tolist()) for row in mask}) == 8
    # random, not blockwise: every patch is masked about 75% of the time over many images
    frequency = random_patch_mask(2000, 16, 0.75, torch.Generator().manual_seed(1)).float().mean(0)
    assert ((frequency - 0.75).abs() < 0.05).all()


def test_patch_mask_rejects_ratios_outside_unit_range():
    with pytest.raises(ValueError, match="mask_ratio"):
        random_patch_mask(1, 4, 1.5)
