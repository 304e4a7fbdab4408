"""TIPSModel: the image and text towers and the contrastive temperature."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tipstorch.models.text import TextConfig, TextTransformer
from tipstorch.models.tokenizer import OFFICIAL_TOKENIZER
from tipstorch.models.vit import ImageFeatures, VisionConfig, VisionTransformer


@dataclass
class TIPSConfig:
    """Everything needed to build a TIPSModel. ``image_size`` is the resolution the model was trained
    at (its default input size), ``temperature`` the initial value of the similarity temperature,
    ``tokenizer`` "official", "scenes" or the path/URL of a SentencePiece model."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_size: int = 448
    temperature: float = 0.01
    tokenizer: str = OFFICIAL_TOKENIZER

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)
        if self.vision.embed_dim != self.text.width:
            raise ValueError(
                f"vision embed_dim {self.vision.embed_dim} and text width {self.text.width} must be equal"
            )

    def to_dict(self) -> dict:
        return asdict(self)


class TIPSModel(nn.Module):
    """Image-text encoder: ``encode_image`` gives global/spatial CLS and patch tokens, ``encode_text``
    pooled text embeddings in the same space; similarities are ``cos / temperature``."""

    float32_parameters = ("temperature",)  # a scalar of ~0.01 that losses divide by: kept float32 in bf16 training

    def __init__(self, config: TIPSConfig) -> None:
        super().__init__()
        self.config = config
        self.visual = VisionTransformer(config.vision)
        self.text = TextTransformer(config.text)
        self.temperature = nn.Parameter(torch.tensor(float(config.temperature)))

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def encode_image(
        self, images: torch.Tensor, normalize: bool = False, patch_mask: torch.Tensor | None = None
    ) -> ImageFeatures:
        """images [B, 3, H, W] in [0, 1] -> ImageFeatures (global_cls, spatial_cls [B, D],
        patch_tokens [B, h, w, D]); each vector L2-normalised when ``normalize``."""
        features = self.visual.forward_features(images, patch_mask)
        return features.normalized() if normalize else features

    def encode_text(self, token_ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """token ids [B, L] -> text embeddings [B, D]."""
        embeddings = self.text(token_ids)
        return F.normalize(embeddings, dim=-1) if normalize else embeddings

    def logits(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Scaled cosine similarities [B_image, B_text] = cos / temperature."""
        cosine = F.normalize(image_embeddings, dim=-1) @ F.normalize(text_embeddings, dim=-1).T
        return cosine / self.temperature

    def forward(
        self, images: torch.Tensor, token_ids: torch.Tensor
    ) -> tuple[ImageFeatures, torch.Tensor, torch.Tensor]:
        """Normalised image features, normalised text embeddings [B_t, D] and the global-CLS logits
        [B_image, B_text], as open_clip's forward returns features and the logit scale."""
        image_features = self.encode_image(images, normalize=True)
        text_embeddings = self.encode_text(token_ids, normalize=True)
        return image_features, text_embeddings, self.logits(image_features.global_cls, text_embeddings)
