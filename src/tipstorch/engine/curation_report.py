"""The curation histogram: per target, the pool's distances to their nearest centre, kept vs dropped."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tipstorch.engine.curation import TargetCuration


def plot_distances(results: Sequence[TargetCuration], names: Sequence[str], path: str | Path) -> Path:
    """Write a PNG with one histogram per target: pool distances inside the radius (eligible) and at
    or beyond it (dropped), and those of the selected images; returns the path."""
    from matplotlib.figure import Figure  # no pyplot: the global backend stays as the caller set it

    figure = Figure(figsize=(7, 2.6 * len(results)))
    axes = figure.subplots(len(results), 1, squeeze=False)
    for axis, result, name in zip(axes[:, 0], results, names, strict=True):
        bins = np.linspace(0.0, float(result.pool_distance.max()) + 1e-6, 41)
        axis.hist(
            [result.pool_distance[result.eligible], result.pool_distance[~result.eligible]],
            bins=bins,
            stacked=True,
            label=["eligible", "dropped (>= radius)"],
            color=["tab:blue", "tab:gray"],
        )
        axis.hist(
            result.pool_distance[result.selected],
            bins=bins,
            histtype="step",
            color="tab:red",
            label="selected",
        )
        axis.set_title(f"{name}: {len(result.selected)} selected of {len(result.pool_distance)}", fontsize=9)
        axis.set_xlabel("distance to the nearest target centre")
        axis.set_ylabel("pool images")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return Path(path)
