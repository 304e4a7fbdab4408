"""The numerics of a training step's forward and backward: float32, bf16 autocast or bf16 compute weights.

``loop.bf16`` turns bfloat16 on, ``loop.bf16_mode`` says how:

- ``autocast``: the parameters stay float32 and ``torch.autocast`` casts the operands of every matmul-like
  op to bf16: the weights (once per micro-batch for those that require grad: autocast's cache), and the
  activations at every such op, forward and backward. The residual streams, layer norms and element-wise
  ops run in float32 wherever a float32 operand (a LayerScale gamma, a norm weight) promotes them.
- ``weights``: ``ComputeWeights`` holds a bf16 copy of every floating parameter of the student and the
  teacher, refreshed from the float32 masters once per step (as the step's forward and backward begin);
  the whole step's forward and backward (every micro-batch, and the recomputations of activation
  checkpointing) run on the copies without autocast, so the activations are bf16 end to end and no op casts.
  Float32 stay: the master weights and their gradients (each micro-batch's bf16 weight gradient is cast
  once and accumulated into the master's float32 ``.grad``), DDP's gradient all-reduce (of those
  gradients), the optimiser and its state, the EMA teacher (an EMA of the masters), the reductions
  inside the kernels (LayerNorm mean / variance, softmax, matmul accumulation: CPU and CUDA kernels
  accumulate bf16 inputs in float32), the parameters a module reads in float32 on purpose (its
  ``float32_parameters``: the heads' prototypes, the contrastive temperature), the prototype scores and
  every loss (``models/heads.py``, ``losses.py``). The same on every device. Under FSDP2 it is FSDP's own
  policy (``parallel.mixed_precision``: bf16 parameters all-gathered from float32 shards, gradients
  reduced in float32), still without autocast; that policy also gathers the prototypes in bf16.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from tipstorch.models.precision import native_bf16

AUTOCAST, WEIGHTS = "autocast", "weights"
BF16_MODES = (AUTOCAST, WEIGHTS)


def use_bf16(setting: bool | str, device: torch.device) -> bool:
    """``loop.bf16`` resolved for ``device``: True / False as set, "auto" where ``native_bf16``."""
    return native_bf16(device) if setting == "auto" else bool(setting)


class _ComputeCopy(torch.autograd.Function):
    """Forward: the master's low-precision copy (no cast here: it was made once for the step). Backward:
    the copy's gradient, cast to the master's dtype, goes to the master."""

    @staticmethod
    def forward(ctx, master: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
        ctx.master_dtype = master.dtype
        return copy.view_as(copy)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.to(ctx.master_dtype), None


def float32_parameter_names(module: nn.Module) -> set[str]:
    """Names (in ``module.named_parameters()``) of the parameters its submodules read in float32 on purpose:
    each submodule lists its own in a ``float32_parameters`` attribute."""
    names = set()
    for prefix, submodule in module.named_modules():
        for name in getattr(submodule, "float32_parameters", ()):
            names.add(f"{prefix}.{name}" if prefix else name)
    return names


class ComputeWeights:
    """bf16 compute copies of the floating parameters of ``modules`` (bar their ``float32_parameters``).

    ``refresh`` copies the masters into the copies (one cast per parameter, no allocation). ``swapped``
    refreshes, then until it exits every such parameter attribute of the modules is its copy: for a master
    that requires grad a differentiable stand-in whose gradient accumulates, in float32, into the master's ``.grad`` (so DDP's
    hooks on the masters fire as usual), otherwise the copy itself. Outside ``swapped`` the modules hold
    their masters: state dicts, the optimiser, the EMA update and checkpoints see float32 only. A
    parameter shared by several modules gets one copy.
    """

    def __init__(self, modules: Iterable[nn.Module], dtype: torch.dtype = torch.bfloat16) -> None:
        self.dtype = dtype
        self.slots: list[tuple[nn.Module, str, nn.Parameter]] = []
        copies: dict[int, torch.Tensor] = {}
        for module in modules:
            kept = float32_parameter_names(module)
            for owner_name, owner in module.named_modules():
                for name, master in owner.named_parameters(recurse=False):
                    full_name = f"{owner_name}.{name}" if owner_name else name
                    if full_name in kept or not master.is_floating_point() or master.dtype == dtype:
                        continue
                    if id(master) not in copies:
                        copies[id(master)] = torch.empty_like(master, dtype=dtype, requires_grad=False)
                    self.slots.append((owner, name, master))
        self.masters = list({id(master): master for _, _, master in self.slots}.values())
        self.copies = [copies[id(master)] for master in self.masters]

    @torch.no_grad()
    def refresh(self) -> None:
        """copies <- masters, rounded to ``dtype`` (after every change of the masters: once per step)."""
        if self.masters:
            torch._foreach_copy_(self.copies, [master.detach() for master in self.masters])

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Refresh, then the modules compute with the copies (see the class docstring) until the context
        exits. Run the forward and the backward of a step inside it: the stand-ins made on entry serve every
        micro-batch, and activation checkpointing recomputes with them."""
        self.refresh()
        stand_ins = {}
        for master, copy in zip(self.masters, self.copies, strict=True):
            differentiable = master.requires_grad and torch.is_grad_enabled()
            stand_ins[id(master)] = _ComputeCopy.apply(master, copy) if differentiable else copy
        for owner, name, master in self.slots:  # plain tensors, which nn.Module.__setattr__ refuses
            owner._parameters[name] = stand_ins[id(master)]
        try:
            yield
        finally:
            for owner, name, master in self.slots:
                owner._parameters[name] = master
