"""``tipstorch models / encode / classify / pca / segment / convert``: running a model on images."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tipstorch.cli.model_args import add_model_arguments, autocast, load_images, model_from_args, open_image
from tipstorch.models.registry import get_model_spec, list_models


def parse_labels(text: str) -> list[str]:
    labels = [label.strip() for label in text.split(",") if label.strip()]
    if len(labels) < 2:
        raise SystemExit("error: --labels needs at least two comma-separated labels")
    return labels


def run_models(args: argparse.Namespace) -> None:
    print(f"{'name':<20} {'weights':<8} {'size':>5} {'width':>6} {'depth':>6} {'text':>5}  description")
    for name in list_models(pretrained=args.pretrained):
        spec = get_model_spec(name)
        vision, text = spec.config.vision, spec.config.text
        print(f"{name:<20} {'official' if spec.has_weights else 'random':<8} {spec.config.image_size:>5} "
              f"{vision.embed_dim:>6} {vision.depth:>6} {text.depth:>5}  {spec.description}")


def run_encode(args: argparse.Namespace) -> None:
    """Write global/spatial CLS and patch tokens of every image to one safetensors file."""
    from safetensors.torch import save_file

    model, _ = model_from_args(args)
    image_size = args.image_size or model.image_size
    images = load_images(args.images, image_size, args.keep_aspect)
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) > 1 and args.keep_aspect:
        raise SystemExit("error: --keep-aspect gave images of different sizes; encode them separately")
    outputs: dict[str, list[torch.Tensor]] = {"global_cls": [], "spatial_cls": [], "patch_tokens": []}
    with torch.inference_mode(), autocast(args):
        for start in tqdm(range(0, len(images), args.batch_size), desc="encode", unit="batch"):
            batch = torch.stack(images[start : start + args.batch_size]).to(args.device)
            features = model.encode_image(batch, normalize=args.normalize)
            for key in outputs:
                outputs[key].append(getattr(features, key).float().cpu())
    tensors = {key: torch.cat(parts).contiguous() for key, parts in outputs.items()}
    metadata = {"images": json.dumps(list(args.images)), "model": str(args.model), "image_size": str(image_size)}
    save_file(tensors, args.out, metadata=metadata)
    print(f"wrote {args.out}: " + ", ".join(f"{key} {list(value.shape)}" for key, value in tensors.items()))


def run_classify(args: argparse.Namespace) -> None:
    """Zero-shot classification of one image against comma-separated labels, as a ranked table."""
    from tipstorch.eval.templates import get_templates
    from tipstorch.eval.zeroshot import build_text_classifier

    labels = parse_labels(args.labels)
    model, tokenizer = model_from_args(args)
    image = load_images([args.image], args.image_size or model.image_size, keep_aspect=False)[0]
    with torch.inference_mode(), autocast(args):
        classifier = build_text_classifier(
            lambda ids: model.encode_text(ids.to(args.device)), tokenizer, labels, get_templates(args.templates)
        )
        features = model.encode_image(image[None].to(args.device), normalize=True)
        logits = (features.global_cls.float() @ classifier.float().T / model.temperature.float())[0]
    probabilities = logits.softmax(dim=-1)
    print(f"{'rank':>4}  {'label':<24} {'probability':>11}")
    for rank, index in enumerate(probabilities.argsort(descending=True).tolist(), start=1):
        print(f"{rank:>4}  {labels[index]:<24} {probabilities[index].item():>11.4f}")


def run_pca(args: argparse.Namespace) -> None:
    """PNG of each image beside the first three principal components of its patch tokens."""
    from PIL import Image

    from tipstorch.viz import colours_to_image, pca_rgb, side_by_side

    model, _ = model_from_args(args)
    images = load_images(args.images, args.image_size or model.image_size, args.keep_aspect)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path, image in zip(args.images, images, strict=True):
        with torch.inference_mode(), autocast(args):
            patch_tokens = model.encode_image(image[None].to(args.device)).patch_tokens[0]
        picture = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
        target = out / f"{Path(path).stem}_pca.png"
        side_by_side([picture, colours_to_image(pca_rgb(patch_tokens))]).save(target)
        print(f"wrote {target} ({patch_tokens.shape[0]}x{patch_tokens.shape[1]} patches)")


def run_segment(args: argparse.Namespace) -> None:
    """Zero-shot segmentation of an image into the given labels (official notebook protocol)."""
    from functools import partial

    from tipstorch.eval.zeroshot import (
        ZeroShotSegConfig,
        segment_image,
        segmentation_classifier,
        values_readout,
    )
    from tipstorch.viz import overlay_labels, palette, side_by_side

    labels = parse_labels(args.labels)
    model, tokenizer = model_from_args(args)
    config = ZeroShotSegConfig(short_side=args.image_size or model.image_size, window=args.image_size or model.image_size,
                               stride=args.stride or (args.image_size or model.image_size) * 3 // 4)
    image = open_image(args.image)
    with torch.inference_mode(), autocast(args):
        classifier = segmentation_classifier(lambda ids: model.encode_text(ids.to(args.device)), tokenizer, labels, config)
        label_map = segment_image(partial(values_readout, model.visual), image, classifier.float(), config)
    side_by_side([image, overlay_labels(image, label_map)]).save(args.out)
    colours = palette(len(labels))
    print(f"wrote {args.out}")
    print(f"{'label':<24} {'colour':<9} {'area':>6}")
    for index, label in enumerate(labels):
        area = (label_map == index).float().mean().item()
        print(f"{label:<24} #{bytes(colours[index]).hex():<8} {area:>6.1%}")


def run_convert(args: argparse.Namespace) -> None:
    """Write a model in another checkpoint format."""
    from tipstorch.weights.official import save_official
    from tipstorch.weights.tipstorch_file import save_model
    from tipstorch.weights.transformers import save_transformers

    model, _ = model_from_args(args)
    out = Path(args.out)
    if args.to == "tipstorch":
        save_model(model, out)
    elif args.to == "transformers":
        save_transformers(model, out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        save_official(model, out / f"{args.stem}_vision.npz", out / f"{args.stem}_text.npz")
    print(f"wrote {args.to} checkpoint to {out}")


def add_inference_parsers(commands: argparse._SubParsersAction) -> None:
    """Add ``models``, ``encode``, ``classify``, ``pca``, ``segment`` and ``convert`` to the ``tipstorch`` subparsers."""

    models = commands.add_parser("models", help="list the registered models")
    models.add_argument("--pretrained", action="store_true", help="only models with official weights")
    models.set_defaults(func=run_models)

    encode = commands.add_parser("encode", help="encode images into features (safetensors)")
    encode.add_argument("images", nargs="+")
    encode.add_argument("--out", required=True, help="output .safetensors file")
    encode.add_argument("--image-size", type=int, help="square input size (default: the model's)")
    encode.add_argument("--keep-aspect", action="store_true", help="short side to --image-size, centre crop to x14")
    encode.add_argument("--normalize", action="store_true", help="L2-normalise the features")
    encode.add_argument("--batch-size", type=int, default=8)
    add_model_arguments(encode)
    encode.set_defaults(func=run_encode)

    classify = commands.add_parser("classify", help="zero-shot classification of an image")
    classify.add_argument("image")
    classify.add_argument("--labels", required=True, help='comma-separated class names, e.g. "cat,dog,car"')
    classify.add_argument("--templates", default="imagenet80", help="prompt templates: imagenet80 (CLIP's 80) or tcl9")
    classify.add_argument("--image-size", type=int)
    add_model_arguments(classify)
    classify.set_defaults(func=run_classify)

    pca = commands.add_parser("pca", help="PNG maps of the first 3 principal components of the patch tokens")
    pca.add_argument("images", nargs="+")
    pca.add_argument("--out", default="pca", help="output folder (default: pca)")
    pca.add_argument("--image-size", type=int)
    pca.add_argument("--keep-aspect", action="store_true")
    add_model_arguments(pca)
    pca.set_defaults(func=run_pca)

    segment = commands.add_parser("segment", help="zero-shot segmentation of an image into text labels (PNG)")
    segment.add_argument("image")
    segment.add_argument("--labels", required=True, help='comma-separated class names, e.g. "sky,tree,road"')
    segment.add_argument("--out", default="segmentation.png")
    segment.add_argument("--image-size", type=int, help="short side and window size (default: the model's)")
    segment.add_argument("--stride", type=int, help="sliding-window stride (default: 3/4 of the window)")
    add_model_arguments(segment)
    segment.set_defaults(func=run_segment)

    convert = commands.add_parser("convert", help="write a model as tipstorch safetensors, transformers or official npz")
    convert.add_argument("--to", choices=["tipstorch", "transformers", "official"], required=True)
    convert.add_argument("--out", required=True, help=".safetensors file (tipstorch) or directory (transformers, official)")
    convert.add_argument("--stem", default="model", help="official npz file stem: <stem>_vision.npz, <stem>_text.npz")
    add_model_arguments(convert)
    convert.set_defaults(func=run_convert)
