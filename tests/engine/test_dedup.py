"""Near-duplicate search: planted near-duplicates are found, and only those."""

from __future__ import annotations

import numpy as np
import pytest

from tipstorch.engine.dedup import near_duplicates_against, near_duplicates_within


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def planted():
    """200 random unit vectors in 64-d (pairwise cosine ~ 0 +- 0.125), then 10 near-copies
    (cosine ~ 0.99) of rows 0, 10, ..., 90 appended as rows 200..209, and a near-copy of row 200
    (so a near-duplicate of row 0 too) as row 210."""
    rng = np.random.default_rng(0)
    base = _unit(rng.standard_normal((200, 64)))
    copies = _unit(base[0:100:10] + 0.1 * rng.standard_normal((10, 64)) / 8)
    twice = _unit(copies[:1] + 0.1 * rng.standard_normal((1, 64)) / 8)
    return np.concatenate([base, copies, twice])


def test_within_finds_exactly_the_planted_copies_and_keeps_the_originals(planted):
    found = near_duplicates_within(planted, threshold=0.9)
    assert [d.index for d in found] == list(range(200, 211))
    assert [d.duplicate_of for d in found] == [*range(0, 100, 10), 0]
    assert all(d.cosine >= 0.9 for d in found)


def test_against_a_reference_removes_only_rows_with_a_copy_in_it(planted):
    reference = planted[200:210]  # e.g. the evaluation images
    found = near_duplicates_against(planted[:200], reference, threshold=0.9)
    assert [(d.index, d.duplicate_of) for d in found] == [(i, i // 10) for i in range(0, 100, 10)]


def test_threshold_is_inclusive_and_configurable():
    rows = _unit(np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]))  # cosines 0.8, 0.6, 0.0
    assert [d.index for d in near_duplicates_within(rows, 0.8)] == [1]
    # row 2 is near row 1 (0.6) only, and row 1 is removed: a row goes only for a kept near-duplicate
    assert [d.index for d in near_duplicates_within(rows, 0.5)] == [1]
    assert [d.index for d in near_duplicates_within(rows, 0.81)] == []
