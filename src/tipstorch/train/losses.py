"""The TIPS / TIPSv2 training losses, one small module each, and their weighted sum.

Paper (section 3.2): L = 1/2 (L_CLIP + L^_CLIP) + alpha * L_distill + beta * L_mask, alpha = 1, beta = 2
(appendix A.2). TIPSv2 adds iBOT++ (the patch loss also on visible tokens). Scores and probabilities are
taken in float32 whatever the autocast dtype of the network.

Distributed runs: ``ContrastiveLoss`` gathers the embeddings of every rank (with gradient) so that each
image sees the negatives of the global batch, and the centres of the self-distillation losses are
all-reduced, so every rank holds the same centre.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tipstorch.train.config import LossCfg
from tipstorch.train.outputs import (
    ContrastiveEmbeddings,
    StudentOutputs,
    SupervisedRows,
    TeacherScores,
    supervised_patches,
)

CLIP_GLOBAL = "clip_global"
CLIP_SPATIAL = "clip_spatial"
DINO = "dino"
IBOT = "ibot"
KOLEO = "koleo"


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; the backward sums the gradients of every rank and returns this rank's slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        rank, world = _rank_and_world()
        ctx.rank, ctx.rows = rank, tensor.shape[0]
        pieces = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(pieces, tensor.contiguous())
        return torch.cat(pieces, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce writes in place
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """[b, ...] on each of W ranks -> [W*b, ...] in rank order, differentiable; identity without a process group.

    Every rank must hold the same b. The gradient reaching each rank's input is the sum over ranks of the
    gradients of their losses, as in open_clip's ``gather_with_grad``.
    """
    if _rank_and_world()[1] == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE between images and their captions, logits = cos(image, text) / temperature.

    The temperature is passed in (it lives in the model, ``TIPSModel.temperature``, stored as in the
    official checkpoints). With W > 1 ranks each rank computes the rows of its own b pairs against
    all W*b gathered pairs (open_clip's ``local_loss`` with ``gather_with_grad``): the mean over ranks of
    the returned losses is the loss of the global batch, and after DDP's gradient averaging the
    gradients are those of the global batch.
    """

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        """image_emb [b, D], text_emb [b, D] (pair i matches), temperature scalar -> scalar loss."""
        if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
            raise ValueError(
                f"ContrastiveLoss expects image and text embeddings of the same shape [b, D], "
                f"got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
            )
        with torch.autocast(image_emb.device.type, enabled=False):  # float32 logits whatever the autocast
            image = F.normalize(image_emb.float(), dim=-1)
            text = F.normalize(text_emb.float(), dim=-1)
            rank, _ = _rank_and_world()
            all_image, all_text = gather_with_grad(image), gather_with_grad(text)
            targets = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
            image_to_text = image @ all_text.T / temperature.float()
            text_to_image = text @ all_image.T / temperature.float()
            return 0.5 * (F.cross_entropy(image_to_text, targets) + F.cross_entropy(text_to_image, targets))


