"""The training stream: one multi-crop batch per optimiser step, reproducible from the step number.

The global batch of step ``t`` has B rows; rank ``r`` of ``W`` holds rows ``r * b .. (r + 1) * b - 1``
(b = B / W). Row ``i`` is collated (``MultiCropCollate``) with its own generator, seeded from
(seed, t, i): its crops, flips, caption draws and patch mask depend on the step and the row alone, not
on the world size, the rank, the other rows or the DataLoader workers. The data position saved in a
checkpoint is therefore the step.

- ``source: scenes``: row ``i`` of step ``t`` is scene ``(t * B + i) mod num_samples`` (one epoch =
  ``num_samples`` scenes). The global batch of every step is the same for 1, 2 or N processes and any
  ``num_workers``, and a resume at any world size continues exactly: the loader starts at the step.
- a WebDataset shard pattern: ``ShardDataset`` deals shards to (rank, worker) consumers, each reads its
  share epoch after epoch (shard order and shuffle buffer seeded from seed and epoch) and groups samples
  into batches; the DataLoader takes batches from the workers in turn. Which samples form a step's batch
  depends on the consumers (world size x ``num_workers``); the augmentation of each row does not. Resume
  at step ``s`` with the same consumers is exact: each consumer skips its batches before ``s`` (and the
  batches are put back in step order); skipped samples are read and decoded again (no crops). A resume
  with other consumers (another world size or ``num_workers``) starts the stream at the next epoch
  boundary of the saved run instead: no sample of the interrupted epoch is seen twice, and the samples
  of that epoch not yet trained on are skipped (the bound: the rest of one epoch; see
  ``ShardBatches``). Shuffle-buffer state and per-consumer positions are not checkpointed.
"""

from __future__ import annotations

import itertools
import logging
import math
import signal
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from tipstorch.data.collate import MultiCropCollate, Tokenize
from tipstorch.data.sample import ImageTextSample
from tipstorch.data.scenes import ScenesConfig, ScenesDataset
from tipstorch.data.shards import ShardDataset
from tipstorch.train.config import DataCfg

logger = logging.getLogger("tipstorch.train")

SCENES = "scenes"
BATCH_KEYS = ("global_crop", "local_crops", "patch_mask", "alt_tokens", "synthetic_tokens")
STEP_KEY = "step"
EPOCH_KEY = "epoch"  # shard streams: the epoch of a batch's last sample (the loop records the newest trained)


