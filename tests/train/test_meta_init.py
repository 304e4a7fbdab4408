"""Meta-device initialisation (``loop.meta_init``): every parameter gets its scheme, in one process too."""

import pytest
import torch

from tests.train.loop_helpers import tiny_cfg
from tipstorch.models.text import sinusoidal_positions
from tipstorch.train.init import build_model, build_teacher
from tipstorch.train.meta_init import materialize
from tipstorch.train.student import TIPSStudent


def meta_student(*overrides: str):
    cfg = tiny_cfg("teacher.mode=full", *overrides)
    with torch.device("meta"):
        model, _ = build_model(cfg.model)
        student = TIPSStudent(model, cfg.heads, cfg.loss)
        teacher = build_teacher(cfg, student)
    return cfg, student, teacher


def test_a_meta_built_student_is_initialised_like_a_fresh_one():
    cfg, student, teacher = meta_student()
    assert student.model.visual.blocks[0].attn.qkv.weight.is_meta
    materialize(student, teacher, torch.device("cpu"), cfg.model, seed=0, rank=0, initialise=True)
    model = student.model
    torch.manual_seed(0)
    fresh, _ = build_model(cfg.model)
    for name, value in model.state_dict().items():
        expected = fresh.state_dict()[name]
        assert value.shape == expected.shape and torch.isfinite(value).all(), name
        if value.numel() == 1:
            assert torch.equal(value, expected), name
        else:  # the same scheme: the same scale (not the same draws)
            assert float(value.std()) == pytest.approx(float(expected.std()), rel=0.5, abs=1e-6), name
    assert torch.equal(model.visual.blocks[0].ls1.gamma, torch.full((32,), 0.1))
    assert torch.equal(model.text.positions, sinusoidal_positions(64, 32))
    for name, value in teacher.ema_parts["backbone"].state_dict().items():
        assert torch.equal(value, model.visual.state_dict()[name]), name


def test_a_parameter_without_a_scheme_is_named(monkeypatch):
    cfg, student, teacher = meta_student()
    monkeypatch.setattr(type(student.model.text.transformer.resblocks[0].attn), "reset_parameters", lambda self: None)
    with pytest.raises(RuntimeError, match=r"without a scheme: \['model.text.transformer.resblocks.0.attn.in_proj"):
        materialize(student, teacher, torch.device("cpu"), cfg.model, seed=0, rank=0, initialise=True)
