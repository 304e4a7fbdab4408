"""Data parallelism under ``torchrun``, chosen by ``loop.parallel``: DDP or FSDP2 (``fully_shard``).

- ``ddp``: every rank holds the whole student; ``DistributedDataParallel`` all-reduces the gradients.
- ``fsdp``: ``torch.distributed.fsdp.fully_shard`` on every block of both towers, on each tower, on each
  head and on the student (the root): parameters, gradients and optimiser state are sharded over the
  ranks (dim 0 of each tensor) and all-gathered one block at a time for the forward and the backward.
  The EMA teacher's parts are sharded the same way (identical shapes, so a rank's teacher shard and
  student shard are the same rows, and the EMA update is local). With ``loop.bf16`` the policy keeps
  bf16 parameters for the computation and reduces the gradients in fp32 (``MixedPrecisionPolicy``);
  the sharded master weights and the optimiser stay fp32. That is ``loop.bf16_mode=weights``
  (``precision.py``) done by FSDP: the passes then run without autocast, as they do on one process.

The contrastive temperature is a scalar, which ``fully_shard`` cannot shard: it is left out of FSDP
(``ignored_params``), replicated, and its gradient is averaged over the ranks by ``sync_replicated``.
The contrastive all-gather and the centre all-reduce (``losses.py``) run unchanged under both.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from tipstorch.models.text import TextTransformer
from tipstorch.models.vit import VisionTransformer
from tipstorch.train.student import TIPSStudent
from tipstorch.train.teacher import EMATeacher, Teacher

DDP, FSDP = "ddp", "fsdp"


def mixed_precision(bf16: bool) -> MixedPrecisionPolicy:
    """bf16 parameters in the forward / backward with fp32 gradient reduction, or plain fp32."""
    if not bf16:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def _shard_tower(tower: nn.Module, policy: MixedPrecisionPolicy) -> None:
    """fully_shard each block, then the tower itself (its embeddings, tokens and final norm)."""
    blocks = tower.blocks if isinstance(tower, VisionTransformer) else tower.transformer.resblocks
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(tower, mp_policy=policy)
    if isinstance(tower, VisionTransformer):  # the passes call forward_features, not forward
        register_fsdp_forward_method(tower, "forward_features")


def _shard_part(part: nn.Module, policy: MixedPrecisionPolicy) -> None:
    if isinstance(part, VisionTransformer | TextTransformer):
        _shard_tower(part, policy)
    else:
        fully_shard(part, mp_policy=policy)


def shard_student(student: TIPSStudent, bf16: bool) -> TIPSStudent:
    """Apply FSDP2 to the student in place: blocks, towers, heads, then the student as root (the
    temperature replicated). Returns the student (now an ``FSDPModule``)."""
    policy = mixed_precision(bf16)
    model = student.model
    _shard_tower(model.visual, policy)
    _shard_tower(model.text, policy)
    for head in (student.dino_head, student.ibot_head):
        if head is not None:
            fully_shard(head, mp_policy=policy)
    fully_shard(student, mp_policy=policy, ignored_params={model.temperature})
    register_fsdp_forward_method(student, "embed")  # the no-grad cache of gradient accumulation
    return student


def shard_teacher(teacher: Teacher | None, bf16: bool) -> None:
    """Shard the EMA teacher's own parts like the student's (a shared backbone is the student's, already
    sharded). A frozen teacher stays replicated (no gradients, no optimiser state)."""
    if isinstance(teacher, EMATeacher):
        policy = mixed_precision(bf16)
        for part in teacher.ema_parts.values():
            _shard_part(part, policy)


def reshard_teacher(teacher: Teacher | None) -> None:
    """Free the gathered weights of the EMA teacher's sharded parts after its forward passes. Each part is
    an FSDP root, and roots keep their weights gathered after a forward (for the backward, which a
    teacher never runs); the EMA update then works on the shards again."""
    if isinstance(teacher, EMATeacher):
        for part in teacher.ema_parts.values():
            if isinstance(part, FSDPModule):
                part.reshard()


def wrap_student(student: TIPSStudent, parallel: str, world_size: int, bf16: bool) -> nn.Module:
    """What runs the student's passes: the student itself (one process), its DDP wrapper, or the
    student sharded in place (FSDP)."""
    if world_size == 1:
        return student
    if parallel == DDP:
        return DistributedDataParallel(student)
    return shard_student(student, bf16)


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a DTensor shard."""
    return any(isinstance(parameter, DTensor) for parameter in module.parameters())


def sync_replicated(student: TIPSStudent) -> None:
    """Under FSDP: average over the ranks the gradients of the parameters left out of sharding."""
    if not (dist.is_available() and dist.is_initialized()) or not is_sharded(student):
        return
    for parameter in student.parameters():
        if parameter.grad is not None and not isinstance(parameter.grad, DTensor):
            dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
            parameter.grad.div_(dist.get_world_size())
