"""The training stream: one multi-crop batch per optimiser step, reproducible from the step number.

Every batch is collated (``MultiCropCollate``) with its own generator, seeded from (seed, step, rank),
so crops, flips, caption draws and patch masks depend on the step alone, not on how many batches came
before or on the DataLoader workers. The data position saved in a checkpoint is therefore the step.

- ``source: scenes``: batch ``step`` of rank ``r`` of ``W`` holds scenes ``((step * W + r) * b + j)``
  modulo ``num_samples`` (one epoch = ``num_samples`` scenes); ranks never share a sample within an
  epoch. Resume is exact: the loader simply starts at the resumed step.
- a WebDataset shard pattern: ``ShardDataset`` deals shards to (rank, worker) consumers, each reads its
  share epoch after epoch (shard order and shuffle buffer seeded from seed and epoch) and groups samples
  into batches; the DataLoader takes batches from the workers in turn. Resume at step ``s`` makes each
  consumer skip its batches before ``s`` (and the batches are put back in step order). Exactness limits: the same shards, ``num_workers`` and world
  size as the interrupted run (the checkpoint records them and a change is reported); skipped samples
  are read and decoded again (no crops), so resuming late in a long run costs that read time.
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


def batch_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The generator of one batch's augmentations: a function of (seed, step, rank) only."""
    state = np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class BatchCollator:
    """Samples -> the training batch of one step (tensors of ``BATCH_KEYS`` only; see ``MultiCropCollate``)."""

    def __init__(self, cfg: DataCfg, tokenize: Tokenize, context_length: int, seed: int, rank: int) -> None:
        self.collate = MultiCropCollate(cfg, tokenize, context_length=context_length)  # DataCfg is a MultiCropConfig
        self.seed, self.rank = seed, rank

    def __call__(self, samples: list[ImageTextSample], step: int) -> dict[str, torch.Tensor]:
        self.collate.generator = batch_generator(self.seed, step, self.rank)
        batch = self.collate(samples)
        return {key: batch[key] for key in BATCH_KEYS}


class SceneBatches(Dataset):
    """Map-style: ``batches[step]`` is this rank's batch of that step (scenes are generated on the fly)."""

    def __init__(self, cfg: DataCfg, collator: BatchCollator, local_batch: int, rank: int, world_size: int) -> None:
        if cfg.num_samples < local_batch * world_size:
            raise ValueError(
                f"data.num_samples ({cfg.num_samples}) is smaller than one global batch ({local_batch * world_size})"
            )
        self.scenes = ScenesDataset(ScenesConfig(image_size=cfg.scenes_size, seed=cfg.scenes_seed))
        self.collator, self.num_samples = collator, cfg.num_samples
        self.local_batch, self.rank, self.world_size = local_batch, rank, world_size

    def sample_indices(self, step: int) -> list[int]:
        first = (step * self.world_size + self.rank) * self.local_batch
        return [(first + j) % self.num_samples for j in range(self.local_batch)]

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        return self.collator([self.scenes.sample(index) for index in self.sample_indices(step)], step)


class ShardBatches(IterableDataset):
    """Endless batches from WebDataset shards, starting at ``start_step`` (see the module docstring)."""

    def __init__(
        self, cfg: DataCfg, collator: BatchCollator, local_batch: int, seed: int, start_step: int,
        rank: int, world_size: int,
    ) -> None:
        self.reader = ShardDataset(
            cfg.source, shuffle_buffer=cfg.shuffle_buffer, shuffle_shards=True, seed=seed, rank=rank,
            world_size=world_size,
        )
        self.collator, self.local_batch, self.start_step = collator, local_batch, start_step

    def _samples(self) -> Iterator[ImageTextSample]:
        for epoch in itertools.count():
            self.reader.set_epoch(epoch)
            yielded = 0
            for sample in self.reader:
                yielded += 1
                yield sample
            if not yielded:
                raise RuntimeError(
                    f"data.source {self.reader.shards[:3]}...: epoch {epoch} gave this data consumer no sample "
                    f"({self.reader.stats}); use at least as many shards as ranks x workers"
                )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        skip = max(0, math.ceil((self.start_step - worker) / workers))  # own batches k*workers+worker < start
        samples = self._samples()
        for own_index in itertools.count():
            chunk = list(itertools.islice(samples, self.local_batch))
            if own_index >= skip:
                step = own_index * workers + worker
                yield self.collator(chunk, step) | {STEP_KEY: torch.tensor(step)}


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
) -> Iterable[dict[str, Any]]:
    """This rank's batches for steps ``start_step .. total_steps - 1``, in order, from DataLoader workers.

    Each batch: global_crop [b, 3, G, G], local_crops [b, M, 3, S, S], patch_mask bool [b, N],
    alt_tokens / synthetic_tokens long [b, L].
    """
    collator = BatchCollator(cfg, tokenize, context_length, seed, rank)
    # Own generator: starting the loader must not draw from the global RNG that the step itself uses.
    workers = {"num_workers": cfg.num_workers, "prefetch_factor": 2 if cfg.num_workers else None,
               "generator": torch.Generator().manual_seed(seed), "worker_init_fn": ignore_stop_signals}
    if cfg.source == SCENES:
        batches = SceneBatches(cfg, collator, local_batch, rank, world_size)
        return DataLoader(batches, batch_size=None, sampler=range(start_step, total_steps), **workers)
    batches = ShardBatches(cfg, collator, local_batch, seed, start_step, rank, world_size)
    return itertools.islice(in_step_order(DataLoader(batches, batch_size=None, **workers), start_step),
                            total_steps - start_step)
