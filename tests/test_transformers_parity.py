"""Parity with transformers' Tipsv2Model, and the transformers checkpoint format both ways."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import tipstorch
from tests.helpers import assert_close_to_scale, randomize, tiny_config
from tipstorch.models.registry import get_model_spec, list_models
from tipstorch.models.tips import TIPSModel
from tipstorch.weights.transformers import save_transformers

transformers = pytest.importorskip("transformers")


def transformers_outputs(hf_model, images, ids):
    with torch.no_grad():
        vision = hf_model.vision_model(pixel_values=images).last_hidden_state
        text = hf_model.text_model(input_ids=ids, attention_mask=(ids != 0).long()).pooler_output
    return vision, text


def assert_parity(model: TIPSModel, hf_model, image_size, scale_tol=2e-5):
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, *image_size, generator=generator)
    vocab = model.config.text.vocab_size
    ids = torch.randint(1, vocab, (2, model.config.text.context_length), generator=generator)
    ids[0, 5:] = 0
    hf_vision, hf_text = transformers_outputs(hf_model, images, ids)
    with torch.no_grad():
        ours = model.encode_image(images)
        ours_text = model.encode_text(ids)
    assert_close_to_scale(ours.global_cls, hf_vision[:, 0], scale_tol)
    assert_close_to_scale(ours.spatial_cls, hf_vision[:, 1], scale_tol)
    assert_close_to_scale(ours.flat, hf_vision[:, 2:], scale_tol)
    assert_close_to_scale(ours_text, hf_text, scale_tol)


@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
@pytest.mark.parametrize("image_size", [(56, 56), (84, 42)])
def test_exported_model_runs_identically_in_transformers(tmp_path, ffn, image_size):
    model = randomize(TIPSModel(tiny_config(ffn))).eval()
    save_transformers(model, tmp_path / "hf")
    hf_model = transformers.Tipsv2Model.from_pretrained(tmp_path / "hf").eval()
    assert_parity(model, hf_model, image_size)
    assert hf_model.temperature.item() == pytest.approx(model.temperature.item())


@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
def test_transformers_checkpoint_loads_into_tipstorch(tmp_path, ffn):
    ours_config = tiny_config(ffn)
    from tipstorch.weights.transformers import transformers_config

    hf_config = transformers.Tipsv2Config(**{k: v for k, v in transformers_config(ours_config).items()
                                             if k not in ("model_type", "architectures")})
    torch.manual_seed(0)
    hf_model = randomize(transformers.Tipsv2Model(hf_config), seed=3).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    model = tipstorch.load_model(tmp_path / "hf")
    assert model.config.vision == dataclasses.replace(ours_config.vision, layer_scale_init=model.config.vision.layer_scale_init)
    assert_parity(model, hf_model, (56, 70))
    again = tipstorch.load_model(tmp_path / "hf" / "model.safetensors")
    torch.testing.assert_close(again.visual.pos_embed, model.visual.pos_embed)


@pytest.mark.parametrize("name", [n for n in list_models(pretrained=True)])
def test_every_released_size_matches_transformers_for_one_block(tmp_path, name):
    """The real widths, heads and MLP shapes of every registered model, truncated to one block each."""
    spec = get_model_spec(name)
    config = dataclasses.replace(
        spec.config,
        vision=dataclasses.replace(spec.config.vision, depth=1, pos_grid=4),
        text=dataclasses.replace(spec.config.text, depth=1, vocab_size=500),
    )
    model = randomize(TIPSModel(config)).eval()
    save_transformers(model, tmp_path / "hf")
    hf_model = transformers.Tipsv2Model.from_pretrained(tmp_path / "hf").eval()
    assert_parity(model, hf_model, (56, 42), scale_tol=5e-5)


def test_in_memory_transformers_state_dict_also_loads(tmp_path):
    """A bare ``save_file(Tipsv2Model.state_dict())`` (split q/k/v names) beside its config.json."""
    import json

    from safetensors.torch import save_file

    from tipstorch.weights.transformers import transformers_config

    ours_config = tiny_config("swiglu")
    hf_config_dict = transformers_config(ours_config)
    hf_config = transformers.Tipsv2Config(**{k: v for k, v in hf_config_dict.items() if k not in ("model_type", "architectures")})
    hf_model = randomize(transformers.Tipsv2Model(hf_config), seed=5).eval()
    (tmp_path / "raw").mkdir()
    save_file({k: v.contiguous() for k, v in hf_model.state_dict().items()}, str(tmp_path / "raw" / "model.safetensors"))
    (tmp_path / "raw" / "config.json").write_text(json.dumps(hf_config_dict))
    model = tipstorch.load_model(tmp_path / "raw")
    assert_parity(model, hf_model, (42, 56))
