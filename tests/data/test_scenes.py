"""ScenesDataset: the sample contract, determinism by seed, resolution independence, streaming."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tipstorch.data.sample import ImageTextSample
from tipstorch.data.scenes import SHAPES, ScenesConfig, ScenesDataset, ScenesStream


def _same(a: ImageTextSample, b: ImageTextSample) -> bool:
    return (
        np.array_equal(np.asarray(a.image), np.asarray(b.image))
        and a.captions == b.captions
        and np.array_equal(a.class_mask, b.class_mask)
        and np.array_equal(a.instance_mask, b.instance_mask)
        and np.array_equal(a.depth, b.depth)
        and np.array_equal(a.normals, b.normals)
        and a.label == b.label
    )


def test_sample_fields_have_the_contract_types_and_shapes():
    sample = ScenesDataset(ScenesConfig(image_size=(64, 96), seed=3), length=4)[1]
    assert sample.image.mode == "RGB" and sample.image.size == (96, 64)
    assert set(sample.captions) == {"alt", "object", "spatial", "detailed"}
    assert all(isinstance(t, str) and t for t in sample.captions.values())
    assert sample.class_mask.dtype == np.int64 and sample.class_mask.shape == (64, 96)
    assert sample.instance_mask.dtype == np.int64 and sample.instance_mask.shape == (64, 96)
    assert sample.depth.dtype == np.float32 and sample.depth.shape == (64, 96)
    assert sample.normals.dtype == np.float32 and sample.normals.shape == (64, 96, 3)
    assert isinstance(sample.label, int) and 0 <= sample.label < len(ScenesDataset.label_names)


def test_class_names_start_with_background_then_the_shapes():
    assert ScenesDataset.class_names[0] == "background"
    assert ScenesDataset.class_names[1:] == list(SHAPES) == ScenesDataset.label_names
    assert {"circle", "ellipse", "ring", "crescent"} <= set(SHAPES)


def test_same_seed_and_index_give_the_same_sample():
    a = ScenesDataset(ScenesConfig(image_size=48, seed=7)).sample(11)
    b = ScenesDataset(ScenesConfig(image_size=48, seed=7)).sample(11)
    assert _same(a, b)


def test_other_seed_or_index_gives_another_sample():
    base = ScenesDataset(ScenesConfig(image_size=48, seed=7))
    assert not _same(base.sample(11), base.sample(12))
    assert not _same(base.sample(11), ScenesDataset(ScenesConfig(image_size=48, seed=8)).sample(11))


def test_scene_content_does_not_depend_on_resolution():
    small = ScenesDataset(ScenesConfig(image_size=112, seed=2))
    large = ScenesDataset(ScenesConfig(image_size=224, seed=2))
    for index in range(5):
        a, b = small.sample(index), large.sample(index)
        assert a.label == b.label
        assert [(o.shape, o.colour) for o in a.objects] == [(o.shape, o.colour) for o in b.objects]
        # masks agree up to boundary pixels
        downsampled = b.class_mask[1::2, 1::2]
        assert (downsampled == a.class_mask).mean() > 0.97


def test_label_is_the_shape_of_the_object_with_most_visible_pixels():
    dataset = ScenesDataset(ScenesConfig(image_size=64, seed=5))
    for index in range(20):
        sample = dataset.sample(index)
        ids, counts = np.unique(sample.instance_mask[sample.instance_mask > 0], return_counts=True)
        largest = ids[np.argmax(counts)]
        shape_class = np.unique(sample.class_mask[sample.instance_mask == largest])
        assert shape_class.tolist() == [sample.label + 1]


def test_every_object_count_from_one_to_four_occurs():
    dataset = ScenesDataset(ScenesConfig(image_size=48, seed=0))
    counts = {int(dataset.sample(i).instance_mask.max()) for i in range(60)}
    assert counts == {1, 2, 3, 4}


def test_bounded_dataset_indexes_like_a_sequence():
    dataset = ScenesDataset(ScenesConfig(image_size=32), length=3)
    assert len(dataset) == 3
    assert _same(dataset[-1], dataset.sample(2))
    with pytest.raises(IndexError):
        dataset[3]


def test_unbounded_dataset_has_no_length():
    with pytest.raises(TypeError, match="unbounded"):
        len(ScenesDataset(ScenesConfig(image_size=32)))


def test_config_rejects_bad_values_with_the_field_name():
    with pytest.raises(ValueError, match="max_objects"):
        ScenesConfig(min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="image_size"):
        ScenesConfig(image_size=8)


def test_stream_gives_disjoint_indices_to_ranks():
    config = ScenesConfig(image_size=32, seed=1)
    keys = []
    for rank in range(2):
        stream = iter(ScenesStream(config, rank=rank, world_size=2))
        keys.append([next(stream).key for _ in range(3)])
    assert keys == [[f"scenes-1-{i}" for i in (0, 2, 4)], [f"scenes-1-{i}" for i in (1, 3, 5)]]


def test_stream_splits_across_dataloader_workers_without_duplicates():
    loader = torch.utils.data.DataLoader(
        ScenesStream(ScenesConfig(image_size=32), rank=0, world_size=1),
        batch_size=None,
        num_workers=2,
        collate_fn=lambda s: s.key,
    )
    keys = []
    for key in loader:
        keys.append(key)
        if len(keys) == 12:
            break
    assert len(set(keys)) == 12
    assert {int(k.rsplit("-", 1)[1]) for k in keys} == set(range(12))
