"""Embedding image units: batched, cached per unit, resumed after a kill, stale caches recomputed."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import tipstorch
from tests.engine.fakes import MeanColourEmbedder, colour_png, colour_record
from tipstorch.data.records import write_record_shards
from tipstorch.engine.embedding_cache import TIPSImageEmbedder, embed_units, stack_units
from tipstorch.engine.image_sources import image_units


@pytest.fixture
def shards(tmp_path):
    records = [colour_record(f"k{i:02d}", ["red", "green"][i % 2], i) for i in range(12)]
    records.insert(5, {"__key__": "broken", "png": b"not an image", "json": b"{}"})
    write_record_shards(records, tmp_path / "pool", shard_size=4)
    return tmp_path / "pool"


def test_embeddings_keys_and_skipped_samples(shards, tmp_path):
    table = stack_units(embed_units(image_units(shards), MeanColourEmbedder(), tmp_path / "cache", 3, False))
    assert table.keys == [f"k{i:02d}" for i in range(12)]
    assert table.embeddings.shape == (12, 3)
    assert np.allclose(np.linalg.norm(table.embeddings, axis=1), 1.0, atol=1e-6)
    assert table.embeddings[0].argmax() == 0 and table.embeddings[1].argmax() == 1  # red, green
    assert [key for key, _ in table.skipped] == ["broken"]


def test_a_killed_run_resumes_at_the_first_unfinished_unit(shards, tmp_path):
    units = image_units(shards)
    assert len(units) == 4
    with pytest.raises(KeyboardInterrupt):  # killed inside the third unit (8 images done, batch of 2)
        embed_units(units, MeanColourEmbedder(fail_after=9), tmp_path / "cache", 2, False)
    resumed = MeanColourEmbedder()
    table = stack_units(embed_units(units, resumed, tmp_path / "cache", 2, False))
    fresh = stack_units(embed_units(units, MeanColourEmbedder(), tmp_path / "fresh", 2, False))
    assert resumed.embedded == 12 - 7  # units 0 and 1 (7 decodable images) came from the cache
    assert table.keys == fresh.keys and np.array_equal(table.embeddings, fresh.embeddings)


def test_a_changed_folder_chunk_is_recomputed(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(colour_png("red", i))
    embed_units(image_units(folder, chunk_size=2), MeanColourEmbedder(), tmp_path / "cache", 8, False)
    (folder / "2.png").write_bytes(colour_png("green", 7, size=20))
    again = MeanColourEmbedder()
    table = stack_units(embed_units(image_units(folder, chunk_size=2), again, tmp_path / "cache", 8, False))
    assert again.embedded == 1 and table.keys == ["0", "1", "2"]
    assert table.embeddings[2].argmax() == 1


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return tipstorch.create_model("tips-tiny")


def test_tips_embedder_gives_unit_global_cls_under_bf16_and_fp32(tiny_model):
    images = _pil_images()
    fp32 = TIPSImageEmbedder(tiny_model, image_size=56, precision="fp32")(images)
    bf16 = TIPSImageEmbedder(tiny_model, image_size=56, precision="bf16")(images)
    assert fp32.shape == (2, tiny_model.config.vision.embed_dim) and fp32.dtype == np.float32
    assert np.allclose(np.linalg.norm(fp32, axis=1), 1.0, atol=1e-5)
    assert np.abs(fp32 - bf16).max() < 0.05  # bf16 keeps ~3 significant digits of unit vectors
    batch = torch.stack([tipstorch.image_transform(56)(image) for image in images])
    with torch.no_grad():
        expected = tiny_model.encode_image(batch, normalize=True).global_cls.numpy()
    assert np.allclose(fp32, expected, atol=1e-5)


def test_fingerprint_separates_weights_and_settings(tiny_model):
    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)  # a fine-tune: every value of a tensor moves
    names = {
        TIPSImageEmbedder(tiny_model, 56).fingerprint,
        TIPSImageEmbedder(other, 56).fingerprint,
        TIPSImageEmbedder(tiny_model, 112).fingerprint,
        TIPSImageEmbedder(tiny_model, 56, embedding="spatial_cls").fingerprint,
    }
    assert len(names) == 4
    assert (
        TIPSImageEmbedder(tiny_model, 56).fingerprint
        == TIPSImageEmbedder(copy.deepcopy(tiny_model), 56).fingerprint
    )


def _pil_images():
    import io

    from PIL import Image

    return [Image.open(io.BytesIO(colour_png(c, 0, size=30))).convert("RGB") for c in ("red", "blue")]
