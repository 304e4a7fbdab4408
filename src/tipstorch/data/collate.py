"""The training batch: one global crop, M local crops, a patch mask and two tokenised captions.

Built in the DataLoader workers (``collate_fn=MultiCropCollate(...)``). Randomness comes from the
torch RNG, which PyTorch seeds per worker (``torch.manual_seed`` in the main process makes a run
repeatable), from an explicit ``generator``, or from one generator per sample (``generators`` of
``__call__``: each sample's crops, flips, caption draws and patch mask then depend on its own generator
alone, not on the other samples of the batch, so a batch cut between processes is collated the same).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from tipstorch.data.captions import CAPTION_SOURCES, CaptionSampler, flip_caption
from tipstorch.data.transforms import pil_to_tensor, random_patch_mask, resized_crop, sample_crop_box

Tokenize = Callable[[list[str]], torch.Tensor]


class ImageTextSample(Protocol):
    image: Any  # PIL.Image.Image
    captions: dict[str, str]


@dataclass
class MultiCropConfig:
    """Augmentation and caption settings of a TIPS training batch.

    global_size / local_size / num_local_crops: "1 global crop at resolution 224 and M = 6 local
        crops at resolution 98" (paper Sec. 4.1); the HR fine-tuning uses 448 / 140 (``high_res``).
    global_scale / local_scale: area fractions of the random resized crops. The paper gives none;
        these are DINOv2's defaults (global_crops_scale 0.32-1.0, local_crops_scale 0.05-0.32),
        the self-supervised recipe TIPS builds on.
    ratio: aspect range of the random resized crops (Inception crop default).
    mask_ratio: "random masking with 75% ratio" (paper App. A.1, Tab. 11), on the global crop.
    flip: horizontal flip (p = flip_prob) of the global crop, "the global crop is a larger random
        crop with horizontal flips" (Sec. 3.2); captions of a flipped sample go through
        ``flip_caption`` so that left/right stay true.
    local_flip: "the local crop is just a random crop of the original image" (Sec. 3.2): off.
    patch_size: side of the model's patches, for the length of the patch mask.
    caption_weights: source -> weight of the per-sample draw for the synthetic caption (CLS2). TIPS:
        {"spatial": 1.0}, the PaliGemma caption (Sec. 3.1). TIPSv2 alternates PaliGemma- and
        Gemini-like captions (our ``spatial`` / ``detailed``); its project page gives no ratio, so its
        recipes weigh them equally.
    alt_source: the caption aligned with CLS1 (noisy alt-text); samples without it use ``caption``.

    The training config's ``data`` section (``train.config.DataCfg``) extends this class: one
    definition of every crop field and its default.
    """

    global_size: int = 224
    local_size: int = 98
    num_local_crops: int = 6
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    mask_ratio: float = 0.75
    patch_size: int = 14
    flip: bool = True
    local_flip: bool = False
    flip_prob: float = 0.5
    caption_weights: dict[str, float] = field(default_factory=lambda: {"spatial": 1.0})
    alt_source: str = "alt"

    def __post_init__(self) -> None:
        for name in ("global_size", "local_size"):
            size = getattr(self, name)
            if size <= 0 or size % self.patch_size:
                raise ValueError(
                    f"{type(self).__name__}.{name} must be a positive multiple of {self.patch_size}, got {size}"
                )
        for name in ("global_scale", "local_scale"):
            low, high = getattr(self, name)
            if not 0.0 < low <= high <= 1.0:
                raise ValueError(
                    f"{type(self).__name__}.{name} must satisfy 0 < low <= high <= 1, got {(low, high)}"
                )
        if self.num_local_crops < 0:
            raise ValueError(f"{type(self).__name__}.num_local_crops must be >= 0, got {self.num_local_crops}")
        if self.alt_source not in CAPTION_SOURCES:
            raise ValueError(
                f"{type(self).__name__}.alt_source must be one of {CAPTION_SOURCES}, got {self.alt_source!r}"
            )

    @classmethod
    def high_res(cls, **overrides: Any) -> MultiCropConfig:
        """The HR fine-tuning stage: "global crops at resolution 448 and local crops at resolution 140" (Sec. 4.1)."""
        return cls(**{"global_size": 448, "local_size": 140, **overrides})

    @property
    def num_patches(self) -> int:
        """N = (global_size / patch_size) ** 2, the length of a patch mask."""
        return (self.global_size // self.patch_size) ** 2


class MultiCropCollate:
    """collate_fn: list of samples (anything with .image PIL and .captions dict) -> batch dict.

    Batch (B samples, M local crops, N = (global_size / 14) ** 2, L = context_length):
      global_crop       float [B, 3, G, G] in [0, 1]
      local_crops       float [B, M, 3, S, S] in [0, 1]
      patch_mask        bool [B, N], True = masked
      alt_tokens        long [B, L]   (CLS1 caption)
      synthetic_tokens  long [B, L]   (CLS2 caption)
      synthetic_source  list[str]     caption source drawn per sample
      alt_text, synthetic_text  list[str]  the captions as tokenised (after flip_caption)
      flipped           bool [B]      whether the global crop was mirrored
    tokenize: texts -> LongTensor [B, L] (e.g. tipstorch.models.tokenizer.Tokenizer), L = context_length:
    "Our text encoder handles a maximum of 64 tokens" (App. A.4.3).
    """

    def __init__(
        self,
        config: MultiCropConfig,
        tokenize: Tokenize,
        generator: torch.Generator | None = None,
        context_length: int = 64,
    ) -> None:
        self.config = config
        self.tokenize = tokenize
        self.generator = generator
        self.context_length = context_length
        others = tuple(s for s in CAPTION_SOURCES if s != config.alt_source)
        self.alt_sampler = CaptionSampler({config.alt_source: 1.0}, fallback=("caption", *others))
        # any caption the sample has is a fallback, so every sample a reader yields (it has at least one
        # non-empty caption) can be collated
        self.synthetic_sampler = CaptionSampler(
            config.caption_weights, fallback=("caption", config.alt_source, *others)
        )

    def _crop(
        self, image, size: int, scale: tuple[float, float], flip: bool, generator: torch.Generator | None
    ) -> torch.Tensor:
        box = sample_crop_box(image.height, image.width, scale, self.config.ratio, generator)
        return pil_to_tensor(resized_crop(image, box, size, flip))

    def _coin(self, enabled: bool, generator: torch.Generator | None) -> bool:
        return enabled and float(torch.rand((), generator=generator)) < self.config.flip_prob

    def __call__(
        self, samples: Sequence[ImageTextSample], generators: Sequence[torch.Generator] | None = None
    ) -> dict[str, Any]:
        """samples -> the batch; ``generators`` (one per sample) replace ``self.generator`` for the draws of
        each sample (crops, flips, captions, then its patch-mask row)."""
        if not samples:
            raise ValueError("MultiCropCollate got an empty list of samples")
        if generators is not None and len(generators) != len(samples):
            raise ValueError(f"MultiCropCollate got {len(generators)} generators for {len(samples)} samples")
        cfg = self.config
        global_crops, local_crops, flipped = [], [], []
        alt_texts, synthetic_texts, synthetic_sources = [], [], []
        for index, sample in enumerate(samples):
            generator = generators[index] if generators is not None else self.generator
            image = sample.image.convert("RGB")
            flip = self._coin(cfg.flip, generator)
            flipped.append(flip)
            global_crops.append(self._crop(image, cfg.global_size, cfg.global_scale, flip, generator))
            local_crops.append(
                torch.stack(
                    [
                        self._crop(image, cfg.local_size, cfg.local_scale, self._coin(cfg.local_flip, generator),
                                   generator)
                        for _ in range(cfg.num_local_crops)
                    ]
                )
                if cfg.num_local_crops
                else torch.empty(0, 3, cfg.local_size, cfg.local_size)
            )
            _, alt = self.alt_sampler(sample.captions, generator)
            source, synthetic = self.synthetic_sampler(sample.captions, generator)
            if flip:
                alt, synthetic = flip_caption(alt), flip_caption(synthetic)
            alt_texts.append(alt)
            synthetic_texts.append(synthetic)
            synthetic_sources.append(source)

        return {
            "global_crop": torch.stack(global_crops),
            "local_crops": torch.stack(local_crops),
            "patch_mask": self._patch_mask(len(samples), generators),
            "alt_tokens": self._tokens(alt_texts),
            "synthetic_tokens": self._tokens(synthetic_texts),
            "synthetic_source": synthetic_sources,
            "alt_text": alt_texts,
            "synthetic_text": synthetic_texts,
            "flipped": torch.tensor(flipped, dtype=torch.bool),
        }

    def _patch_mask(self, rows: int, generators: Sequence[torch.Generator] | None) -> torch.Tensor:
        """bool [rows, N]: one draw of the whole batch from ``self.generator``, or row i from generator i."""
        cfg = self.config
        if generators is None:
            return random_patch_mask(rows, cfg.num_patches, cfg.mask_ratio, self.generator)
        return torch.cat([random_patch_mask(1, cfg.num_patches, cfg.mask_ratio, generator) for generator in generators])

    def _tokens(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenize(texts)
        expected = (len(texts), self.context_length)
        if not isinstance(tokens, torch.Tensor) or tuple(tokens.shape) != expected:
            got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokenize must return a LongTensor {list(expected)}, got {got}")
        return tokens.long()
