"""Curation toward a target (A.3) on a synthetic embedding mixture whose right answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from tipstorch.engine.curation import CurationConfig, curate_target, proportional_quotas

DIM = 16


def _blob(rng: np.random.Generator, component: int, count: int, spread: float = 0.08) -> np.ndarray:
    """``count`` unit vectors scattered around the basis vector e_component."""
    points = np.zeros((count, DIM))
    points[:, component] = 1.0
    points += spread * rng.standard_normal((count, DIM))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def mixture():
    """Target: 300 images near e0, 100 near e1. Pool: 400 near each of e0..e4 (component = row // 400)."""
    rng = np.random.default_rng(0)
    target = np.concatenate([_blob(rng, 0, 300), _blob(rng, 1, 100)])
    pool = np.concatenate([_blob(rng, c, 400) for c in range(5)])
    return target, pool, np.arange(len(pool)) // 400


def test_kmeans_finds_the_target_modes_and_their_sizes(mixture):
    target, pool, _ = mixture
    result = curate_target(target, pool, CurationConfig(clusters=2, samples=200))
    order = np.argsort(-result.target_counts)
    assert result.target_counts[order].tolist() == [300, 100]
    assert result.centroids[order[0], 0] > 0.99 and result.centroids[order[1], 1] > 0.99


def test_selection_comes_from_the_target_modes_in_target_proportion(mixture):
    target, pool, component = mixture
    result = curate_target(target, pool, CurationConfig(clusters=2, samples=200))
    picked = np.bincount(component[result.selected], minlength=5)
    assert picked.tolist() == [150, 50, 0, 0, 0]
    assert len(np.unique(result.selected)) == 200


def test_members_at_or_beyond_the_target_percentile_are_never_selected(mixture):
    target, pool, component = mixture
    result = curate_target(target, pool, CurationConfig(clusters=2, samples=None))
    chosen_distance = result.pool_distance[result.selected]
    assert np.all(chosen_distance < result.radius[result.pool_cluster[result.selected]])
    # pool images of the target modes are distributed like the target: about 90% are inside the radius
    for mode in (0, 1):
        inside = result.eligible[component == mode].mean()
        assert 0.8 < inside < 0.97, (mode, inside)
    assert not result.eligible[component >= 2].any()  # unlike any target image: never eligible


def test_pool_percentile_drops_the_farthest_tenth_of_every_cluster(mixture):
    target, pool, _ = mixture
    result = curate_target(target, pool, CurationConfig(clusters=2, samples=None, radius_from="pool"))
    for row in result.cluster_table():
        members = np.flatnonzero(result.pool_cluster == row["cluster"])
        inside = members[result.pool_distance[members] < np.percentile(result.pool_distance[members], 90)]
        assert row["eligible"] == len(inside) == pytest.approx(0.9 * len(members), abs=1)
        assert set(result.selected[result.pool_cluster[result.selected] == row["cluster"]]) <= set(inside)


def test_a_member_exactly_at_the_percentile_is_dropped(mixture):
    target, pool, _ = mixture
    config = CurationConfig(clusters=2, samples=None, radius_from="pool", radius_percentile=100.0)
    result = curate_target(target, pool, config)
    for row in result.cluster_table():  # the 100th percentile is the farthest member itself
        assert row["eligible"] == row["pool_members"] - 1


def test_short_clusters_give_all_they_have_and_no_more():
    rng = np.random.default_rng(1)
    target = np.concatenate([_blob(rng, 0, 50), _blob(rng, 1, 50)])
    pool = np.concatenate([_blob(rng, 0, 200), _blob(rng, 1, 10)])
    result = curate_target(target, pool, CurationConfig(clusters=2, samples=100))
    table = {int(np.argmax(result.centroids[row["cluster"]])): row for row in result.cluster_table()}
    assert table[0]["selected"] == 50
    assert table[1]["selected"] == table[1]["eligible"] < 10


def test_quotas_follow_weights_and_sum_to_the_total():
    quota = proportional_quotas(np.array([1.0, 1.0, 1.0]), 10, np.array([100, 100, 100]))
    assert sorted(quota.tolist()) == [3, 3, 4]
    assert proportional_quotas(np.array([3.0, 1.0]), 8, np.array([100, 1])).tolist() == [6, 1]


def test_more_clusters_than_target_images_is_refused():
    with pytest.raises(ValueError, match="at least as many target images as clusters: 3 < 4"):
        curate_target(
            np.eye(3, DIM, dtype=np.float32), np.eye(3, DIM, dtype=np.float32), CurationConfig(clusters=4)
        )
