"""Dense predictions for one image, as numpy arrays at the image's own size: depth, surface normals and
ADE20K classes from a DPT head (released or a probe), zero-shot segmentation into any words with
per-class scores, PCA maps of the patch tokens (optionally of the foreground only) and image-text
similarities.

    model, tokenizer = tipstorch.create_model("tipsv2-b14", pretrained=True), tipstorch.get_tokenizer("tipsv2-b14")
    depth = predict_depth(model, create_dense_head("tipsv2-b14", "depth"), image)        # [H, W] metres
    classes = predict_segmentation(model, create_dense_head("tipsv2-b14", "segmentation"), image)
    class_areas(classes, segmentation_class_names(150))                                 # {"wall": 0.31, ...}
    segmentation = zero_shot_segmentation(model, tokenizer, image, ["sky", "tree", "road"])
    segmentation.label_map, segmentation.scores()                                          # [H, W], per class

The image is resized (PIL bicubic) so that its short side is ``image_size`` (default: the model's) and
both sides are multiples of the patch size; predictions are resized back to the original size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tipstorch.data.formats import ADE20K_CLASS_NAMES
from tipstorch.data.transforms import pil_to_tensor
from tipstorch.eval.features import Tokenizer
from tipstorch.eval.templates import get_templates
from tipstorch.eval.zeroshot import (
    ZeroShotSegConfig,
    build_text_classifier,
    segmentation_classifier,
    short_side_resize,
    sliding_window_probs,
    values_readout,
)
from tipstorch.models.dense import DPTDecoder, DPTDepthDecoder, DPTNormalsDecoder, DPTSegmentationDecoder
from tipstorch.models.tips import TIPSModel
from tipstorch.viz import pca_rgb


def _device(model: TIPSModel) -> torch.device:
    return next(model.parameters()).device


def resize_to_patches(image: Image.Image, short_side: int, patch_size: int = 14) -> Image.Image:
    """The whole image (no crop) resized so its short side is about ``short_side`` and both sides are
    multiples of ``patch_size`` (each side rounded to the nearest multiple, at least one patch)."""
    scale = short_side / min(image.width, image.height)
    width, height = (max(patch_size, round(side * scale / patch_size) * patch_size) for side in image.size)
    return image if (width, height) == image.size else image.resize((width, height), Image.Resampling.BICUBIC)


def image_tensor(model: TIPSModel, image: Image.Image, image_size: int | None = None) -> torch.Tensor:
    """[1, 3, H', W'] in [0, 1] on the model's device, resized by ``resize_to_patches``."""
    patch = model.config.vision.patch_size
    return pil_to_tensor(resize_to_patches(image, image_size or model.image_size, patch))[None].to(
        _device(model)
    )


def _check_head(model: TIPSModel, head: DPTDecoder, kind: type) -> None:
    if not isinstance(head, kind):
        raise TypeError(f"expected a {kind.__name__}, got {type(head).__name__}")
    width = model.config.vision.embed_dim
    if head.config.embed_dim != width:
        raise ValueError(
            f"the DPT head reads {head.config.embed_dim}-wide features but the model is {width} wide "
            "(a head of another model size?)"
        )


@torch.no_grad()
def _run_dpt(
    model: TIPSModel, head: DPTDecoder, image: Image.Image, image_size: int | None, upsample: bool = True
) -> torch.Tensor:
    """The head's output [C, H, W] for one image, at the image's size (``upsample``) or the head's own."""
    images = image_tensor(model, image, image_size)
    layers = model.visual.forward_intermediates(
        images,
        indices=head.config.layers_for(len(model.visual.blocks)),
        norm=True,
        return_prefix_tokens=True,
        intermediates_only=True,
    )
    return head(layers, image_size=(image.height, image.width) if upsample else None)[0].float().cpu()


def predict_depth(
    model: TIPSModel, head: DPTDepthDecoder, image: Image.Image, image_size: int | None = None
) -> np.ndarray:
    """Depth in metres, float32 [H, W] for a PIL image of H x W pixels."""
    _check_head(model, head, DPTDepthDecoder)
    return _run_dpt(model, head, image, image_size)[0].numpy()


def predict_normals(
    model: TIPSModel, head: DPTNormalsDecoder, image: Image.Image, image_size: int | None = None
) -> np.ndarray:
    """Unit surface normals, float32 [H, W, 3] (x, y, z as the head predicts them)."""
    _check_head(model, head, DPTNormalsDecoder)
    return _run_dpt(model, head, image, image_size).permute(1, 2, 0).numpy()


