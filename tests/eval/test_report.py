"""Metric names and the markdown comparison table."""

import pytest

from tipstorch.eval.report import format_comparison, headline, lower_is_better


def test_headline_renames_retrieval_and_keeps_only_table_metrics():
    raw = {"image_to_text_r1": 0.5, "text_to_image_r10": 0.9, "num_images": 10}
    assert headline("retrieval", raw) == {"retrieval/i2t_r1": 0.5, "retrieval/t2i_r10": 0.9}


def test_headline_names_normals_in_degrees():
    raw = {"mean": 20.0, "median": 10.0, "rmse": 30.0, "within_11.25": 0.4, "num_pixels": 5}
    assert headline("normals_dpt", raw) == {
        "normals_dpt/mean_deg": 20.0, "normals_dpt/median_deg": 10.0, "normals_dpt/rmse_deg": 30.0,
        "normals_dpt/within_11.25": 0.4,
    }


def test_headline_of_an_unknown_task_lists_the_known_ones():
    with pytest.raises(KeyError, match="seg_probe"):
        headline("segmentation", {"miou": 0.3})


@pytest.mark.parametrize(
    ("metric", "lower"),
    [("depth_probe/rmse", True), ("nyu/depth_dpt/abs_rel", True), ("normals_dpt/median_deg", True),
     ("depth_probe/delta1", False), ("knn/top1", False), ("normals_dpt/within_11.25", False)],
)
def test_metric_direction(metric, lower):
    assert lower_is_better(metric) is lower


def test_comparison_table_has_a_row_per_metric_and_a_column_per_run():
    table = format_comparison({
        "before": {"knn/top1": 0.125, "depth_probe/rmse": 1.5},
        "after": {"knn/top1": 0.5, "depth_probe/rmse": 0.75, "seg_probe/miou": 0.25},
    })
    lines = table.strip().splitlines()
    assert lines[0] == "| metric | better | before | after |"
    assert lines[2] == "| knn/top1 | ↑ | 0.1250 | 0.5000 |"
    assert lines[3] == "| depth_probe/rmse | ↓ | 1.5000 | 0.7500 |"
    assert lines[4] == "| seg_probe/miou | ↑ | - | 0.2500 |"
    assert len(lines) == 5


def test_comparison_of_no_runs_is_refused():
    with pytest.raises(ValueError, match="at least one run"):
        format_comparison({})
