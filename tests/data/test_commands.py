"""`tipstorch data write-shards` through its argument parser."""

from __future__ import annotations

import argparse
import json

import pytest
from PIL import Image

from tipstorch.cli.data import add_data_parser, run_data
from tipstorch.data.shards import ShardDataset


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tipstorch")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_write_shards_from_scenes(tmp_path, capsys):
    out = tmp_path / "out"
    code = _run(["data", "write-shards", "--from", "scenes", "--num", "7", "--seed", "3", "--image-size", "32",
                 "--out", str(out), "--shard-size", "3", "--format", "png"])  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 7 and summary["shards"] == [f"shard-00000{i}.tar" for i in range(3)]
    assert json.loads(capsys.readouterr().out) == summary
    samples = list(ShardDataset(out))
    assert [s.key for s in samples] == [f"scenes-3-{i}" for i in range(7)]
    assert set(samples[0].captions) == {"alt", "object", "spatial", "detailed"}
    assert samples[0].image.size == (32, 32) and isinstance(samples[0].label, int)


def test_write_shards_from_a_folder_with_renamed_csv_and_a_corrupt_image(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (12, 12), "red").save(folder / "a.png")
    (folder / "b.png").write_bytes(b"broken")
    captions = tmp_path / "c.csv"
    captions.write_text("filepath,title\na.png,red square\nb.png,broken one\n")
    out = tmp_path / "out"
    _run(["data", "write-shards", "--from-folder", str(folder), "--captions", str(captions),
          "--rename", "title=alt", "--out", str(out), "--format", "webp"])  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 1 and summary["skipped"] == 1 and summary["format"] == "webp"
    assert [(s.key, s.captions) for s in ShardDataset(out)] == [("a", {"alt": "red square"})]


def test_source_is_required_and_exclusive(tmp_path):
    with pytest.raises(SystemExit):
        _run(["data", "write-shards", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        _run(
            [
                "data",
                "write-shards",
                "--from",
                "scenes",
                "--from-folder",
                str(tmp_path),
                "--out",
                str(tmp_path),
            ]
        )


def test_bad_rename_is_reported(tmp_path):
    with pytest.raises(SystemExit, match="FIELD=SOURCE"):
        _run(
            [
                "data",
                "write-shards",
                "--from-folder",
                str(tmp_path),
                "--rename",
                "title",
                "--out",
                str(tmp_path),
            ]
        )


def test_run_data_is_the_dispatch_function():
    parser = argparse.ArgumentParser()
    add_data_parser(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["data", "write-shards", "--from", "scenes", "--out", "x"]).func is run_data
