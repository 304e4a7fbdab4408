"""torch.distributed set-up for ``torchrun``: process group (nccl on CUDA, gloo on CPU), device, rank.

Launch: ``torchrun --nproc_per_node N -m tipstorch.cli train ...`` (or the ``tipstorch`` script). Without
torchrun's environment (``WORLD_SIZE`` unset or 1) everything runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> DistributedContext:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return DistributedContext(rank, world_size, device)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Element-wise OR of boolean flags over all ranks (the flags themselves without a process group)."""
    if _world() == 1:
        return flags
    values = torch.tensor(flags, dtype=torch.int32, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(value) for value in values.tolist()]


def gather_rows(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[...] on each rank -> [world_size, ...] on CPU in rank order ([1, ...] without a process group)."""
    if _world() == 1:
        return tensor.unsqueeze(0)
    local = tensor.to(device)
    pieces = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, local)
    return torch.stack(pieces).cpu()


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each scalar averaged over all ranks (one all-reduce; the values themselves without a process group)."""
    if _world() == 1 or not values:
        return values
    stacked = torch.stack([value.detach().float().reshape(()) for value in values.values()])
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    return dict(zip(values, stacked / _world(), strict=True))


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest of an integer over all ranks."""
    if _world() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())
