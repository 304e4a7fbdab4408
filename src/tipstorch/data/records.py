"""Raw WebDataset records: read a tar shard as ``{"__key__": key, ext: bytes}`` groups, write them back.

A record holds every member of one sample byte for byte (``<key>.jpg``, ``<key>.json``, ...), so
copying a record or rewriting only its json never re-encodes an image. Keys and extensions split
member names as webdataset does: at the first dot of the file name (``dir/a.b.jpg`` -> ``dir/a`` and
``b.jpg``). Shards are written to ``<name>.tmp`` and renamed when complete, so a killed writer never
leaves a truncated ``.tar`` behind.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from tipstorch.data.sample import CorruptSampleError

Record = dict[str, object]  # "__key__": str, extension: bytes


def split_member_name(name: str) -> tuple[str, str]:
    """Tar member name -> (sample key, extension), webdataset's rule: split at the file name's first dot."""
    directory, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not dot or not stem:
        raise ValueError(f"tar member {name!r} has no '<key>.<extension>' name")
    return (f"{directory}/{stem}" if directory else stem), extension


def iter_records(shard: str | Path) -> Iterator[Record]:
    """The records of one tar shard in file order (consecutive members with one key form a record).

    Raises tarfile.TarError / OSError for an unreadable shard and ValueError naming a member without
    an extension.
    """
    record: Record = {}
    with tarfile.open(shard, "r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, extension = split_member_name(member.name)
            if record and record["__key__"] != key:
                yield record
                record = {}
            record["__key__"] = key
            handle = tar.extractfile(member)
            record[extension] = handle.read() if handle is not None else b""
    if record:
        yield record


def record_meta(record: Record) -> dict[str, object]:
    """The object in the record's ``json`` member ({} without one); CorruptSampleError naming the key
    when the member is not JSON or holds something other than an object."""
    if "json" not in record:
        return {}
    key = str(record.get("__key__", "?"))
    try:
        meta = json.loads(record["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise CorruptSampleError(key, f"bad json: {exn}") from exn
    if not isinstance(meta, dict):
        raise CorruptSampleError(key, f"json must hold an object, got {type(meta).__name__}")
    return meta


def _unique_keys(records: Iterable[Record], seen: set[str], where: str) -> Iterator[Record]:
    """The records, adding their keys to ``seen``; ValueError on a key seen before."""
    for record in records:
        key = str(record["__key__"])
        if key in seen:
            raise ValueError(f"duplicate sample key {key!r} while writing {where}")
        seen.add(key)
        yield record


def _fsync_replace(temporary: Path, final: Path) -> None:
    with temporary.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, final)


def write_shard_atomic(records: Iterable[Record], path: str | Path) -> int:
    """Write records to one tar shard via ``<path>.tmp`` + rename; returns the number written.

    Member times are fixed (equal records give byte-equal shards); duplicate keys are refused.
    """
    final = Path(path)
    temporary = final.with_name(final.name + ".tmp")
    seen: set[str] = set()
    try:
        with temporary.open("wb") as stream:
            writer = wds.TarWriter(stream, mtime=0.0, encoder=False)
            try:
                for record in _unique_keys(records, seen, str(final)):
                    writer.write(record)
            finally:
                writer.close()
        _fsync_replace(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)
    return len(seen)


@dataclass
class ShardWriteSummary:
    """What a shard writer wrote: shard paths in order and the number of samples."""

    shards: list[Path]
    samples: int


def write_record_shards(
    records: Iterable[Record], out_dir: str | Path, shard_size: int = 1000, prefix: str = "shard"
) -> ShardWriteSummary:
    """Write records to ``out_dir/<prefix>-000000.tar``, ... with ``shard_size`` records per shard.

    Each shard appears complete or not at all (see ``write_shard_atomic``); keys must be unique
    across all shards.
    """
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[Path] = []
    seen: set[str] = set()
    batch: list[Record] = []

    def flush() -> None:
        shards.append(out / f"{prefix}-{len(shards):06d}.tar")
        write_shard_atomic(batch, shards[-1])
        batch.clear()

    for record in _unique_keys(records, seen, str(out)):
        batch.append(record)
        if len(batch) == shard_size:
            flush()
    if batch:
        flush()
    return ShardWriteSummary(shards=shards, samples=len(seen))