class ScoreCentering(nn.Module):
    """EMA of the mean teacher score vector, subtracted from teacher scores before sharpening.

    ``accumulate`` records teacher scores of a (micro-)batch; ``step`` folds their mean (all-reduced over
    ranks) into the centre once per optimiser step: c <- m c + (1 - m) mean. Targets of every micro-batch
    of a step therefore use the same centre, as a single large batch would.
    """

    def __init__(self, num_prototypes: int, momentum: float) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(num_prototypes))
        self._pending: torch.Tensor | None = None  # [K + 1]: score sum, then row count

    @torch.no_grad()
    def accumulate(self, teacher_scores: torch.Tensor) -> None:
        """teacher_scores [..., K]; every row counts once in the mean."""
        rows = teacher_scores.reshape(-1, teacher_scores.shape[-1]).float()
        stats = torch.cat([rows.sum(dim=0), rows.new_tensor([rows.shape[0]])])
        self._pending = stats if self._pending is None else self._pending + stats

    @torch.no_grad()
    def step(self) -> None:
        if self._pending is None:
            return
        stats, self._pending = self._pending, None
        if _rank_and_world()[1] > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        batch_mean = stats[:-1] / stats[-1]
        self.center.mul_(self.momentum).add_(batch_mean, alpha=1.0 - self.momentum)

    @torch.no_grad()
    def probabilities(self, teacher_scores: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """teacher_scores [..., K] -> softmax((scores - centre) / teacher_temp) [..., K], float32; one output
        tensor, filled chunk by chunk of rows (``row_chunks``)."""
        scores = teacher_scores.float()
        probabilities = torch.empty_like(scores)
        for rows in row_chunks(scores):
            chunk = torch.sub(scores[rows], self.center, out=probabilities[rows]).div_(teacher_temp)
            chunk.sub_(chunk.amax(dim=-1, keepdim=True)).exp_()
            chunk.div_(chunk.sum(dim=-1, keepdim=True))
        return probabilities


ROW_CHUNK_ELEMENTS = 2**18  # float32 values per chunk (1 MB): a chunk stays in cache between its ops


def row_chunks(tensor: torch.Tensor) -> list[slice]:
    """Slices of the first axis of ``tensor`` [R, ...], each of about ``ROW_CHUNK_ELEMENTS`` values (at
    least one row). The [R, K] prototype scores (K = 32768 in the paper) are worked on chunk by chunk:
    each element-wise op over a chunk reads it from cache, and no op allocates a whole [R, K] temporary."""
    per_row = max(1, tensor[:1].numel())
    step = max(1, ROW_CHUNK_ELEMENTS // per_row)
    return [slice(start, start + step) for start in range(0, tensor.shape[0], step)]


class _SoftCrossEntropy(torch.autograd.Function):
    """-sum_k t_k log softmax(s / tau)_k = logsumexp(s / tau) - sum_k t_k s_k / tau (the targets sum to 1),
    with the gradient (softmax(s / tau) - t) / tau written out. Both run chunk by chunk of rows
    (``row_chunks``): the forward allocates no [..., K] tensor and keeps for the backward only the scores
    (alive anyway) and the targets, the backward allocates the gradient only."""

    @staticmethod
    def forward(
        ctx, student_scores: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float
    ) -> torch.Tensor:
        scores = student_scores.float()
        log_normaliser = scores.new_empty(scores.shape[:-1])
        loss = scores.new_empty(scores.shape[:-1])
        with torch.autocast(student_scores.device.type, enabled=False):
            for rows in row_chunks(scores):
                logits = scores[rows] / student_temp
                torch.logsumexp(logits, dim=-1, out=log_normaliser[rows])
                loss[rows] = log_normaliser[rows] - (teacher_probs[rows] * logits).sum(dim=-1)
        ctx.save_for_backward(scores, log_normaliser, teacher_probs)
        ctx.student_temp, ctx.scores_dtype = student_temp, student_scores.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        scores, log_normaliser, teacher_probs = ctx.saved_tensors
        scale = (grad_loss / ctx.student_temp).unsqueeze(-1)
        grad = torch.empty_like(scores)
        for rows in row_chunks(scores):
            chunk = torch.div(scores[rows], ctx.student_temp, out=grad[rows])
            chunk.sub_(log_normaliser[rows].unsqueeze(-1)).exp_().sub_(teacher_probs[rows]).mul_(scale[rows])
        return grad.to(ctx.scores_dtype), None, None


def _cross_entropy(teacher_probs: torch.Tensor, student_scores: torch.Tensor, student_temp: float) -> torch.Tensor:
    """-sum_k t_k log softmax(s / student_temp)_k over the last axis: [..., K] x [..., K] -> [...] (the
    targets broadcast against the scores and, as constants, get no gradient)."""
    if teacher_probs.requires_grad:
        raise ValueError("self-distillation targets must not require grad (compute them under torch.no_grad)")
    if student_scores.ndim < 2:
        raise ValueError(f"soft cross-entropy expects scores [R, ..., K], got {tuple(student_scores.shape)}")
    return _SoftCrossEntropy.apply(student_scores, teacher_probs.expand_as(student_scores), student_temp)


class _SelfDistillationLoss(nn.Module):
    """A student matching the centred, sharpened distributions of the teacher (DINO and iBOT alike)."""

    def __init__(self, num_prototypes: int, student_temp: float, center_momentum: float) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.centering = ScoreCentering(num_prototypes, center_momentum)


class DINOLoss(_SelfDistillationLoss):
    """Self-distillation on CLS tokens (paper Eq. 1): every local crop of an image predicts the centred,
    sharpened teacher distribution of that image's single global crop (teacher scores [B, K]).

    The loss is the mean over the B*M (image, local crop) pairs, so its scale does not depend on M.
    """

    def teacher_targets(self, teacher_scores: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """teacher_scores [B, K] -> target probabilities [B, K]; records every row for the centre."""
        self.centering.accumulate(teacher_scores)
        return self.centering.probabilities(teacher_scores, teacher_temp)

    def forward(self, student_local_scores: torch.Tensor, teacher_targets: torch.Tensor) -> torch.Tensor:
        """student_local_scores [B*M, K] (image-major: row b*M + m is crop m of image b),
        teacher_targets [B, K] -> scalar."""
        images, prototypes = teacher_targets.shape
        if student_local_scores.ndim != 2 or student_local_scores.shape[0] % images:
            raise ValueError(
                f"DINOLoss expects student scores [B*M, K] with B={images}, got {tuple(student_local_scores.shape)}"
            )
        student = student_local_scores.reshape(images, -1, prototypes)
        return _cross_entropy(teacher_targets.unsqueeze(1), student, self.student_temp).mean()


class IBOTPatchLoss(_SelfDistillationLoss):
    """Masked image modelling on patch tokens (paper Eq. 2), and iBOT++ (TIPSv2) with ``all_tokens=True``.

    Each image's loss is the mean over its supervised tokens and the batch loss the mean over images
    (DINOv2 weights each masked token by 1 / masked count of its image). Supervised tokens are the masked
    ones for iBOT; for iBOT++ they are all N tokens, so each token, visible or masked, weighs 1/N and the
    visible tokens carry the fraction (1 - mask ratio) of the image's loss. An image with no supervised
    token contributes 0 and still counts in the batch mean. Teacher scores come from the unmasked view.
    Student scores, teacher scores and targets are [S, K], the supervised rows
    (``outputs.supervised_patches``): both heads run on those tokens only, and the centre is their mean
    (dinov2 centres on the masked teacher tokens, which are iBOT's supervised rows).
    """

    def __init__(self, num_prototypes: int, student_temp: float, center_momentum: float, all_tokens: bool) -> None:
        super().__init__(num_prototypes, student_temp, center_momentum)
        self.all_tokens = all_tokens

    def supervised(self, tokens: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, ...] -> the supervised rows [S, ...] (see ``outputs.supervised_patches``)."""
        return supervised_patches(tokens, patch_mask, self.all_tokens)

    def patch_targets(self, teacher_scores: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """teacher_scores [S, K] of the supervised rows -> their targets [S, K]; the rows go to the centre."""
        self.centering.accumulate(teacher_scores)
        return self.centering.probabilities(teacher_scores, teacher_temp)

    def forward(
        self, student_patch_scores: torch.Tensor, teacher_targets: torch.Tensor, patch_mask: torch.Tensor
    ) -> torch.Tensor:
        """student_patch_scores [S, K] (masked view), teacher_targets [S, K], both on the supervised rows of
        patch_mask bool [B, N] (True = masked for the student) -> scalar."""
        supervised = torch.ones_like(patch_mask) if self.all_tokens else patch_mask
        rows = int(supervised.sum())
        if student_patch_scores.shape != teacher_targets.shape or student_patch_scores.shape[:1] != (rows,):
            raise ValueError(
                f"IBOTPatchLoss expects student/teacher scores [S, K] of the S={rows} supervised tokens of "
                f"mask {tuple(patch_mask.shape)}, got {tuple(student_patch_scores.shape)}, "
                f"{tuple(teacher_targets.shape)}"
            )
        weights = 1.0 / supervised.sum(dim=-1, keepdim=True).float().clamp(min=1)  # [B, 1]
        row_weights = self.supervised(weights.expand(patch_mask.shape), patch_mask)
        per_token = _cross_entropy(teacher_targets, student_patch_scores, self.student_temp)
        return (per_token * row_weights).sum() / patch_mask.shape[0]


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy regulariser (DINOv2): -mean log distance of each l2-normalised
    embedding to its nearest neighbour in the (local) batch."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """embeddings [B, D], B >= 2 -> scalar."""
        if embeddings.ndim != 2 or embeddings.shape[0] < 2:
            raise ValueError(f"KoLeoLoss needs embeddings [B >= 2, D], got {tuple(embeddings.shape)}")
        unit = F.normalize(embeddings.float(), dim=-1)
        with torch.no_grad():
            similarity = unit @ unit.T
            similarity.fill_diagonal_(-2.0)
            nearest = similarity.argmax(dim=1)
        distance = (unit - unit[nearest]).norm(dim=-1)
        return -torch.log(distance + self.eps).mean()


def _require(term: str, **inputs: object) -> None:
    missing = [name for name, value in inputs.items() if value is None]
    if missing:
        raise ValueError(f"TIPSLoss: the '{term}' term is enabled (weight > 0) but {', '.join(missing)} not given")


class TIPSLoss(nn.Module):
    """All terms of the recipe, switched on by a positive weight in ``LossCfg.weights``.

    Parts are named ``clip_global``, ``clip_spatial``, ``dino``, ``ibot``, ``koleo``; ``total`` weighs them.
    The contrastive parts take full-batch embeddings (see ``contrastive_accum``), the self-supervised
    parts one micro-batch. ``step_centers`` must run once per optimiser step.
    """

    def __init__(self, cfg: LossCfg, num_prototypes: int) -> None:
        super().__init__()
        self.weights = {name: weight for name, weight in cfg.weights.as_dict().items() if weight > 0}
        self.contrastive = ContrastiveLoss()
        self.dino = DINOLoss(num_prototypes, cfg.student_temp, cfg.center_momentum) if DINO in self.weights else None
        self.ibot = (
            IBOTPatchLoss(num_prototypes, cfg.student_temp, cfg.center_momentum, cfg.ibot_all_tokens)
            if IBOT in self.weights
            else None
        )
        self.koleo = KoLeoLoss() if KOLEO in self.weights else None

    def contrastive_parts(self, embeddings: ContrastiveEmbeddings, temperature: torch.Tensor) -> dict[str, torch.Tensor]:
        """CLS1 / alt-text and CLS2 / synthetic-caption pairs, [b, D] each -> the enabled contrastive parts."""
        pairs = {
            CLIP_GLOBAL: (embeddings.global_cls, embeddings.alt_text),
            CLIP_SPATIAL: (embeddings.spatial_cls, embeddings.synthetic_text),
        }
        parts = {}
        for name, (image, text) in pairs.items():
            if name in self.weights:
                _require(name, image_embeddings=image, text_embeddings=text)
                parts[name] = self.contrastive(image, text, temperature)
        return parts

    def self_supervised_parts(
        self,
        student: StudentOutputs,
        teacher: TeacherScores | None,
        patch_mask: torch.Tensor,
        dino_teacher_temp: float,
        ibot_teacher_temp: float,
    ) -> dict[str, torch.Tensor]:
        """The DINO / iBOT / KoLeo parts of one micro-batch (each a mean over its samples): student and
        teacher scores as in ``StudentOutputs`` / ``TeacherScores``, patch_mask bool [b, N] (True = masked
        for the student). The values of a disabled term may be None; those of an enabled term are required."""
        teacher = teacher if teacher is not None else TeacherScores()
        parts: dict[str, torch.Tensor] = {}
        if self.dino is not None:
            _require(DINO, **{"student.local_scores": student.local_scores,
                              "teacher.global_scores": teacher.global_scores})
            targets = self.dino.teacher_targets(teacher.global_scores, dino_teacher_temp)
            parts[DINO] = self.dino(student.local_scores, targets)
        if self.ibot is not None:
            _require(IBOT, **{"student.patch_scores": student.patch_scores,
                              "teacher.patch_scores": teacher.patch_scores})
            targets = self.ibot.patch_targets(teacher.patch_scores, ibot_teacher_temp)
            parts[IBOT] = self.ibot(student.patch_scores, targets, patch_mask)
        if self.koleo is not None:
            _require(KOLEO, **{"student.koleo_cls": student.koleo_cls})
            parts[KOLEO] = self.koleo(student.koleo_cls)
        return parts

    def supervised_rows(self, patch_mask: torch.Tensor) -> SupervisedRows | None:
        """What the teacher's iBOT head scores for a micro-batch of patch_mask bool [b, N] (True = masked):
        tokens [b, N, ...] -> the supervised rows [S, ...]; None when the iBOT term is off."""
        return functools.partial(self.ibot.supervised, patch_mask=patch_mask) if self.ibot is not None else None

    def total(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum of the given parts (every part must be an enabled term)."""
        return sum(self.weights[name] * value for name, value in parts.items())

    def step_centers(self) -> None:
        for loss in (self.dino, self.ibot):
            if loss is not None:
                loss.centering.step()
