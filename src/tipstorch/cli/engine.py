"""``tipstorch curate`` and ``tipstorch caption``: the data engine of the paper (Sec. 3.1, A.3).

tipstorch curate --pool pool/ --target voc/JPEGImages --clusters 5 --samples 20000 --eval val/ --out curated/
tipstorch caption --shards curated/ --field spatial --field "detailed=describe en"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tipstorch.cli.model_args import add_model_arguments, model_from_args
from tipstorch.data.captions import CAPTION_SOURCES
from tipstorch.data.shards import expand_shards
from tipstorch.engine.captioning import CaptionTask, caption_shards
from tipstorch.engine.curation import RADIUS_FROM, CurationConfig
from tipstorch.engine.embedding_cache import EMBEDDINGS

CAPTION_SUMMARY_FILE = "caption_summary.json"


def add_engine_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add ``curate`` and ``caption`` to a ``tipstorch`` subparsers object."""
    curate = subparsers.add_parser(
        "curate",
        help="select pool images like target datasets (k-means on embeddings), deduplicated, as new shards",
        description="Curate a WebDataset pool toward target datasets as in TIPS (A.3): k-means on each "
        "target's image embeddings, pool images assigned to the nearest centre, members at or beyond the "
        "radius percentile dropped, clusters sampled in proportion to the target's cluster sizes; then "
        "near-duplicates removed within the selection and against evaluation sets. Writes shards, "
        "curation_report.json and curation_distances.png to --out.",
    )
    curate.add_argument("--pool", required=True, help="pool shards: directory, brace pattern or .tar")
    curate.add_argument(
        "--target",
        action="append",
        required=True,
        metavar="PATH",
        help="target dataset: image folder or shards (repeat for several targets)",
    )
    curate.add_argument(
        "--clusters",
        type=int,
        nargs="+",
        required=True,
        metavar="K",
        help="k-means clusters: one value for every target, or one per target",
    )
    curate.add_argument(
        "--samples",
        type=int,
        nargs="+",
        metavar="N",
        help="images to draw per target (one value or one per target; default: all eligible)",
    )
    curate.add_argument(
        "--eval",
        dest="eval_sets",
        action="append",
        default=[],
        metavar="PATH",
        help="evaluation images (folder or shards) whose near-duplicates are removed (repeatable)",
    )
    curate.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    curate.add_argument(
        "--dedup-threshold",
        type=float,
        default=0.95,
        help="cosine at or above which two images are near-duplicates (default 0.95)",
    )
    curate.add_argument(
        "--radius-percentile",
        type=float,
        default=90.0,
        help="members at or beyond this percentile of distance are dropped (default 90)",
    )
    curate.add_argument(
        "--radius-from",
        choices=RADIUS_FROM,
        default="target",
        help="percentile of the target's own distances (default) or of the pool members'",
    )
    curate.add_argument(
        "--embedding", choices=EMBEDDINGS, default="global_cls", help="which CLS embeds an image"
    )
    curate.add_argument("--image-size", type=int, help="embedding resolution (default: the model's)")
    curate.add_argument("--batch-size", type=int, default=64)
    curate.add_argument("--shard-size", type=int, default=1000, help="samples per output shard")
    curate.add_argument("--cache-dir", type=Path, help="embedding cache (default: --out/.embeddings)")
    curate.add_argument("--kmeans-iterations", type=int, default=25)
    curate.add_argument("--seed", type=int, default=0, help="seed of k-means and of the draw")
    add_model_arguments(curate)
    curate.set_defaults(func=run_curate)

    caption = subparsers.add_parser(
        "caption",
        help="add synthetic captions from an image-to-text model to shard json (images untouched)",
        description="Caption every sample of WebDataset shards with a transformers image-to-text model "
        "(PaliGemma by default) and store the text under json fields the training reader uses. Resumable: "
        "rerun the same command after a kill.",
    )
    caption.add_argument("--shards", required=True, help="shards: directory, brace pattern or .tar")
    caption.add_argument(
        "--captioner",
        default=None,
        metavar="ID_OR_DIR",
        help="transformers model id or local directory (default: PaliGemma fine-tuned on COCO, 224 px)",
    )
    caption.add_argument(
        "--field",
        dest="fields",
        action="append",
        default=[],
        metavar="FIELD[=PROMPT]",
        help=f"json field to write, one of {', '.join(CAPTION_SOURCES)}, with its prompt "
        "(default prompt 'caption en'); repeat for several granularities (default: spatial)",
    )
    caption.add_argument(
        "--out", type=Path, metavar="DIR", help="write captioned shards here (default: in place)"
    )
    caption.add_argument("--batch-size", type=int, default=16)
    caption.add_argument("--max-new-tokens", type=int, default=64)
    caption.add_argument("--num-beams", type=int, default=1)
    caption.add_argument("--overwrite", action="store_true", help="replace captions a sample already has")
    caption.add_argument("--local-files-only", action="store_true", help="never download the captioner")
    caption.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    caption.add_argument("--bf16", action="store_true", help="bfloat16 weights also where not native (CPU)")
    caption.set_defaults(func=run_caption)


