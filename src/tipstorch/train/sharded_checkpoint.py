"""Sharded training checkpoints (FSDP): ``torch.distributed.checkpoint`` (DCP) directories, written atomically.

A sharded checkpoint is a directory: the DCP files of every rank (each rank writes its own shards of
the student, the EMA teacher and the optimiser state; replicated tensors such as the centres once) and
``meta.pt``, the rest of the state (step, RNG states, data position, config; weights-only loadable).
Files of a run directory, next to (or instead of) the single-file ``last.pt`` of ``run_state.py``:

- ``last.dcp/``: written as ``.last.dcp.tmp/`` by all ranks, completed by rank 0 with ``meta.pt``, then
  renamed; the former ``last.dcp/`` is renamed ``previous.dcp/`` first. A crash at any instant leaves a
  complete ``last.dcp/`` or ``previous.dcp/`` (``run_state.load_checkpoint`` falls back to it);
- ``step-<N>.dcp/``: permanent copies (hard links) every ``loop.keep_every`` steps.

Every rank must see the same run directory (a shared file system on several nodes). DCP reshards on
load: a checkpoint written by W ranks resumes on any number of ranks, with FSDP, DDP or one process.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

SHARDED_LAST = "last.dcp"
SHARDED_PREVIOUS = "previous.dcp"
META = "meta.pt"
SHARDED_KEY = "sharded"  # the state read from meta.pt names its directory under this key


def sharded_kept_name(step: int) -> str:
    return f"step-{step}.dcp"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _link_tree(source: Path, target: Path) -> None:
    """A copy of directory ``source`` made of hard links (plain copies where links are refused)."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link)


def save_sharded(
    tensors: dict[str, Any], meta: dict[str, Any], directory: str | os.PathLike, is_main: bool, keep: bool = False
) -> Path:
    """Collective: write ``tensors`` (state dicts whose values may be DTensor shards) with DCP and ``meta``
    as ``directory/last.dcp``, atomically (see the module docstring). Returns the path of ``last.dcp``."""
    directory = Path(directory)
    temporary, last, previous = directory / f".{SHARDED_LAST}.tmp", directory / SHARDED_LAST, directory / SHARDED_PREVIOUS
    if is_main:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    _barrier()
    dcp.save(tensors, checkpoint_id=temporary)  # returns once every rank's shards and the metadata are written
    if is_main:
        torch.save(meta, temporary / META)
        if last.exists():
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(last, previous)
        os.replace(temporary, last)
        if keep:
            kept = directory / sharded_kept_name(int(meta["step"]))
            shutil.rmtree(kept, ignore_errors=True)
            _link_tree(last, kept)
    _barrier()
    return last


def load_sharded(tensors: dict[str, Any], directory: str | os.PathLike) -> None:
    """Collective: fill ``tensors`` (this run's state dicts, sharded or whole) in place from a DCP directory;
    DCP reads whichever rows each rank holds, whatever the world size that wrote them."""
    dcp.load(tensors, checkpoint_id=Path(directory))


def is_sharded_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / META).is_file() and (path / ".metadata").is_file()
