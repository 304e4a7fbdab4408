"""``tipstorch eval``: the paper's evaluation tasks on standard datasets and on the built-in scenes.

    tipstorch eval --model tipsv2-l14 --tasks zeroshot-seg --data ade20k=/data/ADEChallengeData2016
    tipstorch eval --model runs/tiny_cpu/final.safetensors --tasks quick

Writes a JSON file (model, tasks, data paths, protocol of every run, metrics, raw details, timings)
and prints a markdown table of the metrics, keyed ``"<dataset>/<task>/<metric>"``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tipstorch.cli.model_args import add_model_arguments, model_from_args
from tipstorch.eval.context import SCENES, EvalContext, EvalSettings, FrozenModel
from tipstorch.eval.quick import QUICK_SETTINGS, QUICK_TASKS
from tipstorch.eval.report import format_comparison
from tipstorch.eval.tasks import TASKS, TaskDataError, TaskResult, run_tasks
from tipstorch.weights.state_io import atomic_write

QUICK = "quick"  # the quick evaluation's tasks (tipstorch.eval.quick.QUICK_TASKS) on the scenes
# task -> the --data keys it can read, in the order of the paper's tables; "scenes" needs no path
TASK_DATA: dict[str, tuple[str, ...]] = {name: task.data for name, task in TASKS.items()} | {QUICK: (SCENES,)}
DATA_KEYS: tuple[str, ...] = ("imagenet", "voc", "ade20k", "nyu", "coco", "flickr30k", "docci", "scenes")
DATA_LAYOUTS: dict[str, str] = {
    "imagenet": "folder with train/<wnid>/ and val/<wnid>/ (--class-names FILE for zero-shot prompts)",
    "voc": "VOCdevkit/VOC2012 (or its parent): JPEGImages, SegmentationClass, ImageSets/Segmentation",
    "ade20k": "ADEChallengeData2016: images/ and annotations/ {training,validation}",
    "nyu": "BTS layout: official_splits/{train,test}/<scene>/{rgb_*.jpg, sync_depth_*.png}",
    "coco": "folder with dataset_coco.json (Karpathy) and val2014/ (or images/val2014/)",
    "flickr30k": "folder with dataset_flickr30k.json (Karpathy) and images/ or flickr30k-images/",
    "docci": "folder with docci_descriptions.jsonlines and images/",
    "scenes": "built in, no path",
}


def parse_tasks(text: str) -> list[str]:
    """Comma list of task names -> list, in the given order, without repeats."""
    tasks = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    unknown = [t for t in tasks if t not in TASK_DATA]
    if unknown or not tasks:
        raise argparse.ArgumentTypeError(f"unknown task(s) {unknown or text!r}; choose from {', '.join(TASK_DATA)}")
    return tasks


def parse_data(entries: list[str]) -> dict[str, Path | None]:
    """``["imagenet=/data/in1k", "scenes"]`` -> {"imagenet": Path, "scenes": None}."""
    data: dict[str, Path | None] = {}
    for entry in entries:
        key, sep, path = entry.partition("=")
        key = key.strip().lower()
        if key not in DATA_KEYS:
            raise SystemExit(f"error: unknown --data key {key!r}; known keys: {', '.join(DATA_KEYS)}")
        if key == "scenes":
            data[key] = None
            continue
        if not sep or not path:
            raise SystemExit(f"error: --data {key} needs a path: --data {key}=PATH ({DATA_LAYOUTS[key]})")
        if not Path(path).exists():
            raise SystemExit(f"error: --data {key}={path}: no such file or folder ({DATA_LAYOUTS[key]})")
        data[key] = Path(path)
    return data


def plan_runs(tasks: list[str], data: dict[str, Path | None]) -> list[tuple[str, str]]:
    """(task, data key) pairs to run; a task whose data is missing is one clear error."""
    runs = []
    for task in tasks:
        scenes_only = TASK_DATA[task] == ("scenes",)  # quick, normals-dpt: nothing to point at
        keys = [key for key in TASK_DATA[task] if key in data or scenes_only]
        if not keys:
            needed = " or ".join(f"--data {k}" if k == "scenes" else f"--data {k}=PATH" for k in TASK_DATA[task])
            raise SystemExit(f"error: task {task} needs its evaluation data: {needed}")
        runs.extend((task, key) for key in keys)
    return runs


def add_eval_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``eval`` to a ``tipstorch`` subparsers object; dispatch with ``args.func(args)`` (= ``run_eval``)."""
    epilog = "tasks and their --data keys:\n" + "\n".join(
        f"  {task:<13} {', '.join(keys)}" for task, keys in TASK_DATA.items()
    ) + "\n\ndata layouts:\n" + "\n".join(f"  {key:<10} {layout}" for key, layout in DATA_LAYOUTS.items())
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model on the paper's tasks (or the quick scenes evaluation)",
        description="Evaluate a frozen model: zero-shot classification / segmentation, retrieval, kNN, linear "
        "classification and dense probes. Writes a JSON of all metrics and prints a markdown table.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tasks", required=True, type=parse_tasks, help=f"comma list of: {', '.join(TASK_DATA)}")
    parser.add_argument("--data", action="append", default=[], metavar="NAME=PATH",
                        help="evaluation data (repeatable): " + ", ".join(f"{k}=PATH" for k in DATA_KEYS[:-1]) + ", scenes")
    parser.add_argument("--out", type=Path, default=Path("eval_results.json"), help="JSON file of all results")
    parser.add_argument("--table", type=Path, help="also write the markdown table to this file")
    parser.add_argument("--image-size", type=int,
                        help="square input size (default: per protocol: the model's size; kNN/linear 224; scenes 112)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-samples", type=int, help="random subset of at most N samples per split (smoke runs)")
    parser.add_argument("--probe-iterations", type=int, help="dense probe iterations (default: the paper's 40k / 50k)")
    parser.add_argument("--probe-batch-size", type=int, help="dense probe batch size (default: the paper's 16 / 8)")
    parser.add_argument("--class-names", type=Path, help="JSON {folder: class name} for imagenet zero-shot prompts")
    parser.add_argument("--seed", type=int, default=0,
                        help=f"seed of --max-samples subsets and probes (the built-in scenes are always drawn with "
                             f"seed {QUICK_SETTINGS.scenes_seed})")
    parser.add_argument("--save-probes", type=Path, metavar="DIR",
                        help="write the trained DPT probes (depth-dpt, normals-dpt) to DIR/<data>_<task>.safetensors, "
                             "for 'tipstorch depth/normals --head FILE' and the demo")
    add_model_arguments(parser)
    parser.set_defaults(func=run_eval)
    return parser


