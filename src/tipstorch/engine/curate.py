"""The curation job: embed pool, targets and evaluation sets, curate toward every target
independently, merge, remove near-duplicates, copy the selected samples into new shards, report.

Outputs in ``out_dir``: ``shard-000000.tar``, ... (the selected samples' tar members copied byte
for byte, in pool order), ``curation_report.json`` (see ``CurationReport``) and
``curation_distances.png``. Embeddings are cached in ``cache_dir`` (default ``out_dir/.embeddings``),
so a killed job resumes at the first unit not yet embedded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tipstorch.data.records import iter_records, write_record_shards
from tipstorch.engine.curation import CurationConfig, TargetCuration, curate_target
from tipstorch.engine.curation_report import plot_distances
from tipstorch.engine.dedup import near_duplicates_against, near_duplicates_within
from tipstorch.engine.embedding_cache import EmbeddingTable, ImageEmbedder, embed_units, stack_units
from tipstorch.engine.image_sources import ImageUnit, image_units

logger = logging.getLogger("tipstorch.engine")

REPORT_FILE = "curation_report.json"
HISTOGRAM_FILE = "curation_distances.png"


@dataclass
class Target:
    """A target dataset (folder of images or shards) and its curation settings."""

    source: str | Path
    config: CurationConfig


@dataclass
class CurateJob:
    """pool: WebDataset shards (directory, pattern or file); eval_sets: folders or shards whose
    near-duplicates are removed; dedup_threshold: cosine at or above which two images are duplicates."""

    pool: str | Path
    targets: Sequence[Target]
    out_dir: str | Path
    eval_sets: Sequence[str | Path] = ()
    dedup_threshold: float = 0.95
    shard_size: int = 1000
    batch_size: int = 64
    chunk_size: int = 1000
    cache_dir: str | Path | None = None
    progress: bool = True


@dataclass
class CurationReport:
    """What the job did; ``as_dict`` is the JSON report."""

    model: str
    pool: dict[str, object]
    targets: list[dict[str, object]]
    overlap_between_targets: int
    duplicates: dict[str, object]
    written: dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _embed(
    source: str | Path, job: CurateJob, embedder: ImageEmbedder, cache: Path, desc: str
) -> tuple[list[ImageUnit], EmbeddingTable]:
    units = image_units(source, job.chunk_size)
    return units, _embed_units(source, units, job, embedder, cache, desc)


def _embed_units(
    source: str | Path,
    units: list[ImageUnit],
    job: CurateJob,
    embedder: ImageEmbedder,
    cache: Path,
    desc: str,
) -> EmbeddingTable:
    table = stack_units(embed_units(units, embedder, cache, job.batch_size, job.progress, desc))
    if not len(table.ids):
        raise ValueError(f"{source}: no decodable image to embed ({len(table.skipped)} skipped)")
    return table


def _check_unique_keys(units: Sequence[ImageUnit], table: EmbeddingTable) -> None:
    first: dict[str, int] = {}
    for unit, key in table.ids:
        if first.setdefault(key, unit) != unit:
            raise ValueError(
                f"pool key {key!r} is in both {units[first[key]].source} and {units[unit].source}; "
                "pool keys must be unique to copy the selection into new shards"
            )


def _target_summary(target: Target, images: int, result: TargetCuration) -> dict[str, object]:
    return {
        "source": str(target.source),
        "images": images,
        "clusters": target.config.clusters,
        "samples_requested": target.config.samples,
        "radius_percentile": target.config.radius_percentile,
        "radius_from": target.config.radius_from,
        "eligible": int(result.eligible.sum()),
        "selected": len(result.selected),
        "per_cluster": result.cluster_table(),
    }


def _pool_id(units: Sequence[ImageUnit], table: EmbeddingTable, row: int) -> dict[str, str]:
    unit, key = table.ids[row]
    return {"key": key, "shard": units[unit].source}


def run_curation(job: CurateJob, embedder: ImageEmbedder) -> CurationReport:
    """Run the whole job (see the module docstring); returns the report it also writes."""
    if not job.targets:
        raise ValueError("curation needs at least one target dataset")
    out = Path(job.out_dir)
    cache = Path(job.cache_dir) if job.cache_dir is not None else out / ".embeddings"
    pool_units = image_units(job.pool, job.chunk_size)
    if not all(unit.is_shard for unit in pool_units):
        raise ValueError(
            f"pool {job.pool} must be WebDataset shards (write a folder with `tipstorch data write-shards`)"
        )
    if any(Path(unit.source).resolve().parent == out.resolve() for unit in pool_units):
        raise ValueError(
            f"output directory {out} holds pool shards; write the selection to another directory"
        )
    pool = _embed_units(job.pool, pool_units, job, embedder, cache, "embed pool")
    _check_unique_keys(pool_units, pool)

    results: list[TargetCuration] = []
    summaries: list[dict[str, object]] = []
    for number, target in enumerate(job.targets):
        _, target_table = _embed(target.source, job, embedder, cache, f"embed target {number}")
        result = curate_target(target_table.embeddings, pool.embeddings, target.config)
        results.append(result)
        summaries.append(_target_summary(target, len(target_table.ids), result))
        logger.info(
            "target %s: %d of %d pool images selected", target.source, len(result.selected), len(pool.ids)
        )

    union = np.unique(np.concatenate([r.selected for r in results]))
    overlap = sum(len(r.selected) for r in results) - len(union)

    against_eval: list[dict[str, object]] = []
    for eval_set in job.eval_sets:
        eval_units, eval_table = _embed(eval_set, job, embedder, cache, "embed eval")
        found = near_duplicates_against(pool.embeddings[union], eval_table.embeddings, job.dedup_threshold)
        for duplicate in found:
            eval_unit, eval_key = eval_table.ids[duplicate.duplicate_of]
            against_eval.append(
                {
                    **_pool_id(pool_units, pool, int(union[duplicate.index])),
                    "eval_set": str(eval_set),
                    "eval_key": eval_key,
                    "eval_source": eval_units[eval_unit].source,
                    "cosine": round(duplicate.cosine, 6),
                }
            )
        union = np.delete(union, [d.index for d in found])

    within = near_duplicates_within(pool.embeddings[union], job.dedup_threshold)
    within_report = [
        {
            **_pool_id(pool_units, pool, int(union[d.index])),
            "duplicate_of": _pool_id(pool_units, pool, int(union[d.duplicate_of])),
            "cosine": round(d.cosine, 6),
        }
        for d in within
    ]
    final = np.delete(union, [d.index for d in within])

    keep = {pool.ids[row] for row in final}
    records = (
        record
        for number, unit in enumerate(pool_units)
        for record in iter_records(unit.source)
        if (number, str(record["__key__"])) in keep
    )
    written = write_record_shards(records, out, shard_size=job.shard_size)
    for stale in sorted(set(out.glob("shard-*.tar")) - set(written.shards)):  # from an earlier, larger run
        stale.unlink()
    report = CurationReport(
        model=embedder.fingerprint,
        pool={
            "source": str(job.pool),
            "shards": len(pool_units),
            "embedded": len(pool.ids),
            "skipped": [{"key": key, "reason": reason} for key, reason in pool.skipped],
        },
        targets=summaries,
        overlap_between_targets=int(overlap),
        duplicates={
            "threshold": job.dedup_threshold,
            "against_eval": against_eval,
            "within_selection": within_report,
        },
        written={"samples": written.samples, "shards": [p.name for p in written.shards]},
    )
    plot_distances(results, [str(t.source) for t in job.targets], out / HISTOGRAM_FILE)
    (out / REPORT_FILE).write_text(json.dumps(report.as_dict(), indent=2) + "\n", encoding="utf-8")
    return report
