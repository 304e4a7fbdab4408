"""The data engine's inference precision: "auto" is bf16 exactly where the device multiplies bf16 natively."""

import pytest
import torch

from tipstorch.engine.precision import inference_autocast, inference_bf16


@pytest.mark.parametrize("native", [True, False])
def test_auto_autocasts_to_bf16_only_where_the_cpu_has_bf16_matmuls(monkeypatch, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native)
    assert inference_bf16("cpu", "auto") is native
    with inference_autocast("cpu", "auto"):
        product = torch.ones(2, 2) @ torch.ones(2, 2)
    assert product.dtype == (torch.bfloat16 if native else torch.float32)
    assert inference_bf16("cpu", "bf16") and not inference_bf16("cpu", "fp32")  # explicit choices stay


def test_an_unknown_precision_is_refused_by_name():
    with pytest.raises(ValueError, match="precision must be one of .*'half'"):
        inference_bf16("cpu", "half")
