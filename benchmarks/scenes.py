"""Speed of the data pipeline on one CPU core: scenes generation, shard reading, multi-crop collation.

    python benchmarks/scenes.py [--samples 300] [--shard-samples 400] [--json out.json]

Prints ms per generated scene at 224 and 448 px, shard read throughput (jpg, decode to RGB), and
the cost of building one training sample (1 global 224 crop + 6 local 98 crops + mask; tokenisation
excluded). Pins itself to one core (and one torch thread) so the figures are per core.
Run from the repository root with the package installed (``pip install -e .``) or ``PYTHONPATH=src``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from tipstorch.data.collate import MultiCropCollate, MultiCropConfig
from tipstorch.data.scenes import ScenesConfig, ScenesDataset
from tipstorch.data.shards import ShardDataset, write_shards


def ms_per_scene(image_size: int, samples: int) -> float:
    dataset = ScenesDataset(ScenesConfig(image_size=image_size, seed=0))
    dataset.sample(10**6)  # warm-up (imports, caches)
    start = time.perf_counter()
    for index in range(samples):
        dataset.sample(index)
    return (time.perf_counter() - start) / samples * 1e3


def shard_read(samples: int) -> dict[str, float]:
    dataset = ScenesDataset(ScenesConfig(image_size=224, seed=1))
    with tempfile.TemporaryDirectory() as folder:
        write_shards((dataset.sample(i) for i in range(samples)), folder, shard_size=100, image_format="jpg")
        megabytes = sum(p.stat().st_size for p in Path(folder).glob("*.tar")) / 1e6
        start = time.perf_counter()
        count = sum(1 for _ in ShardDataset(folder, shuffle_buffer=100))
        seconds = time.perf_counter() - start
    return {"samples_per_s": count / seconds, "mb_per_s": megabytes / seconds, "samples": count}


def ms_per_training_sample(samples: int) -> float:
    dataset = ScenesDataset(ScenesConfig(image_size=224, seed=2))
    batch = [dataset.sample(i) for i in range(samples)]
    collate = MultiCropCollate(MultiCropConfig(), lambda texts: torch.zeros(len(texts), 64, dtype=torch.long))
    collate(batch[:2])
    start = time.perf_counter()
    for offset in range(0, samples, 32):
        collate(batch[offset : offset + 32])
    return (time.perf_counter() - start) / samples * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=300, help="scenes per resolution")
    parser.add_argument("--shard-samples", type=int, default=400)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)

    results = {
        "scenes_ms_per_sample_224": ms_per_scene(224, args.samples),
        "scenes_ms_per_sample_448": ms_per_scene(448, max(args.samples // 3, 1)),
        "shard_read": shard_read(args.shard_samples),
        "collate_ms_per_sample_224_6x98": ms_per_training_sample(128),
    }
    print(f"scenes 224x224: {results['scenes_ms_per_sample_224']:.2f} ms/sample (1 core)")
    print(f"scenes 448x448: {results['scenes_ms_per_sample_448']:.2f} ms/sample (1 core)")
    read = results["shard_read"]
    print(
        f"shard read (224 jpg, decode + shuffle buffer): {read['samples_per_s']:.0f} samples/s, {read['mb_per_s']:.1f} MB/s"
    )
    print(
        f"multi-crop collate (224 + 6x98 + mask): {results['collate_ms_per_sample_224_6x98']:.2f} ms/sample"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