def segmentation_class_names(num_classes: int) -> list[str]:
    """Names of a segmentation head's classes: ADE20K's 150 (the released heads), else "class <i>"."""
    if num_classes == len(ADE20K_CLASS_NAMES):
        return list(ADE20K_CLASS_NAMES)
    return [f"class {index}" for index in range(num_classes)]


def upsampled_argmax(logits: torch.Tensor, size: tuple[int, int], chunk: int = 16) -> torch.Tensor:
    """argmax over K of logits [K, h, w] upsampled bilinearly to ``size`` (H, W): int64 [H, W].

    Works through ``chunk`` classes at a time, so that 150 classes on a 12-megapixel photo never hold
    the [K, H, W] upsampled logits (7 GB) at once; ties go to the lower class index, as in argmax.
    """
    best = torch.full(size, -torch.inf)
    classes = torch.zeros(size, dtype=torch.int64)
    for start in range(0, logits.shape[0], chunk):
        upsampled = F.interpolate(
            logits[None, start : start + chunk], size=size, mode="bilinear", align_corners=False
        )[0]
        value, index = upsampled.max(dim=0)
        better = value > best
        best = torch.where(better, value, best)
        classes = torch.where(better, index + start, classes)
    return classes


def predict_segmentation(
    model: TIPSModel, head: DPTSegmentationDecoder, image: Image.Image, image_size: int | None = None
) -> np.ndarray:
    """The class of every pixel, int64 [H, W] for a PIL image of H x W pixels (the released heads: an
    index into ``ADE20K_CLASS_NAMES``): argmax of the head's logits upsampled to the image size."""
    _check_head(model, head, DPTSegmentationDecoder)
    logits = _run_dpt(model, head, image, image_size, upsample=False)
    return upsampled_argmax(logits, (image.height, image.width)).numpy()


