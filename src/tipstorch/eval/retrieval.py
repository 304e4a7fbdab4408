"""Image-text retrieval recall@k (COCO / Flickr30k / DOCCI protocol).

The paper (A.4.3) represents images by the spatial CLS (CLS2, trained on synthetic captions) and
texts by the text tower (64 tokens, longer texts truncated). Image->text: an image is a hit at k
when any of its captions is among the k most similar texts. Text->image: a caption is a hit when
its own image is among the k most similar images. Embeddings are L2-normalised here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from tipstorch.eval.features import ImageEncoder, TextEncoder, Tokenizer, embed_texts, extract_features
from tipstorch.eval.metrics import TiedRanks, image_to_text_ranks, recall_at_k, text_to_image_ranks


def flatten_captions(captions: Sequence[Sequence[str]]) -> tuple[list[str], torch.Tensor]:
    """Per-image caption lists -> (all texts [T], text_to_image long [T])."""
    texts = [text for group in captions for text in group]
    owners = [image for image, group in enumerate(captions) for _ in group]
    return texts, torch.tensor(owners, dtype=torch.long)


def retrieval_recall(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@k both ways; image_embeddings [I, D], text_embeddings [T, D], text_to_image long [T].

    Keys ``image_to_text_r{k}`` and ``text_to_image_r{k}`` (fractions). Similarities are computed
    in chunks of ``chunk_size`` rows, so memory stays O(chunk_size * max(I, T)).
    """
    if text_embeddings.shape[0] != text_to_image.shape[0]:
        raise ValueError(
            f"{text_embeddings.shape[0]} text embeddings but {text_to_image.shape[0]} text_to_image entries"
        )
    images = F.normalize(image_embeddings.float(), dim=-1)
    texts = F.normalize(text_embeddings.float(), dim=-1)
    image_ranks, text_ranks = [], []
    for start in range(0, len(images), chunk_size):
        rows = torch.arange(start, min(start + chunk_size, len(images)))
        image_ranks.append(image_to_text_ranks(images[rows] @ texts.T, text_to_image, rows))
    for start in range(0, len(texts), chunk_size):
        columns = torch.arange(start, min(start + chunk_size, len(texts)))
        text_ranks.append(text_to_image_ranks(images @ texts[columns].T, text_to_image[columns]))
    image_ranks, text_ranks = TiedRanks.cat(image_ranks), TiedRanks.cat(text_ranks)
    result = {f"image_to_text_r{k}": v for k, v in recall_at_k(image_ranks, ks).items()}
    result.update({f"text_to_image_r{k}": v for k, v in recall_at_k(text_ranks, ks).items()})
    return result


def evaluate_retrieval(
    dataset: Dataset,
    transform: Callable[[Image.Image], torch.Tensor],
    encode_image: ImageEncoder,
    encode_text: TextEncoder,
    tokenizer: Tokenizer,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 32,
    progress: bool = False,
) -> dict[str, float]:
    """Recall@k over a dataset of (PIL image, list of captions).

    ``encode_image`` returns the image embedding [B, D] (the paper: spatial CLS). Captions of
    images that cannot be decoded are left out with their image (``num_skipped``).
    """
    extracted = extract_features(
        dataset, transform, encode_image, batch_size, progress, desc="retrieval images"
    )
    texts, text_to_image = flatten_captions(extracted.targets)
    text_embeddings = embed_texts(encode_text, tokenizer, texts)
    result = retrieval_recall(extracted.features, text_embeddings, text_to_image, ks)
    result.update(
        num_images=len(extracted.indices), num_texts=len(texts), num_skipped=extracted.skipped.count
    )
    return result
