"""benchmarks/ablation.py --quick: every rung of the ladder trains and is evaluated, and the report is written."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNGS = {"a", "b", "c", "d", "e", "d+", "e-", "a+"}


def test_quick_ablation_trains_and_evaluates_every_rung(tmp_path):
    out = tmp_path / "ablation"
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ablation.py"), "--quick", "--out", str(out),
                    "--set", "data.scenes_objects=[2,3]"],
                   check=True, env=env, cwd=tmp_path, timeout=900)
    report = json.loads((out / "results.json").read_text())
    assert {run["variant"] for run in report["runs"]} == RUNGS
    assert report["machine"]["cores"] == os.cpu_count() and isinstance(report["machine"]["native_bf16"], bool)
    for run in report["runs"]:
        metrics = run["metrics"]
        for key in ("seg_probe/miou", "depth_probe/rmse", "normals_dpt/mean_deg", "zeroshot_seg/miou",
                    "zeroshot_cls/top1", "retrieval/i2t_r1", "retrieval_alt/i2t_r1"):
            assert math.isfinite(metrics[key]), (run["variant"], key)
        assert run["peak_rss_gb"] > 0.1 and run["seconds_per_step"] > 0
        config = (out / f"{run['config']}-seed0" / "config.yaml").read_text()
        assert "scenes_objects:\n  - 2\n  - 3" in config, run["config"]  # --set reached every variant
    table = (out / "ablation.md").read_text()
    assert all(f"| {rung} |" in table for rung in RUNGS)
    assert f"on {os.cpu_count()} cores of an {report['machine']['cpu']}" in table
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| a -> b | + spatial captions, dual CLS |" in table and "| e- -> e | full -> head-only EMA |" in table
    assert all(run["eval_seconds"] > 0 for run in report["runs"]) and report["runs_reused"] == 0

    # a second sweep into the same directory reads every run back instead of training it again, and says so
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ablation.py"), "--quick", "--out", str(out)],
                   check=True, env=env, cwd=tmp_path, timeout=300)
    again = json.loads((out / "results.json").read_text())
    assert again["runs_reused"] == len(RUNGS) and again["runs"] == report["runs"]
    assert f"{len(RUNGS)} of them read from an earlier sweep's result.json" in (out / "ablation.md").read_text()
    # ... and still states what the runs cost when they ran
    train_minutes = sum(run["train_seconds"] for run in report["runs"]) / 60
    assert again["run_minutes"]["train"] == pytest.approx(train_minutes) and train_minutes > 0
    assert again["run_minutes"] == report["run_minutes"] and again["run_minutes"]["without_eval_time"] == 0
    assert f"training {train_minutes:.1f} min, evaluation {again['run_minutes']['eval']:.1f} min" in (
        out / "ablation.md").read_text()


def test_recorded_minutes_sum_the_runs_and_count_those_without_an_evaluation_time():
    ablation = load_ablation()
    runs = [{"train_seconds": 120.0, "eval_seconds": 60.0}, {"train_seconds": 180.0}]
    assert ablation.recorded_minutes(runs) == {"train": 5.0, "eval": 1.0, "without_eval_time": 1}


def load_ablation():
    spec = importlib.util.spec_from_file_location("ablation", ROOT / "benchmarks" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["ablation"] = module  # its dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def fake_run(variant: str, seed: int, seg: float, depth: float) -> dict:
    return {"variant": variant, "seed": seed, "seconds_per_step": 1.0, "peak_rss_gb": 1.0,
            "metrics": {"seg_probe/miou": seg, "depth_probe/rmse": depth}}


@pytest.mark.parametrize(("seg_b", "depth_b", "seg_cell", "depth_cell"), [
    # seg up by 0.16 and depth down by 0.19 in both seeds, spreads ~0.014
    ((0.30, 0.32), (0.80, 0.82), "+0.160 better (2/2)", "+0.200 better (2/2)"),
    # seg +0.005 on average within its spread (seed 0 better, seed 1 equal), depth up 0.21 in both seeds
    ((0.15, 0.16), (1.20, 1.22), "+0.005 noise (1/2)", "-0.200 worse (0/2)"),
])
def test_a_rung_counts_as_better_or_worse_only_beyond_the_seed_spread(seg_b, depth_b, seg_cell, depth_cell):
    ablation = load_ablation()
    runs = [fake_run("a", 0, 0.14, 1.00), fake_run("a", 1, 0.16, 1.02),
            fake_run("b", 0, seg_b[0], depth_b[0]), fake_run("b", 1, seg_b[1], depth_b[1]),
            fake_run("b", 2, 0.50, 0.10)]  # a seed that (a) lacks is in b's mean but not in the paired count
    row = next(line for line in ablation.format_comparisons(runs).splitlines() if line.startswith("| a -> b |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[2].endswith("/2)") and cells[3].endswith("/2)"), row
    assert cells[4] == "-"  # a metric the runs lack
    runs.pop()
    row = next(line for line in ablation.format_comparisons(runs).splitlines() if line.startswith("| a -> b |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert (cells[2], cells[3]) == (seg_cell, depth_cell), row
