"""Quick evaluation on the scenes data: every metric, ranges, chance level, determinism, side effects."""

import math
from dataclasses import replace

import pytest
import torch

import tipstorch
from tests.helpers import tiny_tips
from tipstorch.eval.quick import QUICK_SETTINGS, SCENE_TASKS, quick_evaluation

# The documented metric names (tipstorch.eval.report / quick module docstring), by range.
FRACTIONS = [
    "zeroshot_cls/top1", "zeroshot_cls/top5", "zeroshot_seg/miou", "zeroshot_seg/pixel_accuracy",
    *[f"{prefix}/{way}_r{k}" for prefix in ("retrieval", "retrieval_alt") for way in ("i2t", "t2i") for k in (1, 5, 10)],
    "knn/top1", "knn/top5", "linear/top1", "linear/top5", "seg_probe/miou", "seg_probe/pixel_accuracy",
    "depth_probe/delta1", "depth_dpt/delta1", "normals_dpt/within_11.25",
]  # fmt: skip
METRES_OR_RATIOS = ["depth_probe/rmse", "depth_probe/abs_rel", "depth_dpt/rmse", "depth_dpt/abs_rel"]
DEGREES = ["normals_dpt/mean_deg", "normals_dpt/median_deg", "normals_dpt/rmse_deg"]

SMALL = replace(
    QUICK_SETTINGS, image_size=28, scenes_train=6, scenes_test=4, probe_iterations=2, probe_batch_size=2,
    linear_epochs=1, dpt_channels=8, batch_size=4,
)


@pytest.fixture(scope="module")
def small_run():
    model = tiny_tips()
    return quick_evaluation(model, tipstorch.get_tokenizer(model), SMALL, SCENE_TASKS, progress=False)


def test_every_documented_metric_is_reported_and_nothing_else(small_run):
    assert sorted(small_run) == sorted(FRACTIONS + METRES_OR_RATIOS + DEGREES)


def test_fractions_lie_in_the_unit_interval(small_run):
    for key in FRACTIONS:
        assert 0.0 <= small_run[key] <= 1.0, key


def test_depth_errors_are_positive_and_finite(small_run):
    for key in METRES_OR_RATIOS:
        assert 0.0 < small_run[key] < math.inf, key


def test_normal_errors_are_angles(small_run):
    for key in DEGREES:
        assert 0.0 <= small_run[key] <= 180.0, key


def test_top5_is_at_least_top1(small_run):
    assert small_run["zeroshot_cls/top5"] >= small_run["zeroshot_cls/top1"]
    assert small_run["retrieval/i2t_r10"] >= small_run["retrieval/i2t_r5"] >= small_run["retrieval/i2t_r1"]


def test_task_subset_reports_only_its_metrics():
    model = tiny_tips()
    settings = replace(QUICK_SETTINGS, image_size=28, scenes_train=4, scenes_test=4)
    result = quick_evaluation(model, tipstorch.get_tokenizer(model), settings, ("knn", "retrieval"), progress=False)
    assert {key.split("/")[0] for key in result} == {"knn", "retrieval", "retrieval_alt"}


def test_results_are_reproducible_and_the_caller_state_is_restored():
    model = tiny_tips()
    model.train()
    tokenizer = tipstorch.get_tokenizer(model)
    settings = replace(QUICK_SETTINGS, image_size=28, scenes_train=4, scenes_test=4, probe_iterations=2)
    tasks = ("seg-probe", "linear")
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    first = quick_evaluation(model, tokenizer, settings, tasks, progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert model.training
    assert quick_evaluation(model, tokenizer, settings, tasks, progress=False) == first


def test_a_task_scores_the_same_whatever_tasks_ran_before_it():
    """Each task seeds the global RNG itself: a probe head's initial weights do not depend on the task list."""
    model = tiny_tips()
    tokenizer = tipstorch.get_tokenizer(model)
    alone = quick_evaluation(model, tokenizer, SMALL, ("normals-dpt",), progress=False)
    after_others = quick_evaluation(model, tokenizer, SMALL, ("seg-probe", "depth-probe", "normals-dpt"), progress=False)
    assert {key: after_others[key] for key in alone} == alone


def test_the_probe_seed_changes_the_probes_but_not_the_scenes():
    """``seed`` draws the probes; ``scenes_seed`` the rendered scenes (the same for every probe seed)."""
    model = tiny_tips()
    tokenizer = tipstorch.get_tokenizer(model)
    runs = [quick_evaluation(model, tokenizer, replace(SMALL, seed=seed), ("normals-dpt", "zeroshot-seg"), progress=False)
            for seed in (0, 1)]
    assert runs[0]["normals_dpt/mean_deg"] != runs[1]["normals_dpt/mean_deg"]
    assert runs[0]["zeroshot_seg/miou"] == runs[1]["zeroshot_seg/miou"]  # no probe: same scenes, same score


@pytest.mark.parametrize(("overrides", "message"), [({"image_size": 100}, "multiple of 14"), ({"scenes_test": 1}, ">= 2")])
def test_bad_settings_are_refused_with_the_reason(overrides, message):
    with pytest.raises(ValueError, match=message):
        replace(QUICK_SETTINGS, **overrides)


def test_a_task_the_scenes_cannot_run_is_refused_with_the_choices():
    model = tiny_tips()
    with pytest.raises(ValueError, match="subset"):
        quick_evaluation(model, tipstorch.get_tokenizer(model), tasks=("knn", "imagenet"), progress=False)


def test_random_model_scores_near_chance_on_the_text_tasks():
    """8 scene labels (the most frequent ~1/4 of scenes), 64 test captions, 8 shapes."""
    model = tiny_tips(seed=1)
    settings = replace(QUICK_SETTINGS, image_size=28, scenes_train=2, scenes_test=64)
    tasks = ("zeroshot-cls", "zeroshot-seg", "retrieval")
    result = quick_evaluation(model, tipstorch.get_tokenizer(model), settings, tasks, progress=False)
    assert result["zeroshot_cls/top1"] <= 0.35
    assert result["zeroshot_seg/miou"] <= 0.2
    for key in ("retrieval/i2t_r1", "retrieval/t2i_r1", "retrieval_alt/i2t_r1", "retrieval_alt/t2i_r1"):
        assert result[key] <= 0.1, key


@pytest.mark.slow
def test_default_quick_evaluation_of_random_tips_tiny_is_complete_and_near_chance():
    """The full-size run (~1 min on 2 idle cores; no time assertion: shared machines stall it)."""
    torch.manual_seed(0)
    model = tipstorch.create_model("tips-tiny")
    result = quick_evaluation(model, tipstorch.get_tokenizer(model), progress=False)
    assert len(result) == len(FRACTIONS + METRES_OR_RATIOS + DEGREES) - 3  # depth_dpt is opt-in
    assert all(math.isfinite(value) for value in result.values())
    assert result["zeroshot_cls/top1"] <= 0.3 and result["zeroshot_seg/miou"] <= 0.15
    assert max(result[f"{prefix}/{way}_r1"] for prefix in ("retrieval", "retrieval_alt") for way in ("i2t", "t2i")) <= 0.03
