"""Tiny evaluation trees in the real standard layouts (both splits), for ``tipstorch eval`` tests.

Images are 28x42 with a colour per class so that every task has something to find; dense
targets have the image's size.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

HEIGHT, WIDTH = 28, 42
COLOURS = ((200, 30, 30), (30, 200, 30), (30, 30, 200))


def _image(path: Path, colour_index: int, seed: int) -> None:
    """A flat colour with a little noise, saved as JPEG."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(COLOURS[colour_index % 3]) + rng.integers(-20, 20, (HEIGHT, WIDTH, 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


def _labels(seed: int, classes: tuple[int, ...]) -> np.ndarray:
    """Left half one class, right half another, a border column of 255."""
    rng = np.random.default_rng(seed)
    left, right = rng.choice(classes, size=2)
    labels = np.full((HEIGHT, WIDTH), right, dtype=np.uint8)
    labels[:, : WIDTH // 2] = left
    labels[:, WIDTH // 2] = 255
    return labels


def imagenet(root: Path, per_class: int = 3) -> Path:
    """root/{train,val}/<wnid>/*.JPEG for three wnids, and root/class_names.json."""
    wnids = ("n01440764", "n01443537", "n01484850")
    for split in ("train", "val"):
        for label, wnid in enumerate(wnids):
            for i in range(per_class):
                _image(root / split / wnid / f"{split}_{wnid}_{i}.JPEG", label, seed=10 * label + i + (split == "val"))
    (root / "class_names.json").write_text(json.dumps(dict(zip(wnids, ("tench", "goldfish", "white shark"), strict=True))))
    return root


def voc(root: Path, per_split: int = 3) -> Path:
    """root/VOCdevkit/VOC2012 with train.txt / val.txt, JPEGs and palette label PNGs."""
    base = root / "VOCdevkit" / "VOC2012"
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "SegmentationClass").mkdir(parents=True)
    for split in ("train", "val"):
        ids = [f"2007_{split}_{i:03d}" for i in range(per_split)]
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for i, sample_id in enumerate(ids):
            _image(base / "JPEGImages" / f"{sample_id}.jpg", i, seed=i)
            label = Image.frombytes("P", (WIDTH, HEIGHT), _labels(i, (0, 7, 12)).tobytes())
            label.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] * 85 + [224, 224, 192])
            label.save(base / "SegmentationClass" / f"{sample_id}.png")
    return root


def ade20k(root: Path, per_split: int = 3) -> Path:
    """root/ADEChallengeData2016/{images,annotations}/{training,validation} (labels 0 = other, 1..150)."""
    base = root / "ADEChallengeData2016"
    for split in ("training", "validation"):
        for i in range(per_split):
            name = f"ADE_{split}_{i:08d}"
            _image(base / "images" / split / f"{name}.jpg", i, seed=i)
            (base / "annotations" / split).mkdir(parents=True, exist_ok=True)
            labels = _labels(i + 10, (0, 1, 3, 150))
            Image.fromarray(np.where(labels == 255, 0, labels).astype(np.uint8)).save(
                base / "annotations" / split / f"{name}.png"
            )
    return base


def nyu_bts(root: Path, per_split: int = 3) -> Path:
    """root/official_splits/{train,test}/<scene>/{rgb_N.jpg, sync_depth_N.png (uint16 mm)}."""
    for split in ("train", "test"):
        for i in range(per_split):
            folder = root / "official_splits" / split / ("bathroom" if i % 2 else "kitchen")
            _image(folder / f"rgb_{i:05d}.jpg", i, seed=i)
            depth_mm = np.linspace(500, 8000, HEIGHT * WIDTH).reshape(HEIGHT, WIDTH).astype(np.uint16)
            depth_mm[0, :3] = 0  # missing measurements
            Image.fromarray(depth_mm).save(folder / f"sync_depth_{i:05d}.png")
    return root


def karpathy(root: Path, name: str, per_split: int = 3) -> Path:
    """root/dataset_<name>.json (Karpathy split) and root/images/ (COCO: images/val2014/)."""
    records = []
    for split in ("train", "test"):
        for i in range(per_split):
            filename = f"{split}_{i}.jpg"
            record = {"filename": filename, "split": split,
                      "sentences": [{"raw": f"a {c} picture number {i}"} for c in ("red", "green")]}
            if name == "coco":
                record["filepath"] = "val2014"
            _image(root / "images" / record.get("filepath", "") / filename, i, seed=i)
            records.append(record)
    (root / f"dataset_{name}.json").write_text(json.dumps({"images": records, "dataset": name}))
    return root


def docci(root: Path, per_split: int = 3) -> Path:
    """root/docci_descriptions.jsonlines and root/images/."""
    lines = []
    for split in ("train", "test"):
        for i in range(per_split):
            image_file = f"{split}_{i:05d}.jpg"
            _image(root / "images" / image_file, i, seed=i)
            lines.append({"example_id": f"{split}_{i}", "split": split, "image_file": image_file,
                          "description": f"A long description of picture {i}, a flat colour with noise."})
    (root / "docci_descriptions.jsonlines").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return root
