"""Prompt templates for zero-shot classification and segmentation (``"{}"`` = class name).

- ``IMAGENET_TEMPLATES``: the 80 prompts of Radford et al. (CLIP) for ImageNet, in the order of
  OpenAI's prompt-engineering notebook (as listed by open_clip). The TIPS paper (A.4.3) uses these
  80 prompts for zero-shot ImageNet classification.
- ``TCL_TEMPLATES``: the 9 prompts of TCL (Cha et al., 2023) that the official TIPS zero-shot
  segmentation notebook (``pytorch/TIPS_zeroshot_segmentation.ipynb``) averages per class: 7 of
  the CLIP prompts plus "a photo of many {}." and "a photo of {}s.".
"""

from __future__ import annotations

IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

TCL_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of a {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
    "a photo of many {}.",
    "a photo of {}s.",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"imagenet80": IMAGENET_TEMPLATES, "tcl9": TCL_TEMPLATES}


def get_templates(name: str) -> tuple[str, ...]:
    """Template set by name: ``"imagenet80"`` or ``"tcl9"``."""
    if name not in TEMPLATE_SETS:
        raise KeyError(f"unknown template set {name!r}; choose one of {sorted(TEMPLATE_SETS)}")
    return TEMPLATE_SETS[name]
