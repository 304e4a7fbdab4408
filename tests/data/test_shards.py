"""WebDataset shards: round trip, corrupt members, rank x worker splitting, shuffling, resampling."""

from __future__ import annotations

import io
import itertools
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tipstorch.data.sample import ImageTextSample
from tipstorch.data.scenes import ScenesConfig, ScenesDataset
from tipstorch.data.shards import ShardDataset, expand_shards, write_shards
from tipstorch.data.streams import ReadStats


def _scenes(count: int, size: int = 32) -> list[ImageTextSample]:
    dataset = ScenesDataset(ScenesConfig(image_size=size, seed=0))
    return [dataset.sample(i) for i in range(count)]


def _key(sample: ImageTextSample) -> str:
    return sample.key


def _png(color: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _caption(text: str) -> bytes:
    return json.dumps({"caption": text}).encode()


@pytest.fixture(scope="module")
def eight_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(_scenes(40), out, shard_size=5, image_format="png")
    return out


def test_png_round_trip_keeps_pixels_captions_label_and_key(tmp_path):
    samples = _scenes(6)
    summary = write_shards(samples, tmp_path, shard_size=4, image_format="png")
    assert [p.name for p in summary.shards] == [
        "shard-000000.tar",
        "shard-000001.tar",
    ] and summary.samples == 6
    read = list(ShardDataset(tmp_path))
    assert [s.key for s in read] == [s.key for s in samples]
    for original, copy in zip(samples, read, strict=True):
        assert np.array_equal(np.asarray(copy.image), np.asarray(original.image))
        assert copy.captions == original.captions and copy.label == original.label
        assert copy.depth is None and copy.class_mask is None


@pytest.mark.parametrize("image_format", ["jpg", "webp"])
def test_lossy_formats_round_trip_closely(tmp_path, image_format):
    samples = _scenes(2, size=64)
    write_shards(samples, tmp_path, image_format=image_format, quality=95)
    assert list(tmp_path.glob("*.tar"))
    for original, copy in zip(samples, list(ShardDataset(tmp_path)), strict=True):
        difference = np.abs(np.asarray(copy.image, dtype=float) - np.asarray(original.image, dtype=float))
        assert difference.mean() < 4.0


def test_writing_equal_samples_twice_gives_identical_shards(tmp_path):
    write_shards(_scenes(3), tmp_path / "a", image_format="png")
    write_shards(_scenes(3), tmp_path / "b", image_format="png")
    assert (tmp_path / "a/shard-000000.tar").read_bytes() == (tmp_path / "b/shard-000000.tar").read_bytes()


def test_writer_refuses_duplicate_keys_and_replaces_dots(tmp_path):
    sample = ImageTextSample(image=Image.new("RGB", (4, 4)), captions={"caption": "x"}, key="img.001")
    write_shards([sample], tmp_path / "ok")
    assert [s.key for s in ShardDataset(tmp_path / "ok")] == ["img_001"]
    with pytest.raises(ValueError, match="duplicate sample key 'img_001'"):
        write_shards([sample, sample], tmp_path / "dup")


def test_corrupt_image_is_skipped_counted_and_logged_with_its_key(tmp_path, caplog):
    _write_tar(
        tmp_path / "s.tar",
        [
            ("good1.png", _png()),
            ("good1.json", _caption("one")),
            ("broken.jpg", b"\xff\xd8\xff not really a jpeg"),
            ("broken.json", _caption("two")),
            ("good2.png", _png()),
            ("good2.json", _caption("three")),
        ],
    )
    dataset = ShardDataset(tmp_path / "s.tar")
    with caplog.at_level(logging.WARNING, logger="tipstorch.data"):
        keys = [s.key for s in dataset]
    assert keys == ["good1", "good2"]
    assert dataset.stats.skipped == 1 and dataset.stats.read == 2
    assert "broken" in caplog.text and "undecodable image" in caplog.text


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        ([("x.json", _caption("no image"))], "no image member"),
        ([("x.png", _png()), ("x.json", b"{not json")], "bad json"),
        ([("x.png", _png()), ("x.json", json.dumps({"alt": ""}).encode())], "no caption"),
        ([("x.png", _png()), ("x.json", json.dumps({"spatial": "  \n", "caption": None}).encode())], "no caption"),
        ([("x.png", _png())], "no caption"),
        ([("x.png", _png()), ("x.json", json.dumps({"caption": "c", "label": "cat"}).encode())], "label"),
    ],
)
def test_other_bad_samples_are_skipped_with_the_reason(tmp_path, caplog, members, reason):
    _write_tar(tmp_path / "s.tar", [*members, ("ok.png", _png()), ("ok.txt", b"a caption from img2dataset")])
    dataset = ShardDataset(tmp_path / "s.tar")
    with caplog.at_level(logging.WARNING, logger="tipstorch.data"):
        read = list(dataset)
    assert [(s.key, s.captions) for s in read] == [("ok", {"caption": "a caption from img2dataset"})]
    assert dataset.stats.skipped == 1 and reason in caplog.text


