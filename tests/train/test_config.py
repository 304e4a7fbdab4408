"""Typed configs: every shipped recipe loads, overrides are typed, bad keys and values are named."""

import dataclasses
from pathlib import Path

import pytest

from tipstorch.train.config import (
    ConfigError,
    LossWeights,
    TrainCfg,
    config_from_dict,
    dump_config,
    load_config,
    shipped_configs_dir,
)

CONFIGS = shipped_configs_dir()
SHIPPED = sorted(CONFIGS.glob("*.yaml"))


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_expected_recipes_are_shipped():
    names = {path.stem for path in SHIPPED}
    assert {"tips_g14_paper", "tips_s14", "tips_b14", "tips_l14", "tips_so400m14", "tips_hr_finetune",
            "distill_l14_from_g14", "clip_only", "tips", "tipsv2", "tiny_cpu"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, TrainCfg) and cfg.name == path.stem


def test_paper_config_carries_the_paper_numbers():
    cfg = load_config(CONFIGS / "tips_g14_paper.yaml")
    assert cfg.loss.weights == LossWeights(clip_global=0.5, clip_spatial=0.5, dino=1.0, ibot=2.0, koleo=0.0)
    assert (cfg.loss.student_temp, cfg.loss.center_momentum) == (0.1, 0.9)
    assert (cfg.optim.name, cfg.optim.lr) == ("adafactor", 5e-4)
    assert (cfg.schedule.teacher_momentum_start, cfg.schedule.teacher_momentum_end) == (0.994, 1.0)
    assert (cfg.schedule.ibot_teacher_temp_start, cfg.schedule.ibot_teacher_temp_end) == (0.04, 0.07)
    assert (cfg.data.global_size, cfg.data.local_size, cfg.data.num_local_crops) == (224, 98, 6)
    assert (cfg.heads.num_prototypes, cfg.data.mask_ratio, cfg.loop.batch_size) == (32768, 0.75, 16384)


def test_ablation_variants_differ_only_in_recipe_switches():
    tips, tipsv2 = load_config(CONFIGS / "tips.yaml"), load_config(CONFIGS / "tipsv2.yaml")
    clip = load_config(CONFIGS / "clip_only.yaml")
    assert (tips.loss.ibot_all_tokens, tips.teacher.mode, tips.data.caption_weights) == (False, "full", {"spatial": 1.0})
    assert (tipsv2.loss.ibot_all_tokens, tipsv2.teacher.mode) == (True, "heads")
    assert [w for w in dataclasses.asdict(clip.loss.weights).values() if w > 0] == [1.0]
    assert tips.loop.steps == tipsv2.loop.steps == clip.loop.steps and tips.model == tipsv2.model == clip.model


def test_set_overrides_are_parsed_with_yaml_scalar_types():
    cfg = load_config(
        CONFIGS / "tiny_cpu.yaml",
        ["loop.steps=7", "optim.lr=3e-4", "loop.bf16=false", "model.init=null", "data.global_scale=[0.5, 1]",
         "model.vision.depth=2"],
    )
    assert (cfg.loop.steps, cfg.optim.lr, cfg.loop.bf16, cfg.model.init) == (7, 3e-4, False, None)
    assert cfg.data.global_scale == (0.5, 1.0) and cfg.model.vision == {"depth": 2}


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    path = write(tmp_path, "bad.yaml", "loop:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'loop\.stepz'"):
        load_config(path)


def test_unknown_key_in_a_base_names_the_base_file(tmp_path):
    write(tmp_path, "parent.yaml", "optim:\n  momentum: 0.9\n")
    child = write(tmp_path, "child.yaml", "base: parent.yaml\nloop:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"parent\.yaml.*'optim\.momentum'"):
        load_config(child)


def test_unknown_override_key_is_named():
    with pytest.raises(ConfigError, match=r"--set loss\.weight\.dino.*'loss\.weight'"):
        load_config(CONFIGS / "tiny_cpu.yaml", ["loss.weight.dino=1"])


def test_override_without_equals_sign_is_an_error():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(CONFIGS / "tiny_cpu.yaml", ["loop.steps"])


def test_wrong_value_type_names_key_and_expected_type(tmp_path):
    path = write(tmp_path, "typed.yaml", "loop:\n  steps: many\n")
    with pytest.raises(ConfigError, match=r"typed\.yaml.*loop\.steps must be int, got 'many'"):
        load_config(path)


def test_literal_fields_accept_only_their_choices():
    with pytest.raises(ConfigError, match=r"teacher\.mode must be one of \['full', 'heads', 'frozen'\]"):
        load_config(CONFIGS / "tiny_cpu.yaml", ["teacher.mode=ema"])


def test_exponent_without_dot_is_read_as_a_float(tmp_path):
    path = write(tmp_path, "lr.yaml", "optim:\n  lr: 5e-4\n")
    assert load_config(path).optim.lr == 5e-4


def test_base_sections_merge_key_by_key_and_free_form_mappings_are_replaced(tmp_path):
    write(tmp_path, "parent.yaml", "loop:\n  steps: 9\n  seed: 4\ndata:\n  caption_weights: {spatial: 0.5, detailed: 0.5}\n")
    child = write(tmp_path, "child.yaml", "base: parent.yaml\nloop:\n  seed: 5\ndata:\n  caption_weights: {spatial: 1.0}\n")
    cfg = load_config(child)
    assert (cfg.loop.steps, cfg.loop.seed) == (9, 5)
    assert cfg.data.caption_weights == {"spatial": 1.0}


def test_base_cycle_is_reported(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yaml")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_dump_reads_back_to_an_equal_config(path, tmp_path):
    cfg = load_config(path)
    assert load_config(write(tmp_path, "dumped.yaml", dump_config(cfg))) == cfg


def test_config_from_dict_rebuilds_a_saved_config():
    cfg = load_config(CONFIGS / "tips.yaml")
    assert config_from_dict(dataclasses.asdict(cfg)) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("loop.accumulation_steps=5", "multiple of loop.accumulation_steps"),
        ("teacher.mode=frozen", "teacher.frozen_model"),
        ("loss.weights.dino=-1", "loss.weights must be >= 0"),
        ("model.name=null", "registry name or explicit vision and text"),
        ("data.num_local_crops=0", "needs local crops"),
        ("data.mask_ratio=0", "supervises no token"),
    ],
)
def test_inconsistent_settings_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "tips.yaml", [override])


