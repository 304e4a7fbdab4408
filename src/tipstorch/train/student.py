"""The student of the recipe (TIPS model + DINO / iBOT heads) and its passes over one micro-batch.

Passes of the student over a micro-batch (DESIGN.md, "One training step"), each run only when a term
with a positive weight needs it:

- unmasked global crop -> CLS1 / CLS2 for the contrastive terms (``loss.contrastive_on_masked`` false,
  the conservative reading of the paper);
- masked global crop (75% of patches replaced by the mask token) -> iBOT patch scores of the supervised
  tokens only (the masked ones; all of them for iBOT++), and the contrastive CLS tokens when
  ``contrastive_on_masked``;
- local crops -> CLS1 -> DINO scores;
- text tower on the alt-text and synthetic captions (one pass over both).

The teacher's pass is not here: see ``teacher.py`` and ``step.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from tipstorch.models.heads import ProjectionHead
from tipstorch.models.tips import TIPSModel
from tipstorch.models.vit import ImageFeatures
from tipstorch.train.config import HeadCfg, LossCfg
from tipstorch.train.outputs import ContrastiveEmbeddings, StudentOutputs, supervised_patches
from tipstorch.train.teacher import BACKBONE, DINO_HEAD, IBOT_HEAD


def projection_head(in_dim: int, cfg: HeadCfg) -> ProjectionHead:
    """A DINO / iBOT head of the configured shape on tokens of width ``in_dim`` (student and frozen teacher)."""
    return ProjectionHead(in_dim, cfg.num_prototypes, cfg.hidden_dim, cfg.bottleneck_dim, cfg.mlp_layers)


def _detached(features: ImageFeatures) -> ImageFeatures:
    return ImageFeatures(
        features.global_cls.detach(), features.spatial_cls.detach(), features.patch_tokens.detach()
    )


class TIPSStudent(nn.Module):
    """Everything the optimiser trains: ``model`` (image and text towers, temperature) and the heads of
    the enabled self-distillation terms (``dino_head`` / ``ibot_head``, None when the term is off)."""

    def __init__(self, model: TIPSModel, heads: HeadCfg, loss: LossCfg) -> None:
        super().__init__()
        self.model = model
        weights = loss.weights
        self.dino_head = projection_head(model.visual.embed_dim, heads) if weights.dino > 0 else None
        self.ibot_head = projection_head(model.visual.embed_dim, heads) if weights.ibot > 0 else None
        self.clip_global, self.clip_spatial = weights.clip_global > 0, weights.clip_spatial > 0
        self.koleo = weights.koleo > 0
        self.ibot_all_tokens = loss.ibot_all_tokens
        contrastive = self.clip_global or self.clip_spatial
        self.contrastive_on_masked = loss.contrastive_on_masked and contrastive
        self.needs_masked = self.ibot_head is not None or self.contrastive_on_masked
        self.needs_unmasked = (contrastive and not self.contrastive_on_masked) or (
            self.koleo and not self.needs_masked
        )
        # What no term uses gets no gradient: freeze it, so that DDP (which expects a gradient for every
        # trainable parameter) and the optimiser leave it alone.
        if not self.needs_masked:
            model.visual.mask_token.requires_grad_(False)
        if not contrastive:
            model.text.requires_grad_(False)
            model.temperature.requires_grad_(False)

    @property
    def self_distillation(self) -> bool:
        """Whether a teacher is needed (a DINO or iBOT term is on)."""
        return self.dino_head is not None or self.ibot_head is not None

    def parts(self) -> dict[str, nn.Module]:
        """The parts a teacher mirrors: ``backbone`` and the enabled heads."""
        heads = {DINO_HEAD: self.dino_head, IBOT_HEAD: self.ibot_head}
        return {BACKBONE: self.model.visual} | {
            name: head for name, head in heads.items() if head is not None
        }

    def contrastive_embeddings(
        self, image: ImageFeatures | None, micro_batch: Mapping[str, Any]
    ) -> ContrastiveEmbeddings:
        """The pairs of the enabled contrastive terms: the image's CLS tokens and the encoded captions
        (``alt_tokens`` / ``synthetic_tokens`` [b, L], one text pass each: the text tower cuts each batch
        to its longest caption, and alt-texts are much shorter than synthetic captions)."""
        captions = ([micro_batch["alt_tokens"]] if self.clip_global else []) + (
            [micro_batch["synthetic_tokens"]] if self.clip_spatial else []
        )
        if not captions:
            return ContrastiveEmbeddings()
        texts = [self.model.encode_text(tokens) for tokens in captions]
        embeddings = ContrastiveEmbeddings()
        if self.clip_global:
            embeddings.global_cls, embeddings.alt_text = image.global_cls, texts[0]
        if self.clip_spatial:
            embeddings.spatial_cls, embeddings.synthetic_text = image.spatial_cls, texts[-1]
        return embeddings

    def embed(self, micro_batch: Mapping[str, Any]) -> ContrastiveEmbeddings:
        """Only the contrastive embeddings (the no-grad cache of gradient accumulation)."""
        mask = micro_batch["patch_mask"] if self.contrastive_on_masked else None
        return self.contrastive_embeddings(
            self.model.visual.forward_features(micro_batch["global_crop"], mask), micro_batch
        )

    def forward(self, micro_batch: Mapping[str, Any]) -> StudentOutputs:
        """micro_batch: global_crop [b, 3, G, G], local_crops [b, M, 3, S, S], patch_mask bool [b, N]
        (True = masked), alt_tokens / synthetic_tokens [b, L] -> the outputs of the enabled terms."""
        visual = self.model.visual
        global_crop = micro_batch["global_crop"]
        unmasked = visual.forward_features(global_crop) if self.needs_unmasked else None
        masked = (
            visual.forward_features(global_crop, micro_batch["patch_mask"]) if self.needs_masked else None
        )
        outputs = StudentOutputs(
            self.contrastive_embeddings(masked if self.contrastive_on_masked else unmasked, micro_batch)
        )
        if self.dino_head is not None:
            local_cls = visual.forward_features(micro_batch["local_crops"].flatten(0, 1)).global_cls
            outputs.local_scores = self.dino_head(local_cls)
        if self.ibot_head is not None:
            # the head on the supervised tokens only (iBOT: the masked ones), not on all N
            supervised = supervised_patches(masked.flat, micro_batch["patch_mask"], self.ibot_all_tokens)
            outputs.patch_scores = self.ibot_head(supervised)
        if self.koleo:
            outputs.koleo_cls = (masked if masked is not None else unmasked).global_cls
        if unmasked is not None:
            outputs.unmasked = _detached(unmasked)
        return outputs
