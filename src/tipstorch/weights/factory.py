"""Public constructors: ``create_model``, ``load_model`` and ``get_tokenizer`` (timm / open_clip style)."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import torch

from tipstorch.models.registry import get_model_spec, list_models
from tipstorch.models.tips import TIPSConfig, TIPSModel
from tipstorch.models.tokenizer import OFFICIAL_TOKENIZER, OFFICIAL_TOKENIZER_URL, SCENES_TOKENIZER, Tokenizer
from tipstorch.weights import cache
from tipstorch.weights.official import load_official, text_path_for
from tipstorch.weights.state_io import CheckpointError
from tipstorch.weights.tipstorch_file import is_tipstorch_file, load_tipstorch
from tipstorch.weights.transformers import load_transformers


def _place(model: TIPSModel, device: str | torch.device | None, dtype: torch.dtype | None) -> TIPSModel:
    model = model.to(device=device, dtype=dtype) if (device or dtype) else model
    return model.eval()


def create_model(
    name: str,
    pretrained: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> TIPSModel:
    """A registered model (see ``list_models()``), randomly initialised or with its official weights
    (downloaded to the cache on first use). Returned in eval mode."""
    spec = get_model_spec(name)
    if not pretrained:
        return _place(TIPSModel(spec.config), device, dtype)
    if not spec.has_weights:
        raise ValueError(
            f"model {name!r} has no official weights; use pretrained=False or one of {list_models(pretrained=True)}"
        )
    vision = cache.download(spec.vision_url)
    text = cache.download(spec.text_url)
    return _place(load_official(vision, text, spec.config), device, dtype)


def load_model(
    path_or_url: str | os.PathLike,
    text_path: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    config: TIPSConfig | None = None,
) -> TIPSModel:
    """Load a model from a registered name, a file, a directory or an http(s) URL.

    Understood: an official ``*_vision.npz`` (its ``*_text.npz`` is found beside it, or pass
    ``text_path``); a transformers Tipsv2 directory or its ``model.safetensors`` (with ``config.json``
    beside it); a tipstorch ``.safetensors`` file (written by ``save_model`` or ``tipstorch train``).
    npz files hold no config: it is inferred from the shapes of the released sizes, or pass ``config``.
    """
    text = str(path_or_url)
    if not text.startswith(("http://", "https://")) and not Path(text).exists() and "/" not in text:
        return create_model(text, pretrained=True, device=device, dtype=dtype)
    local = cache.resolve(path_or_url)
    if local.suffix == ".npz":
        text_source = str(text_path) if text_path is not None else text_path_for(text)
        model = load_official(local, cache.resolve(text_source), config)
    elif local.is_dir():
        if (local / "config.json").exists():
            model = load_transformers(local)
        else:
            raise CheckpointError(f"{local}: directory without config.json is not a known checkpoint")
    elif local.suffix == ".safetensors":
        loader = load_tipstorch if is_tipstorch_file(local) else load_transformers
        model = loader(local)
    else:
        raise CheckpointError(
            f"{local}: unknown checkpoint format (expected .npz, .safetensors or a transformers directory)"
        )
    return _place(model, device, dtype)


def scenes_tokenizer_path() -> Path:
    """The small SentencePiece model for the built-in scenes data, shipped with the package."""
    return Path(str(resources.files("tipstorch") / "assets" / "scenes_tokenizer.model"))


def get_tokenizer(source: str | os.PathLike | TIPSModel, context_length: int = 64) -> Tokenizer:
    """The tokenizer of a model, of a registered model name, or read from a SentencePiece ``.model``
    path or URL. The official one (32k pieces) is downloaded to the cache on first use."""
    if isinstance(source, TIPSModel):
        source = source.config.tokenizer
    elif str(source) in list_models():
        source = get_model_spec(str(source)).config.tokenizer
    source = str(source)
    if source == SCENES_TOKENIZER:
        return Tokenizer(scenes_tokenizer_path(), context_length)
    if source == OFFICIAL_TOKENIZER:
        return Tokenizer(cache.download(OFFICIAL_TOKENIZER_URL), context_length)
    return Tokenizer(cache.resolve(source), context_length)
