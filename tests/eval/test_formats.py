"""Dataset readers, each on a tiny tree written in the exact standard layout."""

import json

import numpy as np
import pytest
from PIL import Image

from tipstorch.data.formats import (
    ADE20K_CLASS_NAMES,
    ADE20KSegmentation,
    DOCCIDescriptions,
    ImageFolderDataset,
    KarpathyCaptions,
    NYUDepthV2,
    NYUDepthV2Labeled,
    VOCSegmentation,
)
from tipstorch.data.sample import CorruptSampleError


def _save_rgb(path, size=(6, 4), value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 0, 0)).save(path)


def _save_palette_png(path, labels):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.astype(np.uint8).tobytes())
    image.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [224, 224, 192] * 253)
    image.save(path)


def _save_grey_png(path, labels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels.astype(np.uint8)).save(path)


# ------------------------------------------------------------------ ImageNet-style folders


def _imagenet_val(root):
    for wnid, count in (("n01440764", 2), ("n01443537", 1)):
        for i in range(count):
            _save_rgb(root / "val" / wnid / f"ILSVRC2012_val_{wnid}_{i}.JPEG", value=10 * i)
    (root / "val" / "n01443537" / "readme.txt").write_text("not an image")
    return root / "val"


def test_image_folder_labels_follow_sorted_class_folders(tmp_path):
    dataset = ImageFolderDataset(_imagenet_val(tmp_path))
    assert dataset.classes == ["n01440764", "n01443537"]
    assert len(dataset) == 3
    image, label = dataset[2]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 1


def test_image_folder_class_names_file_maps_folders_to_names(tmp_path):
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"n01440764": "tench", "n01443537": "goldfish"}))
    assert ImageFolderDataset(_imagenet_val(tmp_path), class_names_file=names).class_names == ["tench", "goldfish"]


def test_image_folder_class_names_file_missing_a_folder_names_it(tmp_path):
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"n01440764": "tench"}))
    with pytest.raises(KeyError, match="n01443537"):
        ImageFolderDataset(_imagenet_val(tmp_path), class_names_file=names)


def test_corrupt_image_raises_corrupt_sample_error_naming_the_file(tmp_path):
    root = _imagenet_val(tmp_path)
    bad = root / "n01440764" / "ILSVRC2012_val_broken.JPEG"
    bad.write_bytes(b"definitely not a jpeg")
    dataset = ImageFolderDataset(root)
    index = [p for p, _ in dataset.samples].index(bad)
    with pytest.raises(CorruptSampleError, match="ILSVRC2012_val_broken.JPEG"):
        dataset[index]


def test_missing_image_folder_root_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder root not found"):
        ImageFolderDataset(tmp_path / "val")


# ------------------------------------------------------------------ VOC 2012


def _voc(root):
    voc = root / "VOCdevkit" / "VOC2012"
    labels = np.array([[0, 0, 1, 1, 255, 15], [0, 2, 2, 1, 255, 15], [0, 0, 0, 0, 0, 0], [20, 20, 0, 0, 0, 0]])
    for sample_id in ("2007_000033", "2007_000042"):
        _save_rgb(voc / "JPEGImages" / f"{sample_id}.jpg")
        _save_palette_png(voc / "SegmentationClass" / f"{sample_id}.png", labels)
    split_dir = voc / "ImageSets" / "Segmentation"
    split_dir.mkdir(parents=True)
    (split_dir / "val.txt").write_text("2007_000033\n2007_000042\n")
    return labels


def test_voc_reads_palette_indices_with_background_and_ignore(tmp_path):
    labels = _voc(tmp_path)
    dataset = VOCSegmentation(tmp_path, split="val")
    image, target = dataset[0]
    assert len(dataset) == 2 and image.size == (6, 4)
    assert target.dtype == np.int64 and np.array_equal(target, labels)
    assert dataset.class_names[0] == "background" and len(dataset.class_names) == 21


def test_voc_without_background_shifts_objects_and_ignores_background(tmp_path):
    labels = _voc(tmp_path)
    dataset = VOCSegmentation(tmp_path / "VOCdevkit" / "VOC2012", include_background=False)
    _, target = dataset[1]
    expected = np.where((labels == 0) | (labels == 255), 255, labels - 1)
    assert np.array_equal(target, expected)
    assert len(dataset.class_names) == 20 and dataset.class_names[0] == "aeroplane"


def test_voc_missing_label_listed_in_split_is_named(tmp_path):
    _voc(tmp_path)
    (tmp_path / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "2007_000042.png").unlink()
    with pytest.raises(FileNotFoundError, match="2007_000042.png"):
        VOCSegmentation(tmp_path)


def test_voc_rgb_label_png_is_a_corrupt_sample(tmp_path):
    _voc(tmp_path)
    _save_rgb(tmp_path / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "2007_000033.png")
    with pytest.raises(CorruptSampleError, match="mode RGB"):
        VOCSegmentation(tmp_path)[0]


# ------------------------------------------------------------------ ADE20K


def _ade(root, split="validation"):
    ade = root / "ADEChallengeData2016"
    labels = np.array([[0, 1, 2, 150], [150, 12, 0, 1], [1, 1, 1, 1]])
    for name in ("ADE_val_00000001", "ADE_val_00000002"):
        _save_rgb(ade / "images" / split / f"{name}.jpg", size=(4, 3))
        _save_grey_png(ade / "annotations" / split / f"{name}.png", labels)
    return ade, labels


def test_ade20k_maps_zero_to_ignore_and_shifts_classes(tmp_path):
    root, labels = _ade(tmp_path)
    dataset = ADE20KSegmentation(root)
    _, target = dataset[0]
    assert len(dataset) == 2
    assert np.array_equal(target, np.where(labels == 0, 255, labels - 1))
    assert target[target != 255].max() == 149 and dataset.class_names[149] == "flag"
    assert len(ADE20K_CLASS_NAMES) == 150


