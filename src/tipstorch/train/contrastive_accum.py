"""Gradient accumulation that keeps the negatives of the whole accumulated batch in the contrastive loss.

The contrastive loss of a batch does not split into per-micro-batch losses: every image is contrasted
with every caption. As open_clip does, first embed every micro-batch without grad (the cache), then for
each micro-batch recompute its embeddings with grad, splice them into the cached batch and back-propagate
the full-batch contrastive loss: the sum over micro-batches of these gradients is exactly the full-batch
gradient. The temperature appears in every micro-step's loss, so its gradient is scaled by 1/K there.
The other (per-sample) terms are computed on the micro-batch alone and weighted 1/K.

Exactness needs a deterministic forward (no dropout / drop-path): the cached and recomputed embeddings
of a micro-batch must be equal.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch

from tipstorch.train.outputs import ContrastiveEmbeddings

MicroBatch = TypeVar("MicroBatch")
Parts = dict[str, torch.Tensor]


def split_batch(batch: Mapping[str, Any], count: int) -> list[dict[str, Any]]:
    """Cut a batch dict into ``count`` equal micro-batches along the sample axis (tensors on dim 0, lists
    by slicing); the batch size must be a multiple of ``count``."""
    sizes = {len(value) for value in batch.values()}
    if len(sizes) != 1 or next(iter(sizes)) % count:
        raise ValueError(f"split_batch: every entry needs the same length, a multiple of {count}; got {sorted(sizes)}")
    rows = next(iter(sizes)) // count
    return [{key: value[i * rows : (i + 1) * rows] for key, value in batch.items()} for i in range(count)]


def splice(cache: Sequence[ContrastiveEmbeddings], index: int, current: ContrastiveEmbeddings) -> ContrastiveEmbeddings:
    """The cached micro-batch embeddings [b_i, D] concatenated along dim 0, with entry ``index`` replaced
    by ``current`` (the same micro-batch computed with grad)."""
    joined = {}
    for field in dataclasses.fields(current):
        if getattr(current, field.name) is not None:
            pieces = [getattr(current if i == index else entry, field.name) for i, entry in enumerate(cache)]
            joined[field.name] = torch.cat(pieces, dim=0)
    return ContrastiveEmbeddings(**joined)


def scale_gradient(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """Same value as ``tensor``; the gradient flowing back through it is multiplied by ``scale``."""
    return tensor * scale + tensor.detach() * (1.0 - scale)


def accumulate_gradients(
    micro_batches: Sequence[MicroBatch],
    embed: Callable[[MicroBatch], ContrastiveEmbeddings],
    forward: Callable[[MicroBatch], tuple[ContrastiveEmbeddings, Parts]],
    contrastive: Callable[[ContrastiveEmbeddings, torch.Tensor], Parts],
    total: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
    temperature: torch.Tensor,
    autocast_dtype: torch.dtype | None = None,
    no_sync: Callable[[], Any] | None = None,
) -> Parts:
    """Run forward and backward over the K micro-batches of one optimiser step; gradients land in ``.grad``.

    Args:
        micro_batches: the K micro-batches of the step.
        embed: micro-batch -> contrastive embeddings, [b, D] each (run under no_grad to build the cache;
            skipped when K = 1).
        forward: micro-batch -> (the same embeddings computed with grad, per-sample loss parts of the
            micro-batch, each a mean over its samples).
        contrastive: (full-batch embeddings [sum b, D], temperature) -> contrastive loss parts.
        total: weighted sum of loss parts (``TIPSLoss.total``).
        temperature: the learnable contrastive temperature (scalar parameter).
        autocast_dtype: run the forward passes under ``torch.autocast`` with this dtype (None = off).
        no_sync: context-manager factory used around all micro-steps but the last (``ddp_model.no_sync``).

    Returns:
        Detached loss parts of the whole step: the contrastive parts (full-batch values), the per-sample
        parts averaged over micro-batches, and ``total``.
    """
    count = len(micro_batches)
    device_type = temperature.device.type

    def autocast() -> contextlib.AbstractContextManager:
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=autocast_dtype)

    cache: list[ContrastiveEmbeddings] = []
    if count > 1:
        with torch.no_grad(), autocast():
            cache = [embed(micro_batch) for micro_batch in micro_batches]
    summed: Parts = {}
    for index, micro_batch in enumerate(micro_batches):
        last = index == count - 1
        sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
        with sync:
            with autocast():
                embeddings, sample_parts = forward(micro_batch)
                full = splice(cache, index, embeddings) if count > 1 else embeddings
                contrastive_parts = contrastive(full, scale_gradient(temperature, 1.0 / count))
                loss = total(contrastive_parts) + total(sample_parts) / count
            loss.backward()
        for name, value in sample_parts.items():
            summed[name] = summed.get(name, 0.0) + value.detach() / count
    parts = {name: value.detach() for name, value in contrastive_parts.items()} | summed
    parts["total"] = total(parts)
    return parts
