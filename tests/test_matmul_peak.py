"""benchmarks/matmul_peak.py: the peak is a rate, and figures scaled by it pair each round with its own peak."""

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_matmul_peak():
    spec = importlib.util.spec_from_file_location("matmul_peak", ROOT / "benchmarks" / "matmul_peak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fraction_of_peak_scales_each_round_by_the_peak_measured_in_that_round():
    peak = load_matmul_peak()
    # the machine slows down by 2x in round 2: the step and the peak both halve, the fraction holds at 50%
    assert peak.fraction_of_peak(100.0, [1.0, 2.0, 1.0], [200.0, 100.0, 200.0]) == pytest.approx(0.5)
    # the median of the rounds' own fractions (0.5, 0.5, 0.67), not the ratio of the medians (0.67)
    assert peak.fraction_of_peak(100.0, [1.0, 2.0, 1.5], [200.0, 100.0, 100.0]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="one peak per round: 2 timings, 3 peaks"):
        peak.fraction_of_peak(1.0, [1.0, 1.0], [1.0, 1.0, 1.0])


def test_paired_ratio_compares_the_two_timings_of_each_round():
    peak = load_matmul_peak()
    assert peak.paired_ratio([2.0, 4.0, 2.2], [1.0, 2.0, 2.0]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        peak.paired_ratio([1.0], [1.0, 2.0])


def test_matmul_rate_is_a_positive_rate_in_flops_per_second():
    rate = load_matmul_peak().matmul_rate(torch.float32, sizes=(32, 64), window=0.01)
    assert 1e6 < rate < 1e15
