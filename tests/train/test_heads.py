"""ProjectionHead: shapes, cosine scores against unit prototypes, copy / state_dict round trips."""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from tipstorch.models.heads import ProjectionHead


def small_head() -> ProjectionHead:
    torch.manual_seed(0)
    return ProjectionHead(in_dim=12, num_prototypes=40, hidden_dim=16, bottleneck_dim=6)


def test_head_maps_any_leading_shape_to_prototype_scores():
    head = small_head()
    assert head(torch.randn(2, 5, 12)).shape == (2, 5, 40)
    assert head(torch.randn(3, 12)).shape == (3, 40)
    assert head.num_prototypes == 40


def test_head_defaults_follow_the_paper():
    head = ProjectionHead(in_dim=8)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 2048), (2048, 2048), (2048, 256)]
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == 2
    assert head.num_prototypes == 32768


def test_scores_are_cosines_between_bottleneck_and_each_prototype():
    head = small_head()
    tokens = torch.randn(4, 12)
    expected = F.normalize(head.mlp(tokens), dim=-1) @ F.normalize(head.prototypes.weight, dim=-1).T
    scores = head(tokens)
    torch.testing.assert_close(scores, expected)
    assert scores.abs().max().item() <= 1.0 + 1e-6


def test_prototype_gain_is_fixed_rescaling_a_prototype_changes_nothing():
    head = small_head()
    tokens = torch.randn(4, 12)
    before = head(tokens)
    with torch.no_grad():
        head.prototypes.weight[3] *= 17.0
    torch.testing.assert_close(head(tokens), before)


def test_deepcopy_and_state_dict_round_trip_give_identical_scores():
    head = small_head()
    tokens = torch.randn(3, 12)
    clone = copy.deepcopy(head)
    restored = ProjectionHead(in_dim=12, num_prototypes=40, hidden_dim=16, bottleneck_dim=6)
    restored.load_state_dict(head.state_dict())
    torch.testing.assert_close(clone(tokens), head(tokens))
    torch.testing.assert_close(restored(tokens), head(tokens))
    assert set(head.state_dict()) == {f"mlp.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")} | {
        "prototypes.weight"
    }


def test_every_head_parameter_receives_a_gradient():
    head = small_head()
    head(torch.randn(5, 12)).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_prototype_scores_are_float32_cosines_under_bf16_autocast():
    head = small_head()
    tokens = torch.randn(64, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = head(tokens)
        embedding = head.mlp(tokens)  # the MLP itself may run in bf16
    assert scores.dtype == torch.float32
    expected = F.normalize(embedding.double(), dim=-1) @ F.normalize(head.prototypes.weight.double(), dim=-1).T
    torch.testing.assert_close(scores.double(), expected, rtol=0, atol=1e-6)
