"""DPT decoder, linear dense heads and the Scenic DPT zip loader."""

import io
import zipfile

import numpy as np
import pytest
import torch

from tests.helpers import assert_close_to_scale
from tipstorch.models.dense import (
    DPT_LAYER_INDICES,
    DepthBinsConfig,
    DPTConfig,
    DPTDepthDecoder,
    DPTNormalsDecoder,
    DPTSegmentationDecoder,
    LinearDepthHead,
    LinearSegmentationHead,
    bins_to_depth,
    dpt_layer_indices,
    load_scenic_dpt,
    unit_vectors,
)

EMBED_DIM, CHANNELS = 32, 16


def _intermediates(batch=2, h=3, w=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, EMBED_DIM, h, w, generator=gen), torch.randn(batch, 2, EMBED_DIM, generator=gen))
        for _ in range(4)
    ]


def _config(readout_index=0):
    return DPTConfig(embed_dim=EMBED_DIM, channels=CHANNELS, readout_index=readout_index)


@pytest.mark.parametrize(("size", "depth"), [("b", 12), ("l", 24), ("so400m", 27), ("g", 40)])
def test_evenly_spaced_layers_reproduce_the_official_table(size, depth):
    assert tuple(dpt_layer_indices(depth)) == DPT_LAYER_INDICES[size]


def test_state_dict_uses_the_official_parameter_names():
    names = set(DPTDepthDecoder(_config()).state_dict())
    for expected in (
        "dpt.reassemble.readout_projects.3.weight",
        "dpt.reassemble.out_projections.0.bias",
        "dpt.reassemble.resize_layers.0.weight",
        "dpt.reassemble.resize_layers.3.weight",
        "dpt.convs.2.weight",
        "dpt.fusion_blocks.0.main_unit.conv1.weight",
        "dpt.fusion_blocks.3.residual_unit.conv2.weight",
        "dpt.fusion_blocks.1.out_conv.bias",
        "dpt.project.weight",
        "head.weight",
        "bin_centers",
    ):
        assert expected in names
    assert not any(name.startswith("dpt.fusion_blocks.0.residual_unit") for name in names)
    assert "dpt.convs.0.bias" not in names


def test_segmentation_decoder_returns_logits_at_image_size():
    logits = DPTSegmentationDecoder(_config(), num_classes=5)(_intermediates(), image_size=(42, 56))
    assert logits.shape == (2, 5, 42, 56)


def test_dpt_raw_output_is_eight_times_an_even_patch_grid():
    raw = DPTSegmentationDecoder(_config(), num_classes=5).raw(_intermediates(h=4, w=6))
    assert raw.shape == (2, 5, 32, 48)


def test_depth_decoder_stays_inside_the_bin_range():
    bins = DepthBinsConfig(num_bins=8, min_depth=0.5, max_depth=4.0)
    depth = DPTDepthDecoder(_config(), bins)(_intermediates(), image_size=(42, 56))
    assert depth.shape == (2, 1, 42, 56)
    assert depth.min() >= 0.5 and depth.max() <= 4.0


def test_bins_to_depth_is_the_expectation_over_bins():
    centers = torch.tensor([1.0, 2.0, 3.0])
    logits = torch.tensor([-5.0, 1.0, 3.0]).reshape(1, 3, 1, 1)
    # relu -> [0, 1, 3], + eps 0 -> probs [0, .25, .75] -> 2*.25 + 3*.75
    assert bins_to_depth(logits, centers, eps=0.0).item() == pytest.approx(2.75)
    # all logits negative: weights are eps everywhere -> uniform -> mean of the centres
    assert bins_to_depth(-torch.ones(1, 3, 1, 1), centers, eps=0.1).item() == pytest.approx(2.0)


def test_normals_decoder_outputs_unit_vectors():
    normals = DPTNormalsDecoder(_config())(_intermediates(), image_size=(42, 56))
    assert normals.shape == (2, 3, 42, 56)
    assert torch.allclose(normals.norm(dim=1), torch.ones(2, 42, 56), atol=1e-5)


