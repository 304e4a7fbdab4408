"""Running a frozen encoder over an evaluation set: batching, progress, corrupt-sample accounting.

Everything here is model-agnostic: an image encoder is any callable
``encode(images [B, 3, H, W] in [0, 1]) -> Tensor [B, ...]`` (or a tuple of such tensors) and
a text encoder is ``encode_text(token_ids [B, L]) -> [B, D]`` with ``tokenizer(list[str]) -> [B, L]``.
Inputs are handed over on the CPU; the callables move them to their device (and may autocast).
Outputs are brought back to the CPU in float32.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from tipstorch.data.sample import CorruptSampleError

logger = logging.getLogger(__name__)

ImageEncoder = Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]]
TextEncoder = Callable[[torch.Tensor], torch.Tensor]
Tokenizer = Callable[[list[str]], torch.Tensor]


@dataclass
class SkippedSamples:
    """Samples that could not be decoded: counted, logged and reported with the metrics."""

    paths: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.paths)

    def add(self, error: CorruptSampleError) -> None:
        logger.warning("skipping %s", error)
        self.paths.append(error.where)


def iterate_samples(
    dataset: Dataset, skipped: SkippedSamples, progress: bool = False, desc: str = ""
) -> Iterator[tuple[int, Any]]:
    """Yield (index, sample) for every decodable sample; corrupt ones go to ``skipped``."""
    for index in tqdm(range(len(dataset)), desc=desc, disable=not progress, unit="img"):
        try:
            sample = dataset[index]
        except CorruptSampleError as error:
            skipped.add(error)
            continue
        yield index, sample


@dataclass
class ExtractedFeatures:
    """Encoder outputs for the decodable samples of a dataset, in dataset order.

    ``features``: tensor [N, ...] (or tuple of tensors) on CPU; ``targets[i]`` and
    ``indices[i]`` (position in the dataset) belong to row i.
    """

    features: torch.Tensor | tuple[torch.Tensor, ...]
    targets: list[Any]
    indices: list[int]
    skipped: SkippedSamples


def _concat(chunks: list[torch.Tensor | tuple[torch.Tensor, ...]]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    if isinstance(chunks[0], torch.Tensor):
        return torch.cat(chunks)
    return tuple(torch.cat(parts) for parts in zip(*chunks, strict=True))


def _to_cpu(output: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    if isinstance(output, torch.Tensor):
        return output.detach().float().cpu()
    return tuple(t.detach().float().cpu() for t in output)


@torch.no_grad()
def extract_features(
    dataset: Dataset,
    transform: Callable[[Image.Image], torch.Tensor],
    encode: ImageEncoder,
    batch_size: int = 32,
    progress: bool = False,
    desc: str = "features",
) -> ExtractedFeatures:
    """Run ``encode`` over ``dataset`` (samples (PIL image, target)) in batches.

    ``transform`` maps a PIL image to [3, H, W] in [0, 1] with the same H, W for every sample.
    """
    skipped = SkippedSamples()
    chunks, targets, indices, images = [], [], [], []

    def flush() -> None:
        chunks.append(_to_cpu(encode(torch.stack(images))))
        images.clear()

    for index, (image, target) in iterate_samples(dataset, skipped, progress, desc):
        images.append(transform(image))
        targets.append(target)
        indices.append(index)
        if len(images) == batch_size:
            flush()
    if images:
        flush()
    if not chunks:
        raise ValueError(f"no decodable samples in the dataset ({skipped.count} corrupt)")
    return ExtractedFeatures(_concat(chunks), targets, indices, skipped)


@torch.no_grad()
def embed_texts(encode_text: TextEncoder, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Text embeddings [T, D] (not normalised), computed in batches, on CPU in float32."""
    if not texts:
        raise ValueError("no texts to embed")
    chunks = [
        encode_text(tokenizer(list(texts[start : start + batch_size]))).float().cpu()
        for start in range(0, len(texts), batch_size)
    ]
    return torch.cat(chunks)


def patch_features_encoder(encode_image: Callable[[torch.Tensor], Any]) -> ImageEncoder:
    """Encoder for the linear dense probes: images -> (patch_tokens [B, h, w, D], spatial_cls [B, D]).

    ``encode_image`` returns ImageFeatures (e.g. ``model.encode_image``); the result feeds
    ``tipstorch.eval.probes.PatchFeatures(*extracted.features)``.
    """

    def encode(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = encode_image(images)
        return features.patch_tokens, features.spatial_cls

    return encode


def intermediates_encoder(vit: Any, indices: Sequence[int]) -> ImageEncoder:
    """Encoder for the DPT probes: images -> (patch_maps [B, L, D, h, w], prefixes [B, L, 2, D]).

    Uses ``vit.forward_intermediates(images, indices, norm=True, output_fmt="NCHW",
    return_prefix_tokens=True, intermediates_only=True)``; the result feeds
    ``tipstorch.eval.probes.IntermediateFeatures(*extracted.features)``.
    """

    def encode(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layers = vit.forward_intermediates(
            images,
            indices=list(indices),
            norm=True,
            output_fmt="NCHW",
            return_prefix_tokens=True,
            intermediates_only=True,
        )
        return torch.stack([m for m, _ in layers], dim=1), torch.stack([p for _, p in layers], dim=1)

    return encode
