"""``tipstorch data ...`` subcommands: ``write-shards`` converts scenes or an image folder to WebDataset shards."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm import tqdm

from tipstorch.data.folder import FolderDataset
from tipstorch.data.sample import ImageTextSample
from tipstorch.data.scenes import ScenesConfig, ScenesDataset
from tipstorch.data.shards import IMAGE_FORMATS, write_shards

SUMMARY_FILE = "summary.json"


def add_data_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``data`` (with ``write-shards``) to a ``tipstorch`` subparsers object; dispatch with ``run_data``."""
    data = subparsers.add_parser("data", help="build datasets: write WebDataset shards")
    data.set_defaults(func=run_data)
    commands = data.add_subparsers(dest="data_command", required=True)
    write = commands.add_parser(
        "write-shards",
        help="write the scenes generator or an image folder to WebDataset tar shards",
        description="Write WebDataset shards (<key>.<format> + <key>.json with the captions) and "
        f"a {SUMMARY_FILE} describing them.",
    )
    source = write.add_mutually_exclusive_group(required=True)
    source.add_argument("--from", dest="source", choices=["scenes"], help="generate built-in scenes")
    source.add_argument("--from-folder", type=Path, metavar="DIR", help="a folder of images")
    write.add_argument(
        "--captions",
        type=Path,
        metavar="FILE",
        help="jsonl/csv/tsv captions (folder; default: sidecar files)",
    )
    write.add_argument(
        "--rename",
        action="append",
        default=[],
        metavar="FIELD=SOURCE",
        help="map a caption field, e.g. title=alt",
    )
    write.add_argument("--num", type=int, default=1000, help="number of scenes (scenes)")
    write.add_argument("--seed", type=int, default=0, help="scenes seed (scenes)")
    write.add_argument("--image-size", type=int, default=224, help="scenes image side in pixels (scenes)")
    write.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    write.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    write.add_argument("--format", dest="image_format", choices=sorted(IMAGE_FORMATS), default="jpg")
    write.add_argument("--quality", type=int, default=95, help="jpg/webp quality")
    return data


def _parse_rename(pairs: Iterable[str]) -> dict[str, str]:
    rename = {}
    for pair in pairs:
        field, sep, source = pair.partition("=")
        if not sep or not field or not source:
            raise SystemExit(f"--rename expects FIELD=SOURCE, got {pair!r}")
        rename[field] = source
    return rename


def _scenes(num: int, seed: int, image_size: int) -> Iterator[ImageTextSample]:
    dataset = ScenesDataset(ScenesConfig(image_size=image_size, seed=seed), length=num)
    return (dataset[i] for i in range(num))


def write_shards_command(args: argparse.Namespace) -> dict:
    """Run ``data write-shards``; returns (and writes to ``--out/summary.json``) the summary."""
    if args.source == "scenes":
        if args.num <= 0:
            raise SystemExit(f"--num must be positive, got {args.num}")
        samples, total, stats = _scenes(args.num, args.seed, args.image_size), args.num, None
        origin = {"source": "scenes", "seed": args.seed, "image_size": args.image_size}
    else:
        folder = FolderDataset(args.from_folder, args.captions, rename=_parse_rename(args.rename))
        samples, total, stats = iter(folder), len(folder), folder.stats
        origin = {"source": "folder", "folder": str(args.from_folder), "captions": str(args.captions)}
    written = write_shards(
        tqdm(samples, total=total, desc="write-shards", unit="sample"),
        args.out,
        shard_size=args.shard_size,
        image_format=args.image_format,
        quality=args.quality,
    )
    summary = {
        **origin,
        "format": args.image_format,
        "samples": written.samples,
        "skipped": stats.skipped if stats is not None else 0,
        "shards": [p.name for p in written.shards],
    }
    (Path(args.out) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def run_data(args: argparse.Namespace) -> int:
    """Dispatch a parsed ``tipstorch data ...`` command; prints its JSON summary; returns the exit code."""
    if args.data_command == "write-shards":
        print(json.dumps(write_shards_command(args), indent=2))
        return 0
    raise SystemExit(f"unknown data command {args.data_command!r}")
