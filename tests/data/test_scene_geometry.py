"""Scenes dense labels agree with each other: masks, depth, normals, occlusion, shading."""

from __future__ import annotations

import numpy as np
import pytest

from tipstorch.data.scenes import CURVED_SHAPES, ScenesConfig, ScenesDataset

SAMPLES = [ScenesDataset(ScenesConfig(image_size=96, seed=4)).sample(i) for i in range(40)]


def _depth_normals(depth: np.ndarray, pixel_size: float) -> tuple[np.ndarray, np.ndarray]:
    """Normals normalise(dd/dX, dd/dY, 1) from central differences (Y up), and where they are defined."""
    ddx = np.zeros_like(depth)
    ddy = np.zeros_like(depth)
    ddx[:, 1:-1] = (depth[:, 2:] - depth[:, :-2]) / (2 * pixel_size)
    ddy[1:-1, :] = -(depth[2:, :] - depth[:-2, :]) / (2 * pixel_size)
    normals = np.stack([ddx, ddy, np.ones_like(depth)], axis=-1)
    return normals / np.linalg.norm(normals, axis=-1, keepdims=True)


def _interior(mask: np.ndarray) -> np.ndarray:
    """Pixels of mask whose 4 neighbours are in the mask too (so central differences stay inside)."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    inner[[0, -1], :] = False
    inner[:, [0, -1]] = False
    return inner


def test_instance_and_class_masks_cover_the_same_pixels():
    for s in SAMPLES:
        assert np.array_equal(s.instance_mask > 0, s.class_mask > 0)


def test_each_instance_has_one_class_matching_its_shape():
    for s in SAMPLES:
        for obj in s.objects:
            classes = np.unique(s.class_mask[s.instance_mask == obj.instance_id])
            assert classes.tolist() == [ScenesDataset.class_names.index(obj.shape)]


def test_instance_ids_are_dense_and_ordered_by_visible_area():
    for s in SAMPLES:
        ids, counts = np.unique(s.instance_mask[s.instance_mask > 0], return_counts=True)
        assert ids.tolist() == list(range(1, len(s.objects) + 1))
        assert list(counts) == sorted(counts, reverse=True)
        assert [o.visible_pixels for o in s.objects] == counts.tolist()


def _floor_depth_per_row(sample) -> np.ndarray:
    """Depth of the floor in each row (the floor is level along rows), read off background pixels."""
    background = np.where(sample.instance_mask == 0, sample.depth, np.nan)
    return np.nanmax(background, axis=1)


def test_depth_is_positive_and_objects_are_nearer_than_the_floor_behind_them():
    for s in SAMPLES:
        assert (s.depth > 0).all()
        floor = np.broadcast_to(_floor_depth_per_row(s)[:, None], s.depth.shape)
        objects = (s.instance_mask > 0) & ~np.isnan(floor)
        assert (s.depth[objects] < floor[objects]).all()


def test_floor_depth_grows_towards_the_top_of_the_image():
    for s in SAMPLES[:10]:
        rows = _floor_depth_per_row(s)
        assert (np.diff(rows[~np.isnan(rows)]) < 0).all()


def test_normals_are_unit_and_face_the_camera():
    for s in SAMPLES:
        assert np.allclose(np.linalg.norm(s.normals, axis=-1), 1.0, atol=1e-5)
        assert (s.normals[..., 2] > 0).all()


def test_normals_match_the_depth_gradient_on_every_surface():
    for s in SAMPLES:
        estimated = _depth_normals(s.depth, s.pixel_size)
        for instance in range(0, int(s.instance_mask.max()) + 1):
            inner = _interior(s.instance_mask == instance)
            if inner.sum() < 10:
                continue
            cosine = (estimated[inner] * s.normals[inner]).sum(-1)
            assert np.median(cosine) > 0.995, (s.key, instance)
            assert (cosine > 0.9).mean() > 0.9, (s.key, instance)


def test_curved_objects_have_varying_normals_and_flat_ones_constant_normals():
    seen = set()
    for s in SAMPLES:
        for obj in s.objects:
            normals = s.normals[s.instance_mask == obj.instance_id]
            spread = normals.std(axis=0).max()
            if obj.shape in CURVED_SHAPES:
                assert spread > 0.1, (s.key, obj.shape)
            else:
                assert spread < 1e-5, (s.key, obj.shape)
            seen.add(obj.shape in CURVED_SHAPES)
    assert seen == {True, False}


def test_occluding_object_is_nearer_everywhere_and_touches_the_occluded_one():
    pairs = 0
    for s in SAMPLES:
        for front in s.objects:
            for back_id in front.occludes:
                front_mask, back_mask = s.instance_mask == front.instance_id, s.instance_mask == back_id
                assert s.depth[front_mask].max() < s.depth[back_mask].min()
                grown = front_mask.copy()
                grown[1:] |= front_mask[:-1]
                grown[:-1] |= front_mask[1:]
                grown[:, 1:] |= front_mask[:, :-1]
                grown[:, :-1] |= front_mask[:, 1:]
                assert (grown & back_mask).any()
                pairs += 1
    assert pairs > 3


def test_shading_brightens_curved_surfaces_that_face_the_light():
    light = np.array([-0.45, 0.55, 0.70])
    correlations = []
    for s in SAMPLES:
        image = np.asarray(s.image, dtype=np.float64).sum(-1)
        for obj in s.objects:
            if obj.shape in CURVED_SHAPES and obj.texture == "plain":
                mask = s.instance_mask == obj.instance_id
                facing = s.normals[mask] @ light
                correlations.append(np.corrcoef(facing, image[mask])[0, 1])
    assert correlations and min(correlations) > 0.8


@pytest.mark.parametrize("size", [(60, 100), (100, 60)])
def test_non_square_scenes_keep_objects_inside_the_image(size):
    dataset = ScenesDataset(ScenesConfig(image_size=size, seed=9))
    for index in range(5):
        sample = dataset.sample(index)
        assert sample.instance_mask.shape == size
        assert sample.instance_mask.max() == len(sample.objects) >= 1
