"""Shared pieces of the streaming readers: which consumer (rank x worker) this is, and what was skipped."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger("tipstorch.data")

T = TypeVar("T")
_MAX_WORKERS = 256  # rows of the shared counter table; worker ids beyond share rows modulo this


def distributed_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): the given values, else torch.distributed's when initialised, else (0, 1)."""
    if rank is None or world_size is None:
        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
        else:
            rank = 0 if rank is None else rank
            world_size = 1 if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    return rank, world_size


def consumer_slot(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(slot, slots): this process's place among world_size x num_workers data consumers.

    Called inside ``__iter__`` so that DataLoader workers see their own worker info.
    """
    rank, world_size = distributed_rank(rank, world_size)
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world_size * workers


def split_for_consumer(items: Sequence[T], rank: int | None = None, world_size: int | None = None) -> list[T]:
    """The disjoint share of ``items`` for this rank and worker (strided, so shares differ by at most one)."""
    slot, slots = consumer_slot(rank, world_size)
    share = list(items[slot::slots])
    if not share:
        logger.warning(
            "data consumer %d of %d got no items out of %d; use at least as many shards/files as ranks x workers",
            slot,
            slots,
            len(items),
        )
    return share


def epoch_share(
    items: Sequence[T],
    shuffle: bool,
    seed: int,
    epoch: int,
    rank: int | None = None,
    world_size: int | None = None,
) -> list[T]:
    """This consumer's share of ``items`` for one epoch: if ``shuffle``, the same permutation on every
    rank and worker (seeded by seed and epoch), then dealt out by ``split_for_consumer``."""
    order = list(items)
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    return split_for_consumer(order, rank, world_size)


class ReadStats:
    """Samples yielded and skipped by a reader, summed over its DataLoader worker processes.

    Counts live in a shared-memory tensor (one row per worker, so no two processes write the same
    cell); every skip is also logged on the ``tipstorch.data`` logger with the sample key and reason.
    """

    def __init__(self) -> None:
        self._counts = torch.zeros(_MAX_WORKERS + 1, 2, dtype=torch.int64).share_memory_()

    def _row(self) -> torch.Tensor:
        info = torch.utils.data.get_worker_info()
        return self._counts[0 if info is None else 1 + info.id % _MAX_WORKERS]

    def record_read(self) -> None:
        self._row()[0] += 1

    def record_skip(self, key: str, reason: str) -> None:
        self._row()[1] += 1
        logger.warning("skipped sample %s: %s", key, reason)

    @property
    def read(self) -> int:
        """Samples yielded so far."""
        return int(self._counts[:, 0].sum())

    @property
    def skipped(self) -> int:
        """Samples skipped as corrupt or undecodable so far."""
        return int(self._counts[:, 1].sum())

    def as_dict(self) -> dict[str, int]:
        return {"read": self.read, "skipped": self.skipped}

    def __repr__(self) -> str:
        return f"ReadStats(read={self.read}, skipped={self.skipped})"