def test_truncated_shard_keeps_its_readable_samples_and_counts_the_damage(tmp_path, eight_shards):
    data = (eight_shards / "shard-000000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) * 2 // 3])
    dataset = ShardDataset(tmp_path / "cut.tar")
    read = list(dataset)
    assert 1 <= len(read) < 5
    assert dataset.stats.skipped >= 1


def test_two_ranks_with_two_workers_each_read_every_sample_once(eight_shards):
    keys: list[str] = []
    for rank in range(2):
        dataset = ShardDataset(
            eight_shards, shuffle_shards=True, shuffle_buffer=4, seed=1, rank=rank, world_size=2
        )
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2, collate_fn=_key)
        keys += list(loader)
    assert len(keys) == 40
    assert sorted(keys) == sorted(s.key for s in _scenes(40))


def test_skips_in_dataloader_workers_reach_the_callers_stats(tmp_path):
    for index in range(2):
        _write_tar(
            tmp_path / f"s{index}.tar",
            [(f"ok{index}.png", _png()), (f"ok{index}.json", _caption("c")), (f"bad{index}.png", b"garbage")],
        )
    stats = ReadStats()
    dataset = ShardDataset(sorted(str(p) for p in tmp_path.glob("*.tar")), stats=stats)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2, collate_fn=_key)
    assert sorted(loader) == ["ok0", "ok1"]
    assert stats.as_dict() == {"read": 2, "skipped": 2}


def test_shuffle_buffer_reorders_but_keeps_every_sample(eight_shards):
    ordered = [s.key for s in ShardDataset(eight_shards)]
    shuffled = [s.key for s in ShardDataset(eight_shards, shuffle_buffer=16, seed=0)]
    assert shuffled != ordered and sorted(shuffled) == sorted(ordered)
    assert shuffled == [s.key for s in ShardDataset(eight_shards, shuffle_buffer=16, seed=0)]


def test_epochs_change_the_shard_order_identically_on_all_ranks(eight_shards):
    def first_keys(epoch: int, rank: int) -> list[str]:
        dataset = ShardDataset(eight_shards, shuffle_shards=True, seed=0, rank=rank, world_size=2)
        dataset.set_epoch(epoch)
        return [s.key for s in dataset]

    epoch0 = first_keys(0, 0) + first_keys(0, 1)
    epoch1 = first_keys(1, 0) + first_keys(1, 1)
    assert len(set(epoch0)) == len(set(epoch1)) == 40
    assert epoch0 != epoch1


def test_resampled_stream_is_endless_and_differs_between_ranks(eight_shards):
    streams = [
        [
            s.key
            for s in itertools.islice(ShardDataset(eight_shards, resampled=True, rank=r, world_size=2), 60)
        ]
        for r in range(2)
    ]
    assert all(len(keys) == 60 for keys in streams)
    assert len(set(streams[0])) < 60  # drawn with replacement
    assert streams[0] != streams[1]


def test_expand_shards_reads_brace_patterns_and_names_missing_files(eight_shards, tmp_path):
    pattern = str(eight_shards / "shard-{000000..000007}.tar")
    assert expand_shards(pattern) == expand_shards(eight_shards)
    with pytest.raises(FileNotFoundError, match="1 shard"):
        expand_shards(str(eight_shards / "shard-{000007..000008}.tar"))
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        expand_shards(tmp_path)


def test_writer_refuses_a_sample_without_captions(tmp_path):
    sample = ImageTextSample(image=Image.new("RGB", (4, 4)), captions={"alt": "  "}, key="empty")
    with pytest.raises(ValueError, match="sample 'empty' has no caption"):
        write_shards([sample], tmp_path)
