"""Training checkpoints (everything a killed run needs to continue exactly) and the stop-on-signal guard.

A checkpoint is one ``torch.save`` file holding only tensors, dicts, lists, tuples, numbers and strings,
so ``torch.load(weights_only=True)`` reads it (no pickled code): the student (model + heads), the
teacher, the loss centres, the optimiser, the step, the RNG states (torch, CUDA, numpy, python), the
data position and the config. Files of a run directory:

- ``last.pt``: the newest checkpoint, written to a temporary file and renamed (``atomic_write``);
- ``previous.pt``: the one before it, the fallback when ``last.pt`` is missing or unreadable;
- ``step-<N>.pt``: permanent copies every ``loop.keep_every`` steps;
- ``final.safetensors``: the trained model for ``tipstorch.load_model`` (written by the loop).

Under FSDP the checkpoints are sharded directories instead (``last.dcp/``, ``previous.dcp/``,
``step-<N>.dcp/``, see ``sharded_checkpoint.py``); ``load_checkpoint`` reads either kind.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import shutil
import signal
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch

from tipstorch.train.sharded_checkpoint import (
    META,
    SHARDED_KEY,
    SHARDED_LAST,
    SHARDED_PREVIOUS,
    is_sharded_checkpoint,
)
from tipstorch.weights.state_io import CheckpointError, atomic_write

logger = logging.getLogger("tipstorch.train")

FORMAT = "tipstorch-train"
VERSION = 2  # 2: optimiser state keyed by parameter name (torch.distributed.checkpoint.state_dict)
LAST = "last.pt"
PREVIOUS = "previous.pt"
FINAL = "final.safetensors"


def kept_name(step: int) -> str:
    return f"step-{step}.pt"


def _one_row(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.unsqueeze(0)


# ---------------------------------------------------------------------------------------------- RNG


def rng_state(gather: Callable[[torch.Tensor], torch.Tensor] = _one_row) -> dict[str, Any]:
    """The global RNG states as weights-only-loadable values. ``gather`` stacks a per-rank state into
    [world_size, n] (``distributed.gather_rows``), so the torch / CUDA generators of every rank are kept;
    numpy and python (unused by the step) are this rank's."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": gather(torch.get_rng_state()),
        "cuda": gather(torch.cuda.get_rng_state()) if torch.cuda.is_available() else None,
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
                  "has_gauss": has_gauss, "cached_gaussian": cached_gaussian},
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any], rank: int = 0) -> None:
    """Restore the states written by ``rng_state``; ``rank`` picks the torch / CUDA row (the last row when
    the run had fewer ranks, with a warning: the random streams then differ from the saved run)."""
    rows = state["torch"]
    if rank >= rows.shape[0]:
        logger.warning("checkpoint holds RNG states of %d rank(s); rank %d reuses the last", rows.shape[0], rank)
    row = min(rank, rows.shape[0] - 1)
    torch.set_rng_state(rows[row].clone())  # a row view (storage offset) would be misread
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][min(rank, state["cuda"].shape[0] - 1)].clone())
    numpy = state["numpy"]
    np.random.set_state(
        (numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["position"], numpy["has_gauss"],
         numpy["cached_gaussian"])
    )
    random.setstate(state["python"])


# ---------------------------------------------------------------------------------------------- files


def _link_or_copy(source: Path, target: str) -> None:
    """Make ``target`` hold ``source``'s bytes: a hard link when the file system allows it, else a copy."""
    os.unlink(target)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def save_checkpoint(state: dict[str, Any], directory: str | os.PathLike, keep: bool = False) -> Path:
    """Write ``state`` as ``directory/last.pt``; the former ``last.pt`` becomes ``previous.pt`` first, so
    at every instant both hold complete checkpoints. With ``keep`` also as the permanent ``step-<N>.pt``.
    Returns the path of ``last.pt``."""
    directory = Path(directory)
    last = directory / LAST
    state = {"format": FORMAT, "version": VERSION} | state
    if last.exists():
        atomic_write(directory / PREVIOUS, lambda path: _link_or_copy(last, path))
    atomic_write(last, lambda path: torch.save(state, path))
    if keep:
        atomic_write(directory / kept_name(state["step"]), lambda path: _link_or_copy(last, path))
    return last


def _read(path: Path) -> dict[str, Any]:
    """A checkpoint file, or a sharded checkpoint's ``meta.pt`` (the tensors stay in the directory, named
    under ``SHARDED_KEY`` for the trainer to load into its sharded modules)."""
    if path.is_dir():
        if not is_sharded_checkpoint(path):
            raise CheckpointError(f"{path}: not a complete sharded checkpoint (no {META} or .metadata)")
        return _read(path / META) | {SHARDED_KEY: str(path)}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"{path}: cannot be read as a training checkpoint (truncated?): {error}") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a tipstorch training checkpoint (format {FORMAT!r} expected)")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path}: training checkpoint version {state.get('version')}, expected {VERSION}")
    return state


def _newest_first(paths: list[Path]) -> list[Path]:
    return sorted((path for path in paths if path.exists()), key=lambda path: path.stat().st_mtime, reverse=True)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """Read a training checkpoint: a ``.pt`` file, a sharded ``.dcp`` directory, or a run directory (its
    newest of ``last.pt`` / ``last.dcp``, falling back to ``previous.pt`` / ``previous.dcp`` when it is
    missing or unreadable). Returns (state, the path read); a sharded state holds no tensors but the
    directory under ``SHARDED_KEY``."""
    path = Path(path)
    if path.suffix == ".dcp" or is_sharded_checkpoint(path):
        return _read(path), path
    if not path.is_dir():
        if not path.is_file():
            raise CheckpointError(f"training checkpoint not found: {path}")
        return _read(path), path
    candidates = _newest_first([path / LAST, path / SHARDED_LAST]) + _newest_first(
        [path / PREVIOUS, path / SHARDED_PREVIOUS]
    )
    for index, candidate in enumerate(candidates):
        try:
            return _read(candidate), candidate
        except CheckpointError as error:
            if index == len(candidates) - 1:
                raise
            logger.warning("%s; falling back to %s", error, candidates[index + 1])
    raise CheckpointError(f"{path}: no {LAST}, {SHARDED_LAST}, {PREVIOUS} or {SHARDED_PREVIOUS} to resume from")


# ---------------------------------------------------------------------------------------------- signals


class StopOnSignal:
    """Context manager: on the first SIGTERM or SIGINT, record it (``requested`` becomes its name) so the
    loop can finish its step, checkpoint and exit; a second one gets the default behaviour (kill /
    KeyboardInterrupt). Outside the main thread signals cannot be caught and nothing is installed."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: str | None = None
        self.signal_number: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, number: int, frame: FrameType | None) -> None:
        self.requested, self.signal_number = signal.Signals(number).name, number
        signal.signal(number, self._previous.get(number, signal.SIG_DFL))
        logger.warning("%s received: finishing the current step, then writing a checkpoint", self.requested)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}
