"""The student built on the meta device and initialised shard by shard under FSDP (``loop.meta_init``).

For L / SO400m / g a rank should never hold the whole model in fp32: the student (and the EMA teacher)
are built on the meta device (shapes only, no memory), sharded by ``parallel.shard_student``, given
memory for their own shards (``to_empty``), and then initialised in place with the same schemes as
an unsharded build: every module's ``reset_parameters`` (PyTorch's layers, the text attention), then
the ViT / text / head schemes, the LayerScale value, the temperature, the folded pixel normalisation
(a parameter left unset is an error naming it); the EMA teacher starts as a copy.
The random draws are not those of an unsharded run (each rank draws its own rows; on CPU from a
generator seeded by rank, on GPU from DTensor's offset-based generator), only their distributions are.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from tipstorch.models.heads import ProjectionHead
from tipstorch.models.text import TextTransformer, sinusoidal_positions
from tipstorch.models.vit import LayerScale, VisionTransformer
from tipstorch.train.config import ModelCfg
from tipstorch.train.init import fold_pixel_normalization
from tipstorch.train.student import TIPSStudent
from tipstorch.train.teacher import EMATeacher, Teacher


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _recompute_buffers(student: TIPSStudent) -> None:
    """Non-persistent buffers (no checkpoint holds them) after ``to_empty``: the text positions."""
    for module in student.modules():
        if isinstance(module, TextTransformer):
            config = module.config
            module.positions.copy_(sinusoidal_positions(config.context_length, config.width))


@torch.no_grad()
def materialize(
    student: TIPSStudent, teacher: Teacher | None, device: torch.device, cfg: ModelCfg, seed: int, rank: int,
    initialise: bool,
) -> None:
    """Give the sharded meta-device student and teacher memory on ``device``; with ``initialise`` draw
    the weights of a fresh run (else a checkpoint loads them next)."""
    student.to_empty(device=device)
    if isinstance(teacher, EMATeacher):
        teacher.ema_parts.to_empty(device=device)
    _recompute_buffers(student)
    if not initialise:
        return
    if device.type == "cpu":
        torch.manual_seed(seed * 1_000_003 + rank)  # DTensor draws each rank's shard from its own generator here
    model = student.model
    for parameter in student.parameters():
        parameter.fill_(float("nan"))  # whatever no scheme below sets is caught by the check at the end
    for module in student.modules():
        if hasattr(module, "reset_parameters"):  # torch layers and MaskedSelfAttention
            module.reset_parameters()
    for module in student.modules():
        if isinstance(module, VisionTransformer):
            module.init_weights()
            module.mask_token.zero_()
            for scale in module.modules():
                if isinstance(scale, LayerScale):
                    scale.gamma.fill_(module.config.layer_scale_init)
        elif isinstance(module, TextTransformer):
            nn.init.normal_(module.token_embedding.weight, std=module.width**-0.5)
        elif isinstance(module, ProjectionHead):
            module._init_mlp()
    model.temperature.fill_(model.config.temperature)
    if cfg.init_pixel_mean is not None and cfg.init_pixel_std is not None:
        projection = model.visual.patch_embed.proj  # weight and bias sharded on dim 0 alike: each rank folds its rows
        weight, bias = _local(projection.weight), _local(projection.bias)
        fold_pixel_normalization(weight, bias, cfg.init_pixel_mean, cfg.init_pixel_std)
    unset = [name for name, parameter in student.named_parameters() if not bool(_local(parameter).isfinite().all())]
    if unset:
        raise RuntimeError(f"meta-device initialisation left parameters without a scheme: {unset[:5]}")
    if isinstance(teacher, EMATeacher):
        parts = student.parts()
        for name, part in teacher.ema_parts.items():
            part.load_state_dict(parts[name].state_dict())
