"""Near-duplicate search by embedding cosine similarity (faiss exact inner-product range search).

Two images are near-duplicates when the cosine of their L2-normalised embeddings is at least
``threshold`` (up to float32 rounding). Within one set the earliest image of a group is kept and every later image that is a
near-duplicate of a kept one is removed; against a reference set (evaluation data) every image with
a near-duplicate in the reference is removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tipstorch.engine.faiss_import import require_faiss

_ROUNDING = (
    1e-6  # float32 inner products of unit vectors: a cosine equal to the threshold may come out just below
)


@dataclass(frozen=True)
class Duplicate:
    """Row ``index`` is removed as a near-duplicate of row ``duplicate_of`` (of the same set, or of
    the reference set), with their cosine similarity."""

    index: int
    duplicate_of: int
    cosine: float


def _check(embeddings: np.ndarray, what: str) -> np.ndarray:
    if embeddings.ndim != 2:
        raise ValueError(f"{what} embeddings must be [N, D], got shape {embeddings.shape}")
    return np.ascontiguousarray(embeddings, dtype=np.float32)


def _neighbours(queries: np.ndarray, reference: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """(query row, reference row, cosine) for every pair with cosine >= threshold, by query row."""
    if not len(queries) or not len(reference):
        return []
    if queries.shape[1] != reference.shape[1]:
        raise ValueError(f"embedding widths differ: {queries.shape[1]} vs reference {reference.shape[1]}")
    index = require_faiss().IndexFlatIP(reference.shape[1])
    index.add(reference)
    limits, similarities, rows = index.range_search(queries, float(threshold) - _ROUNDING)
    return [
        (query, int(rows[position]), float(similarities[position]))
        for query in range(len(queries))
        for position in range(limits[query], limits[query + 1])
    ]


def _validate_threshold(threshold: float) -> None:
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"cosine threshold must be in [-1, 1], got {threshold}")


def near_duplicates_within(embeddings: np.ndarray, threshold: float) -> list[Duplicate]:
    """Rows of embeddings [N, D] to remove so that no two kept rows are near-duplicates (earliest kept)."""
    _validate_threshold(threshold)
    data = _check(embeddings, "selection")
    removed: dict[int, Duplicate] = {}
    for query, other, cosine in _neighbours(data, data, threshold):
        if other > query and query not in removed and other not in removed:
            removed[other] = Duplicate(other, query, cosine)
    return sorted(removed.values(), key=lambda d: d.index)


def near_duplicates_against(
    embeddings: np.ndarray, reference: np.ndarray, threshold: float
) -> list[Duplicate]:
    """Rows of embeddings [N, D] with a near-duplicate in reference [M, D] (the most similar is named)."""
    _validate_threshold(threshold)
    best: dict[int, Duplicate] = {}
    for query, other, cosine in _neighbours(
        _check(embeddings, "selection"), _check(reference, "reference"), threshold
    ):
        if query not in best or cosine > best[query].cosine:
            best[query] = Duplicate(query, other, cosine)
    return sorted(best.values(), key=lambda d: d.index)
