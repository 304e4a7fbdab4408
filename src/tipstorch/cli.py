"""The ``tipstorch`` command: ``models``, ``encode``, ``classify``, ``convert`` and the subcommands of the
data, training, evaluation and dense-picture (``dense_commands``) modules."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tipstorch.models.registry import get_model_spec, list_models


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` / ``--random`` / ``--device`` / ``--bf16``, shared by every command that runs a model."""
    parser.add_argument("--model", default="tipsv2-b14",
                        help="registered name (official weights), checkpoint path or URL (default: tipsv2-b14)")
    parser.add_argument("--random", action="store_true", help="random weights for a registered name (no download)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="run under bfloat16 autocast")
    parser.add_argument("--tokenizer", help="SentencePiece .model path or URL (default: the model's own)")


def model_from_args(args: argparse.Namespace):
    """The model and tokenizer that ``--model`` / ``--random`` name, in eval mode on ``--device``."""
    from tipstorch.factory import create_model, get_tokenizer, load_model

    if args.random:
        model = create_model(args.model, pretrained=False, device=args.device)
    else:
        model = load_model(args.model, device=args.device)
    return model, get_tokenizer(args.tokenizer or model)


def autocast(args: argparse.Namespace):
    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.bf16)


def open_image(path: str):
    """The RGB PIL image in ``path``; exits with one clear error naming the file if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (FileNotFoundError, UnidentifiedImageError, OSError) as error:
        raise SystemExit(f"error: cannot read image {path}: {error}") from error


def load_images(paths: Sequence[str], image_size: int, keep_aspect: bool) -> list[torch.Tensor]:
    """Decode and preprocess image files into tensors [3, H, W]."""
    from tipstorch.data.transforms import image_transform

    transform = image_transform(image_size, keep_aspect=keep_aspect)
    return [transform(open_image(path)) for path in paths]


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


def run_convert(args: argparse.Namespace) -> None:
    """Write a model in another checkpoint format."""
    from tipstorch.checkpoints import save_model, save_official, save_transformers

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tipstorch", description="TIPS / TIPSv2 image-text encoders in PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)

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

    convert = commands.add_parser("convert", help="write a model as tipstorch safetensors, transformers or official npz")
    convert.add_argument("--to", choices=["tipstorch", "transformers", "official"], required=True)
    convert.add_argument("--out", required=True, help=".safetensors file (tipstorch) or directory (transformers, official)")
    convert.add_argument("--stem", default="model", help="official npz file stem: <stem>_vision.npz, <stem>_text.npz")
    add_model_arguments(convert)
    convert.set_defaults(func=run_convert)

    from tipstorch.data.commands import add_data_parser
    from tipstorch.dense_commands import add_dense_parsers
    from tipstorch.eval.commands import add_eval_parser
    from tipstorch.train.commands import add_train_parser

    add_data_parser(commands)
    add_train_parser(commands)
    add_eval_parser(commands)
    add_dense_parsers(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``tipstorch`` console script."""
    args = build_parser().parse_args(argv)
    status = args.func(args)
    if isinstance(status, int) and status:
        raise SystemExit(status)


if __name__ == "__main__":
    main(sys.argv[1:])
