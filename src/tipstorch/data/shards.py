"""WebDataset tar shards: write image + json captions, read them back split across ranks and workers.

Layout of one sample in a shard (webdataset conventions): ``<key>.jpg`` (or ``.jpeg/.png/.webp``)
and ``<key>.json`` holding any of the caption fields alt/object/spatial/detailed/caption, plus an
optional integer ``label``; a ``<key>.txt`` member, as written by img2dataset, counts as ``caption``.

Reading splits shards (not samples) between consumers: the shard list, shuffled identically on
every rank for the epoch, is dealt out rank x worker, so no sample is read twice in an epoch; use at
least as many shards as ranks x workers. ``resampled=True`` instead draws shards with replacement,
independently per consumer, for an endless stream (open_clip's ``--dataset-resampled``).
A sample that cannot be decoded (bad image bytes, bad json, no image, no caption) or a shard that
cannot be read is skipped, counted in ``ReadStats`` and logged with its key.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image

from tipstorch.data.captions import CAPTION_SOURCES, available_captions
from tipstorch.data.images import ImageFileError, open_image
from tipstorch.data.records import ShardWriteSummary, record_meta, write_record_shards
from tipstorch.data.sample import CorruptSampleError, ImageTextSample
from tipstorch.data.streams import ReadStats, consumer_slot, epoch_share

IMAGE_FORMATS: dict[str, str] = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")


def decode_sample(key: str, image: bytes | str | Path, meta: Mapping[str, object]) -> ImageTextSample:
    """Image (encoded bytes or a file path) + metadata (caption fields, optional int label) -> ImageTextSample.

    Raises CorruptSampleError naming the sample (``key``) and the problem; the image is fully decoded
    here, so a truncated file fails now rather than later in a worker.
    """
    try:
        rgb = open_image(image, name=key)
    except ImageFileError as exn:
        raise CorruptSampleError(key, f"undecodable image: {exn.problem}") from exn
    captions = available_captions(meta)
    if not captions:
        raise CorruptSampleError(key, f"no caption among {CAPTION_SOURCES} (fields: {sorted(meta)})")
    label = meta.get("label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
        raise CorruptSampleError(key, f"label must be an integer, got {label!r}")
    return ImageTextSample(image=rgb, captions=captions, label=label, key=key)


def encode_image(image: Image.Image, image_format: str, quality: int = 95) -> bytes:
    """PIL image -> encoded bytes in jpg / png / webp."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image format must be one of {sorted(IMAGE_FORMATS)}, got {image_format!r}")
    buffer = io.BytesIO()
    options = {"quality": quality} if image_format in ("jpg", "webp") else {}
    image.convert("RGB").save(buffer, format=IMAGE_FORMATS[image_format], **options)
    return buffer.getvalue()


def _record(sample: ImageTextSample, key: str, image_format: str, quality: int) -> dict[str, object]:
    meta: dict[str, object] = dict(available_captions(sample.captions))
    if not meta:
        raise ValueError(
            f"sample {key!r} has no caption among {CAPTION_SOURCES} (has {sorted(sample.captions)})"
        )
    if sample.label is not None:
        meta["label"] = int(sample.label)
    return {
        "__key__": key,
        image_format: encode_image(sample.image, image_format, quality),
        "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
    }


def write_shards(
    samples: Iterable[ImageTextSample],
    out_dir: str | Path,
    shard_size: int = 1000,
    image_format: str = "jpg",
    quality: int = 95,
    prefix: str = "shard",
) -> ShardWriteSummary:
    """Write samples to ``out_dir/<prefix>-000000.tar``, ... with ``shard_size`` samples per shard.

    Keys are the samples' ``key`` (dots replaced, webdataset splits names at the first dot) or the
    running index; duplicate keys are refused. Tar member times are fixed, so equal inputs give
    byte-equal shards; each shard is written atomically (``data.records``).
    """
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image format must be one of {sorted(IMAGE_FORMATS)}, got {image_format!r}")
    records = (
        _record(sample, (sample.key or f"{index:09d}").replace(".", "_"), image_format, quality)
        for index, sample in enumerate(samples)
    )
    return write_record_shards(records, out_dir, shard_size=shard_size, prefix=prefix)


