"""Zero-shot classification and segmentation from text prompts.

Classification (paper A.4.3, after CLIP): every class is the renormalised mean of its normalised
prompt embeddings (80 ImageNet templates); images use the global CLS (CLS1); prediction =
highest cosine similarity.

Segmentation follows the official notebook ``pytorch/TIPS_zeroshot_segmentation.ipynb``:
- patch features from the MaskCLIP "values" readout of the last block (``values_readout``);
- text classifier from the 9 TCL templates;
- image short side resized to 448 (PIL bicubic), sliding windows of 448 with stride 336 (a
  window whose sides are not multiples of the patch size is resized bicubically up to the next
  multiple, as the notebook does);
- per window: cosine(patch, class) on the patch grid, bilinear to the window size, softmax over
  classes (the notebook applies it to raw cosines, i.e. ``logit_scale=1``), summed over windows
  and divided by the per-pixel window count;
- bilinear to the label size, argmax; mIoU from a confusion matrix, label 255 ignored.
On ADE20K-150 this gives 25.06 mIoU for TIPSv2-L/14 in the notebook (24.7 in the README).

Variants (TCL / NACLIP protocols): ``stride=224``, ``templates="imagenet80"``, and for datasets
with a background class ``background_threshold``: pixels whose best class probability is below
it become background (label 0) and class c becomes c + 1. That is equivalent to TCL's constant
background score map and to NACLIP's probability threshold; choose ``logit_scale`` accordingly
(with scale 1 the probabilities over C classes stay close to 1/C). PAMR refinement is not
implemented.

Reproducing the official ADE20K-150 number (TIPSv2-L/14: 24.7 README / 25.06 notebook) with the
validation set unpacked at ``/data/ADEChallengeData2016`` (2,000 images; slow on CPU, roughly two
448 px windows per image through ViT-L)::

    model = tipstorch.create_model("tipsv2-l14", pretrained=True).eval()
    tokenizer = tipstorch.get_tokenizer("tipsv2-l14")
    dataset = ADE20KSegmentation("/data/ADEChallengeData2016", split="validation")
    config = ZeroShotSegConfig()  # notebook protocol: 448 short side, window 448, stride 336, TCL-9
    classifier = segmentation_classifier(model.encode_text, tokenizer, dataset.class_names, config)
    result = evaluate_zero_shot_segmentation(
        functools.partial(values_readout, model.visual), dataset, classifier, config, progress=True
    )
    print(100 * result["miou"])  # expected 24.7-25.1
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from tipstorch.data.transforms import pil_to_tensor
from tipstorch.eval.features import SkippedSamples, TextEncoder, Tokenizer, embed_texts, iterate_samples
from tipstorch.eval.metrics import SegmentationMetric, topk_accuracy
from tipstorch.eval.templates import get_templates

DenseEncoder = Callable[[torch.Tensor], torch.Tensor]  # images [B, 3, H, W] -> patch features [B, h, w, D]


# --------------------------------------------------------------------------------------------
# Text classifier and classification
# --------------------------------------------------------------------------------------------


def build_text_classifier(
    encode_text: TextEncoder,
    tokenizer: Tokenizer,
    class_names: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
) -> torch.Tensor:
    """Class embeddings [C, D]: per class, embed every template, L2-normalise, average, renormalise."""
    if not class_names or not templates:
        raise ValueError("need at least one class name and one template")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"templates without a '{{}}' slot for the class name: {bad}")
    texts = [template.format(name) for name in class_names for template in templates]
    embeddings = F.normalize(embed_texts(encode_text, tokenizer, texts, batch_size), dim=-1)
    per_class = embeddings.reshape(len(class_names), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1)


def zero_shot_scores(image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Cosine similarities [N, C] of image features [N, D] with class embeddings [C, D]."""
    return F.normalize(image_features.float(), dim=-1) @ F.normalize(classifier.float(), dim=-1).T


