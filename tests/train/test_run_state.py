"""Checkpoint files: atomic writes, rotation, weights-only loading, RNG states, signal guard."""

import random
import signal

import numpy as np
import pytest
import torch

from tipstorch.train import run_state
from tipstorch.train.run_state import (
    LAST,
    PREVIOUS,
    StopOnSignal,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from tipstorch.weights.state_io import CheckpointError


def state(step: int) -> dict:
    return {"step": step, "weights": torch.full((3,), float(step)), "config": {"name": "x", "sizes": (1, 2)}}


def test_saving_keeps_the_former_last_as_previous(tmp_path):
    save_checkpoint(state(1), tmp_path)
    save_checkpoint(state(2), tmp_path)
    assert load_checkpoint(tmp_path / LAST)[0]["step"] == 2
    assert load_checkpoint(tmp_path / PREVIOUS)[0]["step"] == 1


def test_a_write_that_fails_midway_leaves_the_last_checkpoint_intact_and_no_partial_file(tmp_path, monkeypatch):
    save_checkpoint(state(1), tmp_path)

    def broken_save(obj, path):
        with open(path, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(run_state.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(state(2), tmp_path)
    assert load_checkpoint(tmp_path)[0]["step"] == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == [LAST, PREVIOUS]


def test_checkpoints_load_weights_only(tmp_path):
    save_checkpoint(state(3), tmp_path)
    loaded = torch.load(tmp_path / LAST, weights_only=True)
    assert loaded["config"] == {"name": "x", "sizes": (1, 2)} and loaded["format"] == run_state.FORMAT


class Payload:
    """Any class: unpickling it would run code chosen by the file's author."""


def test_a_pickled_object_is_refused(tmp_path):
    torch.save({"format": run_state.FORMAT, "version": run_state.VERSION, "payload": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil\.pt: cannot be read as a training checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")


def test_other_files_are_named_as_not_training_checkpoints(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"model\.pt: not a tipstorch training checkpoint"):
        load_checkpoint(tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="no last.pt, last.dcp, previous.pt or previous.dcp"):
        load_checkpoint(tmp_path)


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    saved = rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    save_checkpoint({"step": 0, "rng": saved}, tmp_path)
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    set_rng_state(load_checkpoint(tmp_path)[0]["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_rank_rows_select_each_rank_generator():
    torch.manual_seed(5)
    row0 = torch.get_rng_state()
    torch.manual_seed(6)
    row1 = torch.get_rng_state()
    saved = rng_state(lambda tensor: torch.stack([row0, row1]))
    set_rng_state(saved, rank=1)
    assert torch.equal(torch.get_rng_state(), row1)


def test_first_signal_is_recorded_and_the_second_gets_the_previous_handler():
    with StopOnSignal() as stop:
        signal.raise_signal(signal.SIGINT)
        assert (stop.requested, stop.signal_number) == ("SIGINT", signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