def _per_target(values: list[int] | None, targets: int, flag: str) -> list[int | None]:
    if values is None:
        return [None] * targets
    if len(values) == 1:
        return values * targets
    if len(values) != targets:
        raise SystemExit(f"error: {flag} takes one value or one per --target ({targets}), got {len(values)}")
    return list(values)


def run_curate(args: argparse.Namespace) -> int:
    from tipstorch.engine.curate import REPORT_FILE, CurateJob, Target, run_curation
    from tipstorch.engine.embedding_cache import TIPSImageEmbedder

    clusters = _per_target(args.clusters, len(args.target), "--clusters")
    samples = _per_target(args.samples, len(args.target), "--samples")
    try:
        targets = [
            Target(
                path,
                CurationConfig(
                    k, n, args.radius_percentile, args.radius_from, args.kmeans_iterations, args.seed
                ),
            )
            for path, k, n in zip(args.target, clusters, samples, strict=True)
        ]
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    model, _ = model_from_args(args)
    embedder = TIPSImageEmbedder(
        model, args.image_size, args.embedding, args.device, "bf16" if args.bf16 else "auto"
    )
    job = CurateJob(
        pool=args.pool,
        targets=targets,
        out_dir=args.out,
        eval_sets=args.eval_sets,
        dedup_threshold=args.dedup_threshold,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        cache_dir=args.cache_dir,
    )
    try:
        report = run_curation(job, embedder)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    duplicates = report.duplicates
    print(
        json.dumps(
            {
                "targets": [
                    {k: t[k] for k in ("source", "clusters", "eligible", "selected")} for t in report.targets
                ],
                "overlap_between_targets": report.overlap_between_targets,
                "duplicates_within_selection": len(duplicates["within_selection"]),
                "duplicates_of_eval": len(duplicates["against_eval"]),
                "written": report.written,
                "report": str(args.out / REPORT_FILE),
            },
            indent=2,
        )
    )
    return 0


def parse_field(text: str) -> CaptionTask:
    """``"spatial"`` or ``"detailed=describe en"`` -> CaptionTask (exits naming the known fields)."""
    field, _, prompt = text.partition("=")
    try:
        return CaptionTask(field.strip(), prompt.strip() or "caption en")
    except ValueError as error:
        raise SystemExit(f"error: --field {text!r}: {error}") from None


def run_caption(args: argparse.Namespace) -> int:
    import torch

    from tipstorch.engine.transformers_captioner import DEFAULT_CAPTIONER, TransformersCaptioner

    tasks = [parse_field(text) for text in args.fields or ["spatial"]]
    try:
        shards = expand_shards(args.shards)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: --shards {args.shards}: {error}") from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    captioner = TransformersCaptioner(
        args.captioner or DEFAULT_CAPTIONER,
        device=device,
        precision="bf16" if args.bf16 else "auto",
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        local_files_only=args.local_files_only,
    )
    summary = caption_shards(
        shards, captioner, tasks, out_dir=args.out, batch_size=args.batch_size, overwrite=args.overwrite
    )
    result = {
        "captioner": args.captioner or DEFAULT_CAPTIONER,
        "fields": {t.field: t.prompt for t in tasks},
        **summary.as_dict(),
    }
    out_dir = args.out or Path(shards[0]).parent
    (Path(out_dir) / CAPTION_SUMMARY_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({**result, "skipped": len(summary.skipped)}, indent=2))
    return 0
