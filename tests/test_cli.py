"""The inference commands of the ``tipstorch`` CLI, run as a user would (random tiny model, no download)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import tipstorch
from tipstorch.cli import main
from tipstorch.weights.factory import scenes_tokenizer_path

EXAMPLE = str(scenes_tokenizer_path().with_name("example_scene.png"))


def test_models_lists_every_registered_name(capsys):
    main(["models"])
    out = capsys.readouterr().out
    for name in tipstorch.list_models():
        assert name in out
    main(["models", "--pretrained"])
    assert "tips-tiny" not in capsys.readouterr().out


def test_encode_writes_features_of_every_image(tmp_path):
    other = tmp_path / "other.jpg"
    Image.new("RGB", (300, 200), (200, 30, 30)).save(other)
    out = tmp_path / "feats.safetensors"
    main(["encode", EXAMPLE, str(other), "--model", "tips-tiny", "--random", "--out", str(out), "--image-size", "112"])
    with safe_open(str(out), framework="pt") as handle:
        assert handle.get_tensor("global_cls").shape == (2, 192)
        assert handle.get_tensor("spatial_cls").shape == (2, 192)
        assert handle.get_tensor("patch_tokens").shape == (2, 8, 8, 192)
        assert EXAMPLE in handle.metadata()["images"]


def test_encode_matches_the_python_api(tmp_path):
    checkpoint = tipstorch.save_model(tipstorch.create_model("tips-tiny"), tmp_path / "tiny.safetensors")
    out = tmp_path / "feats.safetensors"
    main(["encode", EXAMPLE, "--model", str(checkpoint), "--out", str(out), "--normalize"])
    model = tipstorch.load_model(checkpoint)
    image = tipstorch.image_transform(224)(Image.open(EXAMPLE).convert("RGB"))[None]
    with torch.inference_mode(), safe_open(str(out), framework="pt") as handle:
        expected = model.encode_image(image, normalize=True).patch_tokens
        torch.testing.assert_close(handle.get_tensor("patch_tokens"), expected)


def test_classify_prints_a_ranked_table_of_probabilities(capsys):
    main(["classify", EXAMPLE, "--model", "tips-tiny", "--random", "--labels", "circle, star ,square"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["rank", "label", "probability"]
    rows = [line.split() for line in lines[1:]]
    assert sorted(row[1] for row in rows) == ["circle", "square", "star"]
    probabilities = [float(row[2]) for row in rows]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-3)


def test_unreadable_image_is_one_clear_error(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(SystemExit, match="broken.jpg: not an image file"):
        main(["classify", str(broken), "--model", "tips-tiny", "--random", "--labels", "a,b"])


@pytest.mark.parametrize("fmt", ["tipstorch", "transformers", "official"])
def test_convert_writes_a_loadable_checkpoint(tmp_path, fmt):
    out = tmp_path / ("model.safetensors" if fmt == "tipstorch" else "model")
    main(["convert", "--model", "tips-tiny", "--random", "--to", fmt, "--out", str(out)])
    target = out / "model_vision.npz" if fmt == "official" else out
    config = tipstorch.create_model("tips-tiny").config  # npz files carry no config for non-released widths
    model = tipstorch.load_model(target, config=config if fmt == "official" else None)
    assert model.config.vision.embed_dim == 192
    assert model.encode_image(torch.rand(1, 3, 28, 28)).patch_tokens.shape == (1, 2, 2, 192)


def test_module_entry_point_runs():
    source_root = str(Path(tipstorch.__file__).parents[1])
    environment = {**os.environ, "PYTHONPATH": source_root}
    result = subprocess.run([sys.executable, "-m", "tipstorch.cli", "models"], capture_output=True, text=True,
                            check=True, env=environment)
    assert "tipsv2-b14" in result.stdout


def test_data_write_shards_is_wired_into_the_cli(tmp_path):
    from tipstorch.data.shards import ShardDataset, expand_shards

    main(["data", "write-shards", "--from", "scenes", "--num", "5", "--image-size", "56", "--shard-size", "2",
          "--out", str(tmp_path / "shards")])
    shards = sorted((tmp_path / "shards").glob("*.tar"))
    assert len(shards) == 3
    samples = list(ShardDataset(expand_shards([str(path) for path in shards])))
    assert len(samples) == 5 and all(sample.captions["spatial"] for sample in samples)


def test_pca_writes_image_and_component_map_side_by_side(tmp_path, capsys):
    main(["pca", EXAMPLE, "--model", "tips-tiny", "--random", "--image-size", "112", "--out", str(tmp_path)])
    picture = Image.open(tmp_path / "example_scene_pca.png")
    assert picture.size == (896, 448)  # image and 8x8 map, each scaled to 448 high
    right = np.asarray(picture)[:, 448:]
    assert right.std() > 10  # the component map is not flat
    assert "8x8 patches" in capsys.readouterr().out


def test_segment_writes_an_overlay_and_an_area_table(tmp_path, capsys):
    out = tmp_path / "seg.png"
    main(["segment", EXAMPLE, "--model", "tips-tiny", "--random", "--labels", "circle,star,floor",
          "--image-size", "112", "--out", str(out)])
    assert Image.open(out).size == (896 + 260, 448)  # image, overlay (448 high each), legend
    rows = capsys.readouterr().out.strip().splitlines()[2:]
    assert [row.split()[0] for row in rows] == ["circle", "star", "floor"]
    assert sum(float(row.split()[-1].rstrip("%")) for row in rows) == pytest.approx(100, abs=0.5)
