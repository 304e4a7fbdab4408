"""Schedule values at known steps."""

import math

import pytest

from tipstorch.train.config import OptimCfg, ScheduleCfg
from tipstorch.train.schedules import TrainingSchedules, cosine_ramp, linear_ramp, warmup_then_decay


def test_linear_warmup_then_linear_decay_to_zero():
    values = [warmup_then_decay(step, total_steps=10, warmup_steps=4, peak=8.0) for step in (0, 1, 4, 7, 10, 12)]
    assert values == pytest.approx([0.0, 2.0, 8.0, 4.0, 0.0, 0.0])


def test_cosine_decay_passes_the_midpoint_at_half_way():
    value = warmup_then_decay(6, total_steps=10, warmup_steps=2, peak=1.0, final=0.2, decay="cosine")
    assert value == pytest.approx(0.6)


def test_no_warmup_starts_at_peak():
    assert warmup_then_decay(0, total_steps=5, warmup_steps=0, peak=3.0) == pytest.approx(3.0)


def test_cosine_ramp_endpoints_and_quarter():
    assert cosine_ramp(0, 100, 0.994, 1.0) == pytest.approx(0.994)
    assert cosine_ramp(25, 100, 0.994, 1.0) == pytest.approx(1.0 - 0.006 * (1 + math.cos(math.pi / 4)) / 2)
    assert cosine_ramp(100, 100, 0.994, 1.0) == pytest.approx(1.0)


def test_linear_ramp_holds_end_after_ramp():
    assert [linear_ramp(s, 4, 0.04, 0.07) for s in (0, 2, 4, 9)] == pytest.approx([0.04, 0.055, 0.07, 0.07])


def test_training_schedules_follow_the_paper_recipe():
    schedules = TrainingSchedules(
        ScheduleCfg(warmup_steps=10, ibot_teacher_temp_warmup_steps=20),
        OptimCfg(lr=5e-4, weight_decay=0.1),
        total_steps=110,
    )
    at_peak, half_decay, mid_temp = schedules.at(10), schedules.at(60), schedules.at(10)
    assert at_peak.lr == pytest.approx(5e-4)
    assert half_decay.lr == pytest.approx(2.5e-4)
    assert schedules.at(0).teacher_momentum == pytest.approx(0.994)
    assert schedules.at(55).teacher_momentum == pytest.approx(0.997)
    assert mid_temp.ibot_teacher_temp == pytest.approx(0.055)
    assert schedules.at(30).ibot_teacher_temp == pytest.approx(0.07)
    assert schedules.at(30).dino_teacher_temp == pytest.approx(0.07)
    assert schedules.at(77).weight_decay == pytest.approx(0.1)


def test_weight_decay_cosine_when_an_end_value_is_given():
    schedules = TrainingSchedules(ScheduleCfg(weight_decay_end=0.2), OptimCfg(weight_decay=0.04), total_steps=100)
    assert schedules.at(0).weight_decay == pytest.approx(0.04)
    assert schedules.at(50).weight_decay == pytest.approx(0.12)
    assert schedules.at(100).weight_decay == pytest.approx(0.2)


def test_schedules_are_pure_functions_of_the_step():
    schedules = TrainingSchedules(ScheduleCfg(warmup_steps=3), OptimCfg(), total_steps=9)
    fresh = TrainingSchedules(ScheduleCfg(warmup_steps=3), OptimCfg(), total_steps=9)
    forward = [schedules.at(step) for step in range(9)]
    assert [fresh.at(step) for step in reversed(range(9))] == forward[::-1]
