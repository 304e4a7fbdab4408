"""The written-out attention is the fused kernel's maths, and ``fused=None`` picks one by the measured rule
(models/attention.py)."""

import pytest
import torch

from tests.helpers import tiny_config
from tipstorch.models.attention import attention, use_fused_attention
from tipstorch.models.text import TextConfig, TextTransformer
from tipstorch.models.tips import TIPSModel
from tipstorch.models.vit import VisionConfig, VisionTransformer
from tipstorch.train.config import TrainCfg, load_config, resolve_config
from tipstorch.train.init import trainable


@pytest.mark.parametrize("masked", [False, True], ids=["no mask", "key mask"])
def test_written_out_attention_matches_fused_values_and_gradients(masked):
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 3, 9, 8, generator=generator).requires_grad_(True) for _ in range(3)]
    key_mask = (torch.arange(9) < torch.tensor([[5], [9]]))[:, None, None, :] if masked else None
    grads = []
    for fused in (True, False):
        out = attention(*inputs, key_mask, fused=fused)
        out.sum().backward()
        grads.append((out.detach(), [tensor.grad.clone() for tensor in inputs]))
        for tensor in inputs:
            tensor.grad = None
    (fused_out, fused_grads), (plain_out, plain_grads) = grads
    torch.testing.assert_close(plain_out, fused_out, rtol=1e-5, atol=1e-5)
    for plain, fused in zip(plain_grads, fused_grads, strict=True):
        torch.testing.assert_close(plain, fused, rtol=1e-4, atol=1e-5)


def test_set_fused_attention_switches_every_block_of_both_towers_and_keeps_outputs():
    torch.manual_seed(0)
    vision = VisionTransformer(
        VisionConfig(embed_dim=32, depth=2, num_heads=2, mlp_hidden_dim=64, pos_grid=4)
    )
    text = TextTransformer(
        TextConfig(width=32, depth=2, num_heads=2, mlp_dim=64, vocab_size=50, context_length=8)
    )
    images, tokens = (
        torch.rand(2, 3, 28, 28),
        torch.tensor([[3, 4, 5, 0, 0, 0, 0, 0], [7, 8, 9, 10, 11, 2, 1, 6]]),
    )
    fused = vision(images).patch_tokens, text(tokens)
    vision.set_fused_attention(False)
    text.set_fused_attention(False)
    assert not any(block.attn.fused_attn for block in vision.blocks)
    assert not any(block.attn.fused_attn for block in text.transformer.resblocks)
    plain = vision(images).patch_tokens, text(tokens)
    for a, b in zip(plain, fused, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "dtype, tokens, grad, fused",
    [
        (torch.bfloat16, 66, True, False),  # training crops in bf16: the fused CPU backward is slow
        (torch.bfloat16, 258, True, False),
        (torch.bfloat16, 1026, True, True),  # 448 px: the [L, L] scores cost more than the kernel
        (torch.float32, 66, True, False),
        (torch.float32, 258, True, True),
        (torch.bfloat16, 66, False, False),  # inference
        (torch.bfloat16, 258, False, True),
        (torch.float32, 66, False, True),
    ],
)
def test_auto_attention_follows_the_measured_rule_on_a_cpu(dtype, tokens, grad, fused):
    query = torch.zeros(1, 1, tokens, 8, dtype=dtype, requires_grad=grad)
    assert use_fused_attention(query, query) is fused
    with torch.no_grad():  # no backward follows
        assert use_fused_attention(query, query) is (tokens > 128 or dtype == torch.float32)


def test_auto_attention_is_fused_off_the_cpu():
    query = torch.zeros(1, 1, 18, 8, dtype=torch.bfloat16, device="meta", requires_grad=True)
    assert use_fused_attention(query, query)


@pytest.mark.parametrize("tokens", [60, 140], ids=["written out", "fused"])
def test_auto_attention_gives_both_forms_values_and_gradients(monkeypatch, tokens):
    """fp32 with a backward: written out up to 128 keys, fused above; either way the values of both forms."""
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 2, tokens, 8, generator=generator).requires_grad_(True) for _ in range(3)]
    results = {}
    calls = []
    fused_kernel = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or fused_kernel(*a, **k)
    )
    for fused in (None, True, False):
        out = attention(*inputs, fused=fused)
        out.sum().backward()
        results[fused] = (out.detach(), [tensor.grad.clone() for tensor in inputs])
        for tensor in inputs:
            tensor.grad = None
    assert len(calls) == (2 if tokens > 128 else 1)  # auto called the fused kernel only above 128 keys
    for fused in (True, False):
        torch.testing.assert_close(results[None][0], results[fused][0], rtol=1e-5, atol=1e-5)
        for auto, other in zip(results[None][1], results[fused][1], strict=True):
            torch.testing.assert_close(auto, other, rtol=1e-4, atol=1e-5)


def test_towers_choose_attention_per_call_unless_a_config_fixes_it():
    cfg = TrainCfg()
    model = trainable(TIPSModel(tiny_config()), cfg.model)
    assert cfg.model.fused_attention == "auto" and model.visual.blocks[0].attn.fused_attn is None
    assert model.text.transformer.resblocks[0].attn.fused_attn is None
    model = trainable(model, load_config(resolve_config("tiny_cpu"), ["model.fused_attention=true"]).model)
    assert model.visual.blocks[0].attn.fused_attn is True
