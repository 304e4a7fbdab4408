"""benchmarks/ablation.py --quick: every rung of the ladder trains and is evaluated, and the report is written."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

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
