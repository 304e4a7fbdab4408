"""The student of the recipe (TIPS model + DINO / iBOT heads) and the passes one micro-batch needs.

Passes of the student over a micro-batch (DESIGN.md, "One training step"), each run only when a term
with a positive weight needs it:

- unmasked global crop -> CLS1 / CLS2 for the contrastive terms (``loss.contrastive_on_masked`` false,
  the conservative reading of the paper);
- masked global crop (75% of patches replaced by the mask token) -> iBOT patch scores (and the
  contrastive CLS tokens when ``contrastive_on_masked``);
- local crops -> CLS1 -> DINO scores;
- text tower on the alt-text and synthetic captions (one pass over both).

The teacher sees the unmasked global crop. With a head-only EMA teacher (TIPSv2) its backbone is the
student's own: its features are then the student's unmasked pass, detached, and no extra pass runs.
That backbone runs in the student's mode (train); with ``drop_path_rate`` 0, as in every shipped
recipe, train and eval modes compute the same features.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tipstorch.models.heads import ProjectionHead
from tipstorch.models.tips import TIPSModel
from tipstorch.models.vit import ImageFeatures
from tipstorch.train.config import HeadCfg, LossCfg
from tipstorch.train.losses import TIPSLoss
from tipstorch.train.schedules import ScheduleValues
from tipstorch.train.teacher import BACKBONE

Outputs = dict[str, dict[str, torch.Tensor]]


class TIPSStudent(nn.Module):
    """Everything the optimiser trains: ``model`` (image and text towers, temperature) and the heads of
    the enabled self-distillation terms (``dino_head`` / ``ibot_head``, None when the term is off)."""

    def __init__(self, model: TIPSModel, heads: HeadCfg, loss: LossCfg) -> None:
        super().__init__()
        self.model = model
        weights = loss.weights

        def head() -> ProjectionHead:
            return ProjectionHead(
                model.visual.embed_dim, heads.num_prototypes, heads.hidden_dim, heads.bottleneck_dim, heads.mlp_layers
            )

        self.dino_head = head() if weights.dino > 0 else None
        self.ibot_head = head() if weights.ibot > 0 else None
        self.clip_global, self.clip_spatial = weights.clip_global > 0, weights.clip_spatial > 0
        self.koleo = weights.koleo > 0
        contrastive = self.clip_global or self.clip_spatial
        self.contrastive_on_masked = loss.contrastive_on_masked and contrastive
        self.needs_masked = self.ibot_head is not None or self.contrastive_on_masked
        self.needs_unmasked = (contrastive and not self.contrastive_on_masked) or (self.koleo and not self.needs_masked)
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
        heads = {"dino_head": self.dino_head, "ibot_head": self.ibot_head}
        return {BACKBONE: self.model.visual} | {name: head for name, head in heads.items() if head is not None}

    def contrastive_embeddings(self, image: ImageFeatures | None, micro_batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``global_cls`` / ``alt_text`` and ``spatial_cls`` / ``synthetic_text`` [b, D] of the enabled terms."""
        captions = ([micro_batch["alt_tokens"]] if self.clip_global else []) + (
            [micro_batch["synthetic_tokens"]] if self.clip_spatial else []
        )
        if not captions:
            return {}
        texts = self.model.encode_text(torch.cat(captions)).chunk(len(captions))
        embeddings = {}
        if self.clip_global:
            embeddings |= {"global_cls": image.global_cls, "alt_text": texts[0]}
        if self.clip_spatial:
            embeddings |= {"spatial_cls": image.spatial_cls, "synthetic_text": texts[-1]}
        return embeddings

    def embed(self, micro_batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Only the contrastive embeddings (the no-grad cache of gradient accumulation)."""
        mask = micro_batch["patch_mask"] if self.contrastive_on_masked else None
        return self.contrastive_embeddings(self.model.visual.forward_features(micro_batch["global_crop"], mask), micro_batch)

    def forward(self, micro_batch: Mapping[str, Any]) -> Outputs:
        """micro_batch: global_crop [b, 3, G, G], local_crops [b, M, 3, S, S], patch_mask bool [b, N],
        alt_tokens / synthetic_tokens [b, L] ->
        ``embeddings`` (see ``contrastive_embeddings``), ``scores`` (``local`` [b*M, K], ``patches``
        [b, N, K], ``cls`` [b, D] for KoLeo) and ``unmasked`` (detached ``global_cls`` [b, D] and
        ``patches`` [b, N, D] of the unmasked pass, when it ran)."""
        visual = self.model.visual
        global_crop = micro_batch["global_crop"]
        unmasked = visual.forward_features(global_crop) if self.needs_unmasked else None
        masked = visual.forward_features(global_crop, micro_batch["patch_mask"]) if self.needs_masked else None
        outputs: Outputs = {
            "embeddings": self.contrastive_embeddings(masked if self.contrastive_on_masked else unmasked, micro_batch),
            "scores": {},
            "unmasked": {},
        }
        if self.dino_head is not None:
            local_cls = visual.forward_features(micro_batch["local_crops"].flatten(0, 1)).global_cls
            outputs["scores"]["local"] = self.dino_head(local_cls)
        if self.ibot_head is not None:
            outputs["scores"]["patches"] = self.ibot_head(masked.flat)
        if self.koleo:
            outputs["scores"]["cls"] = (masked if masked is not None else unmasked).global_cls
        if unmasked is not None:
            outputs["unmasked"] = {"global_cls": unmasked.global_cls.detach(), "patches": unmasked.flat.detach()}
        return outputs


@torch.no_grad()
def teacher_scores(
    student: TIPSStudent, teacher: Any, outputs: Outputs, micro_batch: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Teacher prototype scores on the unmasked global crop: ``global`` [b, K] (DINO), ``patches`` [b, N, K]
    (iBOT). A teacher sharing the student's backbone reuses the student's unmasked features."""
    backbone = teacher[BACKBONE]
    if backbone is student.model.visual and outputs["unmasked"]:
        global_cls, patches = outputs["unmasked"]["global_cls"], outputs["unmasked"]["patches"]
    else:
        features = backbone.forward_features(micro_batch["global_crop"])
        global_cls, patches = features.global_cls, features.flat
    scores = {}
    if student.dino_head is not None:
        scores["global"] = teacher["dino_head"](global_cls)
    if student.ibot_head is not None:
        scores["patches"] = teacher["ibot_head"](patches)
    return scores


def self_supervised_parts(
    student: TIPSStudent,
    teacher: Any,
    loss: TIPSLoss,
    outputs: Outputs,
    micro_batch: Mapping[str, Any],
    values: ScheduleValues,
) -> dict[str, torch.Tensor]:
    """The DINO / iBOT / KoLeo parts of one micro-batch (each a mean over its samples)."""
    targets = teacher_scores(student, teacher, outputs, micro_batch) if student.self_distillation else {}
    scores = outputs["scores"]
    return loss.self_supervised_parts(
        student_local_scores=scores.get("local"),
        teacher_global_scores=targets.get("global"),
        dino_teacher_temp=values.dino_teacher_temp,
        student_patch_scores=scores.get("patches"),
        teacher_patch_scores=targets.get("patches"),
        patch_mask=micro_batch["patch_mask"],
        ibot_teacher_temp=values.ibot_teacher_temp,
        student_cls=scores.get("cls"),
    )
