"""Reading, checking and atomically writing weight files (npz, safetensors), format-independent.

Every file is read without unpickling (``np.load(allow_pickle=False)``, safetensors). A key that is
missing, unexpected or of the wrong shape raises :class:`CheckpointError` naming the file, the key,
and the expected and found shapes.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint file is unreadable or does not fit the model."""


def read_npz(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All arrays of an npz file as float/int tensors, read with ``allow_pickle=False``."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: torch.from_numpy(np.array(archive[key])) for key in archive.files}
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError) as error:
        size = path.stat().st_size if path.exists() else 0
        raise CheckpointError(f"{path}: cannot be read as an npz archive ({size} bytes; truncated?): {error}") from error


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a safetensors file."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot be read as safetensors (truncated?): {error}") from error


def load_checked(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``module`` after checking that keys and shapes match exactly."""
    expected = module.state_dict()
    problems = [f"missing key {key} (expected shape {list(expected[key].shape)})" for key in expected if key not in state]
    problems += [f"unexpected key {key} (shape {list(state[key].shape)})" for key in state if key not in expected]
    problems += [
        f"key {key}: expected shape {list(expected[key].shape)}, found {list(state[key].shape)}"
        for key in expected
        if key in state and expected[key].shape != state[key].shape
    ]
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CheckpointError(f"{source} does not fit the model:\n  {shown}")
    module.load_state_dict({key: value.to(expected[key].dtype) for key, value in state.items()})


def require_key(state: dict[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"{source}: missing key {key}")
    return state[key]


def atomic_write(path: Path, write) -> None:
    """Call ``write(temporary_path)`` then rename it to ``path``, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