def test_unit_vectors_equal_f_normalize_in_value_and_gradient_and_stay_finite_at_zero():
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[0, :, 1, 2] = 0.0  # a zero vector: F.normalize gives 0 with a finite gradient, so must unit_vectors
    x.requires_grad_(True)
    weights = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    expected = torch.nn.functional.normalize(x, dim=1)
    got = unit_vectors(x)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), x)
    (got_grad,) = torch.autograd.grad((got * weights).sum(), x)
    assert_close_to_scale(got, expected, scale_tol=1e-12, rtol=1e-12)
    assert_close_to_scale(got_grad, expected_grad, scale_tol=1e-12, rtol=1e-12)
    assert torch.isfinite(got_grad).all() and got[0, :, 1, 2].abs().sum() == 0
    assert_close_to_scale(unit_vectors(x.detach(), dim=-1), torch.nn.functional.normalize(x.detach(), dim=-1), scale_tol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("readout_index", [0, 1])
def test_readout_uses_only_the_configured_prefix_token(readout_index):
    torch.manual_seed(0)
    decoder = DPTSegmentationDecoder(_config(readout_index), num_classes=3).eval()
    features = _intermediates()
    other = 1 - readout_index
    changed = [(patch, prefix.clone().index_fill_(1, torch.tensor([other]), 7.0)) for patch, prefix in features]
    with torch.no_grad():
        assert torch.equal(decoder(features), decoder(changed))
        changed_own = [(p, x.clone().index_fill_(1, torch.tensor([readout_index]), 7.0)) for p, x in features]
        assert not torch.allclose(decoder(features), decoder(changed_own))


def test_linear_segmentation_head_concatenates_the_cls_token():
    head = LinearSegmentationHead(EMBED_DIM, num_classes=4, use_cls=True)
    assert head.classifier.in_channels == 2 * EMBED_DIM
    logits = head(torch.randn(2, 3, 4, EMBED_DIM), torch.randn(2, EMBED_DIM), image_size=(42, 56))
    assert logits.shape == (2, 4, 42, 56)


def test_linear_segmentation_head_without_cls_ignores_it():
    head = LinearSegmentationHead(EMBED_DIM, num_classes=4, use_cls=False).eval()
    tokens = torch.randn(2, 3, 4, EMBED_DIM)
    assert torch.equal(head(tokens, torch.randn(2, EMBED_DIM), (6, 8)), head(tokens, None, (6, 8)))


def test_linear_depth_head_predicts_metres_in_range():
    head = LinearDepthHead(EMBED_DIM, DepthBinsConfig(num_bins=16, min_depth=0.1, max_depth=5.0))
    depth = head(torch.randn(2, 3, 4, EMBED_DIM), torch.randn(2, EMBED_DIM), image_size=(42, 56))
    assert depth.shape == (2, 1, 42, 56)
    assert depth.min() >= 0.1 and depth.max() <= 5.0


# ------------------------------------------------------------------ Scenic zip loader


def _flax_layout(decoder, head_name):
    """Flax-named arrays equivalent to ``decoder`` (the released zip layout, see decoders.py)."""
    state = {k: v.numpy() for k, v in decoder.state_dict().items()}

    def conv(name):
        return state[name].transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)

    def conv_transpose(name):
        return state[name].transpose(2, 3, 0, 1)[::-1, ::-1]  # (in, out, kh, kw) -> flipped (kh, kw, in, out)

    flax = {}
    for i in range(4):
        base = "decoder/dpt/reassemble_blocks"
        flax[f"{base}/out_projection_{i}/kernel"] = conv(f"dpt.reassemble.out_projections.{i}.weight")
        flax[f"{base}/out_projection_{i}/bias"] = state[f"dpt.reassemble.out_projections.{i}.bias"]
        flax[f"{base}/readout_projects_{i}/kernel"] = state[f"dpt.reassemble.readout_projects.{i}.weight"].T
        flax[f"{base}/readout_projects_{i}/bias"] = state[f"dpt.reassemble.readout_projects.{i}.bias"]
        flax[f"decoder/dpt/convs_{i}/kernel"] = conv(f"dpt.convs.{i}.weight")
        units = {"main_unit": 0} if i == 0 else {"residual_unit": 0, "main_unit": 1}
        for unit, flax_index in units.items():
            for c in ("conv1", "conv2"):
                flax[f"decoder/dpt/fusion_blocks_{i}/PreActResidualConvUnit_{flax_index}/{c}/kernel"] = conv(
                    f"dpt.fusion_blocks.{i}.{unit}.{c}.weight"
                )
        flax[f"decoder/dpt/fusion_blocks_{i}/Conv_0/kernel"] = conv(f"dpt.fusion_blocks.{i}.out_conv.weight")
        flax[f"decoder/dpt/fusion_blocks_{i}/Conv_0/bias"] = state[f"dpt.fusion_blocks.{i}.out_conv.bias"]
    for i in (0, 1):
        flax[f"decoder/dpt/reassemble_blocks/resize_layers_{i}/kernel"] = conv_transpose(
            f"dpt.reassemble.resize_layers.{i}.weight"
        )
    flax["decoder/dpt/reassemble_blocks/resize_layers_3/kernel"] = conv("dpt.reassemble.resize_layers.3.weight")
    for i in (0, 1, 3):
        flax[f"decoder/dpt/reassemble_blocks/resize_layers_{i}/bias"] = state[f"dpt.reassemble.resize_layers.{i}.bias"]
    flax["decoder/dpt/project/kernel"] = conv("dpt.project.weight")
    flax["decoder/dpt/project/bias"] = state["dpt.project.bias"]
    flax[f"decoder/{head_name}/kernel"] = state["head.weight"].T
    flax[f"decoder/{head_name}/bias"] = state["head.bias"]
    return flax


