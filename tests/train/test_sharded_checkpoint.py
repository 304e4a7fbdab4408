"""Sharded (DCP) checkpoints: written atomically, read back, the previous one kept for a crash mid-write."""

import os

import pytest
import torch

from tipstorch.train import sharded_checkpoint
from tipstorch.train.init import load_starting_point
from tipstorch.train.run_state import FORMAT, VERSION, load_checkpoint
from tipstorch.train.sharded_checkpoint import SHARDED_KEY, load_sharded, save_sharded
from tipstorch.weights.state_io import CheckpointError


def write(directory, step: int, keep: bool = False):
    tensors = {"student": {"weight": torch.full((3, 2), float(step))}, "loss": {"center": torch.arange(4.0) + step}}
    meta = {"format": FORMAT, "version": VERSION, "step": step}
    return save_sharded(tensors, meta, directory, is_main=True, keep=keep)


def read_weight(path) -> torch.Tensor:
    tensors = {"student": {"weight": torch.zeros(3, 2)}, "loss": {"center": torch.zeros(4)}}
    load_sharded(tensors, path)
    return tensors["student"]["weight"]


def test_the_newest_checkpoint_is_read_and_the_one_before_is_kept(tmp_path):
    write(tmp_path, 1)
    write(tmp_path, 2, keep=True)
    state, path = load_checkpoint(tmp_path)
    assert (state["step"], path.name) == (2, "last.dcp") and state[SHARDED_KEY] == str(path)
    assert torch.equal(read_weight(path), torch.full((3, 2), 2.0))
    assert torch.equal(read_weight(tmp_path / "previous.dcp"), torch.full((3, 2), 1.0))
    assert load_checkpoint(tmp_path / "step-2.dcp")[0]["step"] == 2
    assert not (tmp_path / ".last.dcp.tmp").exists()


def test_a_crash_while_writing_leaves_the_last_checkpoint_untouched(tmp_path, monkeypatch):
    write(tmp_path, 1)

    def crash(tensors, checkpoint_id):
        (checkpoint_id / "__0_0.distcp").write_bytes(b"half a shard")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(sharded_checkpoint.dcp, "save", crash)
    with pytest.raises(RuntimeError, match="killed"):
        write(tmp_path, 2)
    state, path = load_checkpoint(tmp_path)
    assert (state["step"], path.name) == (1, "last.dcp")
    assert torch.equal(read_weight(path), torch.full((3, 2), 1.0))


def test_a_crash_between_the_renames_falls_back_to_the_previous_checkpoint(tmp_path):
    write(tmp_path, 1)
    write(tmp_path, 2)
    os.replace(tmp_path / "last.dcp", tmp_path / ".last.dcp.tmp")  # last.dcp -> previous.dcp done, not tmp -> last
    state, path = load_checkpoint(tmp_path)
    assert (state["step"], path.name) == (1, "previous.dcp")


def test_an_incomplete_sharded_directory_is_refused_by_name(tmp_path):
    (tmp_path / "last.dcp").mkdir()
    with pytest.raises(CheckpointError, match=r"last\.dcp: not a complete sharded checkpoint"):
        load_checkpoint(tmp_path / "last.dcp")


def test_a_sharded_checkpoint_cannot_start_a_new_run(tmp_path):
    write(tmp_path, 1)
    with pytest.raises(CheckpointError, match=r"sharded \(FSDP\) training checkpoint cannot start a new run"):
        load_starting_point(str(tmp_path))