def _check_args(args: argparse.Namespace) -> None:
    for name in ("image_size", "batch_size", "max_samples", "probe_iterations", "probe_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {value}")
    if args.image_size is not None and args.image_size % 14:
        raise SystemExit(f"error: --image-size must be a multiple of 14 (the patch size), got {args.image_size}")
    if args.class_names is not None and not args.class_names.is_file():
        raise SystemExit(f"error: --class-names {args.class_names}: no such file")


def scenes_settings(args: argparse.Namespace) -> EvalSettings:
    """The quick evaluation's settings with what ``--image-size``, ``--max-samples`` etc. ask for."""
    overrides: dict[str, Any] = {"batch_size": args.batch_size, "seed": args.seed}
    if args.image_size:
        overrides["image_size"] = args.image_size
    if args.max_samples:
        overrides.update(scenes_train=min(QUICK_SETTINGS.scenes_train, args.max_samples),
                         scenes_test=min(QUICK_SETTINGS.scenes_test, args.max_samples))
    if args.probe_iterations:
        overrides["probe_iterations"] = args.probe_iterations
    if args.probe_batch_size:
        overrides["probe_batch_size"] = args.probe_batch_size
    try:
        return replace(QUICK_SETTINGS, **overrides)
    except ValueError as error:
        raise SystemExit(f"error: scenes evaluation: {error}") from error


