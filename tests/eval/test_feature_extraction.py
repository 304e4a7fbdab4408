"""Feature extraction helpers: batching, corrupt samples, text batches, dense encoder adapters."""

from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from tipstorch.data.sample import CorruptSampleError
from tipstorch.data.transforms import pil_to_tensor
from tipstorch.eval.features import (
    embed_texts,
    extract_features,
    intermediates_encoder,
    patch_features_encoder,
)
from tipstorch.eval.probes import IntermediateFeatures, PatchFeatures


class GreyImages(Dataset):
    """Image i is flat grey level 10 * i with target i; the listed indices are corrupt."""

    def __init__(self, n, corrupt=()):
        self.n, self.corrupt = n, set(corrupt)

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        if index in self.corrupt:
            raise CorruptSampleError(f"img_{index}.jpg", "cannot identify image file")
        return Image.new("RGB", (14, 14), (10 * index,) * 3), index


def test_extract_features_batches_and_keeps_dataset_order():
    batch_sizes = []

    def encode(images):
        batch_sizes.append(len(images))
        return images.mean(dim=(1, 2, 3), keepdim=False)[:, None]

    extracted = extract_features(GreyImages(5), pil_to_tensor, encode, batch_size=2)
    assert batch_sizes == [2, 2, 1]
    assert extracted.targets == [0, 1, 2, 3, 4] and extracted.indices == [0, 1, 2, 3, 4]
    assert torch.allclose(extracted.features[:, 0], torch.tensor([10.0 * i / 255 for i in range(5)]))


def test_extract_features_skips_and_counts_corrupt_samples():
    extracted = extract_features(GreyImages(4, corrupt=(1, 3)), pil_to_tensor, lambda x: x.flatten(1)[:, :2])
    assert extracted.indices == [0, 2] and extracted.skipped.count == 2
    assert extracted.skipped.paths == ["img_1.jpg", "img_3.jpg"]


def test_extract_features_concatenates_tuple_outputs():
    extracted = extract_features(GreyImages(3), pil_to_tensor, lambda x: (x[:, :1], x.mean((1, 2, 3))), batch_size=2)
    first, second = extracted.features
    assert first.shape == (3, 1, 14, 14) and second.shape == (3,)


def test_extract_features_with_only_corrupt_samples_is_an_error():
    with pytest.raises(ValueError, match="no decodable samples"):
        extract_features(GreyImages(2, corrupt=(0, 1)), pil_to_tensor, lambda x: x)


def test_embed_texts_batches_in_order():
    calls = []

    def encode(ids):
        calls.append(len(ids))
        return ids.float()

    embeddings = embed_texts(encode, lambda texts: torch.tensor([[len(t)] for t in texts]), ["a", "bb", "ccc"], 2)
    assert calls == [2, 1] and embeddings[:, 0].tolist() == [1.0, 2.0, 3.0]


def test_patch_features_encoder_returns_tokens_and_spatial_cls():
    def encode_image(images):
        b = len(images)
        return SimpleNamespace(patch_tokens=torch.ones(b, 2, 3, 4), spatial_cls=torch.zeros(b, 4), global_cls=None)

    extracted = extract_features(GreyImages(3), pil_to_tensor, patch_features_encoder(encode_image), batch_size=2)
    features = PatchFeatures(*extracted.features)
    assert features.patch_tokens.shape == (3, 2, 3, 4) and features.spatial_cls.shape == (3, 4)


def test_intermediates_encoder_calls_forward_intermediates_with_the_contract_arguments():
    seen = {}

    class FakeViT:
        def forward_intermediates(self, images, **kwargs):
            seen.update(kwargs)
            b = len(images)
            return [(torch.full((b, 4, 1, 1), float(i)), torch.full((b, 2, 4), float(i))) for i in kwargs["indices"]]

    encode = intermediates_encoder(FakeViT(), indices=(0, 2, 5, 7))
    features = IntermediateFeatures(*extract_features(GreyImages(2), pil_to_tensor, encode).features)
    assert seen == {
        "indices": [0, 2, 5, 7],
        "norm": True,
        "output_fmt": "NCHW",
        "return_prefix_tokens": True,
        "intermediates_only": True,
    }
    assert features.patch_maps.shape == (2, 4, 4, 1, 1) and features.prefixes[0, :, 0, 0].tolist() == [0, 2, 5, 7]
