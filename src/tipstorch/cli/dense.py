"""``tipstorch depth | normals | segment | pca | demo``: pictures of what a model sees.

tipstorch depth room.jpg --model tipsv2-b14            # room_depth.png + room_depth.npy beside it
tipstorch normals room.jpg --model tipsv2-b14          # room_normals.png + room_normals.npy
tipstorch segment street.jpg --labels "road,car,tree,sky" --out seg.png   # + seg.json scores, seg.npy
tipstorch segment street.jpg --head released --model tipsv2-b14            # the 150 ADE20K classes
tipstorch pca photo.jpg --fg-threshold 0.5 --out pca/
tipstorch demo                                         # http://127.0.0.1:7860
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from tipstorch.cli.model_args import add_model_arguments, autocast, model_from_args, open_image


def _target(image_path: str, out_dir: str | None, suffix: str) -> Path:
    """``<out_dir or the image's folder>/<image stem><suffix>``."""
    source = Path(image_path)
    return Path(out_dir or source.parent) / f"{source.stem}{suffix}"


def _head(args: argparse.Namespace, task: str):
    from tipstorch.weights.cache import DownloadError
    from tipstorch.weights.dense_heads import dense_head_from
    from tipstorch.weights.state_io import CheckpointError

    try:
        head = dense_head_from(args.head, task, args.model, pretrained=not args.random)
    except (ValueError, CheckpointError, DownloadError, FileNotFoundError) as error:
        raise SystemExit(
            f"error: no {task} head: {error}\n(--head released needs a TIPSv2 model name; otherwise pass --head "
            "FILE: a probe saved by 'tipstorch eval --save-probes', a released *_dpt.zip or a transformers "
            "tipsv2_dpt directory)"
        ) from error
    return head.to(args.device)


def run_dense_map(args: argparse.Namespace) -> None:
    """Depth or normals for each image: a colour-mapped PNG and the raw .npy array."""
    from tipstorch.eval.dense_predict import predict_depth, predict_normals
    from tipstorch.viz import depth_to_rgb, normals_to_rgb

    task = args.command
    model, _ = model_from_args(args)
    head = _head(args, task)
    predict, colour = (predict_depth, depth_to_rgb) if task == "depth" else (predict_normals, normals_to_rgb)
    for path in args.images:
        image = open_image(path)
        with autocast(args):
            prediction = predict(model, head, image, args.image_size)
        picture, array_path = (
            _target(path, args.out_dir, f"_{task}.png"),
            _target(path, args.out_dir, f"_{task}.npy"),
        )
        picture.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(colour(prediction)).save(picture)
        np.save(array_path, prediction.astype(np.float32), allow_pickle=False)
        detail = (
            f"{prediction.min():.3f}-{prediction.max():.3f} m"
            if task == "depth"
            else "unit vectors [H, W, 3]"
        )
        print(f"wrote {picture} and {array_path} ({image.width}x{image.height}, {detail})")


