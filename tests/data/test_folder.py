"""A plain image folder with a captions jsonl / csv, or sidecar files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from tipstorch.data.folder import FolderDataset
from tipstorch.data.sample import CorruptSampleError


def _images(root: Path, names: list[str]) -> None:
    for index, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (10, 8), (index * 40, 0, 0)).save(path)


def test_jsonl_captions_are_read_with_keys_and_labels(tmp_path):
    _images(tmp_path, ["a.png", "sub/b.jpg"])
    rows = [
        {"image": "a.png", "alt": "noisy a", "spatial": "a left", "label": 2},
        {"file_name": "sub/b.jpg", "caption": "plain b"},
    ]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    dataset = FolderDataset(tmp_path, tmp_path / "captions.jsonl")
    samples = list(dataset)
    assert len(dataset) == 2
    assert [(s.key, s.captions, s.label) for s in samples] == [
        ("a", {"alt": "noisy a", "spatial": "a left"}, 2),
        ("sub/b", {"caption": "plain b"}, None),
    ]
    assert samples[0].image.size == (10, 8) and samples[0].image.mode == "RGB"


def test_csv_columns_can_be_renamed_to_caption_sources(tmp_path):
    _images(tmp_path, ["x.png"])
    (tmp_path / "c.csv").write_text("filepath,title,label\nx.png,a red thing,7\n")
    (sample,) = FolderDataset(tmp_path, tmp_path / "c.csv", rename={"title": "alt"})
    assert sample.captions == {"alt": "a red thing"} and sample.label == 7


def test_sidecar_json_and_txt_files_give_the_captions(tmp_path):
    _images(tmp_path, ["one.png", "two.png", "three.png"])
    (tmp_path / "one.json").write_text(json.dumps({"object": "a circle", "detailed": "long"}))
    (tmp_path / "two.txt").write_text("a square\n")
    dataset = FolderDataset(tmp_path)
    assert [(s.key, s.captions) for s in dataset] == [
        ("one", {"object": "a circle", "detailed": "long"}),
        ("two", {"caption": "a square"}),
    ]
    assert dataset.stats.skipped == 1  # three.png has no caption


def test_corrupt_and_missing_images_are_skipped_counted_and_logged(tmp_path, caplog):
    _images(tmp_path, ["good.png"])
    (tmp_path / "bad.jpg").write_bytes(b"definitely not a jpeg")
    rows = [{"image": n, "caption": "c"} for n in ("bad.jpg", "good.png", "gone.png")] + [
        {"caption": "no image"}
    ]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken json\n")
    with caplog.at_level(logging.WARNING, logger="tipstorch.data"):
        dataset = FolderDataset(tmp_path, tmp_path / "c.jsonl")
        keys = [s.key for s in dataset]
    assert keys == ["good"]
    assert dataset.stats.as_dict() == {"read": 1, "skipped": 4}
    assert "bad" in caplog.text and "gone" in caplog.text and "c.jsonl:5" in caplog.text


def test_indexing_a_corrupt_image_raises_an_error_naming_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"nope")
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "bad.png", "caption": "c"}))
    with pytest.raises(CorruptSampleError, match="bad.png: undecodable image"):
        FolderDataset(tmp_path, tmp_path / "c.jsonl")[0]


def test_ranks_get_disjoint_shares_of_the_files(tmp_path):
    names = [f"{i}.png" for i in range(7)]
    _images(tmp_path, names)
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"image": n, "caption": "c"}) for n in names))
    shares = [
        [s.key for s in FolderDataset(tmp_path, tmp_path / "c.jsonl", shuffle=True, rank=r, world_size=2)]
        for r in range(2)
    ]
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(str(i) for i in range(7))


def test_missing_folder_or_captions_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        FolderDataset(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="captions file not found"):
        FolderDataset(tmp_path, tmp_path / "nope.jsonl")
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(ValueError, match=r"\.jsonl, \.csv or \.tsv"):
        FolderDataset(tmp_path, tmp_path / "c.txt")
