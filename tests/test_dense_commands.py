"""``tipstorch depth | normals | segment | pca`` as a user runs them (random tiny model, head files, no download)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.eval.test_dense_heads import _flax_layout, _write_zip
from tipstorch.cli import main
from tipstorch.data.formats import ADE20K_CLASS_NAMES
from tipstorch.models.dense import DPTConfig, create_dpt_decoder
from tipstorch.weights.dense_heads import save_dense_head
from tipstorch.weights.factory import scenes_tokenizer_path

EXAMPLE = scenes_tokenizer_path().with_name("example_scene.png")
TINY_WIDTH = 192  # tips-tiny


@pytest.fixture
def scene(tmp_path):
    target = tmp_path / "photos" / "scene.png"
    target.parent.mkdir()
    shutil.copy(EXAMPLE, target)
    return target


def tiny(*argv) -> None:
    """``tipstorch ARGV --model tips-tiny --random``."""
    main([*map(str, argv), "--model", "tips-tiny", "--random"])


def _head_file(tmp_path, task, width=TINY_WIDTH):
    torch.manual_seed(0)
    return save_dense_head(
        create_dpt_decoder(task, DPTConfig(width, channels=16)), tmp_path / f"{task}.safetensors"
    )


@pytest.mark.parametrize("task", ["depth", "normals"])
def test_dense_map_writes_a_picture_and_an_array_beside_the_image(tmp_path, scene, capsys, task):
    tiny(task, str(scene), "--head", str(_head_file(tmp_path, task)), "--image-size", "112")
    size = Image.open(scene).size
    picture = Image.open(scene.with_name(f"scene_{task}.png"))
    array = np.load(scene.with_name(f"scene_{task}.npy"), allow_pickle=False)
    assert picture.size == size and picture.mode == "RGB"
    if task == "depth":
        assert array.shape == (size[1], size[0]) and 1e-3 <= array.min() <= array.max() <= 10.0
    else:
        assert array.shape == (size[1], size[0], 3)
        np.testing.assert_allclose(np.linalg.norm(array, axis=-1), 1.0, atol=1e-4)
    assert f"scene_{task}.png" in capsys.readouterr().out


def test_dense_map_out_dir_and_head_of_the_wrong_task(tmp_path, scene):
    head = _head_file(tmp_path, "depth")
    tiny("depth", scene, "--head", head, "--image-size", "56", "--out-dir", tmp_path / "out")
    assert (tmp_path / "out" / "scene_depth.npy").exists()
    with pytest.raises(SystemExit, match="a normals head, not a depth head"):
        tiny("depth", str(scene), "--head", str(_head_file(tmp_path, "normals")))


def test_a_model_without_released_heads_needs_a_head_file(scene):
    with pytest.raises(SystemExit, match="(?s)no released DPT heads for model 'tips-tiny'.*--head FILE"):
        tiny("depth", str(scene))


def test_a_file_that_is_not_an_image_is_one_clear_error(tmp_path):
    (tmp_path / "notes.jpg").write_text("not pixels")
    with pytest.raises(SystemExit, match="notes.jpg: not an image file"):
        tiny("pca", str(tmp_path / "notes.jpg"))


def test_segment_writes_per_class_scores_beside_the_picture(tmp_path, capsys):
    out = tmp_path / "seg.png"
    tiny("segment", str(EXAMPLE), "--labels", "circle, star,,floor", "--image-size", "112", "--out", str(out))
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["labels"] == ["circle", "star", "floor"]
    assert set(report["scores"]) == {"circle", "star", "floor"}
    assert sum(score["area"] for score in report["scores"].values()) == pytest.approx(1.0)
    assert all(colour.startswith("#") and len(colour) == 7 for colour in report["colours"].values())
    label_map = np.load(out.with_suffix(".npy"), allow_pickle=False)
    assert label_map.shape == Image.open(EXAMPLE).size[::-1] and label_map.max() <= 2
    assert report["scores"]["star"]["area"] == pytest.approx((label_map == 1).mean())
    assert "seg.json" in capsys.readouterr().out


def ade20k_zip(path, winner=7, width=TINY_WIDTH):
    """A segmentation head in the released Scenic zip layout (150 ADE20K classes) whose per-pixel layer
    ignores the features and picks class ``winner`` everywhere, so that the whole chain (zip -> head ->
    class map -> names) is checked."""
    torch.manual_seed(0)
    head = create_dpt_decoder("segmentation", DPTConfig(width, channels=16))
    with torch.no_grad():
        head.head.weight.mul_(1e-6)
        head.head.bias.zero_()
        head.head.bias[winner] = 10.0
    _write_zip(path, _flax_layout(head, "pixel_segmentation"))
    return path


def test_segment_with_a_released_format_head_writes_ade20k_classes(tmp_path, scene, capsys):
    out = tmp_path / "classes" / "seg.png"
    zip_path = ade20k_zip(tmp_path / "tips_v2_tiny_segmentation_dpt.zip")
    tiny("segment", scene, "--head", zip_path, "--image-size", "56", "--out", out)
    width, height = Image.open(scene).size
    class_map = np.load(out.with_suffix(".npy"), allow_pickle=False)
    assert class_map.shape == (height, width) and (class_map == 7).all()
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["classes"] == list(ADE20K_CLASS_NAMES) and report["head"] == str(zip_path)
    assert report["scores"] == {"bed": {"class": 7, "area": 1.0, "colour": report["scores"]["bed"]["colour"]}}
    assert Image.open(out).height == 448
    printed = capsys.readouterr().out
    assert "1 of 150 classes present" in printed and "bed" in printed


def test_segment_needs_labels_or_a_head_not_both(tmp_path):
    with pytest.raises(SystemExit):
        tiny("segment", str(EXAMPLE))
    with pytest.raises(SystemExit):
        tiny("segment", str(EXAMPLE), "--labels", "a,b", "--head", "released")
    with pytest.raises(SystemExit, match="(?s)no segmentation head.*--head FILE"):
        tiny("segment", str(EXAMPLE), "--head", "released")


def _pca(out, threshold):
    tiny("pca", str(EXAMPLE), "--image-size", "112", "--fg-threshold", str(threshold), "--out", str(out))


def test_pca_foreground_threshold(tmp_path, capsys):
    _pca(tmp_path, 0.3)
    assert "foreground" in capsys.readouterr().out
    right = np.asarray(Image.open(tmp_path / "example_scene_pca.png"))[:, 448:]
    assert (right.reshape(-1, 3) == 0).all(axis=1).any()  # background patches are black
    with pytest.raises(SystemExit, match="lower the threshold"):
        _pca(tmp_path, 0.99999)


def test_probes_saved_by_eval_drive_depth_and_normals(tmp_path, scene, capsys):
    """tipstorch eval --save-probes -> tipstorch depth/normals --head: the probe's task, config and weights."""
    from tipstorch.weights.dense_heads import dense_head_model, load_dense_head

    probes = tmp_path / "probes"
    smoke = "--max-samples 4 --probe-iterations 2 --probe-batch-size 2 --image-size 56".split()
    tiny("eval", "--tasks", "depth-dpt,normals-dpt", "--data", "scenes", *smoke, "--save-probes", probes,
         "--out", tmp_path / "eval.json")  # fmt: skip
    depth_file, normals_file = (
        probes / "scenes_depth_dpt.safetensors",
        probes / "scenes_normals_dpt.safetensors",
    )
    assert f"wrote probe {depth_file}" in capsys.readouterr().out
    head = load_dense_head(depth_file)
    assert head.config.readout_index == 1 and head.config.layer_indices == (1, 2, 4, 5)  # tips-tiny: 6 blocks
    assert dense_head_model(depth_file) == "tips-tiny"
    tiny("depth", str(scene), "--head", str(depth_file), "--image-size", "56")
    tiny("normals", str(scene), "--head", str(normals_file), "--image-size", "56")
    assert scene.with_name("scene_depth.npy").exists() and scene.with_name("scene_normals.png").exists()
