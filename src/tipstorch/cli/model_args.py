"""What every command that runs a model shares: ``--model`` / ``--random`` / ``--device`` / ``--bf16`` /
``--tokenizer``, the model they name, autocast, and reading images with one clear error."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from tipstorch.data import images
from tipstorch.data.transforms import image_transform
from tipstorch.models.tokenizer import LazyTokenizer
from tipstorch.weights.factory import create_model, get_tokenizer, load_model


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` / ``--random`` / ``--device`` / ``--bf16``, shared by every command that runs a model."""
    parser.add_argument("--model", default="tipsv2-b14",
                        help="registered name (official weights), checkpoint path or URL (default: tipsv2-b14)")
    parser.add_argument("--random", action="store_true", help="random weights for a registered name (no download)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="run under bfloat16 autocast")
    parser.add_argument("--tokenizer", help="SentencePiece .model path or URL (default: the model's own)")


def model_from_args(args: argparse.Namespace):
    """The model and tokenizer that ``--model`` / ``--random`` name, in eval mode on ``--device``. The
    tokenizer is loaded (perhaps downloaded) only when a text is first encoded."""
    if args.random:
        model = create_model(args.model, pretrained=False, device=args.device)
    else:
        model = load_model(args.model, device=args.device)
    return model, LazyTokenizer(lambda: get_tokenizer(args.tokenizer or model))


def autocast(args: argparse.Namespace):
    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.bf16)


def open_image(path: str):
    """The upright RGB PIL image in ``path``; exits with one clear error naming the file if it cannot be
    used (see ``tipstorch.data.images``: limits and how to raise them)."""
    try:
        return images.open_image(path)
    except images.ImageFileError as error:
        raise SystemExit(f"error: {error}") from None


def load_images(paths: Sequence[str], image_size: int, keep_aspect: bool) -> list[torch.Tensor]:
    """Decode and preprocess image files into tensors [3, H, W]."""
    transform = image_transform(image_size, keep_aspect=keep_aspect)
    return [transform(open_image(path)) for path in paths]
