"""Parameter groups, optimiser construction, scheduled hyper-parameters, gradient clipping."""

import pytest
import torch
from torch import nn

from tipstorch.train.config import OptimCfg
from tipstorch.train.optim import build_optimizer, clip_gradients, parameter_groups, set_hyperparams


class TinyViTLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 2, 4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        self.mask_token = nn.Parameter(torch.zeros(1, 4))
        self.register_tokens = nn.Parameter(torch.zeros(1, 1, 4))
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.ls1 = nn.Module()
        self.ls1.gamma = nn.Parameter(torch.ones(4))
        self.temperature = nn.Parameter(torch.tensor(0.07))
        self.frozen = nn.Parameter(torch.zeros(4, 4), requires_grad=False)


def group_names(model: nn.Module) -> dict[str, set[str]]:
    ids = {id(p): name for name, p in model.named_parameters()}
    return {g["name"]: {ids[id(p)] for p in g["params"]} for g in parameter_groups(model.named_parameters(), 0.1)}


def test_weight_decay_only_on_matrices_that_are_not_tokens():
    groups = group_names(TinyViTLike())
    assert groups["decay"] == {"fc.weight"}
    assert groups["no_decay"] == {
        "cls_token", "pos_embed", "mask_token", "register_tokens", "fc.bias", "norm.weight", "norm.bias", "ls1.gamma"
    }
    assert groups["temperature"] == {"temperature"}


def test_frozen_parameters_are_left_out():
    assert all("frozen" not in names for names in group_names(TinyViTLike()).values())


def test_set_hyperparams_scales_temperature_lr_and_skips_decay_where_excluded():
    optimizer = build_optimizer(TinyViTLike().named_parameters(), OptimCfg(name="adamw", temperature_lr_scale=0.1))
    set_hyperparams(optimizer, lr=2e-3, weight_decay=0.05)
    by_name = {g["name"]: g for g in optimizer.param_groups}
    assert (by_name["decay"]["lr"], by_name["decay"]["weight_decay"]) == (2e-3, 0.05)
    assert (by_name["no_decay"]["lr"], by_name["no_decay"]["weight_decay"]) == (2e-3, 0.0)
    assert by_name["temperature"]["lr"] == pytest.approx(2e-4)
    assert by_name["temperature"]["weight_decay"] == 0.0


@pytest.mark.parametrize("name, cls", [("adafactor", torch.optim.Adafactor), ("adamw", torch.optim.AdamW)])
def test_both_optimisers_step_every_trainable_parameter(name, cls):
    model = TinyViTLike()
    optimizer = build_optimizer(model.named_parameters(), OptimCfg(name=name, lr=1e-2))
    assert isinstance(optimizer, cls)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = sum((p * torch.randn_like(p)).sum() for p in model.parameters() if p.requires_grad)
    loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}


def test_clip_gradients_returns_norm_before_clipping_and_clips_to_max():
    weight = nn.Parameter(torch.zeros(2))
    weight.grad = torch.tensor([3.0, 4.0])
    norm = clip_gradients([weight], max_norm=1.0)
    assert norm.item() == pytest.approx(5.0)
    assert weight.grad.norm().item() == pytest.approx(1.0, rel=1e-4)


def test_clip_gradients_with_zero_max_norm_only_measures():
    weight = nn.Parameter(torch.zeros(2))
    weight.grad = torch.tensor([3.0, 4.0])
    assert clip_gradients([weight], max_norm=0.0).item() == pytest.approx(5.0)
    assert weight.grad.tolist() == [3.0, 4.0]
