"""The ``tipstorch`` command: every subcommand, its argument parsing, printing and exit status.

The library packages below (models, weights, data, train, eval, engine) never parse arguments,
print tables or exit; each command group here composes them: ``inference`` (models, encode, classify,
convert), ``dense`` (depth, normals, segment, pca, demo), ``data`` (write-shards), ``engine`` (curate,
caption), ``train`` (training + the quick evaluation) and ``eval``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from tipstorch.cli.data import add_data_parser
from tipstorch.cli.dense import add_dense_parsers
from tipstorch.cli.engine import add_engine_parsers
from tipstorch.cli.eval import add_eval_parser
from tipstorch.cli.inference import add_inference_parsers
from tipstorch.cli.train import add_train_parser
from tipstorch.weights.cache import DownloadError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tipstorch", description="TIPS / TIPSv2 image-text encoders in PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)
    add_inference_parsers(commands)
    add_data_parser(commands)
    add_engine_parsers(commands)
    add_train_parser(commands)
    add_eval_parser(commands)
    add_dense_parsers(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``tipstorch`` console script."""
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
    except DownloadError as error:
        raise SystemExit(f"error: {error}") from None
    if isinstance(status, int) and status:
        raise SystemExit(status)

