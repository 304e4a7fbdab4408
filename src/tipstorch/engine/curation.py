"""Curation of a pool toward one target dataset by k-means on image embeddings (TIPS paper, A.3).

For a target: k-means (faiss) on its embeddings gives K centres and the target's cluster sizes;
every pool image is assigned to its nearest centre; members at or beyond the ``radius_percentile``
(90) of distance to their centre are ignored; then ``samples`` images are drawn from the clusters in
proportion to the target cluster sizes (largest-remainder quotas, seeded random draw inside a
cluster). A cluster with fewer eligible members than its quota gives all it has; the shortfall is
reported, not moved to other clusters, so no cluster exceeds its target share.

Which distances define the percentile (the paper: "ignoring members that are sufficiently far from
their assigned cluster center (90th percentile or above)") is ``radius_from``: ``"target"`` (default)
takes the target images' distances to their centre, so a pool image farther from every centre than
90% of the target's own members is dropped and pool images unlike any target are never selected;
``"pool"`` takes the pool members' distances, dropping the farthest 10% of every cluster's members.
All embeddings are L2-normalised; distances are Euclidean (sqrt(2 - 2 cos) to a unit centre).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tipstorch.engine.faiss_import import require_faiss

RADIUS_FROM: tuple[str, ...] = ("target", "pool")


@dataclass
class CurationConfig:
    """Settings for one target. ``samples``: images to draw (None: as many as the pool has eligible)."""

    clusters: int
    samples: int | None = None
    radius_percentile: float = 90.0
    radius_from: str = "target"
    kmeans_iterations: int = 25
    seed: int = 0

    def __post_init__(self) -> None:
        if self.clusters <= 0:
            raise ValueError(f"clusters must be positive, got {self.clusters}")
        if self.samples is not None and self.samples < 0:
            raise ValueError(f"samples must be >= 0, got {self.samples}")
        if not 0.0 < self.radius_percentile <= 100.0:
            raise ValueError(f"radius_percentile must be in (0, 100], got {self.radius_percentile}")
        if self.radius_from not in RADIUS_FROM:
            raise ValueError(f"radius_from must be one of {RADIUS_FROM}, got {self.radius_from!r}")


@dataclass
class TargetCuration:
    """The outcome for one target. Shapes: K clusters, P pool images, D embedding width.

    centroids [K, D]; target_counts [K] (target images per cluster); pool_cluster [P] and
    pool_distance [P] (nearest centre and distance to it); radius [K] (distance at which members are
    dropped; inf for a cluster without reference distances); eligible [P] bool (nearer to the
    centre than its radius); quota [K]; selected: sorted pool indices drawn.
    """

    centroids: np.ndarray
    target_counts: np.ndarray
    pool_cluster: np.ndarray
    pool_distance: np.ndarray
    radius: np.ndarray
    eligible: np.ndarray
    quota: np.ndarray
    selected: np.ndarray

    def cluster_table(self) -> list[dict[str, object]]:
        """One row per cluster: target images and share, pool members, radius, eligible, quota, selected."""
        k = len(self.centroids)
        members = np.bincount(self.pool_cluster, minlength=k)
        eligible = np.bincount(self.pool_cluster[self.eligible], minlength=k)
        selected = np.bincount(self.pool_cluster[self.selected], minlength=k)
        share = self.target_counts / max(int(self.target_counts.sum()), 1)
        return [
            {
                "cluster": c,
                "target_images": int(self.target_counts[c]),
                "target_share": round(float(share[c]), 6),
                "pool_members": int(members[c]),
                "radius": float(self.radius[c]) if np.isfinite(self.radius[c]) else None,
                "eligible": int(eligible[c]),
                "quota": int(self.quota[c]),
                "selected": int(selected[c]),
            }
            for c in range(k)
        ]


def _as_float32(embeddings: np.ndarray, what: str) -> np.ndarray:
    if embeddings.ndim != 2 or not len(embeddings):
        raise ValueError(f"{what} embeddings must be a non-empty [N, D] array, got shape {embeddings.shape}")
    return np.ascontiguousarray(embeddings, dtype=np.float32)


def kmeans_centroids(
    embeddings: np.ndarray, clusters: int, iterations: int = 25, seed: int = 0
) -> np.ndarray:
    """Spherical k-means centres [K, D] (unit norm) of embeddings [N, D] with faiss; needs N >= K."""
    data = _as_float32(embeddings, "target")
    if len(data) < clusters:
        raise ValueError(
            f"k-means needs at least as many target images as clusters: {len(data)} < {clusters}"
        )
    kmeans = require_faiss().Kmeans(
        data.shape[1],
        clusters,
        niter=iterations,
        seed=seed,
        spherical=True,
        min_points_per_centroid=1,
        max_points_per_centroid=max(256, len(data) // clusters + 1),
        verbose=False,
    )
    kmeans.train(data)
    return kmeans.centroids.copy()


def assign_nearest(embeddings: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cluster [N] int64, Euclidean distance [N] float32) of each embedding's nearest centre."""
    data = _as_float32(embeddings, "assigned")
    if data.shape[1] != centroids.shape[1]:
        raise ValueError(f"embedding width {data.shape[1]} differs from the centres' {centroids.shape[1]}")
    index = require_faiss().IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    squared, nearest = index.search(data, 1)
    return nearest[:, 0].astype(np.int64), np.sqrt(np.maximum(squared[:, 0], 0.0))


