"""The written-out attention is the fused kernel's maths (models/attention.py)."""

import pytest
import torch

from tipstorch.models.attention import attention
from tipstorch.models.text import TextConfig, TextTransformer
from tipstorch.models.vit import VisionConfig, VisionTransformer


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
