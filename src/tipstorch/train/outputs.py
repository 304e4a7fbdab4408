"""The typed values of one training step: what the student's passes give, and what the teacher gives.

Shapes: b images in the micro-batch, M local crops per image, N = h * w patches of the global crop,
D the backbone width, K the number of prototypes of the DINO / iBOT heads. A value of a term that is
off (weight 0) is None.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tipstorch.models.vit import ImageFeatures


def supervised_patches(tokens: torch.Tensor, patch_mask: torch.Tensor, all_tokens: bool) -> torch.Tensor:
    """The rows of the tokens the iBOT loss supervises: tokens [b, N, ...], patch_mask bool [b, N] (True =
    masked) -> [S, ...] image-major, S = the masked count (iBOT) or b*N (iBOT++, ``all_tokens``: a view)."""
    if tokens.shape[:2] != patch_mask.shape:
        raise ValueError(
            f"supervised_patches: tokens {tuple(tokens.shape)} do not match patch_mask "
            f"{tuple(patch_mask.shape)}"
        )
    return tokens.flatten(0, 1) if all_tokens else tokens[patch_mask]


@dataclass
class ContrastiveEmbeddings:
    """The image / caption pairs of the contrastive terms, [b, D] each (row i of an image matches row i
    of its caption): CLS1 ``global_cls`` with the alt-text ``alt_text``, CLS2 ``spatial_cls`` with the
    synthetic caption ``synthetic_text``."""

    global_cls: torch.Tensor | None = None
    alt_text: torch.Tensor | None = None
    spatial_cls: torch.Tensor | None = None
    synthetic_text: torch.Tensor | None = None


@dataclass
class StudentOutputs:
    """What the student's passes over one micro-batch give the losses.

    embeddings: the contrastive pairs (from the unmasked pass, or the masked one with
        ``loss.contrastive_on_masked``).
    local_scores: [b*M, K] DINO head on the CLS1 of every local crop, image-major (row b*M + m is crop m
        of image b).
    patch_scores: [S, K] iBOT head on the supervised patch tokens of the masked pass only (rows as
        ``supervised_patches`` orders them: the masked tokens for iBOT, all b*N tokens for iBOT++).
    koleo_cls: [b, D] CLS1 the KoLeo term spreads (masked pass when it ran, else the unmasked one).
    unmasked: the unmasked pass's features, detached (when that pass ran): a teacher sharing the
        student's backbone reads its targets from them instead of running the backbone again.
    """

    embeddings: ContrastiveEmbeddings
    local_scores: torch.Tensor | None = None
    patch_scores: torch.Tensor | None = None
    koleo_cls: torch.Tensor | None = None
    unmasked: ImageFeatures | None = None


# tokens [b, N, ...] -> the rows the iBOT loss supervises [S, ...] (``supervised_patches`` with the batch's
# patch mask and the recipe's ``ibot_all_tokens``; ``IBOTPatchLoss.supervised``)
SupervisedRows = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class TeacherScores:
    """The teacher's prototype scores on the unmasked global crop, before centring and sharpening (the
    losses turn them into target distributions): ``global_scores`` [b, K] from the DINO head on CLS1,
    ``patch_scores`` [S, K] from the iBOT head on the supervised patch tokens only (the masked ones for
    iBOT, all b*N for iBOT++; rows as ``supervised_patches`` orders them, as the student's)."""

    global_scores: torch.Tensor | None = None
    patch_scores: torch.Tensor | None = None
