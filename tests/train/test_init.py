"""Starting points: from scratch, from an exported model (--init), from a training checkpoint; teachers."""

import pytest
import torch

import tipstorch
from tests.helpers import randomize
from tests.train.loop_helpers import parameters, tiny_cfg, tiny_trainer
from tipstorch.models.tips import TIPSModel
from tipstorch.models.vit import resample_pos_embed
from tipstorch.train.config import ConfigError
from tipstorch.train.init import build_model, fold_pixel_normalization, model_config
from tipstorch.train.teacher import FrozenTeacher
from tipstorch.weights.state_io import CheckpointError


@pytest.fixture
def exported(tmp_path):
    """A tiny model with random weights everywhere (temperature 0.03), saved with tipstorch.save_model."""
    model = randomize(TIPSModel(model_config(tiny_cfg().model)), seed=3)
    with torch.no_grad():
        model.temperature.fill_(0.03)
    return model, tipstorch.save_model(model, tmp_path / "start.safetensors")


def test_init_from_an_exported_model_loads_both_towers_and_the_temperature(tmp_path, exported):
    source, path = exported
    trainer = tiny_trainer(tmp_path / "run", f"model.init={path}")
    for tower in ("visual", "text"):
        loaded = getattr(trainer.model, tower).state_dict()
        assert all(torch.equal(value, loaded[name]) for name, value in getattr(source, tower).state_dict().items())
    assert trainer.model.temperature.item() == pytest.approx(0.03)
    assert trainer.loaded_heads == []


def test_init_starts_new_heads(tmp_path, exported):
    _, path = exported
    started = tiny_trainer(tmp_path, f"model.init={path}")
    for head in (started.student.dino_head, started.student.ibot_head):  # ProjectionHead's fresh initialisation
        linears = [module for module in head.mlp if isinstance(module, torch.nn.Linear)]
        assert all(torch.equal(layer.bias, torch.zeros_like(layer.bias)) for layer in linears)
        assert all(0.01 < layer.weight.std().item() < 0.03 for layer in linears)


def test_explicit_temperature_wins_over_the_starting_model(tmp_path, exported):
    _, path = exported
    assert tiny_trainer(tmp_path, f"model.init={path}", "model.temperature=0.05").model.temperature.item() == pytest.approx(0.05)


def test_init_to_a_larger_position_grid_resamples_the_position_embeddings(tmp_path, exported):
    source, path = exported
    trainer = tiny_trainer(tmp_path, f"model.init={path}", "model.vision.pos_grid=4")
    pos_embed = trainer.model.visual.pos_embed
    assert pos_embed.shape == (1, 1 + 16, 32) and trainer.model.image_size == 56
    torch.testing.assert_close(pos_embed[:, :1], source.visual.pos_embed[:, :1])
    torch.testing.assert_close(pos_embed[:, 1:], resample_pos_embed(source.visual.pos_embed[:, 1:], (4, 4)))


def test_init_with_a_shape_changing_override_names_the_key_and_shapes(tmp_path, exported):
    _, path = exported
    with pytest.raises(CheckpointError, match=r"blocks\.0\.mlp\.fc1\.weight: expected shape \[48, 32\], found \[64, 32\]"):
        tiny_trainer(tmp_path, f"model.init={path}", "model.vision.mlp_hidden_dim=48")


def test_init_from_a_training_checkpoint_also_loads_its_heads(tmp_path):
    first = tiny_trainer(tmp_path / "first", "loop.steps=2")
    first.fit()
    second = tiny_trainer(tmp_path / "second", f"model.init={tmp_path / 'first' / 'last.pt'}")
    assert second.loaded_heads == ["dino_head", "ibot_head"]
    trained = parameters(first.student)
    assert all(torch.equal(value, trained[name]) for name, value in parameters(second.student).items())
    assert second.step == 0  # a new run: optimiser, schedules and step start afresh


def test_heads_of_another_shape_start_new(tmp_path):
    tiny_trainer(tmp_path / "first", "loop.steps=1").fit()
    second = tiny_trainer(tmp_path / "second", f"model.init={tmp_path / 'first'}", "heads.num_prototypes=32")
    assert second.loaded_heads == []


def test_unknown_architecture_field_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.vision: unknown field\(s\) \['widht'\]"):
        build_model(tiny_cfg("model.vision.widht=3").model)


def test_folded_pixel_normalisation_equals_normalising_the_input():
    projection = torch.nn.Conv2d(3, 8, kernel_size=14, stride=14)
    original = torch.nn.Conv2d(3, 8, kernel_size=14, stride=14)
    original.load_state_dict(projection.state_dict())
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    fold_pixel_normalization(projection, mean, std)
    pixels = torch.rand(2, 3, 28, 28)
    normalised = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(projection(pixels), original(normalised), rtol=1e-5, atol=1e-5)


def test_frozen_teacher_is_the_given_model_with_fixed_heads(tmp_path, exported):
    source, path = exported
    trainer = tiny_trainer(tmp_path, "teacher.mode=frozen", f"teacher.frozen_model={path}", "loop.steps=2")
    assert isinstance(trainer.teacher, FrozenTeacher)
    before = parameters(trainer.teacher)
    trainer.fit()
    after = parameters(trainer.teacher)
    assert all(torch.equal(value, after[name]) for name, value in before.items())
    teacher_backbone = trainer.teacher["backbone"].state_dict()
    assert all(torch.equal(value, teacher_backbone[name]) for name, value in source.visual.state_dict().items())
