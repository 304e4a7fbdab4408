"""Stand-ins for the image and text towers (the real ones live in tipstorch.models) and a tiny TIPS step.

FakeBackbone follows the model contract: ``forward_features(images [B, 3, H, W], patch_mask [B, N] | None)``
returns features with ``global_cls`` [B, D], ``spatial_cls`` [B, D], ``patch_tokens`` [B, h, w, D], ``flat``.
"""

from __future__ import annotations

import torch
from torch import nn

from tipstorch.models.heads import ProjectionHead
from tipstorch.models.vit import ImageFeatures
from tipstorch.train.config import LossCfg, LossWeights
from tipstorch.train.contrastive_accum import accumulate_gradients, split_batch
from tipstorch.train.losses import TIPSLoss
from tipstorch.train.outputs import ContrastiveEmbeddings, StudentOutputs, TeacherScores

PATCH = 14


class FakeBackbone(nn.Module):
    """Linear patch embedding, a mask token, one global-context mixing layer, two CLS tokens, a LayerNorm."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed_dim = dim
        self.patch_embed = nn.Linear(3 * PATCH * PATCH, dim)
        self.cls_token = nn.Parameter(torch.randn(2, dim) * 0.1)
        self.mask_token = nn.Parameter(torch.randn(dim) * 0.1)
        self.mix = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward_features(self, images: torch.Tensor, patch_mask: torch.Tensor | None = None) -> ImageFeatures:
        batch, _, height, width = images.shape
        rows, cols = height // PATCH, width // PATCH
        patches = images.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)  # [B, 3, h, w, p, p]
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(batch, rows * cols, -1)
        tokens = self.patch_embed(patches)
        if patch_mask is not None:
            tokens = torch.where(patch_mask[..., None], self.mask_token.to(tokens.dtype), tokens)
        context = tokens.mean(dim=1, keepdim=True)
        tokens = tokens + torch.tanh(self.mix(context))
        cls = self.cls_token.unsqueeze(0) + context
        out = self.norm(torch.cat([cls, tokens], dim=1))
        return ImageFeatures(out[:, 0], out[:, 1], out[:, 2:].reshape(batch, rows, cols, -1))


class FakeTextTower(nn.Module):
    """Mean of token embeddings (pad id 0 ignored) and a linear layer: token ids [B, L] -> [B, D]."""

    def __init__(self, dim: int = 16, vocab: int = 50) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        keep = (token_ids != 0).float().unsqueeze(-1)
        pooled = (self.token_embedding(token_ids) * keep).sum(1) / keep.sum(1).clamp(min=1)
        return self.proj(pooled)


class FakeStudent(nn.Module):
    """Everything the optimiser trains: backbone, text tower, heads and the contrastive temperature."""

    def __init__(self, dim: int = 16, prototypes: int = 32) -> None:
        super().__init__()
        self.backbone = FakeBackbone(dim)
        self.text = FakeTextTower(dim)
        self.dino_head = ProjectionHead(dim, prototypes, hidden_dim=24, bottleneck_dim=8)
        self.ibot_head = ProjectionHead(dim, prototypes, hidden_dim=24, bottleneck_dim=8)
        self.temperature = nn.Parameter(torch.tensor(0.1))

    def parts(self) -> dict[str, nn.Module]:
        """The parts a teacher mirrors."""
        return {"backbone": self.backbone, "dino_head": self.dino_head, "ibot_head": self.ibot_head}


def make_batch(batch: int = 4, local_crops: int = 2, seed: int = 0, size: int = 28, local: int = 14) -> dict:
    generator = torch.Generator().manual_seed(seed)
    patches = (size // PATCH) ** 2
    mask = torch.rand(batch, patches, generator=generator) < 0.5
    mask[:, 0] = True
    return {
        "global_crop": torch.rand(batch, 3, size, size, generator=generator),
        "local_crops": torch.rand(batch, local_crops, 3, local, local, generator=generator),
        "patch_mask": mask,
        "alt_tokens": torch.randint(1, 50, (batch, 5), generator=generator),
        "synthetic_tokens": torch.randint(1, 50, (batch, 7), generator=generator),
    }


def contrastive_embeddings(
    student: FakeStudent, micro_batch: dict, features: ImageFeatures | None = None
) -> ContrastiveEmbeddings:
    if features is None:
        features = student.backbone.forward_features(micro_batch["global_crop"])
    return ContrastiveEmbeddings(
        global_cls=features.global_cls,
        alt_text=student.text(micro_batch["alt_tokens"]),
        spatial_cls=features.spatial_cls,
        synthetic_text=student.text(micro_batch["synthetic_tokens"]),
    )


def student_patch_scores(
    student: FakeStudent, loss: TIPSLoss, masked: ImageFeatures, patch_mask: torch.Tensor
) -> torch.Tensor | None:
    """The student's iBOT head on the tokens the loss supervises (None when the iBOT term is off)."""
    return student.ibot_head(loss.ibot.supervised(masked.flat, patch_mask)) if loss.ibot is not None else None


def tips_forward(student: FakeStudent, teacher, loss: TIPSLoss, micro_batch: dict, temps=(0.07, 0.05)):
    """One micro-batch of the recipe: (contrastive embeddings with grad, self-supervised parts)."""
    masked = student.backbone.forward_features(micro_batch["global_crop"], micro_batch["patch_mask"])
    local = micro_batch["local_crops"].flatten(0, 1)
    local_cls = student.backbone.forward_features(local).global_cls
    with torch.no_grad():
        teacher_features = teacher["backbone"].forward_features(micro_batch["global_crop"])
        teacher_scores = TeacherScores(
            global_scores=teacher["dino_head"](teacher_features.global_cls),
            patch_scores=teacher["ibot_head"](loss.ibot.supervised(teacher_features.flat, micro_batch["patch_mask"]))
            if loss.ibot is not None else None,
        )
    outputs = StudentOutputs(
        contrastive_embeddings(student, micro_batch),
        local_scores=student.dino_head(local_cls),
        patch_scores=student_patch_scores(student, loss, masked, micro_batch["patch_mask"]),
        koleo_cls=masked.global_cls,
    )
    parts = loss.self_supervised_parts(outputs, teacher_scores, micro_batch["patch_mask"], *temps)
    return outputs.embeddings, parts


def make_student(seed: int = 0) -> FakeStudent:
    torch.manual_seed(seed)
    return FakeStudent()


def tips_loss(prototypes: int = 32, **weights: float) -> TIPSLoss:
    return TIPSLoss(LossCfg(weights=LossWeights(**weights)), num_prototypes=prototypes)


def accumulated_tips_step(student, teacher, loss, batch: dict, micro_batches: int, **kwargs) -> dict:
    """One TIPS step split into ``micro_batches`` with contrastive-exact accumulation; returns the loss parts.
    ``kwargs`` go to ``accumulate_gradients`` (autocast_dtype, no_sync)."""
    parts = accumulate_gradients(
        split_batch(batch, micro_batches),
        embed=lambda mb: contrastive_embeddings(student, mb),
        forward=lambda mb: tips_forward(student, teacher, loss, mb),
        contrastive=loss.contrastive_parts,
        total=loss.total,
        temperature=student.temperature,
        **kwargs,
    )
    loss.step_centers()
    return parts