def zero_shot_classification(
    image_features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-k accuracy of zero-shot classification; image_features [N, D] (global CLS), labels [N]."""
    return topk_accuracy(zero_shot_scores(image_features, classifier), labels, ks)


# --------------------------------------------------------------------------------------------
# MaskCLIP "values" readout
# --------------------------------------------------------------------------------------------


def values_readout(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Patch features [B, h, w, D] with the last block's attention replaced by its value path.

    Runs all blocks but the last normally; in the last block the attention output is the value
    projection of norm1(x) (each token keeps its own value, as MaskCLIP), followed by proj, ls1,
    the residual, the MLP branch and the final norm. Uses only ``vit.prepare_tokens(images) ->
    [B, P + h*w, D]``, ``vit.blocks`` (norm1, attn.qkv, attn.proj, ls1, norm2, mlp, ls2),
    ``vit.norm`` and ``vit.patch_size``. images: [B, 3, H, W] in [0, 1], H and W multiples of
    the patch size.
    """
    batch, _, height, width = images.shape
    grid_h, grid_w = height // vit.patch_size, width // vit.patch_size
    tokens = vit.prepare_tokens(images)
    *early_blocks, last = list(vit.blocks)
    for block in early_blocks:
        tokens = block(tokens)
    dim = tokens.shape[-1]
    values = last.attn.qkv(last.norm1(tokens))[..., 2 * dim :]
    tokens = tokens + last.ls1(last.attn.proj(values))
    tokens = tokens + last.ls2(last.mlp(last.norm2(tokens)))
    patch_tokens = vit.norm(tokens)[:, tokens.shape[1] - grid_h * grid_w :]
    return patch_tokens.reshape(batch, grid_h, grid_w, dim)


# --------------------------------------------------------------------------------------------
# Sliding-window segmentation
# --------------------------------------------------------------------------------------------


@dataclass
class ZeroShotSegConfig:
    """Zero-shot segmentation protocol; defaults = official TIPS notebook (ADE20K-150)."""

    short_side: int = 448
    window: int = 448
    stride: int = 336
    templates: str = "tcl9"
    logit_scale: float = 1.0
    background_threshold: float | None = None
    patch_size: int = 14
    window_batch_size: int = 4


def segmentation_classifier(
    encode_text: TextEncoder, tokenizer: Tokenizer, class_names: Sequence[str], config: ZeroShotSegConfig
) -> torch.Tensor:
    """Class embeddings [C, D] from the config's template set (background excluded from class_names)."""
    return build_text_classifier(encode_text, tokenizer, class_names, get_templates(config.templates))


def short_side_resize(image: Image.Image, size: int) -> Image.Image:
    """Resize (PIL bicubic) so the short side is ``size``; long side int(size * long / short)."""
    width, height = image.size
    if min(width, height) == size:
        return image
    if width < height:
        return image.resize((size, int(size * height / width)), Image.Resampling.BICUBIC)
    return image.resize((int(size * width / height), size), Image.Resampling.BICUBIC)


def sliding_windows(height: int, width: int, window: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Window boxes (y1, y2, x1, x2) on a regular grid; the last row/column is shifted back inside.

    Every box is min(window, height) x min(window, width) and together they cover the image.
    """
    rows = max(height - window + stride - 1, 0) // stride + 1
    cols = max(width - window + stride - 1, 0) // stride + 1
    boxes = []
    for i in range(rows):
        for j in range(cols):
            y2, x2 = min(i * stride + window, height), min(j * stride + window, width)
            boxes.append((max(y2 - window, 0), y2, max(x2 - window, 0), x2))
    return boxes


def window_class_probs(
    patch_features: torch.Tensor, classifier: torch.Tensor, size: tuple[int, int], logit_scale: float = 1.0
) -> torch.Tensor:
    """patch_features [B, h, w, D], classifier [C, D] -> class probabilities [B, C, *size].

    Cosine similarity on the patch grid, bilinear to ``size``, softmax over classes.
    """
    similarity = torch.einsum("bhwd,cd->bchw", F.normalize(patch_features.float(), dim=-1), classifier.float())
    similarity = F.interpolate(similarity, size=size, mode="bilinear", align_corners=False)
    return (logit_scale * similarity).softmax(dim=1)


def _resize_to_patch_multiple(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    height, width = images.shape[-2:]
    target = (math.ceil(height / patch_size) * patch_size, math.ceil(width / patch_size) * patch_size)
    if target == (height, width):
        return images
    return F.interpolate(images, size=target, mode="bicubic", align_corners=False)


@torch.no_grad()
def sliding_window_probs(
    dense_encoder: DenseEncoder, image: torch.Tensor, classifier: torch.Tensor, config: ZeroShotSegConfig
) -> torch.Tensor:
    """Class probabilities [C, H, W] for image [3, H, W], averaged over overlapping windows."""
    _, height, width = image.shape
    boxes = sliding_windows(height, width, config.window, config.stride)
    probs = torch.zeros(classifier.shape[0], height, width)
    counts = torch.zeros(height, width)
    for start in range(0, len(boxes), config.window_batch_size):
        chunk = boxes[start : start + config.window_batch_size]
        crops = torch.stack([image[:, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
        features = dense_encoder(_resize_to_patch_multiple(crops, config.patch_size)).float().cpu()
        window_probs = window_class_probs(features, classifier, tuple(crops.shape[-2:]), config.logit_scale)
        for (y1, y2, x1, x2), window_prob in zip(chunk, window_probs, strict=True):
            probs[:, y1:y2, x1:x2] += window_prob
            counts[y1:y2, x1:x2] += 1
    return probs / counts


def probs_to_labels(
    probs: torch.Tensor, label_size: tuple[int, int], background_threshold: float | None = None
) -> torch.Tensor:
    """probs [C, H, W] -> labels long [*label_size] (bilinear, argmax, optional background rule).

    With ``background_threshold`` the result is 0 where the best probability is below it and
    best class + 1 elsewhere.
    """
    resized = F.interpolate(probs[None], size=label_size, mode="bilinear", align_corners=False)[0]
    best_prob, best_class = resized.max(dim=0)
    if background_threshold is None:
        return best_class
    return torch.where(best_prob < background_threshold, 0, best_class + 1)


def segment_image(
    dense_encoder: DenseEncoder,
    image: Image.Image,
    classifier: torch.Tensor,
    config: ZeroShotSegConfig,
    label_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Zero-shot label map long [H, W] for a PIL image (label_size defaults to the image size)."""
    tensor = pil_to_tensor(short_side_resize(image, config.short_side))
    probs = sliding_window_probs(dense_encoder, tensor, classifier, config)
    return probs_to_labels(probs, label_size or (image.height, image.width), config.background_threshold)


def evaluate_zero_shot_segmentation(
    dense_encoder: DenseEncoder,
    dataset: Dataset,
    classifier: torch.Tensor,
    config: ZeroShotSegConfig | None = None,
    ignore_index: int = 255,
    progress: bool = False,
) -> dict[str, object]:
    """mIoU etc. over a dataset of (PIL image, labels int [H, W]) with ``ignore_index`` pixels.

    Labels must be 0..C-1 for the C classifier rows, or 0 = background and 1..C with a
    ``background_threshold``. Returns the SegmentationMetric scores plus ``num_images`` and
    ``num_skipped`` (corrupt samples).
    """
    config = config or ZeroShotSegConfig()
    num_classes = classifier.shape[0] + (config.background_threshold is not None)
    metric = SegmentationMetric(num_classes, ignore_index)
    skipped = SkippedSamples()
    num_images = 0
    for _, (image, labels) in iterate_samples(dataset, skipped, progress, desc="zero-shot segmentation"):
        labels = torch.as_tensor(np.asarray(labels))
        metric.update(segment_image(dense_encoder, image, classifier, config, tuple(labels.shape)), labels)
        num_images += 1
    return {**metric.compute(), "num_images": num_images, "num_skipped": skipped.count}