def cluster_radii(cluster: np.ndarray, distance: np.ndarray, clusters: int, percentile: float) -> np.ndarray:
    """[K] the ``percentile`` of the distances of each cluster's members (inf where it has none)."""
    radius = np.full(clusters, np.inf)
    for c in range(clusters):
        member_distances = distance[cluster == c]
        if len(member_distances):
            radius[c] = np.percentile(member_distances, percentile)
    return radius


def proportional_quotas(weights: np.ndarray, total: int, capacity: np.ndarray) -> np.ndarray:
    """[K] int quotas summing to ``total`` in proportion to weights (largest remainder), each
    then capped at ``capacity`` (so the sum may fall short)."""
    share = weights / weights.sum() * total
    quota = np.floor(share).astype(np.int64)
    remainder_order = np.argsort(-(share - quota), kind="stable")
    quota[remainder_order[: total - int(quota.sum())]] += 1
    return np.minimum(quota, capacity)


def curate_target(target: np.ndarray, pool: np.ndarray, config: CurationConfig) -> TargetCuration:
    """Select pool images like the target: target [T, D], pool [P, D], both L2-normalised."""
    centroids = kmeans_centroids(target, config.clusters, config.kmeans_iterations, config.seed)
    target_cluster, target_distance = assign_nearest(target, centroids)
    target_counts = np.bincount(target_cluster, minlength=config.clusters)
    pool_cluster, pool_distance = assign_nearest(pool, centroids)
    if config.radius_from == "target":
        radius = cluster_radii(target_cluster, target_distance, config.clusters, config.radius_percentile)
    else:
        radius = cluster_radii(pool_cluster, pool_distance, config.clusters, config.radius_percentile)
    eligible = pool_distance < radius[pool_cluster]
    capacity = np.bincount(pool_cluster[eligible], minlength=config.clusters)
    total = int(eligible.sum()) if config.samples is None else config.samples
    quota = proportional_quotas(target_counts.astype(np.float64), total, capacity)
    rng = np.random.default_rng(config.seed)
    chosen = [
        rng.choice(np.flatnonzero(eligible & (pool_cluster == c)), size=int(quota[c]), replace=False)
        for c in range(config.clusters)
    ]
    selected = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
    return TargetCuration(
        centroids, target_counts, pool_cluster, pool_distance, radius, eligible, quota, selected
    )
