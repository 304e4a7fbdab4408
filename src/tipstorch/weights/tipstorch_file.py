"""tipstorch's own checkpoint file: one safetensors file holding our state dict, with the model config
stored in the file's metadata (written by ``save_model`` and ``tipstorch train``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from tipstorch.models.tips import TIPSConfig, TIPSModel
from tipstorch.weights.state_io import CheckpointError, atomic_write, load_checked, read_safetensors

TIPSTORCH_FORMAT = "tipstorch"



def save_model(model: TIPSModel, path: str | os.PathLike) -> Path:
    """Write a TIPSModel as one safetensors file, config in the metadata; atomic."""
    return save_model_state(model.config, model.state_dict(), path)


def save_model_state(config: TIPSConfig, state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write the weights ``state`` of a TIPSModel of ``config`` (e.g. gathered from FSDP shards) as
    ``save_model`` does."""
    path = Path(path)
    metadata = {"format": TIPSTORCH_FORMAT, "config": json.dumps(config.to_dict())}
    tensors = {key: value.detach().contiguous() for key, value in state.items()}
    atomic_write(path, lambda target: save_file(tensors, target, metadata=metadata))
    return path


def load_tipstorch(path: str | os.PathLike) -> TIPSModel:
    state, metadata = read_safetensors(path)
    if metadata.get("format") != TIPSTORCH_FORMAT:
        raise CheckpointError(f"{path}: not a tipstorch safetensors file (no tipstorch metadata)")
    model = TIPSModel(TIPSConfig(**json.loads(metadata["config"])))
    load_checked(model, state, str(path))
    return model


def is_tipstorch_file(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("format") == TIPSTORCH_FORMAT
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot be read as safetensors (truncated?): {error}") from error
