"""Readers for the standard evaluation layouts (torch Datasets returning (PIL RGB image, target)).

| reader               | layout                                                          | target                          |
|----------------------|-----------------------------------------------------------------|---------------------------------|
| ImageFolderDataset   | root/<class>/*.jpg (ImageNet val: val/<wnid>/*.JPEG)             | int, sorted folder index        |
| VOCSegmentation      | VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation} | int64 [H, W], 0 bg, 255 ignore  |
| ADE20KSegmentation   | ADEChallengeData2016/{images,annotations}/{training,validation} | int64 [H, W], 0..149, 255 ignore|
| NYUDepthV2           | official_splits/test/<scene>/{rgb_*.jpg, sync_depth_*.png} (BTS) | float32 [H, W] metres, 0 = none |
| NYUDepthV2Labeled    | nyu_depth_v2_labeled.mat (HDF5; needs h5py)                      | float32 [H, W] metres           |
| KarpathyCaptions     | dataset_{coco,flickr30k}.json + image folder                     | list[str] captions              |
| DOCCIDescriptions    | docci_descriptions.jsonlines + images/                           | [description]                   |

A missing file or folder raises FileNotFoundError naming it. An image or label that cannot be
decoded raises ``CorruptSampleError`` from ``__getitem__``; evaluation loops skip and count those
(see ``tipstorch.eval.features.iterate_samples``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from tipstorch.data.images import ImageFileError, open_image
from tipstorch.data.sample import CorruptSampleError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm")


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _open_image(path: Path, mode: str | None = None) -> Image.Image:
    """The decoded, upright image (see ``tipstorch.data.images``); CorruptSampleError naming the file if it
    cannot be decoded or exceeds a limit."""
    try:
        return open_image(path, mode)
    except ImageFileError as err:
        raise CorruptSampleError(path, err.problem) from err


def load_rgb(path: Path | str) -> Image.Image:
    """Decoded, upright RGB image; CorruptSampleError if the file cannot be decoded."""
    return _open_image(Path(path), "RGB")


def load_label_map(path: Path | str) -> np.ndarray:
    """Integer label PNG (palette 'P' or grey 'L') as uint8 [H, W] of label indices."""
    image = _open_image(Path(path))
    if image.mode not in ("P", "L"):
        raise CorruptSampleError(path, f"label PNG must be palette (P) or greyscale (L), got mode {image.mode}")
    return np.asarray(image, dtype=np.uint8)


def _check_size(image: Image.Image, target: np.ndarray, path: Path) -> None:
    if target.shape != (image.height, image.width):
        raise CorruptSampleError(path, f"label size {target.shape} differs from image size {(image.height, image.width)}")


# --------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------


def class_folders(root: Path) -> list[str]:
    """The sorted names of the class folders in ``root`` (an ImageNet split: its wnids)."""
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def check_same_classes(first: Path, second: Path) -> None:
    """Raise one ValueError listing the differing names when two split folders hold different class
    folders: each split numbers its classes by sorted name, so labels would not agree."""
    first_set, second_set = set(class_folders(first)), set(class_folders(second))
    if first_set != second_set:
        raise ValueError(
            f"class folders of {first} and {second} differ, so their labels would not agree: "
            f"only in {first.name}: {sorted(first_set - second_set)[:20]}, "
            f"only in {second.name}: {sorted(second_set - first_set)[:20]}"
        )


class ImageFolderDataset(Dataset):
    """root/<class folder>/<image>; label = index of the folder in sorted order (ImageNet: sorted wnids).

    ``class_names_file``: optional JSON object {folder name: human-readable class name} used for
    zero-shot prompts; without it ``class_names`` are the folder names.
    """

    def __init__(self, root: Path | str, class_names_file: Path | str | None = None) -> None:
        self.root = _require(Path(root), "image folder root")
        self.classes = class_folders(self.root)
        if not self.classes:
            raise FileNotFoundError(f"no class folders in {self.root}")
        self.samples = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in sorted((self.root / name).iterdir())
            if path.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}/<class>/")
        self.class_names = self._read_class_names(class_names_file) if class_names_file else list(self.classes)

    def _read_class_names(self, path: Path | str) -> list[str]:
        mapping = json.loads(_require(Path(path), "class names file").read_text())
        missing = [c for c in self.classes if c not in mapping]
        if missing:
            raise KeyError(f"class names file {path} has no entry for folders {missing[:10]}")
        return [mapping[c] for c in self.classes]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        return load_rgb(path), label


# --------------------------------------------------------------------------------------------
# Semantic segmentation
# --------------------------------------------------------------------------------------------

VOC_CLASS_NAMES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

# ADE20K-150 names as spelled in the official zero-shot notebook (TIPS_zeroshot_segmentation.ipynb)
ADE20K_CLASS_NAMES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)  # fmt: skip

IGNORE_INDEX = 255


class VOCSegmentation(Dataset):
    """PASCAL VOC 2012 segmentation. ``root`` is VOC2012 or a folder containing VOCdevkit/VOC2012.

    Targets: 0 background, 1..20 objects, 255 ignore (object borders). With
    ``include_background=False`` (the zero-shot "VOC20" setting) background becomes 255 and the
    objects 0..19.
    """

    def __init__(self, root: Path | str, split: str = "val", include_background: bool = True) -> None:
        root = Path(root)
        nested = root / "VOCdevkit" / "VOC2012"
        self.root = nested if nested.is_dir() else root
        split_file = _require(self.root / "ImageSets" / "Segmentation" / f"{split}.txt", f"VOC {split} split file")
        self.ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        self.image_dir = _require(self.root / "JPEGImages", "VOC image folder")
        self.label_dir = _require(self.root / "SegmentationClass", "VOC label folder")
        for sample_id in self.ids:
            _require(self.image_dir / f"{sample_id}.jpg", f"VOC image listed in {split_file.name}")
            _require(self.label_dir / f"{sample_id}.png", f"VOC label listed in {split_file.name}")
        self.include_background = include_background
        self.class_names = list(VOC_CLASS_NAMES if include_background else VOC_CLASS_NAMES[1:])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Image.Image, np.ndarray]:
        sample_id = self.ids[index]
        label_path = self.label_dir / f"{sample_id}.png"
        image = load_rgb(self.image_dir / f"{sample_id}.jpg")
        labels = load_label_map(label_path).astype(np.int64)
        _check_size(image, labels, label_path)
        if not self.include_background:
            labels = np.where((labels == 0) | (labels == IGNORE_INDEX), IGNORE_INDEX, labels - 1)
        return image, labels


class ADE20KSegmentation(Dataset):
    """ADE20K SceneParsing (ADEChallengeData2016). PNG 0 = "other" -> 255 ignore; 1..150 -> 0..149."""

    class_names = list(ADE20K_CLASS_NAMES)

    def __init__(self, root: Path | str, split: str = "validation") -> None:
        self.root = _require(Path(root), "ADEChallengeData2016 folder")
        image_dir = _require(self.root / "images" / split, f"ADE20K {split} image folder")
        label_dir = _require(self.root / "annotations" / split, f"ADE20K {split} annotation folder")
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() == ".jpg")
        if not images:
            raise FileNotFoundError(f"no .jpg images in {image_dir}")
        self.pairs = [(p, _require(label_dir / f"{p.stem}.png", f"annotation for {p.name}")) for p in images]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Image.Image, np.ndarray]:
        image_path, label_path = self.pairs[index]
        image = load_rgb(image_path)
        labels = load_label_map(label_path).astype(np.int64)
        _check_size(image, labels, label_path)
        return image, np.where((labels == 0) | (labels == IGNORE_INDEX), IGNORE_INDEX, labels - 1)


# --------------------------------------------------------------------------------------------
# Depth
# --------------------------------------------------------------------------------------------


class NYUDepthV2(Dataset):
    """NYUv2 Eigen test split in the BTS layout: official_splits/test/<scene>/{rgb_N.jpg, sync_depth_N.png}.

    ``root`` is the folder holding ``official_splits`` (or ``official_splits`` itself). Depth PNGs
    are uint16 millimetres; 0 means no measurement.
    """

    def __init__(self, root: Path | str, split: str = "test") -> None:
        root = Path(root)
        splits = root if root.name == "official_splits" else root / "official_splits"
        split_dir = _require(splits / split, f"NYUv2 {split} folder")
        images = sorted(split_dir.glob("*/rgb_*.jpg"))
        if not images:
            raise FileNotFoundError(f"no <scene>/rgb_*.jpg files in {split_dir}")
        self.pairs = [
            (p, _require(p.with_name(p.name.replace("rgb_", "sync_depth_")).with_suffix(".png"), f"depth for {p}"))
            for p in images
        ]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Image.Image, np.ndarray]:
        image_path, depth_path = self.pairs[index]
        image = load_rgb(image_path)
        raw = np.asarray(_open_image(depth_path))
        if raw.ndim != 2:
            raise CorruptSampleError(depth_path, f"depth PNG must be single-channel uint16, got shape {raw.shape}")
        depth = raw.astype(np.float32) / 1000.0
        _check_size(image, depth, depth_path)
        return image, depth


class NYUDepthV2Labeled(Dataset):
    """The 1,449 labelled NYUv2 frames from ``nyu_depth_v2_labeled.mat`` (MATLAB v7.3 = HDF5; needs h5py).

    ``indices``: 0-based frames to use; the standard 654-frame test split is
    ``scipy.io.loadmat("splits.mat")["testNdxs"].ravel() - 1``. Default: all frames.
    """

    def __init__(self, mat_path: Path | str, indices: Sequence[int] | None = None) -> None:
        try:
            import h5py
        except ImportError as err:
            raise ImportError(
                "reading nyu_depth_v2_labeled.mat needs h5py (pip install h5py); "
                "or use the BTS layout with NYUDepthV2"
            ) from err
        self.mat_path = _require(Path(mat_path), "NYUv2 labelled .mat file")
        self._h5py = h5py
        self._file = None
        with h5py.File(self.mat_path, "r") as mat:
            for key in ("images", "depths"):
                if key not in mat:
                    raise KeyError(f"{self.mat_path} has no dataset {key!r} (found {sorted(mat.keys())})")
            total = mat["images"].shape[0]
        self.indices = list(range(total)) if indices is None else [int(i) for i in indices]
        bad = [i for i in self.indices if not 0 <= i < total]
        if bad:
            raise IndexError(f"frame indices {bad[:5]} outside [0, {total}) in {self.mat_path}")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Image.Image, np.ndarray]:
        if self._file is None:  # opened lazily so each DataLoader worker gets its own handle
            self._file = self._h5py.File(self.mat_path, "r")
        frame = self.indices[index]
        # MATLAB stores column-major: images [N, 3, W, H], depths [N, W, H]
        rgb = np.ascontiguousarray(self._file["images"][frame].transpose(2, 1, 0))
        depth = np.ascontiguousarray(self._file["depths"][frame].T).astype(np.float32)
        return Image.fromarray(rgb.astype(np.uint8)), depth


# --------------------------------------------------------------------------------------------
# Image-text retrieval
# --------------------------------------------------------------------------------------------


def _select_split(records: list[dict], split: str, source: Path) -> list[dict]:
    chosen = [r for r in records if r.get("split") == split]
    if not chosen:
        available = sorted({str(r.get("split")) for r in records})
        raise ValueError(f"no samples with split {split!r} in {source}; available splits: {available}")
    return chosen


class _CaptionedImages(Dataset):
    """Images with one or more captions; ``captions[i]`` holds image i's captions without loading it."""

    def __init__(self, image_paths: list[Path], captions: list[list[str]]) -> None:
        self.image_paths = image_paths
        self.captions = captions

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[Image.Image, list[str]]:
        return load_rgb(self.image_paths[index]), self.captions[index]


