"""Optimiser construction (Adafactor as in the paper, or AdamW), parameter groups and gradient clipping.

No weight decay on biases, norm weights, LayerScale gammas (every parameter of fewer than 2 dims), nor on
position embeddings, CLS / register / mask tokens and the contrastive temperature. The temperature has
its own group with an lr multiplier, because AdamW's absolute steps are large next to a value of ~0.005.
Groups carry ``lr_scale`` and ``apply_weight_decay``; ``set_hyperparams`` writes the scheduled values.

Note on Adafactor: ``torch.optim.Adafactor`` takes relative steps (scaled by the parameter RMS, at least
1e-3), like optax's default Adafactor; the paper's peak lr 5e-4 is used as its lr.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from tipstorch.train.config import OptimCfg

NO_DECAY_NAMES = frozenset({"pos_embed", "cls_token", "register_tokens", "mask_token", "temperature"})
TEMPERATURE_NAME = "temperature"


def parameter_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]], temperature_lr_scale: float = 1.0
) -> list[dict]:
    """Split trainable parameters into ``decay``, ``no_decay`` and ``temperature`` groups (empty ones dropped)."""
    groups = {
        "decay": {"name": "decay", "params": [], "lr_scale": 1.0, "apply_weight_decay": True},
        "no_decay": {"name": "no_decay", "params": [], "lr_scale": 1.0, "apply_weight_decay": False},
        "temperature": {
            "name": "temperature",
            "params": [],
            "lr_scale": temperature_lr_scale,
            "apply_weight_decay": False,
        },
    }
    for name, parameter in named_parameters:
        if not parameter.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf == TEMPERATURE_NAME:
            groups["temperature"]["params"].append(parameter)
        elif parameter.ndim < 2 or leaf in NO_DECAY_NAMES:
            groups["no_decay"]["params"].append(parameter)
        else:
            groups["decay"]["params"].append(parameter)
    return [group for group in groups.values() if group["params"]]


def build_optimizer(named_parameters: Iterable[tuple[str, nn.Parameter]], cfg: OptimCfg) -> torch.optim.Optimizer:
    """Adafactor or AdamW over the groups of ``parameter_groups``, at lr / weight decay of ``cfg``."""
    groups = parameter_groups(named_parameters, cfg.temperature_lr_scale)
    if not groups:
        raise ValueError("build_optimizer: no trainable parameters")
    if cfg.name == "adafactor":
        optimizer = torch.optim.Adafactor(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.name == "adamw":
        # fused: one kernel per step for all parameters (CPU and GPU); the per-parameter loop's values to
        # float rounding, ~3x less time per step on the tiny_cpu model
        optimizer = torch.optim.AdamW(
            groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, eps=cfg.eps, fused=True
        )
    else:
        raise ValueError(f"optim.name must be 'adafactor' or 'adamw', got {cfg.name!r}")
    set_hyperparams(optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return optimizer


def set_hyperparams(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Write the scheduled lr (times each group's ``lr_scale``) and weight decay (where it applies)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
        group["weight_decay"] = weight_decay if group["apply_weight_decay"] else 0.0


def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm to ``max_norm`` (no clipping when <= 0); returns the norm before clipping.

    Under FSDP some gradients are DTensor shards and some (the replicated temperature) plain tensors:
    the norm of the shards is reduced over the ranks (``full_tensor``) and combined with the plain ones',
    so the norm and the clipping factor are those of the whole model on every rank."""
    parameters = list(parameters)
    grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
    sharded = [grad for grad in grads if isinstance(grad, DTensor)]
    if not sharded:
        return nn.utils.clip_grad_norm_(parameters, max_norm if max_norm > 0 else float("inf"))
    plain = [grad for grad in grads if not isinstance(grad, DTensor)]
    norms = [nn.utils.get_total_norm(sharded).full_tensor()] + ([nn.utils.get_total_norm(plain)] if plain else [])
    total = torch.stack([norm.to(norms[0].device) for norm in norms]).norm()
    if max_norm > 0:
        factor = (max_norm / (total + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_([grad.to_local() for grad in sharded] + plain, factor)
    return total
