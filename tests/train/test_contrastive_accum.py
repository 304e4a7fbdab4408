"""Gradient accumulation with cached contrastive embeddings equals one full-batch step."""

import copy

import pytest
import torch

from tests.helpers import assert_close_to_scale
from tests.train.train_fakes import (
    accumulated_tips_step,
    make_batch,
    make_student,
    tips_loss,
)
from tipstorch.train.contrastive_accum import scale_gradient, splice, split_batch
from tipstorch.train.outputs import ContrastiveEmbeddings
from tipstorch.train.teacher import EMATeacher


def run_step(student, teacher, loss, batch, micro_batches, **kwargs):
    student.zero_grad(set_to_none=True)
    parts = accumulated_tips_step(student, teacher, loss, batch, micro_batches, **kwargs)
    return parts, {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}


def twin_setups(**weights):
    """Two identical (student, teacher, loss) triples, centres set to the same non-zero values."""
    student = make_student()
    setups = []
    for copy_of in (student, copy.deepcopy(student)):
        loss = tips_loss(**weights)
        for term in (loss.dino, loss.ibot):
            if term is not None:
                term.centering.center.copy_(torch.linspace(-0.5, 0.5, term.centering.center.numel()))
        setups.append((copy_of, EMATeacher(copy_of.parts(), mode="full"), loss))
    return setups


@pytest.mark.parametrize("micro_batches", [2, 4])
def test_accumulated_contrastive_gradients_equal_full_batch_gradients(micro_batches):
    (s1, t1, l1), (s2, t2, l2) = twin_setups(dino=0.0, ibot=0.0)
    batch = make_batch(batch=8)
    full_parts, full_grads = run_step(s1, t1, l1, batch, 1)
    accum_parts, accum_grads = run_step(s2, t2, l2, batch, micro_batches)
    assert accum_grads.keys() == full_grads.keys() and "temperature" in full_grads
    for name, grad in full_grads.items():
        assert_close_to_scale(accum_grads[name], grad, msg=name)
    torch.testing.assert_close(accum_parts["total"], full_parts["total"])


def test_accumulated_tips_step_matches_full_batch_gradients_parts_and_centres():
    (s1, t1, l1), (s2, t2, l2) = twin_setups()
    batch = make_batch(batch=6)
    full_parts, full_grads = run_step(s1, t1, l1, batch, 1)
    accum_parts, accum_grads = run_step(s2, t2, l2, batch, 3)
    assert accum_grads.keys() == full_grads.keys() == dict(s1.named_parameters()).keys()
    for name, grad in full_grads.items():
        assert_close_to_scale(accum_grads[name], grad, msg=name)
    for name, value in full_parts.items():
        assert_close_to_scale(accum_parts[name], value, msg=name)
    torch.testing.assert_close(l2.dino.centering.center, l1.dino.centering.center)
    torch.testing.assert_close(l2.ibot.centering.center, l1.ibot.centering.center)


def test_returned_parts_are_named_and_detached():
    (student, teacher, loss), _ = twin_setups()
    parts, _ = run_step(student, teacher, loss, make_batch(), 2)
    assert set(parts) == {"clip_global", "clip_spatial", "dino", "ibot", "total"}
    assert not any(value.requires_grad for value in parts.values())


def test_bf16_autocast_step_runs_and_fills_gradients():
    (student, teacher, loss), _ = twin_setups()
    parts, grads = run_step(student, teacher, loss, make_batch(), 2, autocast_dtype=torch.bfloat16)
    assert torch.isfinite(parts["total"])
    assert all(torch.isfinite(grad).all() and grad.abs().sum() > 0 for grad in grads.values())


def test_no_sync_wraps_all_micro_steps_but_the_last():
    (student, teacher, loss), _ = twin_setups()
    entered = []

    class Recorder:
        def __enter__(self):
            entered.append(True)

        def __exit__(self, *exc):
            return False

    run_step(student, teacher, loss, make_batch(), 4, no_sync=Recorder)
    assert len(entered) == 3


def test_splice_replaces_only_the_current_micro_batch():
    cache = [ContrastiveEmbeddings(global_cls=torch.zeros(2, 1)), ContrastiveEmbeddings(global_cls=torch.ones(1, 1)),
             ContrastiveEmbeddings(global_cls=torch.full((2, 1), 2.0))]
    full = splice(cache, 1, ContrastiveEmbeddings(global_cls=torch.full((1, 1), 9.0)))
    assert full.global_cls.flatten().tolist() == [0.0, 0.0, 9.0, 2.0, 2.0]


def test_scale_gradient_keeps_value_and_scales_gradient():
    value = torch.tensor(3.0, requires_grad=True)
    scaled = scale_gradient(value, 0.25)
    (scaled * 2.0).backward()
    assert scaled.item() == 3.0
    assert value.grad.item() == pytest.approx(0.5)


def test_split_batch_cuts_tensors_and_lists_alike():
    batch = {"global_crop": torch.arange(6).reshape(6, 1), "synthetic_source": list("abcdef")}
    micro = split_batch(batch, 3)
    assert [m["global_crop"].flatten().tolist() for m in micro] == [[0, 1], [2, 3], [4, 5]]
    assert [m["synthetic_source"] for m in micro] == [["a", "b"], ["c", "d"], ["e", "f"]]


def test_split_batch_rejects_a_batch_that_does_not_divide():
    with pytest.raises(ValueError, match="multiple of 4"):
        split_batch({"global_crop": torch.zeros(6, 1)}, 4)