class KarpathyCaptions(_CaptionedImages):
    """COCO / Flickr30k with the Karpathy split json (``dataset_coco.json``, ``dataset_flickr30k.json``).

    Image path: ``image_root / [filepath /] filename`` (COCO entries carry a ``filepath`` such as
    val2014; Flickr30k entries do not). Each image has ~5 captions (``sentences[].raw``).
    """

    def __init__(self, json_path: Path | str, image_root: Path | str, split: str = "test") -> None:
        json_path = _require(Path(json_path), "Karpathy split json")
        image_root = _require(Path(image_root), "caption dataset image folder")
        data = json.loads(json_path.read_text())
        if "images" not in data:
            raise KeyError(f"{json_path} has no 'images' list (not a Karpathy split file?)")
        records = _select_split(data["images"], split, json_path)
        paths, captions = [], []
        for record in records:
            path = image_root / record.get("filepath", "") / record["filename"]
            texts = [s["raw"].strip() for s in record.get("sentences", [])]
            if not texts:
                raise ValueError(f"{json_path}: image {record['filename']} has no sentences")
            paths.append(_require(path, f"image listed in {json_path.name}"))
            captions.append(texts)
        super().__init__(paths, captions)


class DOCCIDescriptions(_CaptionedImages):
    """DOCCI: ``docci_descriptions.jsonlines`` (example_id, split, image_file, description), images/ folder.

    ``image_root`` defaults to the ``images`` folder next to the jsonlines file. One long
    description per image.
    """

    def __init__(self, jsonl_path: Path | str, image_root: Path | str | None = None, split: str = "test") -> None:
        jsonl_path = _require(Path(jsonl_path), "DOCCI descriptions file")
        image_root = _require(Path(image_root) if image_root else jsonl_path.parent / "images", "DOCCI image folder")
        records = []
        for line_number, line in enumerate(jsonl_path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{jsonl_path}:{line_number} is not valid JSON: {err}") from err
        records = _select_split(records, split, jsonl_path)
        paths = [_require(image_root / r["image_file"], f"image listed in {jsonl_path.name}") for r in records]
        super().__init__(paths, [[r["description"]] for r in records])
