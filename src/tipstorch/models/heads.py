"""Projection heads of the self-supervised losses (DINO on CLS tokens, iBOT on patch tokens).

TIPS (paper appendix A.2): "The projection heads for self-distillation and masking are identical but
unshared, and consist of a 3-layer MLP, l2 normalization, and a weight-normalized projection layer to a
prototype dimension of 32k." Hidden width 2048 and bottleneck 256 are the DINO / DINOv2 defaults.

The weight-normalised prototype layer keeps its gain fixed to 1 (DINO's ``norm_last_layer``), so it is
written as an explicit normalisation of each prototype row: the layer then holds one plain weight
tensor, which deep-copies, EMA-averages and round-trips through ``state_dict`` like any other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """MLP -> l2-normalise -> cosine scores against ``num_prototypes`` unit-norm prototypes.

    Args:
        in_dim: width D of the backbone tokens fed to the head.
        num_prototypes: K, size of the score vector (32768 in the paper).
        hidden_dim: width of the hidden MLP layers (2048).
        bottleneck_dim: width of the l2-normalised embedding (256).
        mlp_layers: number of linear layers of the MLP (3 in the paper), GELU between them.
    """

    float32_parameters = ("prototypes.weight",)  # read in float32 (``forward``) whatever the compute dtype

    def __init__(
        self,
        in_dim: int,
        num_prototypes: int = 32768,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        mlp_layers: int = 3,
    ) -> None:
        super().__init__()
        if mlp_layers < 1:
            raise ValueError(f"ProjectionHead needs mlp_layers >= 1, got {mlp_layers}")
        widths = [in_dim] + [hidden_dim] * (mlp_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            if index > 0:
                layers.append(nn.GELU())
            layers.append(nn.Linear(width_in, width_out))
        self.mlp = nn.Sequential(*layers)
        self.prototypes = nn.Linear(bottleneck_dim, num_prototypes, bias=False)
        self._init_mlp()

    def _init_mlp(self) -> None:
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    @property
    def num_prototypes(self) -> int:
        return self.prototypes.out_features

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [..., D] -> prototype scores [..., K] in float32, each a cosine in [-1, 1].

        The MLP follows any autocast; the scores do not: the losses sharpen them by temperatures of
        0.04-0.1, and bf16 cosines (8 bits of mantissa) would blur the targets."""
        embedding = self.mlp(tokens)
        with torch.autocast(embedding.device.type, enabled=False):
            unit_embedding = F.normalize(embedding.float(), dim=-1)
            unit_prototypes = F.normalize(self.prototypes.weight.float(), dim=-1)
            return F.linear(unit_embedding, unit_prototypes)
