"""A plain folder of images with captions, as ImageTextSample (image, captions, key, optional label).

Captions come from one file or from sidecar files:
- ``captions.jsonl``: one object per line with the image path (field ``image``, ``file_name``,
  ``filename``, ``filepath`` or ``path``, relative to the folder or absolute) and any caption
  fields alt/object/spatial/detailed/caption, optionally an integer ``label``;
- ``captions.csv`` / ``.tsv``: the same as columns (open_clip style; ``rename={"title": "alt"}``
  maps other column names onto caption sources);
- no file: every image ``a/b.jpg`` under the folder with ``a/b.json`` (caption fields) and/or
  ``a/b.txt`` (the ``caption``) beside it, as img2dataset writes them.
Rows without an image path or with bad json, and images that cannot be decoded or have no
caption, are skipped when iterating, counted in ``stats`` and logged.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from tipstorch.data.sample import CorruptSampleError, ImageTextSample
from tipstorch.data.shards import decode_sample
from tipstorch.data.streams import ReadStats, epoch_share

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
IMAGE_FIELDS: tuple[str, ...] = ("image", "file_name", "filename", "filepath", "path")


@dataclass(frozen=True)
class FolderEntry:
    """One image of the folder: its key (relative path without suffix), file and metadata."""

    key: str
    path: Path
    meta: Mapping[str, object]


def _entry(root: Path, row: Mapping[str, object], rename: Mapping[str, str], where: str) -> FolderEntry:
    meta = {rename.get(k, k): v for k, v in row.items()}
    image = next((meta[f] for f in IMAGE_FIELDS if isinstance(meta.get(f), str) and meta[f]), None)
    if image is None:
        raise CorruptSampleError(where, f"no image path in any of the fields {IMAGE_FIELDS}")
    label = meta.get("label")
    if isinstance(label, str):  # csv cells are text: "" = no label, digits = the label, else left to fail
        text = label.strip()
        meta["label"] = None if not text else int(text) if text.lstrip("-").isdigit() else label
    path = Path(image) if Path(image).is_absolute() else root / image
    key = path.relative_to(root).with_suffix("").as_posix() if path.is_relative_to(root) else path.stem
    return FolderEntry(key=key, path=path, meta=meta)


def _read_rows(path: Path) -> Iterator[tuple[str, Mapping[str, object] | Exception]]:
    """(where, row or the error that row raised) for every row of a jsonl / csv / tsv file."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".jsonlines"):
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    yield (
                        f"{path}:{number}",
                        row if isinstance(row, dict) else ValueError("not a json object"),
                    )
                except json.JSONDecodeError as exn:
                    yield f"{path}:{number}", exn
    elif suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as table:
            for number, row in enumerate(
                csv.DictReader(table, delimiter="\t" if suffix == ".tsv" else ","), start=2
            ):
                yield f"{path}:{number}", row
    else:
        raise ValueError(f"captions file must be .jsonl, .csv or .tsv, got {path}")


def _sidecar_rows(root: Path) -> Iterator[tuple[str, Mapping[str, object] | Exception]]:
    for image in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        row: dict[str, object] = {"image": str(image)}
        sidecar_json, sidecar_txt = image.with_suffix(".json"), image.with_suffix(".txt")
        try:
            if sidecar_json.is_file():
                loaded = json.loads(sidecar_json.read_text(encoding="utf-8"))
                if not isinstance(loaded, dict):
                    raise ValueError(f"{sidecar_json} must hold a json object")
                row.update(loaded)
                row["image"] = str(image)
            if sidecar_txt.is_file() and "caption" not in row:
                row["caption"] = sidecar_txt.read_text(encoding="utf-8").strip()
        except (ValueError, UnicodeDecodeError) as exn:  # JSONDecodeError is a ValueError
            yield str(image), exn
            continue
        yield str(image), row


class FolderDataset(torch.utils.data.IterableDataset):
    """Images of a folder with their captions; iterate (split by rank and worker, corrupt samples
    skipped) or index ``ds[i]`` (raises CorruptSampleError naming the file).

    root: the folder. captions: jsonl/csv/tsv file, or None for sidecar .json/.txt files.
    rename: field name -> caption source, e.g. {"title": "alt"}.
    shuffle: shuffle the file order each epoch (same order on every rank, from seed + epoch).
    """

    def __init__(
        self,
        root: str | Path,
        captions: str | Path | None = None,
        rename: Mapping[str, str] | None = None,
        shuffle: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        stats: ReadStats | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        if captions is not None and not Path(captions).is_file():
            raise FileNotFoundError(f"captions file not found: {captions}")
        self.stats = stats or ReadStats()
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.epoch = 0
        rows = _read_rows(Path(captions)) if captions is not None else _sidecar_rows(self.root)
        self.entries: list[FolderEntry] = []
        for where, row in rows:
            try:
                if isinstance(row, Exception):
                    raise CorruptSampleError(where, f"bad row: {row}")
                self.entries.append(_entry(self.root, row, rename or {}, where))
            except CorruptSampleError as exn:
                self.stats.record_skip(where, exn.reason)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> ImageTextSample:
        entry = self.entries[index]
        try:
            return decode_sample(entry.key, entry.path, entry.meta)
        except CorruptSampleError as exn:
            raise CorruptSampleError(entry.path, exn.reason) from exn

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[ImageTextSample]:
        indices = range(len(self.entries))
        for index in epoch_share(indices, self.shuffle, self.seed, self.epoch, self.rank, self.world_size):
            try:
                sample = self[index]
            except CorruptSampleError as exn:
                self.stats.record_skip(self.entries[index].key, str(exn))
                continue
            self.stats.record_read()
            yield sample