def sample_generator(seed: int, step: int, row: int) -> torch.Generator:
    """The generator of one sample's augmentations: a function of (seed, step, row of the global batch) only."""
    state = np.random.SeedSequence([seed, step, row]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class BatchCollator:
    """Samples -> this rank's rows of one step's global batch (tensors of ``BATCH_KEYS`` only; see
    ``MultiCropCollate``); ``first_row`` is the global row of this rank's first sample (rank x b)."""

    def __init__(self, cfg: DataCfg, tokenize: Tokenize, context_length: int, seed: int, first_row: int) -> None:
        self.collate = MultiCropCollate(cfg, tokenize, context_length=context_length)  # DataCfg is a MultiCropConfig
        self.seed, self.first_row = seed, first_row

    def __call__(self, samples: list[ImageTextSample], step: int) -> dict[str, torch.Tensor]:
        rows = range(self.first_row, self.first_row + len(samples))
        batch = self.collate(samples, [sample_generator(self.seed, step, row) for row in rows])
        return {key: batch[key] for key in BATCH_KEYS}


def scenes_config(cfg: DataCfg) -> ScenesConfig:
    """The built-in scenes the ``data`` section asks for (ScenesConfig's ValueError names a bad field)."""
    min_objects, max_objects = cfg.scenes_objects
    return ScenesConfig(
        image_size=cfg.scenes_size,
        seed=cfg.scenes_seed,
        min_objects=int(min_objects),
        max_objects=int(max_objects),
        object_radius=tuple(float(r) for r in cfg.scenes_object_radius),
    )


class SceneBatches(Dataset):
    """Map-style: ``batches[step]`` is this rank's batch of that step (scenes are generated on the fly)."""

    def __init__(self, cfg: DataCfg, collator: BatchCollator, local_batch: int, rank: int, world_size: int) -> None:
        if cfg.num_samples < local_batch * world_size:
            raise ValueError(
                f"data.num_samples ({cfg.num_samples}) is smaller than one global batch ({local_batch * world_size})"
            )
        self.scenes = ScenesDataset(scenes_config(cfg))
        self.collator, self.num_samples = collator, cfg.num_samples
        self.local_batch, self.rank, self.world_size = local_batch, rank, world_size

    def sample_indices(self, step: int) -> list[int]:
        """The scenes of this rank's rows of step ``step``: (step * B + row) mod num_samples."""
        first = (step * self.world_size + self.rank) * self.local_batch
        return [(first + j) % self.num_samples for j in range(self.local_batch)]

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        return self.collator([self.scenes.sample(index) for index in self.sample_indices(step)], step)


class ShardBatches(IterableDataset):
    """Endless batches from WebDataset shards, starting at ``start_step`` (see the module docstring).

    ``start_epoch`` None: the stream of a run that started at step 0, each consumer skipping its batches
    before ``start_step`` (exact with the consumers of the saved run). An int: a fresh stream from that
    epoch whose first batches are steps ``start_step, ...`` (the resume with other consumers). Each batch
    is tagged with its step (``STEP_KEY``) and the epoch of its last sample (``EPOCH_KEY``).
    """

    def __init__(
        self, cfg: DataCfg, collator: BatchCollator, local_batch: int, seed: int, start_step: int,
        rank: int, world_size: int, start_epoch: int | None = None,
    ) -> None:
        self.reader = ShardDataset(
            cfg.source, shuffle_buffer=cfg.shuffle_buffer, shuffle_shards=True, seed=seed, rank=rank,
            world_size=world_size,
        )
        self.collator, self.local_batch, self.start_step = collator, local_batch, start_step
        self.start_epoch = start_epoch

    def _samples(self) -> Iterator[tuple[int, ImageTextSample]]:
        for epoch in itertools.count(self.start_epoch or 0):
            self.reader.set_epoch(epoch)
            yielded = 0
            for sample in self.reader:
                yielded += 1
                yield epoch, sample
            if not yielded:
                raise RuntimeError(
                    f"data.source {self.reader.shards[:3]}...: epoch {epoch} gave this data consumer no sample "
                    f"({self.reader.stats}); use at least as many shards as ranks x workers"
                )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        first_step = 0 if self.start_epoch is None else self.start_step
        skip = max(0, math.ceil((self.start_step - first_step - worker) / workers))  # own steps before start
        samples = self._samples()
        for own_index in itertools.count():
            epochs, chunk = zip(*itertools.islice(samples, self.local_batch), strict=True)
            if own_index >= skip:
                step = first_step + own_index * workers + worker
                tags = {STEP_KEY: torch.tensor(step), EPOCH_KEY: torch.tensor(epochs[-1])}
                yield self.collator(list(chunk), step) | tags


def in_step_order(batches: Iterable[dict[str, Any]], start_step: int) -> Iterator[dict[str, Any]]:
    """Batches tagged with their step, re-ordered by step (a resumed DataLoader asks its workers in turn
    from worker 0, whose first batch need not be the resumed step's); holds at most num_workers batches."""
    pending: dict[int, dict[str, Any]] = {}
    expected = start_step
    for batch in batches:
        pending[int(batch.pop(STEP_KEY))] = batch
        while expected in pending:
            yield pending.pop(expected)
            expected += 1


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: leave SIGTERM / SIGINT to the main process, which finishes its step,
    checkpoints and then stops the workers. A signal sent to the whole process group (Ctrl-C, a cluster's
    scancel) would otherwise kill a worker and make the main process fail mid-step."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def training_batches(
    cfg: DataCfg,
    tokenize: Tokenize,
    context_length: int,
    local_batch: int,
    seed: int,
    start_step: int,
    total_steps: int,
    rank: int = 0,
    world_size: int = 1,
    start_epoch: int | None = None,
) -> Iterable[dict[str, Any]]:
    """This rank's batches for steps ``start_step .. total_steps - 1``, in order, from DataLoader workers.

    Each batch: global_crop [b, 3, G, G], local_crops [b, M, 3, S, S], patch_mask bool [b, N],
    alt_tokens / synthetic_tokens long [b, L]; from shards also ``EPOCH_KEY`` (a scalar). ``start_epoch``:
    shard streams only, see ``ShardBatches``.
    """
    collator = BatchCollator(cfg, tokenize, context_length, seed, first_row=rank * local_batch)
    # Own generator: starting the loader must not draw from the global RNG that the step itself uses.
    workers = {"num_workers": cfg.num_workers, "prefetch_factor": 2 if cfg.num_workers else None,
               "generator": torch.Generator().manual_seed(seed), "worker_init_fn": ignore_stop_signals}
    if cfg.source == SCENES:
        batches = SceneBatches(cfg, collator, local_batch, rank, world_size)
        return DataLoader(batches, batch_size=None, sampler=range(start_step, total_steps), **workers)
    batches = ShardBatches(cfg, collator, local_batch, seed, start_step, rank, world_size, start_epoch)
    return itertools.islice(in_step_order(DataLoader(batches, batch_size=None, **workers), start_step),
                            total_steps - start_step)
