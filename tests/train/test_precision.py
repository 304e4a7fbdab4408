"""bf16 compute weights over float32 master weights (``loop.bf16_mode=weights``, train/precision.py) on the
real TIPSStudent and loop: the losses of bf16 autocast, float32 masters, gradients and EMA teacher."""

import pytest
import torch
from torch import nn

from tests.helpers import assert_close_to_scale
from tests.train.loop_helpers import first, losses, tiny_trainer
from tests.train.test_student import HEADS, VALUES, real_batch, real_student
from tipstorch.train.losses import TIPSLoss
from tipstorch.train.precision import ComputeWeights
from tipstorch.train.step import forward_backward
from tipstorch.train.teacher import EMATeacher

BF16 = ("loop.bf16=true",)
WEIGHTS = (*BF16, "loop.bf16_mode=weights")
STEPS = 4


def twin_runs(tmp_path, *overrides: str):
    """The same steps on the same batches under bf16 autocast and on bf16 compute weights."""
    autocast = tiny_trainer(tmp_path / "autocast", *BF16, f"loop.steps={STEPS}", *overrides)
    batches = first(autocast.batches(), STEPS)
    weights = tiny_trainer(tmp_path / "weights", *WEIGHTS, f"loop.steps={STEPS}", *overrides)
    return autocast, losses(autocast.fit(batches).history), weights, losses(weights.fit(batches).history)


def test_bf16_weights_give_the_losses_of_bf16_autocast_over_several_steps(tmp_path):
    autocast, autocast_losses, weights, weights_losses = twin_runs(tmp_path)
    for step, (got, expected) in enumerate(zip(weights_losses, autocast_losses, strict=True)):
        for name in ("total", "clip_global", "clip_spatial", "dino", "ibot", "grad_norm"):
            # bf16 rounds to 8 bits (3e-3); the residual stream in bf16 instead of float32 adds a few roundings
            assert got[name] == pytest.approx(expected[name], rel=2e-2), (step, name)
    assert weights_losses != autocast_losses  # not the same path twice: the residual stream differs


def test_bf16_weights_run_the_blocks_in_bf16_without_autocast(tmp_path):
    trainer = tiny_trainer(tmp_path, *WEIGHTS, "loop.steps=1")
    seen = []

    def note(module: nn.Module, args: tuple) -> None:
        seen.append((module.qkv.weight.dtype, args[0].dtype, torch.is_autocast_enabled("cpu")))

    trainer.model.visual.blocks[0].attn.register_forward_pre_hook(note)
    trainer.fit()
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16, False)}
    # outside the step the module holds its float32 master
    assert trainer.model.visual.blocks[0].attn.qkv.weight.dtype == torch.float32


def test_the_optimizer_moves_the_float32_masters_by_less_than_bf16_resolves(tmp_path):
    """AdamW's first step moves every weight by about lr = 1e-6, far below bf16's spacing near the weights'
    values (~1e-4 at 0.02): only float32 masters updated from float32 gradients keep such a step."""
    tiny = ("optim.lr=1e-6", "optim.weight_decay=0", "optim.grad_clip_norm=0", "schedule.warmup_steps=0")
    trainer = tiny_trainer(tmp_path, *WEIGHTS, "loop.steps=1", *tiny)
    before = {name: value.detach().clone() for name, value in trainer.student.named_parameters()}
    trainer.fit()
    weight = dict(trainer.student.named_parameters())["model.visual.blocks.0.mlp.fc1.weight"]
    assert weight.dtype == weight.grad.dtype == torch.float32
    assert all(value.dtype == torch.float32 for value in trainer.student.parameters())
    after = dict(trainer.student.named_parameters())
    modules = trainer.student.named_modules()
    linears = [f"{name}.weight" for name, module in modules if isinstance(module, nn.Linear)]
    assert len(linears) > 10
    for name in linears:
        moved = (after[name].detach() - before[name]).abs()
        assert float(moved.max()) <= 1.1e-6, name  # one Adam step of lr: |update| <= lr
        assert float((moved > 0.5e-6).float().mean()) > 0.9, name  # and nearly every entry moved by ~lr