def _scene_tasks(tasks: list[str]) -> list[str]:
    """Tasks run on the scenes, ``quick`` expanded to the quick evaluation's tasks."""
    names: list[str] = []
    for task in tasks:
        names.extend(QUICK_TASKS if task == QUICK else [task])
    return list(dict.fromkeys(names))


def _run(context: EvalContext, runs: list[tuple[str, str, Path | None]]) -> dict[str, TaskResult]:
    """Results of ``runs`` by ``"<data key>/<task name>"``; bad data is one clear error."""
    try:
        results = run_tasks(context, runs)
    except TaskDataError as error:
        raise SystemExit(f"error: {error}") from error
    for name, result in results.items():
        skipped = result.details.get("num_skipped", 0)
        if skipped:
            tqdm.write(f"{name}: skipped {skipped} corrupt sample(s) (paths in the log)", file=sys.stderr)
    return results


def _save_probes(results: dict[str, TaskResult], directory: Path, model: str) -> None:
    from tipstorch.weights.dense_heads import save_dense_head

    saved = 0
    for name, result in results.items():
        for task, head in result.heads.items():
            path = save_dense_head(head, directory / f"{name.split('/')[0]}_{task}.safetensors", model=model)
            print(f"wrote probe {path}")
            saved += 1
    if not saved:
        print("--save-probes: none of the tasks run trains a DPT probe (depth-dpt, normals-dpt)", file=sys.stderr)


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``tipstorch eval``; returns the report that is written to ``--out``."""
    _check_args(args)
    data = parse_data(args.data)
    runs = plan_runs(args.tasks, data)
    scene_tasks = _scene_tasks([task for task, key in runs if key == SCENES])

    scenes = scenes_settings(args) if scene_tasks else None

    torch.manual_seed(args.seed)  # --random weights come from the global generator
    model, tokenizer = model_from_args(args)
    frozen = FrozenModel(model, tokenizer, args.device, args.bf16)
    settings = EvalSettings(args.image_size, args.batch_size, args.max_samples, args.probe_iterations,
                            args.probe_batch_size, args.class_names, args.seed)
    report: dict[str, Any] = {
        "model": str(args.model),
        "random_init": bool(args.random),
        "tasks": list(args.tasks),
        "data": {key: None if path is None else str(path) for key, path in data.items()},
        "settings": {"image_size": args.image_size, "batch_size": args.batch_size, "bf16": args.bf16,
                     "device": str(args.device), "max_samples": args.max_samples, "seed": args.seed,
                     "probe_iterations": args.probe_iterations, "probe_batch_size": args.probe_batch_size},
        "protocol": {}, "metrics": {}, "details": {}, "seconds": {},
    }
    # every standard (task, dataset) pair, then the scenes tasks with the quick evaluation's settings
    results = _run(EvalContext(frozen, settings), [(task, key, data[key]) for task, key in runs if key != SCENES])
    if scenes is not None:
        results |= _run(EvalContext(frozen, scenes), [(task, SCENES, None) for task in scene_tasks])
    for name, result in results.items():
        key = name.split("/")[0]
        report["metrics"].update({f"{key}/{metric}": value for metric, value in result.metrics.items()})
        report["protocol"][name], report["seconds"][name] = result.protocol, result.seconds
        if result.details:
            report["details"][name] = result.details

    if args.save_probes:
        _save_probes(results, args.save_probes, str(args.model))
    table = format_comparison({str(args.model) + (" (random)" if args.random else ""): report["metrics"]})
    atomic_write(args.out, lambda path: Path(path).write_text(json.dumps(report, indent=2) + "\n"))
    if args.table:
        atomic_write(args.table, lambda path: Path(path).write_text(table))
    print(table, end="")
    print(f"wrote {args.out}")
    return report