def _write_segmentation(
    args: argparse.Namespace, picture: Image.Image, class_map: np.ndarray, report: dict
) -> Path:
    """<out> (the picture), <out>.npy (uint8/int16 class of each pixel) and <out>.json (``report``)."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out)
    dtype = np.uint8 if class_map.max(initial=0) < 256 else np.int16
    np.save(out.with_suffix(".npy"), class_map.astype(dtype), allow_pickle=False)
    side = out.with_suffix(".json")
    side.write_text(
        json.dumps({"image": str(args.image), "model": str(args.model), **report}, indent=2) + "\n"
    )
    print(f"wrote {out}, {out.with_suffix('.npy')} and {side}")
    return side


def run_segment(args: argparse.Namespace) -> None:
    """Segmentation into typed labels (zero-shot) or into a DPT head's classes (``--head``: the released
    ADE20K heads): picture with a legend + class map (.npy) + JSON of per-class scores."""
    if args.head is not None:
        run_head_segment(args)
        return
    from tipstorch.eval.dense_predict import clean_labels, zero_shot_segmentation
    from tipstorch.eval.zeroshot import ZeroShotSegConfig
    from tipstorch.viz import palette, segmentation_figure

    try:
        labels = clean_labels(args.labels.split(","))
    except ValueError as error:
        raise SystemExit(f"error: --labels: {error}") from error
    model, tokenizer = model_from_args(args)
    size = args.image_size or model.image_size
    config = ZeroShotSegConfig(short_side=size, window=size, stride=args.stride or size * 3 // 4)
    image = open_image(args.image)
    with autocast(args):
        result = zero_shot_segmentation(model, tokenizer, image, labels, config)
    scores = result.scores()
    picture = segmentation_figure(
        image, result.label_map, labels, [f"{scores[label]['area']:.0%}" for label in labels]
    )
    colours = palette(len(labels))
    hex_colours = {label: f"#{bytes(colours[i]).hex()}" for i, label in enumerate(labels)}
    _write_segmentation(
        args, picture, result.label_map, {"labels": labels, "colours": hex_colours, "scores": scores}
    )
    print(f"{'label':<24} {'colour':<9} {'mean p':>7} {'conf.':>6} {'area':>6}")
    for label in labels:
        score = scores[label]
        print(
            f"{label:<24} {hex_colours[label]:<9} {score['mean_probability']:>7.3f} "
            f"{score['confidence']:>6.3f} {score['area']:>6.1%}"
        )


def run_head_segment(args: argparse.Namespace) -> None:
    """The classes of a DPT segmentation head (released: ADE20K, 150 classes) for one image."""
    from tipstorch.eval.dense_predict import class_areas, predict_segmentation, segmentation_class_names
    from tipstorch.viz import class_map_figure, palette

    model, _ = model_from_args(args)
    head = _head(args, "segmentation")
    names = segmentation_class_names(head.head.out_features)
    image = open_image(args.image)
    with autocast(args):
        class_map = predict_segmentation(model, head, image, args.image_size)
    areas = class_areas(class_map, names)
    colours = palette(len(names))
    report = {
        "head": args.head,
        "classes": names,
        "scores": {
            name: {
                "class": names.index(name),
                "area": area,
                "colour": f"#{bytes(colours[names.index(name)]).hex()}",
            }
            for name, area in areas.items()
        },
    }
    _write_segmentation(args, class_map_figure(image, class_map, names), class_map, report)
    print(f"{len(areas)} of {len(names)} classes present; largest:")
    for name, area in list(areas.items())[:10]:
        print(f"  {name:<24} {area:>6.1%}")


def run_pca(args: argparse.Namespace) -> None:
    """PNG of each image beside the first three principal components of its patch tokens."""
    from tipstorch.eval.dense_predict import pca_map
    from tipstorch.viz import side_by_side

    model, _ = model_from_args(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in args.images:
        image = open_image(path)
        with autocast(args):
            try:
                result = pca_map(model, image, args.image_size, args.fg_threshold)
            except ValueError as error:
                raise SystemExit(f"error: {path}: {error}") from error
        colours = Image.fromarray(np.round(result.colours * 255).astype(np.uint8))
        target = out / f"{Path(path).stem}_pca.png"
        side_by_side([image, colours]).save(target)
        grid = f"{result.colours.shape[0]}x{result.colours.shape[1]} patches"
        if result.foreground is not None:
            grid += f", {int(result.foreground.sum())} foreground"
        print(f"wrote {target} ({grid})")


def run_demo(args: argparse.Namespace) -> None:
    """Serve the gradio demo (loopback by default)."""
    try:
        import gradio  # noqa: F401
    except ImportError as error:
        raise SystemExit("error: the demo needs gradio: pip install 'tipstorch[demo]'") from error
    from tipstorch.cli.demo import launch, prepare_demo_model

    demo_model = prepare_demo_model(
        args.model,
        args.random,
        {"segmentation": args.segmentation_head, "depth": args.depth_head, "normals": args.normals_head},
        args.device,
    )
    print(demo_model.description.replace("**", "").replace("`", ""), flush=True)
    print(f"serving on http://{args.host}:{args.port}", flush=True)
    launch(demo_model, args.host, args.port)


def add_dense_parsers(commands: argparse._SubParsersAction) -> None:
    """Add depth, normals, segment, pca and demo to a ``tipstorch`` subparsers object."""
    for task, what in (("depth", "depth in metres"), ("normals", "surface normals")):
        parser = commands.add_parser(
            task, help=f"{what} of images from a DPT head (PNG + .npy beside each image)"
        )
        parser.add_argument("images", nargs="+")
        parser.add_argument(
            "--head",
            default="released",
            help="'released' (the model's released DPT head), a probe saved by 'tipstorch eval "
            "--save-probes', a *_dpt.zip or a transformers tipsv2_dpt directory",
        )
        parser.add_argument("--out-dir", help="folder for the outputs (default: beside each image)")
        parser.add_argument(
            "--image-size", type=int, help="short side fed to the model (default: the model's)"
        )
        add_model_arguments(parser)
        parser.set_defaults(func=run_dense_map)

    segment = commands.add_parser(
        "segment", help="zero-shot segmentation of an image into text labels (PNG + JSON)"
    )
    segment.add_argument("image")
    classes = segment.add_mutually_exclusive_group(required=True)
    classes.add_argument("--labels", help='zero-shot: comma-separated class names, e.g. "sky,tree,road"')
    classes.add_argument(
        "--head",
        help="the classes of a DPT segmentation head instead: 'released' (the model's released ADE20K "
        "head, 150 classes), a *_segmentation_dpt.zip, a transformers tipsv2_dpt directory or a head file",
    )
    segment.add_argument(
        "--out",
        default="segmentation.png",
        help="picture; the class of each pixel goes to <out>.npy, per-class scores to <out>.json",
    )
    segment.add_argument("--image-size", type=int, help="short side and window size (default: the model's)")
    segment.add_argument(
        "--stride", type=int, help="zero-shot sliding-window stride (default: 3/4 of the window)"
    )
    add_model_arguments(segment)
    segment.set_defaults(func=run_segment)

    pca = commands.add_parser("pca", help="PNG maps of the first 3 principal components of the patch tokens")
    pca.add_argument("images", nargs="+")
    pca.add_argument("--out", default="pca", help="output folder (default: pca)")
    pca.add_argument("--image-size", type=int, help="short side fed to the model (default: the model's)")
    pca.add_argument(
        "--fg-threshold",
        type=float,
        help="keep patches whose first component (scaled to [0, 1]) exceeds this; PCA of those only",
    )
    add_model_arguments(pca)
    pca.set_defaults(func=run_pca)

    demo = commands.add_parser(
        "demo", help="web demo (gradio): segmentation, ADE20K classes, PCA, depth, normals, similarity"
    )
    demo.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)"
    )
    demo.add_argument("--port", type=int, default=7860)
    demo.add_argument(
        "--model",
        help="registered name, checkpoint path or URL (default: runs/tiny_cpu/final.safetensors "
        "if it exists, else a random tips-tiny)",
    )
    demo.add_argument("--random", action="store_true", help="random weights for a registered --model")
    demo.add_argument(
        "--depth-head", help="depth head file (default: released head for TIPSv2 names, else random)"
    )
    demo.add_argument("--normals-head", help="normals head file (default: as --depth-head)")
    demo.add_argument("--segmentation-head", help="ADE20K segmentation head file (default: as --depth-head)")
    demo.add_argument("--device", default="cpu")
    demo.set_defaults(func=run_demo)
