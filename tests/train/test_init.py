"""Starting points: from scratch, from an exported model (--init), from a training checkpoint; teachers."""

import pytest
import torch

import tipstorch
from tests.helpers import assert_close_to_scale, randomize
from tests.train.loop_helpers import parameters, tiny_cfg, tiny_trainer
from tipstorch.models.registry import get_model_spec
from tipstorch.models.tips import TIPSModel
from tipstorch.models.vit import resample_pos_embed
from tipstorch.train.config import ConfigError, load_config, resolve_config
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
    fold_pixel_normalization(projection.weight, projection.bias, mean, std)
    pixels = torch.rand(2, 3, 28, 28)
    normalised = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert_close_to_scale(projection(pixels), original(normalised))


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


@pytest.mark.parametrize("config", ["tips_g14_paper", "tips_b14", "tips_s14", "distill_l14_from_g14"])
def test_paper_recipes_from_scratch_start_layer_scale_at_the_small_dinov2_value(config):
    cfg = load_config(resolve_config(config))
    assert cfg.model.init is None
    assert get_model_spec(cfg.model.name).config.vision.layer_scale_init == 1.0  # released weights: unchanged
    assert model_config(cfg.model).vision.layer_scale_init == 1e-5


def test_a_model_built_from_scratch_has_small_gammas_and_a_configured_value_wins():
    small = ["model.vision={depth: 1, pos_grid: 2}", "model.text={depth: 1}"]
    model, _ = build_model(load_config(resolve_config("tips_s14"), small).model)
    assert all(torch.all(gamma == 1e-5) for name, gamma in model.visual.named_parameters() if name.endswith("gamma"))
    configured = load_config(resolve_config("tips_s14"), [*small, "model.vision.layer_scale_init=0.1"])
    model, _ = build_model(configured.model)
    gammas = [gamma for name, gamma in model.visual.named_parameters() if name.endswith("gamma")]
    assert gammas and all(torch.allclose(gamma, torch.full_like(gamma, 0.1)) for gamma in gammas)


def ema_parts(trainer) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in trainer.teacher.ema_parts.state_dict().items()}


@pytest.mark.parametrize("config", ["tiny_cpu", "tips"])  # head-only EMA (TIPSv2), full EMA (TIPS)
def test_init_from_a_training_checkpoint_continues_its_ema_teacher_and_centres(tmp_path, config):
    first = tiny_trainer(tmp_path / "first", "loop.steps=3", config=config)
    first.fit()
    second = tiny_trainer(tmp_path / "second", f"model.init={tmp_path / 'first' / 'last.pt'}", config=config)
    teacher, student_heads = ema_parts(first), parameters(first.student)
    assert ema_parts(second).keys() == teacher.keys()
    assert all(torch.equal(value, teacher[name]) for name, value in ema_parts(second).items())
    # the teacher's own EMA heads, not copies of the student's
    assert not torch.equal(teacher["dino_head.mlp.0.weight"], student_heads["dino_head.mlp.0.weight"])
    centres = first.loss.state_dict()
    assert all(value.abs().sum() > 0 for value in centres.values())
    assert all(torch.equal(value, centres[name]) for name, value in second.loss.state_dict().items())
    assert {"dino.centering.center", "ibot.centering.center", "teacher.dino_head"} <= set(second.continued)
    assert second.step == 0


def test_the_continued_full_ema_backbone_is_resampled_to_a_larger_grid(tmp_path):
    first = tiny_trainer(tmp_path / "first", "loop.steps=2", config="tips")
    first.fit()
    second = tiny_trainer(tmp_path / "second", f"model.init={tmp_path / 'first'}", "model.vision.pos_grid=4",
                          config="tips")
    old, new = first.teacher["backbone"], second.teacher["backbone"]
    assert new.pos_embed.shape == (1, 1 + 16, 32)
    torch.testing.assert_close(new.pos_embed[:, 1:], resample_pos_embed(old.pos_embed[:, 1:], (4, 4)))
    assert torch.equal(new.blocks[0].attn.qkv.weight, old.blocks[0].attn.qkv.weight)
    assert not torch.equal(new.blocks[0].attn.qkv.weight, second.model.visual.blocks[0].attn.qkv.weight)


def test_a_frozen_teacher_from_a_training_checkpoint_gets_its_heads(tmp_path):
    first = tiny_trainer(tmp_path / "first", "loop.steps=2")
    first.fit()
    checkpoint = tmp_path / "first" / "last.pt"
    trainer = tiny_trainer(tmp_path / "second", "teacher.mode=frozen", f"teacher.frozen_model={checkpoint}")
    trained = parameters(first.student)
    for head in ("dino_head", "ibot_head"):
        loaded = trainer.teacher[head].state_dict()
        assert all(torch.equal(value, trained[f"{head}.{name}"]) for name, value in loaded.items())


def test_a_frozen_teacher_without_heads_says_they_are_random(tmp_path, exported, caplog):
    _, path = exported
    with caplog.at_level("WARNING", logger="tipstorch.train"):
        tiny_trainer(tmp_path, "teacher.mode=frozen", f"teacher.frozen_model={path}")
    assert "frozen teacher" in caplog.text and "dino_head and ibot_head random and fixed" in caplog.text
