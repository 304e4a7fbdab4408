"""The training batch built by MultiCropCollate."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from tipstorch.data.captions import flip_caption
from tipstorch.data.collate import MultiCropCollate, MultiCropConfig
from tipstorch.data.scenes import ScenesConfig, ScenesDataset


@dataclass
class Pair:
    image: Image.Image
    captions: dict[str, str]


def _scenes(count: int, size: int = 64):
    dataset = ScenesDataset(ScenesConfig(image_size=size, seed=0))
    return [dataset.sample(i) for i in range(count)]


def test_batch_has_the_contract_shapes_and_types(tokenize):
    collate = MultiCropCollate(MultiCropConfig(), tokenize, torch.Generator().manual_seed(0))
    batch = collate(_scenes(3))
    assert batch["global_crop"].shape == (3, 3, 224, 224) and batch["global_crop"].dtype == torch.float32
    assert batch["local_crops"].shape == (3, 6, 3, 98, 98)
    assert 0.0 <= batch["global_crop"].min() and batch["global_crop"].max() <= 1.0
    assert batch["patch_mask"].shape == (3, 256) and batch["patch_mask"].dtype == torch.bool
    assert (batch["patch_mask"].sum(1) == 192).all()
    for key in ("alt_tokens", "synthetic_tokens"):
        assert batch[key].shape == (3, 64) and batch[key].dtype == torch.long
    assert len(batch["synthetic_source"]) == 3


def test_high_res_config_gives_448_global_and_140_local_crops(tokenize):
    config = MultiCropConfig.high_res(num_local_crops=2)
    batch = MultiCropCollate(config, tokenize, torch.Generator().manual_seed(0))(_scenes(1))
    assert batch["global_crop"].shape == (1, 3, 448, 448)
    assert batch["local_crops"].shape == (1, 2, 3, 140, 140)
    assert batch["patch_mask"].shape == (1, 1024)


def test_no_local_crops_gives_an_empty_crop_axis(tokenize):
    batch = MultiCropCollate(MultiCropConfig(num_local_crops=0), tokenize)(_scenes(2))
    assert batch["local_crops"].shape == (2, 0, 3, 98, 98)


def test_tokens_encode_the_drawn_captions(tokenize):
    batch = MultiCropCollate(MultiCropConfig(), tokenize, torch.Generator().manual_seed(0))(_scenes(4))
    assert torch.equal(batch["alt_tokens"], tokenize(batch["alt_text"]))
    assert torch.equal(batch["synthetic_tokens"], tokenize(batch["synthetic_text"]))


def test_synthetic_sources_follow_the_weights_and_alt_uses_alt(tokenize):
    config = MultiCropConfig(
        num_local_crops=0, global_size=28, caption_weights={"object": 1.0, "detailed": 3.0}
    )
    collate = MultiCropCollate(config, tokenize, torch.Generator().manual_seed(0))
    samples = _scenes(4, size=32) * 50
    batch = collate(samples)
    counts = Counter(batch["synthetic_source"])
    assert set(counts) == {"object", "detailed"} and 0.65 < counts["detailed"] / len(samples) < 0.85
    for sample, alt, flipped in zip(samples, batch["alt_text"], batch["flipped"], strict=True):
        assert alt == (flip_caption(sample.captions["alt"]) if flipped else sample.captions["alt"])


def test_flipped_samples_get_mirrored_images_and_captions(tokenize):
    image = Image.fromarray(np.tile(np.arange(28, dtype=np.uint8)[None, :, None] * 9, (28, 1, 3)))
    sample = Pair(image, {"alt": "left thing", "spatial": "a star to the left of a ring"})
    config = MultiCropConfig(global_size=28, global_scale=(1.0, 1.0), ratio=(1.0, 1.0), num_local_crops=0)
    batch = MultiCropCollate(config, tokenize, torch.Generator().manual_seed(0))([sample] * 16)
    flipped = batch["flipped"]
    assert 0 < int(flipped.sum()) < 16
    gradient = batch["global_crop"][:, 0, 0, -1] - batch["global_crop"][:, 0, 0, 0]
    assert ((gradient < 0) == flipped).all()
    for is_flipped, alt, synthetic in zip(flipped, batch["alt_text"], batch["synthetic_text"], strict=True):
        assert synthetic == (
            "a star to the right of a ring" if is_flipped else "a star to the left of a ring"
        )
        assert alt == ("right thing" if is_flipped else "left thing")


def test_flip_disabled_never_mirrors(tokenize):
    config = MultiCropConfig(global_size=28, num_local_crops=1, local_size=14, flip=False)
    batch = MultiCropCollate(config, tokenize, torch.Generator().manual_seed(0))(_scenes(8, size=32))
    assert not batch["flipped"].any()


def test_same_generator_seed_gives_the_same_batch(tokenize):
    config = MultiCropConfig(global_size=28, local_size=14, num_local_crops=2)
    a = MultiCropCollate(config, tokenize, torch.Generator().manual_seed(3))(_scenes(2, size=32))
    b = MultiCropCollate(config, tokenize, torch.Generator().manual_seed(3))(_scenes(2, size=32))
    assert torch.equal(a["global_crop"], b["global_crop"]) and torch.equal(a["local_crops"], b["local_crops"])
    assert torch.equal(a["patch_mask"], b["patch_mask"]) and a["synthetic_source"] == b["synthetic_source"]


def test_web_samples_without_synthetic_captions_fall_back_to_their_caption(tokenize):
    sample = Pair(Image.new("RGB", (40, 30)), {"caption": "a dog on a sofa"})
    batch = MultiCropCollate(MultiCropConfig(global_size=28, num_local_crops=0, flip=False), tokenize)(
        [sample]
    )
    assert batch["alt_text"] == ["a dog on a sofa"] and batch["synthetic_source"] == ["caption"]


def test_wrong_tokenizer_output_is_reported_with_the_expected_shape():
    collate = MultiCropCollate(
        MultiCropConfig(global_size=28, num_local_crops=0), lambda texts: torch.zeros(1, 77)
    )
    with pytest.raises(ValueError, match=r"LongTensor \[2, 64\], got \(1, 77\)"):
        collate(_scenes(2, size=32))


def test_config_rejects_sizes_that_are_not_patch_multiples():
    with pytest.raises(ValueError, match="local_size"):
        MultiCropConfig(local_size=100)
    with pytest.raises(ValueError, match="global_scale"):
        MultiCropConfig(global_scale=(0.0, 1.0))


def test_a_sample_with_only_a_caption_the_weights_do_not_name_is_collated(tokenize):
    config = MultiCropConfig(num_local_crops=0, caption_weights={"spatial": 1.0})
    batch = MultiCropCollate(config, tokenize, torch.Generator().manual_seed(0))(
        [Pair(Image.new("RGB", (64, 64)), {"object": "a red circle"})]
    )
    assert batch["alt_text"] == ["a red circle"] and batch["synthetic_text"] == ["a red circle"]
    assert batch["synthetic_source"] == ["object"]