def _write_zip(path, arrays):
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.save(buffer, np.ascontiguousarray(array))
            archive.writestr(f"{name}.npy", buffer.getvalue())


@pytest.mark.parametrize(
    ("make", "head_name"),
    [
        (lambda: DPTSegmentationDecoder(_config(), num_classes=6), "pixel_segmentation"),
        (lambda: DPTDepthDecoder(_config(), DepthBinsConfig(num_bins=12)), "pixel_depth_classif"),
        (lambda: DPTNormalsDecoder(_config()), "pixel_normals"),
    ],
)
def test_scenic_zip_loads_into_the_decoder(tmp_path, make, head_name):
    torch.manual_seed(0)
    reference = make().eval()
    path = tmp_path / "tips_v2_test_dpt.zip"
    _write_zip(path, _flax_layout(reference, head_name))
    torch.manual_seed(1)
    loaded = load_scenic_dpt(make(), path).eval()
    with torch.no_grad():
        features = _intermediates()
        assert torch.equal(reference(features, (42, 56)), loaded(features, (42, 56)))


def _flax_conv_transpose(x, kernel, stride):
    """lax.conv_transpose semantics (input dilation, k-1 padding, unflipped correlation); x [H, W, Cin]."""
    k = kernel.shape[0]
    h, w, c_in = x.shape
    dilated = np.zeros(((h - 1) * stride + 1 + 2 * (k - 1), (w - 1) * stride + 1 + 2 * (k - 1), c_in))
    dilated[k - 1 : k - 1 + (h - 1) * stride + 1 : stride, k - 1 : k - 1 + (w - 1) * stride + 1 : stride] = x
    out_h, out_w = dilated.shape[0] - k + 1, dilated.shape[1] - k + 1
    out = np.zeros((out_h, out_w, kernel.shape[3]))
    for i in range(out_h):
        for j in range(out_w):
            out[i, j] = np.einsum("abc,abco->o", dilated[i : i + k, j : j + k], kernel)
    return out


def test_conv_transpose_kernel_conversion_matches_flax_semantics(tmp_path):
    # resize layer 1 is a 2x2 stride-2 transposed conv; check it against Flax's definition
    decoder = DPTSegmentationDecoder(_config(), num_classes=6)
    flax = _flax_layout(decoder, "pixel_segmentation")
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=flax["decoder/dpt/reassemble_blocks/resize_layers_1/kernel"].shape)
    flax["decoder/dpt/reassemble_blocks/resize_layers_1/kernel"] = kernel
    path = tmp_path / "seg.zip"
    _write_zip(path, flax)
    layer = load_scenic_dpt(decoder, path).dpt.reassemble.resize_layers[1]
    x = rng.normal(size=(3, 2, kernel.shape[2]))
    expected = _flax_conv_transpose(x, kernel, stride=2) + layer.bias.detach().numpy()
    with torch.no_grad():
        got = layer(torch.from_numpy(x.transpose(2, 0, 1)).float()[None])[0].numpy().transpose(1, 2, 0)
    assert_close_to_scale(torch.from_numpy(got), torch.from_numpy(expected).float())


def test_scenic_zip_with_missing_parameter_names_it(tmp_path):
    decoder = DPTSegmentationDecoder(_config(), num_classes=6)
    flax = _flax_layout(decoder, "pixel_segmentation")
    del flax["decoder/dpt/project/bias"]
    path = tmp_path / "seg.zip"
    _write_zip(path, flax)
    with pytest.raises(KeyError, match=r"dpt\.project\.bias"):
        load_scenic_dpt(decoder, path)


def test_scenic_zip_for_another_model_size_is_a_shape_error(tmp_path):
    path = tmp_path / "seg.zip"
    _write_zip(path, _flax_layout(DPTSegmentationDecoder(_config(), num_classes=6), "pixel_segmentation"))
    bigger = DPTSegmentationDecoder(DPTConfig(embed_dim=2 * EMBED_DIM, channels=CHANNELS), num_classes=6)
    with pytest.raises(ValueError, match="wrong model size"):
        load_scenic_dpt(bigger, path)


def test_missing_dpt_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.zip"):
        load_scenic_dpt(DPTNormalsDecoder(_config()), tmp_path / "nothere.zip")
