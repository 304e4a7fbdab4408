"""The official PyTorch npz checkpoints of google-deepmind/tips (``pytorch/``): one file for the vision
tower, one for the text tower, whose ``temperature`` scalar divides cosine similarities. Key names
equal our module names; npz files hold no config, so it is inferred from the shapes.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import torch

from tipstorch.models.registry import heads_for_width
from tipstorch.models.text import TextConfig
from tipstorch.models.tips import TIPSConfig, TIPSModel
from tipstorch.models.vit import VisionConfig
from tipstorch.weights.state_io import CheckpointError, atomic_write, load_checked, read_npz, require_key

TEMPERATURE_KEY = "temperature"


def _count_indexed(state: dict[str, torch.Tensor], pattern: str) -> int:
    indices = {int(match.group(1)) for key in state if (match := re.fullmatch(pattern, key))}
    return max(indices) + 1 if indices else 0


def infer_vision_config(state: dict[str, torch.Tensor], source: str) -> VisionConfig:
    """A VisionConfig from the shapes of an official-layout vision state dict."""
    width = require_key(state, "cls_token", source).shape[-1]
    depth = _count_indexed(state, r"blocks\.(\d+)\.norm1\.weight")
    swiglu = "blocks.0.mlp.w12.weight" in state
    hidden_key = "blocks.0.mlp.w12.weight" if swiglu else "blocks.0.mlp.fc1.weight"
    hidden = require_key(state, hidden_key, source).shape[0] // (2 if swiglu else 1)
    grid = math.isqrt(require_key(state, "pos_embed", source).shape[1] - 1)
    return VisionConfig(
        embed_dim=width, depth=depth, num_heads=heads_for_width(width), mlp_hidden_dim=hidden,
        ffn="swiglu" if swiglu else "mlp", pos_grid=grid, layer_scale_init=1.0,
    )


def infer_text_config(state: dict[str, torch.Tensor], source: str) -> TextConfig:
    """A TextConfig from the shapes of an official-layout text state dict."""
    vocab, width = require_key(state, "token_embedding.weight", source).shape
    return TextConfig(
        width=width,
        depth=_count_indexed(state, r"transformer\.resblocks\.(\d+)\.ln_1\.weight"),
        num_heads=heads_for_width(width),
        mlp_dim=require_key(state, "transformer.resblocks.0.mlp.c_fc.weight", source).shape[0],
        vocab_size=vocab,
    )


def text_path_for(vision_path: str) -> str:
    """The official text-tower file that accompanies a ``*_vision.npz`` file (path or URL)."""
    if not vision_path.endswith("_vision.npz"):
        raise CheckpointError(
            f"{vision_path}: cannot find its text tower; official vision files end in _vision.npz, "
            "or pass the text file explicitly"
        )
    return vision_path[: -len("_vision.npz")] + "_text.npz"


def load_official(
    vision_path: str | os.PathLike, text_path: str | os.PathLike, config: TIPSConfig | None = None
) -> TIPSModel:
    """Build a TIPSModel from the official PyTorch npz pair; the config is inferred if not given."""
    vision_state = read_npz(vision_path)
    text_state = read_npz(text_path)
    if "token_embedding.weight" in vision_state or "cls_token" in text_state:
        raise CheckpointError(f"{vision_path} / {text_path}: vision and text files are swapped")
    temperature = require_key(text_state, TEMPERATURE_KEY, str(text_path)).reshape(())
    text_state.pop(TEMPERATURE_KEY)
    text_state.pop("temperature_contrastive", None)
    if config is None:
        vision_config = infer_vision_config(vision_state, str(vision_path))
        config = TIPSConfig(
            vision=vision_config,
            text=infer_text_config(text_state, str(text_path)),
            image_size=vision_config.pos_grid * vision_config.patch_size,
        )
    model = TIPSModel(config)
    load_checked(model.visual, vision_state, str(vision_path))
    load_checked(model.text, text_state, str(text_path))
    with torch.no_grad():
        model.temperature.fill_(float(temperature))
    return model


def save_official(model: TIPSModel, vision_path: str | os.PathLike, text_path: str | os.PathLike) -> None:
    """Write a model as the official npz pair (float32 arrays, official key names)."""
    vision = {key: value.detach().float().cpu().numpy() for key, value in model.visual.state_dict().items()}
    text = {key: value.detach().float().cpu().numpy() for key, value in model.text.state_dict().items()}
    text[TEMPERATURE_KEY] = np.asarray(model.temperature.detach().float().cpu().numpy())
    atomic_write(Path(vision_path), lambda path: np.savez(path, **vision))
    atomic_write(Path(text_path), lambda path: np.savez(path, **text))