def test_the_ema_teacher_follows_the_float32_masters_not_their_bf16_copies(tmp_path):
    trainer = tiny_trainer(tmp_path, *WEIGHTS, "loop.steps=1", "optim.lr=1e-2", "schedule.warmup_steps=0")
    head = trainer.teacher.ema_parts["dino_head"]
    before = {name: value.detach().clone() for name, value in head.named_parameters()}
    momentum = trainer.fit().history[0]["teacher_momentum"]
    student = dict(trainer.student.dino_head.named_parameters())
    assert not torch.equal(student["mlp.0.weight"], before["mlp.0.weight"])  # the step moved the student
    for name, value in head.named_parameters():
        assert value.dtype == torch.float32
        expected = momentum * before[name] + (1 - momentum) * student[name].detach()
        # float32 EMA of float32 values: equal to float32 rounding; the bf16 copy is ~1e-3 away
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-9, msg=name)


def test_micro_batch_gradients_of_bf16_weights_accumulate_in_float32():
    """Each micro-batch's weight gradient is computed in bf16 and cast once: one micro-batch leaves
    bf16-representable values in the float32 ``.grad``, the sum of two leaves values bf16 cannot hold
    (a bf16 accumulation would round them), close to the one-batch gradient."""

    def step(micro_batches: int) -> dict[str, torch.Tensor]:
        student, cfg = real_student()
        teacher = EMATeacher(student.parts(), mode="heads")
        with ComputeWeights([student, teacher]).swapped():
            forward_backward(
                student, teacher, TIPSLoss(cfg, HEADS.num_prototypes), real_batch(), VALUES, micro_batches
            )
        return {name: value.grad for name, value in student.named_parameters() if value.grad is not None}

    def bf16_exact(grad: torch.Tensor) -> float:
        return float((grad.bfloat16().float() == grad).float().mean())

    full, accumulated = step(1), step(2)
    matmul_weights = [
        name
        for name in full
        if name.endswith("weight")
        and full[name].ndim == 2
        and "prototypes" not in name
        and "embedding" not in name
    ]
    assert len(matmul_weights) > 10
    for name in matmul_weights:
        assert full[name].dtype == accumulated[name].dtype == torch.float32, name
        assert bf16_exact(full[name]) == 1.0, name
        assert bf16_exact(accumulated[name]) < 0.8, name
        # bf16 activations of 2-row and 4-row micro-batches round apart: a few % of the gradient's scale
        assert_close_to_scale(accumulated[name], full[name], scale_tol=0.1, rtol=0.1, msg=name)


def test_compute_weights_leave_the_float32_parameters_of_a_module_alone():
    student, _ = real_student()
    weights = ComputeWeights([student])
    kept = {
        id(student.dino_head.prototypes.weight),
        id(student.ibot_head.prototypes.weight),
        id(student.model.temperature),
    }
    assert not kept & {id(master) for master in weights.masters}
    with weights.swapped():
        assert student.dino_head.prototypes.weight.dtype == student.model.temperature.dtype == torch.float32
        assert student.dino_head.mlp[0].weight.dtype == student.model.visual.pos_embed.dtype == torch.bfloat16


@pytest.mark.parametrize("native", [True, False])
def test_bf16_auto_follows_the_devices_bf16_matmuls(tmp_path, monkeypatch, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    auto = tiny_trainer(tmp_path / "auto", "loop.bf16=auto", "loop.steps=1")
    assert auto.bf16 is native
    assert auto.autocast_dtype == (torch.bfloat16 if native else None)
    forced = tiny_trainer(tmp_path / "forced", "loop.bf16=true", "loop.steps=1")  # an explicit choice stays
    assert forced.autocast_dtype == torch.bfloat16