def test_model_names_and_fields_exist_in_the_registry():
    registry = pytest.importorskip("tipstorch.models.registry", reason="models land on main")
    vision_fields = {f.name for f in dataclasses.fields(registry.VisionConfig)}
    text_fields = {f.name for f in dataclasses.fields(registry.TextConfig)}
    for path in SHIPPED:
        cfg = load_config(path)
        assert cfg.model.name in registry.list_models(), path.name
        assert set(cfg.model.vision) <= vision_fields and set(cfg.model.text) <= text_fields, path.name
        if cfg.teacher.frozen_model is not None:
            assert cfg.teacher.frozen_model in registry.list_models(pretrained=True), path.name


def test_crop_fields_are_checked_at_load_and_the_error_names_them():
    with pytest.raises(ConfigError, match=r"tiny_cpu.*DataCfg\.local_size must be a positive multiple of 14, got 50"):
        load_config(CONFIGS / "tiny_cpu.yaml", ["data.local_size=50"])


def test_the_data_section_and_the_collate_share_one_definition_of_the_crops():
    from tipstorch.data.collate import MultiCropConfig
    from tipstorch.train.config import DataCfg

    crop_fields = {field.name: field for field in dataclasses.fields(MultiCropConfig)}
    data_fields = {field.name: field for field in dataclasses.fields(DataCfg)}
    assert all(data_fields[name] is field for name, field in crop_fields.items())
    assert DataCfg().caption_weights == MultiCropConfig().caption_weights == {"spatial": 1.0}


def test_the_hr_stage_names_a_step_the_low_resolution_run_keeps():
    cfg = load_config(CONFIGS / "tips_hr_finetune.yaml")
    base = load_config(CONFIGS / "tips_g14_paper.yaml")
    assert cfg.model.init == f"{base.loop.out_dir}/step-92040.pt" and 92040 == 13 * base.loop.keep_every


def stage_starting_from(tmp_path: Path, init: Path) -> Path:
    return write(tmp_path, "stage.yaml", f"base: {CONFIGS / 'tiny_cpu.yaml'}\nmodel:\n  init: {init}\n")


@pytest.mark.parametrize("step, keep_every", [(100, 30), (120, 0), (150, 30)])
def test_a_starting_step_the_named_run_never_keeps_is_an_error_at_load(tmp_path, step, keep_every):
    run = tmp_path / "first_stage"
    run.mkdir()
    (run / "config.yaml").write_text(f"loop:\n  steps: 120\n  keep_every: {keep_every}\n")
    stage = stage_starting_from(tmp_path, run / f"step-{step}.pt")
    with pytest.raises(ConfigError, match=rf"step-{step}\.pt can never exist: .*first_stage/config\.yaml"):
        load_config(stage)


def test_a_starting_step_the_named_run_keeps_loads(tmp_path):
    run = tmp_path / "first_stage"
    run.mkdir()
    (run / "config.yaml").write_text("loop:\n  steps: 120\n  keep_every: 30\n")
    stage = stage_starting_from(tmp_path, run / "step-90.pt")
    assert load_config(stage).model.init == f"{run}/step-90.pt"


def test_a_shipped_recipe_naming_an_unkept_step_fails_at_load(tmp_path):
    stage = write(tmp_path, "stage.yaml", f"base: {CONFIGS / 'tips_hr_finetune.yaml'}\n")
    with pytest.raises(ConfigError, match=r"step-91040\.pt can never exist: .*shipped recipe tips_g14_paper"):
        load_config(stage, ["model.init=runs/tips_g14_paper/step-91040.pt"])  # the step it used to name
