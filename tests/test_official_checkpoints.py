"""Official PyTorch npz files: loading, numerics against the official forward, round trip, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tipstorch
from tests.helpers import assert_close_to_scale
from tests.official_reference import (
    official_image_forward,
    official_text_arrays,
    official_text_forward,
    official_vision_arrays,
)
from tipstorch.weights.official import save_official
from tipstorch.weights.state_io import CheckpointError

CASES = {
    # name: (width, heads, vision depth, mlp hidden, swiglu)
    "s14-like": (384, 6, 2, 1536, False),
    "g14-like": (1536, 24, 1, 4096, True),
}


def write_official_pair(directory, width, depth, mlp, swiglu, grid=4, temperature=0.0123):
    vision = directory / "tips_test_vision.npz"
    text = directory / "tips_test_text.npz"
    np.savez(vision, **official_vision_arrays(width, depth, mlp, grid, swiglu))
    np.savez(text, **official_text_arrays(width, 2, 2 * width, vocab=300, temperature=temperature))
    return vision, text


def as_tensors(path):
    with np.load(path, allow_pickle=False) as archive:
        return {key: torch.from_numpy(archive[key]) for key in archive.files}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("size", [(56, 56), (70, 42)])
def test_image_features_equal_the_official_forward(tmp_path, case, size):
    width, heads, depth, mlp, swiglu = CASES[case]
    vision_path, _ = write_official_pair(tmp_path, width, depth, mlp, swiglu)
    model = tipstorch.load_model(vision_path)
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.encode_image(images)
        cls1, cls2, patches = official_image_forward(as_tensors(vision_path), images, heads)
    grid = (size[0] // 14, size[1] // 14)
    assert ours.patch_tokens.shape == (2, *grid, width)
    assert_close_to_scale(ours.global_cls, cls1)
    assert_close_to_scale(ours.spatial_cls, cls2)
    assert_close_to_scale(ours.flat, patches)


def test_text_embeddings_equal_the_official_forward(tmp_path):
    vision_path, text_path = write_official_pair(tmp_path, 384, 1, 1536, False)
    model = tipstorch.load_model(vision_path)
    ids = torch.tensor([[5, 9, 33, 0, 0, 0], [7, 1, 2, 3, 4, 250], [11, 0, 0, 0, 0, 0], [0] * 6])
    with torch.no_grad():
        ours = model.encode_text(ids)
        reference = official_text_forward(as_tensors(text_path), ids, num_heads=6)
    # the empty text (last row): the official masked mean over no tokens is zeros, and so is ours
    assert torch.equal(reference[3], torch.zeros_like(reference[3])) and torch.equal(ours[3], reference[3])
    assert_close_to_scale(ours, reference)


def test_temperature_and_inferred_config_come_from_the_files(tmp_path):
    vision_path, _ = write_official_pair(tmp_path, 384, 2, 1536, False, grid=4, temperature=0.0123)
    model = tipstorch.load_model(vision_path)
    assert model.temperature.item() == pytest.approx(0.0123)
    assert model.config.vision.depth == 2 and model.config.vision.num_heads == 6
    assert model.config.vision.pos_grid == 4 and model.config.image_size == 56
    assert model.config.text.vocab_size == 300


def test_official_round_trip_keeps_every_tensor(tmp_path):
    vision_path, _ = write_official_pair(tmp_path, 384, 1, 1536, False)
    model = tipstorch.load_model(vision_path)
    out = tmp_path / "out"
    save_official(model, out / "copy_vision.npz", out / "copy_text.npz")
    original, copy = as_tensors(vision_path), as_tensors(out / "copy_vision.npz")
    assert original.keys() == copy.keys()
    for key in original:
        torch.testing.assert_close(original[key], copy[key], rtol=0, atol=0)
    reloaded = tipstorch.load_model(out / "copy_vision.npz")
    assert reloaded.temperature.item() == pytest.approx(model.temperature.item())


def test_wrong_shape_names_the_key_and_both_shapes(tmp_path):
    vision_path, _ = write_official_pair(tmp_path, 384, 1, 1536, False)
    arrays = dict(np.load(vision_path, allow_pickle=False))
    arrays["blocks.0.attn.proj.weight"] = np.zeros((384, 380), dtype=np.float32)
    np.savez(vision_path, **arrays)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.proj\.weight: expected shape \[384, 384\], found \[384, 380\]"):
        tipstorch.load_model(vision_path)


def test_missing_key_is_named(tmp_path):
    vision_path, _ = write_official_pair(tmp_path, 384, 1, 1536, False)
    arrays = dict(np.load(vision_path, allow_pickle=False))
    del arrays["blocks.0.ls2.gamma"]
    np.savez(vision_path, **arrays)
    with pytest.raises(CheckpointError, match=r"missing key blocks\.0\.ls2\.gamma"):
        tipstorch.load_model(vision_path)


def test_truncated_file_is_a_clear_error(tmp_path):
    vision_path, _ = write_official_pair(tmp_path, 384, 1, 1536, False)
    data = vision_path.read_bytes()
    vision_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="tips_test_vision.npz: cannot be read as an npz archive"):
        tipstorch.load_model(vision_path)


def test_missing_text_file_is_named(tmp_path):
    vision_path, text_path = write_official_pair(tmp_path, 384, 1, 1536, False)
    text_path.unlink()
    with pytest.raises(FileNotFoundError, match="tips_test_text.npz"):
        tipstorch.load_model(vision_path)


def test_pickled_npz_is_refused(tmp_path):
    vision_path, _ = write_official_pair(tmp_path, 384, 1, 1536, False)
    arrays = dict(np.load(vision_path, allow_pickle=False))
    arrays["cls_token"] = np.array([{"evil": 1}], dtype=object)
    np.savez(vision_path, **arrays)
    with pytest.raises(CheckpointError, match="cannot be read"):
        tipstorch.load_model(vision_path)
