"""Images to embed, in resumable units: one WebDataset shard, or a chunk of the files of an image folder.

A unit's ``name`` is unique and filesystem-safe (it names the unit's cache file) and its
``signature`` changes when its files change, so a stale cache entry is recomputed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tipstorch.data.folder import IMAGE_SUFFIXES
from tipstorch.data.records import iter_records
from tipstorch.data.shards import IMAGE_EXTENSIONS, expand_shards


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]


def _file_state(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


@dataclass(frozen=True)
class ImageUnit:
    """One shard (``files`` empty) or a chunk of image files of the folder ``source``."""

    name: str
    source: str
    files: tuple[str, ...] = ()

    @property
    def is_shard(self) -> bool:
        return not self.files

    def signature(self) -> str:
        """Sizes and modification times of the unit's files, as a short hash."""
        if self.is_shard:
            state: object = _file_state(Path(self.source))
        else:
            state = [[name, *_file_state(Path(self.source) / name)] for name in self.files]
        return _short_hash(json.dumps([self.source, state]))

    def images(self) -> Iterator[tuple[str, bytes]]:
        """(key, encoded image bytes) in unit order; a shard sample without an image member yields b""."""
        if self.is_shard:
            for record in iter_records(self.source):
                extension = next((e for e in IMAGE_EXTENSIONS if e in record), None)
                yield str(record["__key__"]), record[extension] if extension else b""
            return
        for name in self.files:
            yield Path(name).with_suffix("").as_posix(), (Path(self.source) / name).read_bytes()


def image_units(source: str | Path, chunk_size: int = 1000) -> list[ImageUnit]:
    """Units of a source: a folder of ``*.tar`` shards, a shard file or brace pattern, or a folder of
    images (searched recursively, cut into chunks of ``chunk_size`` files in sorted order)."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    path = Path(source)
    if path.is_dir() and not any(path.glob("*.tar")):
        files = sorted(
            p.relative_to(path).as_posix()
            for p in path.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        if not files:
            raise FileNotFoundError(f"{path}: neither .tar shards nor images ({', '.join(IMAGE_SUFFIXES)})")
        stem = f"{path.resolve().name or 'folder'}-{_short_hash(str(path.resolve()))}"
        return [
            ImageUnit(f"{stem}-{index:05d}", str(path), tuple(files[start : start + chunk_size]))
            for index, start in enumerate(range(0, len(files), chunk_size))
        ]
    return [
        ImageUnit(f"{Path(shard).stem}-{_short_hash(str(Path(shard).resolve()))}", shard)
        for shard in expand_shards(source)
    ]
