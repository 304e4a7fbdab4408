"""Raw shard records: read back byte for byte, written atomically, keys split as webdataset does."""

from __future__ import annotations

import io
import tarfile

import pytest

from tipstorch.data.records import iter_records, split_member_name, write_record_shards, write_shard_atomic
from tipstorch.data.shards import ShardDataset


def _records(count: int) -> list[dict[str, object]]:
    return [{"__key__": f"s{i:03d}", "jpg": bytes([i]) * 50, "json": b'{"alt": "x"}'} for i in range(count)]


def test_records_round_trip_byte_for_byte_across_shards(tmp_path):
    summary = write_record_shards(_records(7), tmp_path, shard_size=3)
    assert [p.name for p in summary.shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [r for p in summary.shards for r in iter_records(p)] == _records(7)


def test_member_names_split_at_the_first_dot_of_the_file_name():
    assert split_member_name("a/b.c/key.seg.png") == ("a/b.c/key", "seg.png")
    with pytest.raises(ValueError, match="'noext' has no '<key>.<extension>' name"):
        split_member_name("noext")


def test_a_failed_write_leaves_no_shard_behind(tmp_path):
    def failing():
        yield from _records(2)
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_shard_atomic(failing(), tmp_path / "out.tar")
    assert list(tmp_path.iterdir()) == []


def test_duplicate_keys_are_refused(tmp_path):
    with pytest.raises(ValueError, match="duplicate sample key 's000'"):
        write_record_shards(_records(2) + _records(1), tmp_path, shard_size=10)


def test_written_records_are_read_by_the_training_reader(tmp_path):
    from tests.engine.fakes import colour_record

    write_record_shards([colour_record("a", "red", 0), colour_record("b", "green", 1)], tmp_path)
    assert [s.key for s in ShardDataset(tmp_path)] == ["a", "b"]


def test_members_of_one_key_in_a_foreign_tar_form_one_record(tmp_path):
    path = tmp_path / "foreign.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("k1.jpg", b"1"), ("k1.txt", b"t"), ("k2.jpg", b"2")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert list(iter_records(path)) == [
        {"__key__": "k1", "jpg": b"1", "txt": b"t"},
        {"__key__": "k2", "jpg": b"2"},
    ]