def test_ade20k_image_without_annotation_is_named(tmp_path):
    root, _ = _ade(tmp_path)
    (root / "annotations" / "validation" / "ADE_val_00000002.png").unlink()
    with pytest.raises(FileNotFoundError, match="ADE_val_00000002.jpg"):
        ADE20KSegmentation(root)


def test_ade20k_missing_split_folder_is_named(tmp_path):
    root, _ = _ade(tmp_path, split="training")
    with pytest.raises(FileNotFoundError, match="validation"):
        ADE20KSegmentation(root)


# ------------------------------------------------------------------ NYU Depth v2


def _nyu_bts(root):
    depth_mm = np.array([[0, 1000, 2500], [9999, 500, 65535]], dtype=np.uint16)
    for scene, number in (("bathroom", "00045"), ("kitchen", "00001")):
        folder = root / "official_splits" / "test" / scene
        _save_rgb(folder / f"rgb_{number}.jpg", size=(3, 2))
        Image.fromarray(depth_mm).save(folder / f"sync_depth_{number}.png")
    return depth_mm


def test_nyu_bts_layout_reads_depth_in_metres(tmp_path):
    depth_mm = _nyu_bts(tmp_path)
    dataset = NYUDepthV2(tmp_path)
    image, depth = dataset[0]
    assert len(dataset) == 2 and image.size == (3, 2)
    assert depth.dtype == np.float32
    np.testing.assert_allclose(depth, depth_mm / 1000.0, rtol=1e-6)
    assert "bathroom" in str(dataset.pairs[0][0])


def test_nyu_missing_depth_png_is_named(tmp_path):
    _nyu_bts(tmp_path)
    (tmp_path / "official_splits" / "test" / "kitchen" / "sync_depth_00001.png").unlink()
    with pytest.raises(FileNotFoundError, match="sync_depth_00001.png"):
        NYUDepthV2(tmp_path)


def test_nyu_labeled_mat_reads_transposed_hdf5_arrays(tmp_path):
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, size=(3, 4, 5, 3), dtype=np.uint8)  # N, H, W, C
    depth = rng.uniform(0.5, 9.0, size=(3, 4, 5)).astype(np.float32)
    path = tmp_path / "nyu_depth_v2_labeled.mat"
    with h5py.File(path, "w") as mat:  # MATLAB v7.3 column-major layout
        mat["images"] = rgb.transpose(0, 3, 2, 1)
        mat["depths"] = depth.transpose(0, 2, 1)
    dataset = NYUDepthV2Labeled(path, indices=[2, 0])
    image, target = dataset[0]
    assert len(dataset) == 2
    assert np.array_equal(np.asarray(image), rgb[2]) and np.array_equal(target, depth[2])


def test_nyu_labeled_mat_without_h5py_explains_what_to_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_h5py(name, *args, **kwargs):
        if name == "h5py":
            raise ImportError("no h5py")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_h5py)
    with pytest.raises(ImportError, match="pip install h5py"):
        NYUDepthV2Labeled(tmp_path / "nyu_depth_v2_labeled.mat")


# ------------------------------------------------------------------ COCO / Flickr30k Karpathy json


def _karpathy(root, with_filepath):
    images = []
    for i, split in enumerate(("test", "train", "test")):
        record = {"filename": f"img_{i}.jpg", "split": split, "sentences": [{"raw": f"caption {i}.{j} "} for j in range(2)]}
        if with_filepath:
            record["filepath"] = "val2014"
        images.append(record)
        _save_rgb(root / "images" / ("val2014" if with_filepath else "") / f"img_{i}.jpg")
    path = root / "dataset.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco" if with_filepath else "flickr30k"}))
    return path


@pytest.mark.parametrize("with_filepath", [True, False], ids=["coco", "flickr30k"])
def test_karpathy_json_keeps_the_split_and_all_captions(tmp_path, with_filepath):
    dataset = KarpathyCaptions(_karpathy(tmp_path, with_filepath), tmp_path / "images", split="test")
    assert len(dataset) == 2
    assert dataset.captions == [["caption 0.0", "caption 0.1"], ["caption 2.0", "caption 2.1"]]
    image, captions = dataset[1]
    assert image.mode == "RGB" and captions == ["caption 2.0", "caption 2.1"]


def test_karpathy_unknown_split_lists_the_available_ones(tmp_path):
    with pytest.raises(ValueError, match=r"available splits: \['test', 'train'\]"):
        KarpathyCaptions(_karpathy(tmp_path, True), tmp_path / "images", split="val")


# ------------------------------------------------------------------ DOCCI


def _docci(root):
    lines = [
        {"example_id": "test_00001", "split": "test", "image_file": "test_00001.jpg", "description": "A long one."},
        {"example_id": "train_00001", "split": "train", "image_file": "train_00001.jpg", "description": "Other."},
    ]
    for line in lines:
        _save_rgb(root / "images" / line["image_file"])
    path = root / "docci_descriptions.jsonlines"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def test_docci_reads_one_description_per_image(tmp_path):
    dataset = DOCCIDescriptions(_docci(tmp_path), split="test")
    image, captions = dataset[0]
    assert len(dataset) == 1 and captions == ["A long one."] and image.size == (6, 4)


def test_docci_bad_json_line_is_named_with_its_line_number(tmp_path):
    path = _docci(tmp_path)
    path.write_text(path.read_text() + "{broken\n")
    with pytest.raises(ValueError, match=r"docci_descriptions.jsonlines:3"):
        DOCCIDescriptions(path)