def class_areas(class_map: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Fraction of the pixels of ``class_map`` [H, W] (indices into ``class_names``) each present class
    covers, largest first; classes absent from the map are left out."""
    counts = np.bincount(class_map.ravel(), minlength=len(class_names))
    order = np.argsort(-counts, kind="stable")
    return {class_names[index]: float(counts[index] / class_map.size) for index in order if counts[index] > 0}


def clean_labels(labels: Sequence[str], minimum: int = 2) -> list[str]:
    """Stripped, non-empty, distinct labels in order; ValueError if fewer than ``minimum`` remain."""
    cleaned = list(dict.fromkeys(label.strip() for label in labels if label.strip()))
    if len(cleaned) < minimum:
        raise ValueError(f"need at least {minimum} different non-empty labels, got {cleaned}")
    return cleaned


@dataclass
class ZeroShotSegmentation:
    """labels [K]; label_map int64 [H, W] (index into labels); probabilities float32 [K, H, W]."""

    labels: list[str]
    label_map: np.ndarray
    probabilities: np.ndarray

    def scores(self) -> dict[str, dict[str, float]]:
        """Per label: ``area`` (fraction of pixels it wins), ``mean_probability`` (over the whole image)
        and ``confidence`` (mean probability over the pixels it wins; 0 when it wins none)."""
        result = {}
        for index, label in enumerate(self.labels):
            won = self.label_map == index
            probability = self.probabilities[index]
            result[label] = {
                "area": float(won.mean()),
                "mean_probability": float(probability.mean()),
                "confidence": float(probability[won].mean()) if won.any() else 0.0,
            }
        return result


def zero_shot_segmentation(
    model: TIPSModel,
    tokenizer: Tokenizer,
    image: Image.Image,
    labels: Sequence[str],
    config: ZeroShotSegConfig | None = None,
) -> ZeroShotSegmentation:
    """Zero-shot segmentation of a PIL image into ``labels`` (official notebook protocol: values readout,
    TCL prompts, sliding windows; see ``eval.zeroshot``). Default windows: the model's input size."""
    labels = clean_labels(labels)
    if config is None:
        size = model.image_size
        config = ZeroShotSegConfig(short_side=size, window=size, stride=size * 3 // 4)
    device = _device(model)
    with torch.no_grad():
        classifier = segmentation_classifier(
            lambda ids: model.encode_text(ids.to(device)), tokenizer, labels, config
        )
        tensor = pil_to_tensor(short_side_resize(image, config.short_side))
        probs = sliding_window_probs(
            lambda crops: values_readout(model.visual, crops.to(device)), tensor, classifier.float(), config
        )
        probs = F.interpolate(
            probs[None], size=(image.height, image.width), mode="bilinear", align_corners=False
        )[0]
    return ZeroShotSegmentation(labels, probs.argmax(dim=0).numpy(), probs.numpy().astype(np.float32))


@dataclass
class PCAMap:
    """colours float32 [h, w, 3] in [0, 1] on the patch grid; foreground bool [h, w] (None: all patches)."""

    colours: np.ndarray
    foreground: np.ndarray | None


def interior_up(score: torch.Tensor) -> torch.Tensor:
    """A score map [h, w] signed so that the image border scores lower on average than the interior
    (the border is mostly background), then scaled to [0, 1]."""
    border = torch.ones_like(score, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    if not border.all() and score[border].mean() > score[~border].mean():
        score = -score
    return (score - score.min()) / (score.max() - score.min()).clamp_min(1e-8)


def first_component(tokens: torch.Tensor) -> torch.Tensor:
    """Projection of patch tokens [h, w, D] on their first principal component, through ``interior_up``."""
    flat = tokens.reshape(-1, tokens.shape[-1]).float()
    centred = flat - flat.mean(dim=0)
    _, _, right = torch.linalg.svd(centred, full_matrices=False)
    return interior_up((centred @ right[0]).reshape(tokens.shape[:2]))


def pca_map(
    model: TIPSModel, image: Image.Image, image_size: int | None = None, fg_threshold: float | None = None
) -> PCAMap:
    """First three principal components of the patch tokens as colours (DINOv2-style).

    With ``fg_threshold`` (in [0, 1]) patches whose first component, scaled to [0, 1], exceeds it are
    foreground; the three components are then fitted on foreground patches only and the background is
    black. ValueError when fewer than 3 patches pass the threshold.
    """
    with torch.no_grad():
        tokens = model.encode_image(image_tensor(model, image, image_size)).patch_tokens[0].float().cpu()
    if fg_threshold is None:
        return PCAMap(pca_rgb(tokens).numpy(), None)
    if not 0.0 <= fg_threshold < 1.0:
        raise ValueError(f"fg_threshold must be in [0, 1), got {fg_threshold}")
    foreground = first_component(tokens) > fg_threshold
    if int(foreground.sum()) < 3:
        raise ValueError(
            f"only {int(foreground.sum())} of {foreground.numel()} patches score above fg_threshold {fg_threshold}; "
            "lower the threshold"
        )
    colours = torch.zeros(*tokens.shape[:2], 3)
    colours[foreground] = pca_rgb(tokens[foreground][:, None])[:, 0]
    return PCAMap(colours.numpy(), foreground.numpy())


@dataclass
class ImageTextSimilarity:
    """texts [K]; cosine similarities float32 [K] of the global and spatial CLS with each text
    embedding; probabilities [K] = softmax(global cosine / temperature) over the texts."""

    texts: list[str]
    global_cosine: np.ndarray
    spatial_cosine: np.ndarray
    probabilities: np.ndarray


def image_text_similarity(
    model: TIPSModel,
    tokenizer: Tokenizer,
    image: Image.Image,
    texts: Sequence[str],
    templates: str | None = None,
    image_size: int | None = None,
) -> ImageTextSimilarity:
    """How well each text describes the image. ``templates`` (e.g. "imagenet80") averages prompt
    templates around each text as zero-shot classification does; None embeds the texts as typed."""
    texts = clean_labels(texts, minimum=1)
    device = _device(model)
    prompts = get_templates(templates) if templates else ("{}",)
    with torch.no_grad():
        text = build_text_classifier(lambda ids: model.encode_text(ids.to(device)), tokenizer, texts, prompts)
        features = model.encode_image(image_tensor(model, image, image_size), normalize=True)
        text = F.normalize(text.float(), dim=-1)
        global_cosine = (features.global_cls.float() @ text.T)[0].cpu()
        spatial_cosine = (features.spatial_cls.float() @ text.T)[0].cpu()
        probabilities = (global_cosine / model.temperature.float().cpu()).softmax(dim=-1)
    return ImageTextSimilarity(texts, global_cosine.numpy(), spatial_cosine.numpy(), probabilities.numpy())
