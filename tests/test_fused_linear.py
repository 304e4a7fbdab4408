"""models/fused_linear.py: bias and GELU inside oneDNN's GEMM for bf16 CPU inference, F.linear elsewhere."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import tipstorch
from tipstorch.models import fused_linear
from tipstorch.models.fused_linear import linear, uses_fused_linear
from tipstorch.models.precision import native_bf16

needs_native_bf16 = pytest.mark.skipif(not native_bf16("cpu"), reason="this CPU has no native bf16 (AVX512-BF16 / AMX)")


class CountFusedCalls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.mkldnn._linear_pointwise.default:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def layer(dtype: torch.dtype) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(64, 96).to(dtype)


def test_float32_and_training_keep_f_linear():
    tokens = torch.randn(2, 5, 64)
    assert not uses_fused_linear(tokens, layer(torch.float32))
    bf16 = layer(torch.bfloat16)
    assert not uses_fused_linear(tokens.bfloat16(), bf16)  # bf16 weights need grads: a backward may follow
    with torch.no_grad():
        assert not uses_fused_linear(tokens, bf16)  # float32 tokens (autocast-free) into bf16 weights
    fp32 = layer(torch.float32)
    with torch.no_grad(), CountFusedCalls() as counter:
        out = linear(tokens, fp32, "gelu")
    assert counter.calls == 0
    torch.testing.assert_close(out, F.gelu(F.linear(tokens, fp32.weight, fp32.bias)), rtol=0, atol=0)


def test_a_trainable_bias_beside_frozen_weights_keeps_f_linear_and_gets_its_gradient():
    bf16 = layer(torch.bfloat16)
    bf16.weight.requires_grad_(False)  # e.g. bias-only fine-tuning: oneDNN's op has no autograd formula
    tokens = torch.randn(2, 5, 64).bfloat16()
    assert not uses_fused_linear(tokens, bf16)
    linear(tokens, bf16, "gelu").float().sum().backward()
    assert bf16.bias.grad is not None and bf16.bias.grad.abs().sum() > 0


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="activation must be one of"):
        linear(torch.randn(2, 64), layer(torch.float32), "relu6")


def test_without_native_bf16_the_fused_kernel_is_never_called(monkeypatch):
    monkeypatch.setattr(fused_linear, "_cpu_has_fused_linear", lambda: False)
    with torch.inference_mode():
        assert not uses_fused_linear(torch.randn(2, 64).bfloat16(), layer(torch.bfloat16))


@needs_native_bf16
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_bf16_inference_runs_one_fused_kernel_with_f_linear_values(activation):
    bf16 = layer(torch.bfloat16)
    tokens = torch.randn(3, 7, 64).bfloat16()
    with torch.inference_mode(), CountFusedCalls() as counter:
        out = linear(tokens, bf16, activation)
    assert counter.calls == 1 and out.dtype == torch.bfloat16 and out.shape == (3, 7, 96)
    exact = F.linear(tokens.double(), bf16.weight.double(), bf16.bias.double())
    exact = F.gelu(exact) if activation == "gelu" else exact
    # one bf16 rounding of the output (2^-8 relative), as F.linear's own bf16 result
    assert (out.double() - exact).abs().max() <= 2**-7 * exact.abs().max()


@needs_native_bf16
def test_bf16_vision_tower_uses_the_fused_kernel_for_every_linear_and_matches_its_float32_output():
    model = tipstorch.create_model("tips-tiny").visual.eval()
    images = torch.rand(2, 3, 56, 56)
    with torch.inference_mode():
        exact = model(images).patch_tokens
        model = model.to(torch.bfloat16)
        with CountFusedCalls() as counter:
            fused = model(images.bfloat16()).patch_tokens.float()
    assert counter.calls == 4 * len(model.blocks)  # qkv, proj, fc1 + GELU, fc2
    scale = exact.abs().max()
    assert (fused - exact).abs().max() <= 0.05 * scale
