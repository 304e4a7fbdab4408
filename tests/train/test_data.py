"""The training stream: the global batch is a function of the step, cut into rows by rank, so a resumed
stream is exact at any world size."""

import pytest
import torch

import tipstorch
from tests.train.loop_helpers import first, tiny_cfg
from tipstorch.data.scenes import ScenesConfig, ScenesDataset
from tipstorch.data.shards import write_shards
from tipstorch.train.data import BATCH_KEYS, EPOCH_KEY, BatchCollator, SceneBatches, training_batches

TOKENIZER = tipstorch.get_tokenizer("tips-tiny")


def batches(cfg, start: int, total: int, rank: int = 0, world_size: int = 1, local_batch: int = 4):
    return training_batches(cfg, TOKENIZER, 64, local_batch, seed=0, start_step=start, total_steps=total,
                            rank=rank, world_size=world_size)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() - {EPOCH_KEY} == b.keys() - {EPOCH_KEY} == set(BATCH_KEYS)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_batch_has_the_documented_shapes():
    batch = first(batches(tiny_cfg().data, 0, 1), 1)[0]
    assert batch["global_crop"].shape == (4, 3, 28, 28) and batch["local_crops"].shape == (4, 2, 3, 14, 14)
    assert batch["patch_mask"].shape == (4, 4) and batch["patch_mask"].dtype == torch.bool
    assert batch["alt_tokens"].shape == batch["synthetic_tokens"].shape == (4, 64)


def test_scenes_stream_started_at_a_step_equals_the_full_stream_from_that_step():
    cfg = tiny_cfg().data
    full = first(batches(cfg, 0, 6), 6)
    for got, expected in zip(first(batches(cfg, 3, 6), 3), full[3:], strict=True):
        assert_same(got, expected)


def test_consecutive_steps_draw_different_scenes_and_augmentations():
    one, two = first(batches(tiny_cfg().data, 0, 2), 2)
    assert not torch.equal(one["global_crop"], two["global_crop"])


def test_dataloader_workers_give_the_same_batches_as_the_main_process():
    cfg = tiny_cfg().data
    in_process = first(batches(cfg, 2, 5), 3)
    with_workers = first(batches(tiny_cfg("data.num_workers=2").data, 2, 5), 3)
    for got, expected in zip(with_workers, in_process, strict=True):
        assert_same(got, expected)


def test_ranks_read_disjoint_scenes_and_an_epoch_wraps_around():
    cfg = tiny_cfg("data.num_samples=16").data
    collator = BatchCollator(cfg, TOKENIZER, 64, seed=0, first_row=0)
    rank0, rank1 = (SceneBatches(cfg, collator, 4, rank, 2) for rank in (0, 1))
    assert rank0.sample_indices(0) == [0, 1, 2, 3] and rank1.sample_indices(0) == [4, 5, 6, 7]
    seen = {index for step in range(2) for ranks in (rank0, rank1) for index in ranks.sample_indices(step)}
    assert seen == set(range(16))
    assert rank0.sample_indices(2) == rank0.sample_indices(0)  # second epoch: same scenes, new crops


@pytest.mark.parametrize("workers", [0, 2])
def test_the_rows_of_two_ranks_are_the_global_batch_of_one_process(workers):
    cfg = tiny_cfg(f"data.num_workers={workers}").data
    whole = first(batches(cfg, 1, 3, local_batch=8), 2)
    halves = [first(batches(cfg, 1, 3, rank=rank, world_size=2), 2) for rank in (0, 1)]
    for step, expected in enumerate(whole):
        joined = {key: torch.cat([halves[0][step][key], halves[1][step][key]]) for key in BATCH_KEYS}
        assert_same(joined, expected)


def test_a_sample_is_augmented_the_same_whatever_the_other_samples_of_its_batch():
    cfg = tiny_cfg().data
    scenes = ScenesDataset(ScenesConfig(image_size=42, seed=0))
    samples = [scenes.sample(index) for index in range(4)]
    whole = BatchCollator(cfg, TOKENIZER, 64, seed=0, first_row=0)(samples, step=5)
    last = BatchCollator(cfg, TOKENIZER, 64, seed=0, first_row=3)(samples[3:], step=5)
    for key in BATCH_KEYS:
        assert torch.equal(whole[key][3:], last[key]), key
    other_step = BatchCollator(cfg, TOKENIZER, 64, seed=0, first_row=3)(samples[3:], step=6)
    assert not torch.equal(other_step["global_crop"], last["global_crop"])
    twice = BatchCollator(cfg, TOKENIZER, 64, seed=0, first_row=0)(samples[:1] * 2, step=5)
    assert not torch.equal(twice["global_crop"][0], twice["global_crop"][1])  # each row its own draws


def test_an_epoch_smaller_than_a_global_batch_is_rejected():
    cfg = tiny_cfg("data.num_samples=6").data
    with pytest.raises(ValueError, match=r"num_samples \(6\).*global batch \(8\)"):
        SceneBatches(cfg, BatchCollator(cfg, TOKENIZER, 64, 0, 0), 4, 0, 2)


def test_the_scenes_object_settings_reach_the_training_scenes():
    cfg = tiny_cfg("data.scenes_objects=[6,8]", "data.scenes_object_radius=[0.05,0.1]").data
    scenes = SceneBatches(cfg, BatchCollator(cfg, TOKENIZER, 64, 0, 0), 4, 0, 1).scenes
    assert (scenes.config.min_objects, scenes.config.max_objects) == (6, 8)
    assert scenes.config.object_radius == (0.05, 0.1)
    counts = [len(scenes.sample(index).objects) for index in range(8)]
    assert max(counts) > 4  # the default draws at most 4


def test_bad_scenes_object_settings_name_the_field():
    cfg = tiny_cfg("data.scenes_objects=[5,2]").data
    with pytest.raises(ValueError, match=r"min_objects <= max_objects.*5, 2"):
        SceneBatches(cfg, BatchCollator(cfg, TOKENIZER, 64, 0, 0), 4, 0, 1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    scenes = ScenesDataset(ScenesConfig(image_size=42, seed=7))
    write_shards((scenes.sample(i) for i in range(40)), folder, shard_size=10, image_format="png")
    return str(folder)


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_stream_resumed_at_a_step_equals_the_uninterrupted_stream(shards, workers):
    cfg = tiny_cfg(f"data.source={shards}", f"data.num_workers={workers}", "data.shuffle_buffer=8").data
    full = first(batches(cfg, 0, 14), 14)  # 14 batches of 4 = 56 samples: past the first epoch of 40
    for got, expected in zip(first(batches(cfg, 9, 14), 5), full[9:], strict=True):
        assert_same(got, expected)


def test_shard_stream_resumed_with_other_consumers_starts_the_next_epoch(shards):
    cfg = tiny_cfg(f"data.source={shards}", "data.num_workers=0", "data.shuffle_buffer=8").data
    full = first(batches(cfg, 0, 14), 14)  # 40 samples per epoch, 4 per batch: steps 0-9 are epoch 0
    assert [int(batch[EPOCH_KEY]) for batch in full] == [0] * 10 + [1] * 4
    # saved at step 5 in epoch 0 by 1 consumer, resumed by 2 ranks: their batches come from epoch 1 on
    resumed = [first(training_batches(cfg, TOKENIZER, 64, 2, seed=0, start_step=5, total_steps=8, rank=rank,
                                      world_size=2, start_epoch=1), 3) for rank in (0, 1)]
    assert all(int(batch[EPOCH_KEY]) == 1 for rank in resumed for batch in rank)
