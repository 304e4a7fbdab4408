"""Stable metric names and the markdown comparison table.

Every evaluation reports flat ``"<task>/<metric>"`` keys (the CLI prefixes the dataset:
``"<dataset>/<task>/<metric>"``). ``headline`` picks the numbers worth a table row from the raw
output of a library function and renames them:

| task kind      | tasks                                   | metrics                                         |
|----------------|-----------------------------------------|-------------------------------------------------|
| classification | zeroshot_cls, knn, linear               | top1, top5                                      |
| segmentation   | zeroshot_seg, seg_probe                 | miou, pixel_accuracy                            |
| retrieval      | retrieval, retrieval_alt                | i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10 |
| depth          | depth_probe, depth_dpt                  | rmse (m), abs_rel, delta1                       |
| normals        | normals_dpt                             | mean_deg, median_deg, rmse_deg, within_11.25    |

Accuracies, IoUs, recalls, delta1 and within_11.25 are fractions in [0, 1] (the paper prints
them x100). Lower is better for rmse, abs_rel and the angles (*_deg); higher for the rest. The
paper reports angular RMSE for normals (section 4.1); mean, median and % < 11.25 deg are the
usual companions (El Banani et al.).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

TASK_KINDS: dict[str, str] = {
    "zeroshot_cls": "classification",
    "knn": "classification",
    "linear": "classification",
    "zeroshot_seg": "segmentation",
    "seg_probe": "segmentation",
    "retrieval": "retrieval",
    "retrieval_alt": "retrieval",
    "depth_probe": "depth",
    "depth_dpt": "depth",
    "normals_dpt": "normals",
}

# kind -> (key in the library function's result, stable metric name)
HEADLINE_METRICS: dict[str, tuple[tuple[str, str], ...]] = {
    "classification": (("top1", "top1"), ("top5", "top5")),
    "segmentation": (("miou", "miou"), ("pixel_accuracy", "pixel_accuracy")),
    "retrieval": tuple(
        (f"{long}_r{k}", f"{short}_r{k}")
        for long, short in (("image_to_text", "i2t"), ("text_to_image", "t2i"))
        for k in (1, 5, 10)
    ),
    "depth": (("rmse", "rmse"), ("abs_rel", "abs_rel"), ("delta1", "delta1")),
    "normals": (("mean", "mean_deg"), ("median", "median_deg"), ("rmse", "rmse_deg"), ("within_11.25", "within_11.25")),
}

LOWER_IS_BETTER: frozenset[str] = frozenset({"rmse", "abs_rel", "log10", "mean_deg", "median_deg", "rmse_deg"})


def headline(task: str, raw: Mapping[str, object]) -> dict[str, float]:
    """``{"<task>/<metric>": value}`` for the headline metrics of ``task`` present in ``raw``."""
    if task not in TASK_KINDS:
        raise KeyError(f"unknown task {task!r}; known tasks: {sorted(TASK_KINDS)}")
    return {
        f"{task}/{name}": float(raw[key])  # type: ignore[arg-type]
        for key, name in HEADLINE_METRICS[TASK_KINDS[task]]
        if key in raw
    }


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` (any ``.../<name>`` key) is better."""
    return metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER


def _format_value(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    return f"{value:.4f}"


def format_comparison(runs: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table: one row per metric (in order of first appearance), one column per run.

    The second column gives the direction: "↑" higher is better, "↓" lower is better. A metric a
    run did not report shows "-".
    """
    if not runs:
        raise ValueError("format_comparison needs at least one run")
    metrics: dict[str, None] = {}
    for values in runs.values():
        metrics.update(dict.fromkeys(values))
    names = list(runs)
    lines = [
        "| metric | better | " + " | ".join(names) + " |",
        "|---|:---:|" + "---:|" * len(names),
    ]
    for metric in metrics:
        cells = [_format_value(runs[name].get(metric)) for name in names]
        arrow = "↓" if lower_is_better(metric) else "↑"
        lines.append(f"| {metric} | {arrow} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
