"""Behaviour of the model API: resolutions, intermediates, masking, dtypes, training, saving."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tipstorch
from tests.helpers import assert_close_to_scale, randomize, tiny_config
from tipstorch.models.tips import TIPSModel
from tipstorch.models.vit import resample_pos_embed


@pytest.fixture(scope="module")
def model():
    return randomize(TIPSModel(tiny_config())).eval()


@pytest.mark.parametrize("size,grid", [((56, 56), (4, 4)), ((112, 112), (8, 8)), ((28, 70), (2, 5))])
def test_any_multiple_of_14_gives_the_matching_patch_grid(model, size, grid):
    features = model.encode_image(torch.rand(3, 3, *size))
    assert features.patch_tokens.shape == (3, *grid, 48)
    assert features.flat.shape == (3, grid[0] * grid[1], 48)
    assert features.global_cls.shape == features.spatial_cls.shape == (3, 48)


def test_size_not_multiple_of_14_is_a_clear_error(model):
    with pytest.raises(ValueError, match="image size 50x56 is not a multiple of the patch size 14"):
        model.encode_image(torch.rand(1, 3, 50, 56))
    with pytest.raises(ValueError, match=r"expected images of shape \[B, 3, H, W\], got \[1, 1, 56, 56\]"):
        model.encode_image(torch.rand(1, 1, 56, 56))


def test_pos_embed_is_used_as_stored_at_the_native_grid_and_resampled_otherwise():
    stored = torch.randn(1, 16, 8)
    assert resample_pos_embed(stored, (4, 4)) is stored
    upsampled = resample_pos_embed(stored, (8, 8))
    assert upsampled.shape == (1, 64, 8)
    # bilinear x2 (half-pixel centres): output column 1 samples input column 0.25 of row 0
    grid, source = upsampled.reshape(8, 8, 8), stored.reshape(4, 4, 8)
    torch.testing.assert_close(grid[0, 0], source[0, 0])
    torch.testing.assert_close(grid[0, 1], 0.75 * source[0, 0] + 0.25 * source[0, 1])
    assert resample_pos_embed(stored.bfloat16(), (2, 3)).dtype == torch.bfloat16


def test_image_features_do_not_depend_on_the_batch(model):
    images = torch.rand(3, 3, 56, 56)
    together = model.encode_image(images)
    alone = model.encode_image(images[1:2])
    assert_close_to_scale(together.patch_tokens[1:2], alone.patch_tokens)


def test_normalize_gives_unit_vectors(model):
    features = model.encode_image(torch.rand(2, 3, 56, 56), normalize=True)
    for tensor in (features.global_cls, features.spatial_cls, features.patch_tokens):
        torch.testing.assert_close(tensor.norm(dim=-1), torch.ones(tensor.shape[:-1]))
    text = model.encode_text(torch.tensor([[3, 4, 0]]), normalize=True)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(1))


def test_last_intermediate_with_norm_equals_the_final_features(model):
    images = torch.rand(2, 3, 56, 84)
    final, intermediates = model.visual.forward_intermediates(images, indices=[0, -1], norm=True,
                                                              return_prefix_tokens=True)
    assert len(intermediates) == 2
    patch_map, prefix = intermediates[1]
    assert patch_map.shape == (2, 48, 4, 6) and prefix.shape == (2, 2, 48)
    torch.testing.assert_close(patch_map.permute(0, 2, 3, 1), final.patch_tokens)
    torch.testing.assert_close(prefix[:, 0], final.global_cls)
    torch.testing.assert_close(prefix[:, 1], final.spatial_cls)
    only = model.visual.forward_intermediates(images, indices=1, output_fmt="NHWC", intermediates_only=True)
    assert len(only) == 1 and only[0].shape == (2, 4, 6, 48)
    with pytest.raises(ValueError, match="out of range"):
        model.visual.forward_intermediates(images, indices=[2])


def test_patch_mask_replaces_exactly_the_masked_patches(model):
    images = torch.rand(1, 3, 56, 56)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, 5] = True
    plain = model.visual.prepare_tokens(images)
    masked = model.visual.prepare_tokens(images, patch_mask=mask)
    changed = (plain != masked).any(dim=-1)[0]
    assert changed.nonzero().flatten().tolist() == [2 + 5]
    torch.testing.assert_close(masked[0, 7] - plain[0, 7], model.visual.mask_token[0] - model.visual.patch_embed(images)[0, 5])
    with pytest.raises(ValueError, match=r"patch_mask must have shape \[1, 16\], got \[1, 15\]"):
        model.visual.prepare_tokens(images, patch_mask=mask[:, :15])


def test_bf16_autocast_stays_close_to_fp32(model):
    images = torch.rand(2, 3, 56, 56)
    reference = model.encode_image(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.encode_image(images)
        text = model.encode_text(torch.tensor([[5, 6, 7, 0]]))
    assert not torch.equal(low.patch_tokens.float(), reference.patch_tokens)  # the matmuls did run in bf16
    cosine = F.cosine_similarity(low.patch_tokens.float(), reference.patch_tokens, dim=-1)
    assert cosine.min() > 0.99
    assert torch.isfinite(text).all()


def test_training_mode_backpropagates_to_every_parameter_with_checkpointing_equal():
    torch.manual_seed(0)
    model = randomize(TIPSModel(tiny_config("swiglu"))).train()
    images, ids = torch.rand(2, 3, 56, 56), torch.tensor([[5, 6, 0], [7, 8, 9]])

    def loss_and_grads():
        model.zero_grad()
        mask = torch.zeros(2, 16, dtype=torch.bool)
        mask[:, :4] = True
        features = model.encode_image(images, patch_mask=mask)
        loss = features.patch_tokens.square().mean() + features.global_cls.sum() + model.encode_text(ids).sum()
        loss = loss + model.logits(features.spatial_cls, model.encode_text(ids)).sum()
        loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = loss_and_grads()
    assert set(plain) == {name for name, _ in model.named_parameters()}
    model.visual.set_grad_checkpointing()
    model.text.set_grad_checkpointing()
    checkpointed = loss_and_grads()
    for name in plain:
        assert_close_to_scale(checkpointed[name], plain[name], msg=name)


def test_all_padding_row_pools_to_zeros_and_leaves_the_other_rows_unchanged(model):
    with torch.no_grad():
        batch = model.encode_text(torch.tensor([[5, 6], [0, 0]]))
        alone = model.encode_text(torch.tensor([[5, 6]]))
    assert torch.equal(batch[1], torch.zeros_like(batch[1]))  # empty text: sum over no tokens / (0 + 1e-8)
    assert_close_to_scale(batch[0], alone[0])


def test_token_rows_longer_than_the_context_are_an_error(model):
    with pytest.raises(ValueError, match="exceeds the context length 16"):
        model.encode_text(torch.ones(1, 17, dtype=torch.long))


def test_tipstorch_safetensors_round_trip(model, tmp_path):
    path = tipstorch.save_model(model, tmp_path / "model.safetensors")
    loaded = tipstorch.load_model(path)
    assert loaded.config == model.config
    images = torch.rand(1, 3, 56, 56)
    torch.testing.assert_close(loaded.encode_image(images).flat, model.encode_image(images).flat)
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_logits_are_cosine_over_temperature(model):
    image, text = torch.randn(2, 48), torch.randn(3, 48)
    expected = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T / model.temperature
    torch.testing.assert_close(model.logits(image, text), expected)


def test_unknown_file_format_is_named(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(tipstorch.CheckpointError, match="weights.bin: unknown checkpoint format"):
        tipstorch.load_model(path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_run_and_stay_close(model, dtype):
    """model.to(bf16/fp16), as on a GPU: every op runs in that dtype and stays near fp32."""
    images, ids = torch.rand(2, 3, 42, 56), torch.tensor([[5, 6, 7, 0], [9, 0, 0, 0]])
    low = TIPSModel(model.config).eval()
    low.load_state_dict(model.state_dict())
    low = low.to(dtype)
    with torch.inference_mode():
        features = low.encode_image(images.to(dtype))
        text = low.encode_text(ids)
        reference = model.encode_image(images)
        reference_text = model.encode_text(ids)
    assert features.patch_tokens.dtype == text.dtype == dtype
    assert F.cosine_similarity(features.flat.float(), reference.flat, dim=-1).min() > 0.99
    assert F.cosine_similarity(text.float(), reference_text, dim=-1).min() > 0.99


def test_text_tower_runs_on_the_longest_caption_only_and_padding_changes_nothing():
    from tipstorch.models.text import TextConfig, TextTransformer

    torch.manual_seed(0)
    text = TextTransformer(TextConfig(width=32, depth=2, num_heads=2, mlp_dim=64, vocab_size=50, context_length=16))
    short = torch.tensor([[3, 4, 5, 0], [7, 8, 0, 0]])
    padded = torch.cat([short, torch.zeros(2, 12, dtype=torch.long)], dim=1)  # [2, 16]: 13 all-pad columns
    lengths = []
    hook = text.token_embedding.register_forward_hook(lambda module, args, out: lengths.append(args[0].shape[1]))
    embeddings = text(padded)
    hook.remove()
    assert lengths == [3]  # the columns after the longest caption's last token are not computed
    torch.testing.assert_close(embeddings, text(short), rtol=1e-5, atol=1e-6)


def test_patch_embedding_equals_the_stride_14_convolution_of_its_weights():
    from tipstorch.models.vit import PatchEmbed

    torch.manual_seed(0)
    embed = PatchEmbed(14, 16)
    images = torch.rand(2, 3, 28, 42)
    expected = F.conv2d(images, embed.proj.weight, embed.proj.bias, stride=14).flatten(2).transpose(1, 2)
    torch.testing.assert_close(embed(images), expected, rtol=1e-5, atol=1e-5)
