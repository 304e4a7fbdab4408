"""Image transforms: the official inference preprocessing, random resized crops and patch masks.

Pixels are float RGB in [0, 1] with no mean/std normalisation (official ``IMAGE_MEAN = (0, 0, 0)``,
``IMAGE_STD = (1, 1, 1)``). The official inference preprocessing is torchvision
``Resize((S, S))`` + ``ToTensor()`` on a PIL image, i.e. PIL bilinear resampling (which filters,
so it antialiases when shrinking) to a square; ``image_transform`` reproduces it with PIL alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ImageLike = Image.Image | np.ndarray | torch.Tensor


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> float32 [3, H, W] in [0, 1] (converted to RGB first)."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def _as_pil(image: np.ndarray) -> Image.Image:
    """uint8 [H, W] or [H, W, 3|4] array -> PIL; anything else is refused with the reason."""
    if (
        image.dtype != np.uint8
        or image.ndim not in (2, 3)
        or (image.ndim == 3 and image.shape[2] not in (3, 4))
    ):
        raise ValueError(
            f"numpy images must be uint8 [H, W] or [H, W, 3|4], got {image.dtype} {tuple(image.shape)}; "
            "pass float images as torch tensors [3, H, W] in [0, 1]"
        )
    return Image.fromarray(image)


class InferenceTransform:
    """Callable image -> float32 [3, H, W] in [0, 1] (or [B, 3, H, W] for batched tensors).

    Square mode (official): resize to (image_size, image_size) with PIL bilinear.
    keep_aspect: resize the short side to image_size (bilinear), then centre-crop both sides down
    to multiples of patch_size, so a 640x480 photo becomes 588x448 at image_size=448.
    Inputs: PIL images, uint8 numpy arrays [H, W(, C)], or float tensors [3, H, W] / [B, 3, H, W]
    in [0, 1] (resized with torch bilinear + antialias, close to but not bit-equal to PIL).
    """

    def __init__(self, image_size: int = 448, keep_aspect: bool = False, patch_size: int = 14) -> None:
        if image_size <= 0 or image_size % patch_size:
            raise ValueError(
                f"image_size must be a positive multiple of the patch size {patch_size}, got {image_size}"
            )
        self.image_size, self.keep_aspect, self.patch_size = image_size, keep_aspect, patch_size

    def output_size(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """((resized H, resized W), (output H, output W)) for an input of height x width."""
        size = self.image_size
        if not self.keep_aspect:
            return (size, size), (size, size)
        scale = size / min(height, width)
        resized = (max(round(height * scale), size), max(round(width * scale), size))
        return resized, (
            resized[0] // self.patch_size * self.patch_size,
            resized[1] // self.patch_size * self.patch_size,
        )

    def __call__(self, image: ImageLike) -> torch.Tensor:
        if isinstance(image, np.ndarray):
            image = _as_pil(image)
        if isinstance(image, Image.Image):
            (rh, rw), (oh, ow) = self.output_size(image.height, image.width)
            resized = image.convert("RGB").resize((rw, rh), Image.BILINEAR)
            top, left = (rh - oh) // 2, (rw - ow) // 2
            return pil_to_tensor(resized.crop((left, top, left + ow, top + oh)))
        if isinstance(image, torch.Tensor):
            return self._resize_tensor(image)
        raise TypeError(f"expected a PIL image, numpy array or torch tensor, got {type(image).__name__}")

    def _resize_tensor(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim not in (3, 4) or image.shape[-3] != 3:
            raise ValueError(f"tensor images must be [3, H, W] or [B, 3, H, W], got {tuple(image.shape)}")
        batch = image if image.ndim == 4 else image[None]
        batch = batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()
        (rh, rw), (oh, ow) = self.output_size(batch.shape[-2], batch.shape[-1])
        resized = F.interpolate(batch, size=(rh, rw), mode="bilinear", align_corners=False, antialias=True)
        top, left = (rh - oh) // 2, (rw - ow) // 2
        out = resized[..., top : top + oh, left : left + ow].clamp_(0.0, 1.0)
        return out if image.ndim == 4 else out[0]


def image_transform(
    image_size: int = 448, keep_aspect: bool = False, patch_size: int = 14
) -> InferenceTransform:
    """The inference preprocessing of the official TIPS code (448 for TIPSv2 / HR models, 224 for LR)."""
    return InferenceTransform(image_size, keep_aspect, patch_size)


@dataclass(frozen=True)
class CropBox:
    """A crop in pixels of the source image: rows [top, top + height), columns [left, left + width)."""

    top: int
    left: int
    height: int
    width: int


def sample_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> CropBox:
    """Inception-style random resized crop: area fraction ~ U(scale), log aspect (w/h) ~ U(log ratio).

    Up to 10 draws; if none fits, the largest centred crop with the aspect clamped to ``ratio``.
    """
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(2, generator=generator).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_low + (log_high - log_low) * u[1])
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return CropBox(top, left, h, w)
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return CropBox((height - h) // 2, (width - w) // 2, h, w)


def resized_crop(image: Image.Image, box: CropBox, size: int, flip: bool = False) -> Image.Image:
    """Crop ``box`` out of ``image``, then resize it to size x size (PIL bilinear), mirrored if ``flip``
    (as torchvision's RandomResizedCrop: the resampling filter sees only the cropped pixels)."""
    cropped = image.crop((box.left, box.top, box.left + box.width, box.top + box.height))
    out = cropped.resize((size, size), Image.BILINEAR)
    return out.transpose(Image.FLIP_LEFT_RIGHT) if flip else out


def random_patch_mask(
    batch_size: int, num_patches: int, mask_ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random (not blockwise) patch masks, bool [B, N], exactly round(mask_ratio * N) True per row.

    True = masked (replaced by the mask token). TIPS uses random masking at 75% (paper App. A.1, Tab. 11).
    """
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
    num_masked = round(mask_ratio * num_patches)
    order = torch.rand(batch_size, num_patches, generator=generator).argsort(dim=1)
    return order < num_masked