def expand_shards(urls: str | Path | Sequence[str | Path]) -> list[str]:
    """Shard list from a directory (its ``*.tar``), a brace pattern ("shard-{000000..000009}.tar"),
    or a list of either; local files must exist (FileNotFoundError lists the missing ones)."""
    if isinstance(urls, (str, Path)):
        path = Path(urls)
        if path.is_dir():
            found = sorted(str(p) for p in path.glob("*.tar"))
            if not found:
                raise FileNotFoundError(f"no .tar shards in directory {path}")
            return found
        expanded = list(wds.shardlists.expand_urls(str(urls)))
    else:
        expanded = [u for item in urls for u in expand_shards(item)]
    if not expanded:
        raise ValueError(f"no shards in {urls!r}")
    local = [u for u in expanded if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) not found, e.g. {missing[:3]}")
    return expanded


def _shuffle_buffer(items: Iterator[ImageTextSample], size: int, rng: random.Random) -> Iterator[ImageTextSample]:
    """Approximate shuffle through a buffer of ``size`` samples (size <= 1: unchanged order)."""
    if size <= 1:
        yield from items
        return
    buffer: list[ImageTextSample] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = rng.randrange(size)
        buffer[index], item = item, buffer[index]
        yield item
    rng.shuffle(buffer)
    yield from buffer


class ShardDataset(torch.utils.data.IterableDataset):
    """Samples (ImageTextSample with image, captions, key and optional label) from WebDataset shards.

    urls: directory, brace pattern or list (see ``expand_shards``).
    shuffle_buffer: size of the sample shuffle buffer (0 = shard order).
    shuffle_shards: shuffle the shard list each epoch (same order on every rank, from seed + epoch).
    resampled: endless stream of shards drawn with replacement, seeded per (seed, epoch, consumer).
    rank, world_size: default to torch.distributed when initialised, else (0, 1).
    stats: ReadStats counting read and skipped samples (created if not given; see ``.stats``).
    """

    def __init__(
        self,
        urls: str | Path | Sequence[str | Path],
        shuffle_buffer: int = 0,
        shuffle_shards: bool = False,
        resampled: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        stats: ReadStats | None = None,
    ) -> None:
        self.shards = expand_shards(urls)
        self.shuffle_buffer, self.shuffle_shards, self.resampled = shuffle_buffer, shuffle_shards, resampled
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.stats = stats or ReadStats()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shard order and shuffle seeds (call before iterating, on every rank)."""
        self.epoch = epoch

    def _my_shards(self) -> Iterator[str]:
        if self.resampled:
            slot, _ = consumer_slot(self.rank, self.world_size)
            rng = random.Random(f"{self.seed}:{self.epoch}:{slot}:shards")
            while True:
                yield rng.choice(self.shards)
        yield from epoch_share(
            self.shards, self.shuffle_shards, self.seed, self.epoch, self.rank, self.world_size
        )

    def _on_shard_error(self, exn: Exception) -> bool:
        self.stats.record_skip(str(exn.args[-1]) if exn.args else "?", f"unreadable shard data: {exn}")
        return True

    def _decode(self, record: dict) -> ImageTextSample | None:
        key = str(record.get("__key__", "?"))
        where = f"{record.get('__url__', '?')}:{key}"
        try:
            image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in record), None)
            if image_ext is None:
                members = sorted(k for k in record if not k.startswith("__"))
                raise CorruptSampleError(key, f"no image member ({'/'.join(IMAGE_EXTENSIONS)}), has {members}")
            meta = record_meta(record)
            if "txt" in record and "caption" not in meta:
                meta["caption"] = record["txt"].decode("utf-8", errors="replace")
            sample = decode_sample(key, record[image_ext], meta)
        except CorruptSampleError as exn:
            self.stats.record_skip(where, exn.reason)
            return None
        self.stats.record_read()
        return sample

    def __iter__(self) -> Iterator[ImageTextSample]:
        slot, _ = consumer_slot(self.rank, self.world_size)
        records = wds.tariterators.tarfile_samples(
            ({"url": u} for u in self._my_shards()), handler=self._on_shard_error
        )
        samples = (s for s in map(self._decode, records) if s is not None)
        yield from _shuffle_buffer(
            samples, self.shuffle_buffer, random.Random(f"{self.seed}:{self.epoch}:{slot}")
        )
