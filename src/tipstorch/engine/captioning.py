"""Synthetic captions (TIPS Sec. 3.1): an image-to-text model writes a caption field into every
sample's json, the images untouched.

Each ``CaptionTask`` is a (field, prompt) pair, e.g. ``spatial`` <- PaliGemma's "caption en" and
``detailed`` <- a longer-description prompt, the granularities the TIPSv2 caption sampler
(``data.captions.CaptionSampler``) alternates between. Only the json member of a sample is rewritten;
every other member is copied byte for byte, so images are never re-encoded.

Resuming: every captioned batch is appended (and fsynced) to
``<progress dir>/<shard>.<tasks hash>.partial.jsonl``; a shard is then written atomically (tmp +
rename), a ``.done.json`` record is written, and the partial file removed. A killed run therefore
loses at most the batch in flight: on restart, captions already in the partial file are reused, done
shards are skipped, and no sample is captioned twice or dropped. A sample whose image or json cannot
be read is copied unchanged, counted and logged with its key.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from PIL import Image
from tqdm.auto import tqdm

from tipstorch.data.captions import CAPTION_SOURCES
from tipstorch.data.images import ImageFileError, open_image
from tipstorch.data.records import Record, iter_records, record_meta, write_shard_atomic
from tipstorch.data.sample import CorruptSampleError
from tipstorch.data.shards import IMAGE_EXTENSIONS

logger = logging.getLogger("tipstorch.engine")

PROGRESS_DIR = ".caption-progress"


class Captioner(Protocol):
    """Images + one text prompt -> one caption per image."""

    def __call__(self, images: list[Image.Image], prompt: str) -> list[str]: ...


@dataclass(frozen=True)
class CaptionTask:
    """Write the caption the model gives for ``prompt`` under json field ``field``."""

    field: str
    prompt: str = "caption en"

    def __post_init__(self) -> None:
        if self.field not in CAPTION_SOURCES:
            raise ValueError(
                f"caption field must be one the training reader knows, one of {CAPTION_SOURCES} "
                f"(spatial: PaliGemma-like short captions, detailed: long descriptions); got {self.field!r}"
            )


@dataclass
class CaptionSummary:
    """Shards processed or found done, captions written per field, (sample, field) pairs that already
    held a caption and were kept, and (shard, key, reason) of every sample that could not be read."""

    shards_done: int = 0
    shards_already_done: int = 0
    captioned: dict[str, int] = field(default_factory=dict)
    kept: int = 0
    skipped: list[tuple[str, str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "shards_done": self.shards_done,
            "shards_already_done": self.shards_already_done,
            "captioned": self.captioned,
            "kept_existing": self.kept,
            "skipped": [{"shard": s, "key": k, "reason": r} for s, k, r in self.skipped],
        }


def _tasks_hash(tasks: Sequence[CaptionTask]) -> str:
    return hashlib.sha256(json.dumps([[t.field, t.prompt] for t in tasks]).encode()).hexdigest()[:10]


def _write_json_atomic(path: Path, payload: object) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _read_partial(path: Path) -> dict[tuple[str, str], str]:
    """(key, field) -> caption from a partial file; a torn last line (killed mid-write) is ignored."""
    done: dict[tuple[str, str], str] = {}
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
            done[(entry["key"], entry["field"])] = entry["caption"]
        except (json.JSONDecodeError, KeyError, TypeError):
            logger.warning("ignoring a torn line of %s", path)
    return done


@dataclass
class _Sample:
    record: Record
    meta: dict[str, object] | None  # None: unreadable json, copied unchanged
    problem: str | None = None

    @property
    def key(self) -> str:
        return str(self.record["__key__"])


def _parse(record: Record) -> _Sample:
    try:
        sample = _Sample(record, record_meta(record))
    except CorruptSampleError as exn:
        return _Sample(record, None, exn.reason)
    if not any(extension in record for extension in IMAGE_EXTENSIONS):
        sample.problem = f"no image member ({'/'.join(IMAGE_EXTENSIONS)})"
    return sample


def _decode(sample: _Sample) -> Image.Image | None:
    data = next(sample.record[e] for e in IMAGE_EXTENSIONS if e in sample.record)
    try:
        return open_image(data)
    except ImageFileError as exn:
        sample.problem = f"undecodable image: {exn.problem}"
        return None


class _ShardCaptioning:
    """Captions one shard: reuses the partial file, captions what is missing, writes the shard."""

    def __init__(self, source: Path, output: Path, tasks: Sequence[CaptionTask], progress_dir: Path) -> None:
        self.source, self.output, self.tasks = source, output, tasks
        stem = f"{output.name}.{_tasks_hash(tasks)}"
        self.partial = progress_dir / f"{stem}.partial.jsonl"
        self.done = progress_dir / f"{stem}.done.json"

    def run(
        self, captioner: Captioner, batch_size: int, overwrite: bool, bar: tqdm, summary: CaptionSummary
    ) -> None:
        samples = [_parse(record) for record in iter_records(self.source)]
        captions = _read_partial(self.partial)
        readable = [s for s in samples if s.meta is not None and not s.problem]
        pending = [s for s in readable if any(self._needs(s, t, captions, overwrite) for t in self.tasks)]
        kept = (
            sum(
                1
                for s in readable
                for t in self.tasks
                if (s.key, t.field) not in captions and s.meta.get(t.field)
            )
            if not overwrite
            else 0
        )
        with self.partial.open("a", encoding="utf-8") as log:
            for start in range(0, len(pending), batch_size):
                self._caption_batch(
                    pending[start : start + batch_size], captions, captioner, overwrite, log, summary
                )
                bar.update(min(batch_size, len(pending) - start))
        skipped = [(str(self.source), s.key, s.problem) for s in samples if s.problem]
        for _, key, problem in skipped:
            logger.warning("skipped sample %s:%s: %s", self.source, key, problem)
        write_shard_atomic((self._updated(s, captions) for s in samples), self.output)
        _write_json_atomic(
            self.done,
            {"samples": len(samples), "skipped": [{"key": k, "reason": r} for _, k, r in skipped]},
        )
        self.partial.unlink(missing_ok=True)
        summary.kept += kept
        summary.skipped.extend(skipped)
        summary.shards_done += 1

    def _caption_batch(
        self,
        batch: list[_Sample],
        captions: dict[tuple[str, str], str],
        captioner: Captioner,
        overwrite: bool,
        log: io.TextIOBase,
        summary: CaptionSummary,
    ) -> None:
        images = {sample.key: image for sample in batch if (image := _decode(sample)) is not None}
        for task in self.tasks:
            todo = [s.key for s in batch if s.key in images and self._needs(s, task, captions, overwrite)]
            if not todo:
                continue
            texts = captioner([images[key] for key in todo], task.prompt)
            if len(texts) != len(todo):
                raise RuntimeError(f"captioner returned {len(texts)} captions for {len(todo)} images")
            for key, text in zip(todo, texts, strict=True):
                captions[(key, task.field)] = text.strip()
                log.write(json.dumps({"key": key, "field": task.field, "caption": text.strip()}) + "\n")
            summary.captioned[task.field] = summary.captioned.get(task.field, 0) + len(todo)
        log.flush()
        os.fsync(log.fileno())

    @staticmethod
    def _needs(
        sample: _Sample, task: CaptionTask, captions: dict[tuple[str, str], str], overwrite: bool
    ) -> bool:
        """Whether ``sample`` still needs a caption for ``task`` (not logged, and not present unless overwrite)."""
        return (sample.key, task.field) not in captions and (overwrite or not sample.meta.get(task.field))

    def _updated(self, sample: _Sample, captions: dict[tuple[str, str], str]) -> Record:
        if sample.meta is None or sample.problem:
            return sample.record
        meta = dict(sample.meta)
        for task in self.tasks:
            if (sample.key, task.field) in captions:
                meta[task.field] = captions[(sample.key, task.field)]
        if meta == sample.meta:
            return sample.record
        return {**sample.record, "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}


def caption_shards(
    shards: Iterable[str | Path],
    captioner: Captioner,
    tasks: Sequence[CaptionTask],
    out_dir: str | Path | None = None,
    batch_size: int = 16,
    overwrite: bool = False,
    progress: bool = True,
) -> CaptionSummary:
    """Caption every sample of the shards for every task (see the module docstring).

    out_dir: where the captioned shards go (same names); None rewrites the shards in place.
    overwrite: caption samples that already hold the field too (default: keep their caption); shards
        with a done record for the same fields and prompts are skipped either way (delete
        ``.caption-progress/`` beside the output to caption them again).
    """
    if not tasks:
        raise ValueError("no caption task given")
    if len({t.field for t in tasks}) != len(tasks):
        raise ValueError(f"each caption field may appear once, got {[t.field for t in tasks]}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    summary = CaptionSummary(captioned={t.field: 0 for t in tasks})
    with tqdm(desc="caption", unit="img", disable=not progress) as bar:
        for shard in map(Path, shards):
            output = Path(out_dir) / shard.name if out_dir is not None else shard
            progress_dir = output.parent / PROGRESS_DIR
            progress_dir.mkdir(parents=True, exist_ok=True)
            job = _ShardCaptioning(shard, output, tasks, progress_dir)
            if job.done.is_file() and output.is_file():
                summary.shards_already_done += 1
                continue
            job.run(captioner, batch_size, overwrite, bar, summary)
    return summary
