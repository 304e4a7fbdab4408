"""DPT heads from files: parity with a transcription of the official decoders.py and with transformers'
Tipsv2Dpt classes, transformers' tipsv2_dpt checkpoints both ways, tipstorch head files, unused arrays in
Scenic zips, and the released heads fetched over loopback HTTP."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.eval.test_dense_heads import _flax_layout, _write_zip
from tests.helpers import randomize
from tests.official_decoders import official_decoder_forward
from tests.test_download_cache import FileServer
from tipstorch.models import registry
from tipstorch.models.dense import (
    DENSE_TASKS,
    DepthBinsConfig,
    DPTConfig,
    create_dpt_decoder,
    load_scenic_dpt,
)
from tipstorch.models.text import TextConfig
from tipstorch.models.vit import VisionConfig, VisionTransformer
from tipstorch.weights import cache as hub
from tipstorch.weights import dense_heads
from tipstorch.weights.state_io import CheckpointError

EMBED_DIM, CHANNELS = 32, 16
HEAD_NAMES = {
    "segmentation": "pixel_segmentation",
    "depth": "pixel_depth_classif",
    "normals": "pixel_normals",
}


def _decoder(task, seed=0, config=None, **kwargs):
    torch.manual_seed(seed)
    decoder = create_dpt_decoder(
        task,
        config or DPTConfig(EMBED_DIM, channels=CHANNELS),
        num_classes=7,
        bins=DepthBinsConfig(num_bins=12, min_depth=0.01, max_depth=5.0),
        **kwargs,
    )
    return randomize(decoder, seed=seed).eval()


def _ours_features(seed=0, batch=2, h=4, w=6):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, EMBED_DIM, h, w, generator=gen), torch.randn(batch, 2, EMBED_DIM, generator=gen))
        for _ in range(4)
    ]


# ------------------------------------------------------------------ official decoders.py


@pytest.mark.parametrize("task", DENSE_TASKS)
@pytest.mark.parametrize("output_activation", [False, True])
def test_decoders_match_the_official_transcription(task, output_activation):
    config = DPTConfig(EMBED_DIM, channels=CHANNELS, output_activation=output_activation)
    decoder = _decoder(task, config=config)
    features = _ours_features()
    official_inputs = [(prefix[:, 0], patch) for patch, prefix in features]  # official order: (CLS1, map)
    weights = dict(decoder.state_dict())
    with torch.no_grad():
        ours = decoder(features, image_size=(50, 70)) if task != "normals" else decoder.raw(features)
        expected = official_decoder_forward(
            weights,
            official_inputs,
            task,
            image_size=(50, 70) if task != "normals" else None,
            output_activation=output_activation,
            min_depth=0.01,
            max_depth=5.0,
        )
    scale = expected.abs().max().item()
    torch.testing.assert_close(ours, expected, atol=1e-5 * max(scale, 1.0), rtol=1e-4)


def test_output_activation_changes_the_depth_prediction():
    features = _ours_features()
    plain = _decoder("depth")
    with_relu = _decoder("depth", config=DPTConfig(EMBED_DIM, channels=CHANNELS, output_activation=True))
    with torch.no_grad():
        assert not torch.allclose(plain(features), with_relu(features))


# ------------------------------------------------------------------ Scenic zips


def test_unused_arrays_in_a_scenic_zip_are_reported_not_fatal(tmp_path):
    reference = _decoder("normals")
    arrays = _flax_layout(reference, "pixel_normals")
    arrays["decoder/aux_head/kernel"] = np.zeros((3, 3), np.float32)
    arrays["opt_state/step"] = np.zeros((), np.int32)
    path = tmp_path / "normals.zip"
    _write_zip(path, arrays)
    with pytest.warns(UserWarning, match=r"ignored 2 array\(s\).*decoder/aux_head/kernel, opt_state/step"):
        loaded = load_scenic_dpt(_decoder("normals", seed=5), path)
    features = _ours_features()
    with torch.no_grad():
        torch.testing.assert_close(loaded.raw(features), reference.raw(features))


@pytest.mark.parametrize("task", DENSE_TASKS)
def test_scenic_zip_alone_gives_its_task_and_shapes(tmp_path, task):
    reference = _decoder(task)
    path = tmp_path / f"{task}.zip"
    _write_zip(path, _flax_layout(reference, HEAD_NAMES[task]))
    loaded = dense_heads.read_scenic_zip(path)
    assert loaded.config.embed_dim == EMBED_DIM and loaded.config.channels == CHANNELS
    assert type(loaded) is type(reference)
    with torch.no_grad():
        torch.testing.assert_close(loaded.raw(_ours_features()), reference.raw(_ours_features()))


# ------------------------------------------------------------------ released heads over HTTP


@pytest.fixture
def loopback(tmp_path, monkeypatch):
    monkeypatch.setenv("TIPSTORCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TIPSTORCH_OFFLINE", raising=False)
    server = FileServer({})
    import threading

    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_registry_names_the_released_urls():
    assert len(registry.list_dense_heads()) == 12
    spec = registry.get_dense_head_spec("tipsv2-so400m14", "normals")
    assert spec.url == (
        "https://storage.googleapis.com/tips_data/v2_0/checkpoints/scenic/tips_v2_so400m14_normals_dpt.zip"
    )
    with pytest.raises(ValueError, match="no released DPT heads for model 'tips-v1-b14'"):
        registry.get_dense_head_spec("tips-v1-b14", "depth")
    with pytest.raises(ValueError, match="unknown dense task 'edges'"):
        registry.get_dense_head_spec("tipsv2-b14", "edges")


def _serve_head(server, tmp_path, monkeypatch, task, size_bytes=None):
    """Point the 'tipsv2-b14' heads at the loopback server; the model is shrunk to width 32 / 4 blocks
    so the served zip stays small."""
    decoder = randomize(create_dpt_decoder(task, DPTConfig(EMBED_DIM)), seed=2)  # released head shapes
    path = tmp_path / f"b14_{task}.zip"
    _write_zip(path, _flax_layout(decoder, HEAD_NAMES[task]))
    server.files[f"/scenic/b14_{task}.zip"] = path.read_bytes()
    real_head, real_model = registry.get_dense_head_spec, registry.get_model_spec

    def head_spec(model_name, wanted_task):
        found = real_head(model_name, wanted_task)
        url = f"{server.base_url}/scenic/b14_{wanted_task}.zip"
        return dataclasses.replace(found, url=url, size_bytes=size_bytes)

    def model_spec(name):
        spec = real_model(name)
        vision = dataclasses.replace(spec.config.vision, embed_dim=EMBED_DIM, depth=4, num_heads=2)
        return dataclasses.replace(
            spec,
            config=dataclasses.replace(
                spec.config, vision=vision, text=TextConfig(width=EMBED_DIM, num_heads=2)
            ),
        )

    monkeypatch.setattr(dense_heads, "get_dense_head_spec", head_spec)
    monkeypatch.setattr(dense_heads, "get_model_spec", model_spec)
    return decoder


def test_create_dense_head_downloads_once_and_then_works_offline(loopback, tmp_path, monkeypatch):
    reference = _serve_head(loopback, tmp_path, monkeypatch, "depth")
    head = dense_heads.create_dense_head("tipsv2-b14", "depth")
    assert not head.training and head.config.layer_indices == (0, 1, 2, 3)
    torch.testing.assert_close(head.dpt.convs[1].weight, reference.dpt.convs[1].weight)
    monkeypatch.setenv("TIPSTORCH_OFFLINE", "1")
    again = dense_heads.create_dense_head("tipsv2-b14", "depth")
    torch.testing.assert_close(again.head.weight, reference.head.weight)
    assert len(loopback.requests) == 1
    with pytest.raises(hub.DownloadError, match="TIPSTORCH_OFFLINE"):
        dense_heads.create_dense_head("tipsv2-b14", "normals")


def test_a_released_head_of_the_wrong_size_is_a_download_error(loopback, tmp_path, monkeypatch):
    _serve_head(loopback, tmp_path, monkeypatch, "normals", size_bytes=123)
    with pytest.raises(hub.DownloadError, match="expected size is 123 bytes"):
        dense_heads.create_dense_head("tipsv2-b14", "normals")


def test_random_dense_head_needs_no_download(loopback):
    head = dense_heads.create_dense_head("tipsv2-l14", "segmentation", pretrained=False)
    assert head.head.out_features == 150 and head.config.embed_dim == 1024
    assert head.config.layer_indices == (5, 11, 17, 23)
    assert dense_heads.create_dense_head("tipsv2-b14", "depth", pretrained=False).config.layer_indices == (
        2,
        5,
        8,
        11,
    )
    assert loopback.requests == []


# ------------------------------------------------------------------ tipstorch head files


@pytest.mark.parametrize("task", DENSE_TASKS)
def test_head_file_round_trip(tmp_path, task):
    decoder = _decoder(
        task, config=DPTConfig(EMBED_DIM, channels=CHANNELS, readout_index=1, layer_indices=(0, 1, 2, 3))
    )
    path = dense_heads.save_dense_head(
        decoder, tmp_path / "probe.safetensors", model="runs/x/final.safetensors"
    )
    loaded = dense_heads.load_dense_head(path)
    assert loaded.config == decoder.config
    assert dense_heads.dense_head_model(path) == "runs/x/final.safetensors"
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ours_features(), (20, 30)), decoder(_ours_features(), (20, 30)))


def test_a_model_file_is_not_a_head_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors", metadata={"format": "tipstorch"})
    with pytest.raises(CheckpointError, match="not a tipstorch dense head file"):
        dense_heads.load_dense_head(tmp_path / "model.safetensors")


# ------------------------------------------------------------------ transformers tipsv2_dpt

transformers = pytest.importorskip("transformers")


def _tiny_visual(seed=0):
    torch.manual_seed(seed)
    visual = VisionTransformer(
        VisionConfig(
            embed_dim=EMBED_DIM, depth=4, num_heads=2, mlp_hidden_dim=64, pos_grid=4, layer_scale_init=0.5
        )
    )
    return randomize(visual, seed=seed).eval()


def _hf_config(**overrides):
    backbone = dict(
        model_type="tipsv2_vision_model",
        hidden_size=EMBED_DIM,
        num_hidden_layers=4,
        num_attention_heads=2,
        mlp_ratio=2.0,
        image_size=56,
        patch_size=14,
        out_indices=[1, 2, 3, 4],
        apply_layernorm=True,
        reshape_hidden_states=False,
        num_register_tokens=1,
        layerscale_value=0.5,
    )
    return transformers.Tipsv2DptConfig(
        backbone_config=backbone,
        neck_hidden_sizes=[4, 8, 16, 32],
        fusion_hidden_size=CHANNELS,
        num_depth_bins=12,
        num_labels=7,
        **overrides,
    )


def _hf_outputs(hf_model, images):
    with torch.no_grad():
        out = hf_model(pixel_values=images)
    if isinstance(hf_model, transformers.Tipsv2DptForDensePrediction):
        return {"depth": out.predicted_depth, "normals": out.normals, "segmentation": out.segmentation_logits}
    if isinstance(hf_model, transformers.Tipsv2DptForDepthEstimation):
        return {"depth": out.predicted_depth}
    if isinstance(hf_model, transformers.Tipsv2DptForNormalEstimation):
        return {"normals": out.normals}
    return {"segmentation": out.logits}


def _our_outputs(visual, heads, images):
    outputs = {}
    with torch.no_grad():
        for task, head in heads.items():
            layers = visual.forward_intermediates(
                images,
                indices=head.config.layers_for(len(visual.blocks)),
                norm=True,
                return_prefix_tokens=True,
                intermediates_only=True,
            )
            outputs[task] = head(layers)[:, 0] if task == "depth" else head.raw(layers)
    return outputs


def _assert_outputs_close(ours, theirs):
    assert set(ours) == set(theirs)
    for task in ours:
        scale = max(theirs[task].abs().max().item(), 1.0)
        torch.testing.assert_close(ours[task], theirs[task], atol=2e-5 * scale, rtol=1e-4, msg=task)


@pytest.mark.parametrize(
    "cls_name",
    [
        "Tipsv2DptForDensePrediction",
        "Tipsv2DptForDepthEstimation",
        "Tipsv2DptForNormalEstimation",
        "Tipsv2DptForSemanticSegmentation",
    ],
)
def test_transformers_checkpoint_reads_into_identical_heads(tmp_path, cls_name):
    torch.manual_seed(0)
    hf_model = randomize(
        getattr(transformers, cls_name)(_hf_config(depth_decoder_activation="relu")), seed=4
    ).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    loaded = dense_heads.load_transformers_dpt(tmp_path / "hf", follow_depth_activation=True)
    images = torch.rand(2, 3, 56, 84, generator=torch.Generator().manual_seed(1))
    _assert_outputs_close(_our_outputs(loaded.visual, loaded.heads, images), _hf_outputs(hf_model, images))
    assert all(head.config.layer_indices == (0, 1, 2, 3) for head in loaded.heads.values())


def test_reading_transformers_follows_the_released_weights_by_default(tmp_path):
    """transformers' depth ReLU is dropped unless asked for: the released heads were trained without it."""
    hf_model = randomize(transformers.Tipsv2DptForDepthEstimation(_hf_config()), seed=4).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    loaded = dense_heads.load_transformers_dpt(tmp_path / "hf")
    assert loaded.heads["depth"].config.output_activation is False
    linear = randomize(
        transformers.Tipsv2DptForDepthEstimation(_hf_config(depth_decoder_activation="linear")), seed=4
    )
    images = torch.rand(1, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    _assert_outputs_close(
        _our_outputs(loaded.visual, loaded.heads, images), _hf_outputs(linear.eval(), images)
    )


@pytest.mark.parametrize("tasks", [DENSE_TASKS, ("depth",), ("segmentation",)])
def test_written_transformers_checkpoint_runs_identically_in_transformers(tmp_path, tasks):
    visual = _tiny_visual()
    config = DPTConfig(EMBED_DIM, channels=CHANNELS)  # default layers: evenly spaced = (0, 1, 2, 3)
    heads = {task: _decoder(task, seed=i, config=config) for i, task in enumerate(tasks)}
    dense_heads.save_transformers_dpt(visual, heads, tmp_path / "hf")
    hf_model = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    cls = getattr(transformers, hf_model.architectures[0])
    hf_model = cls.from_pretrained(tmp_path / "hf").eval()
    images = torch.rand(2, 3, 42, 70, generator=torch.Generator().manual_seed(3))
    _assert_outputs_close(_our_outputs(visual, heads, images), _hf_outputs(hf_model, images))
    again = dense_heads.load_transformers_dpt(tmp_path / "hf")
    for task in tasks:
        torch.testing.assert_close(again.heads[task].state_dict(), heads[task].state_dict())


def test_two_of_three_tasks_have_no_transformers_class(tmp_path):
    config = DPTConfig(EMBED_DIM, channels=CHANNELS)
    heads = {task: _decoder(task, config=config) for task in ("depth", "normals")}
    with pytest.raises(ValueError, match="one task or all three"):
        dense_heads.save_transformers_dpt(_tiny_visual(), heads, tmp_path / "hf")


def test_a_tipsv2_model_directory_is_not_a_dpt_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "tipsv2"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="expected 'tipsv2_dpt'"):
        dense_heads.load_transformers_dpt(tmp_path)


def test_a_probe_trained_in_place_saves_and_reloads_with_its_metrics(tmp_path):
    """The head given to dpt_normals_probe is the one trained: saved, reloaded, it scores the same."""
    from dataclasses import replace

    from tests.eval.test_probes import _normals_task
    from tipstorch.eval.metrics import NormalsMetric
    from tipstorch.eval.probes import DPT_RECIPE, dpt_normals_probe, evaluate_dense_probe
    from tipstorch.models.dense import DPTNormalsDecoder

    torch.manual_seed(0)
    head = DPTNormalsDecoder(DPTConfig(embed_dim=16, channels=16, readout_index=1))
    before = {key: value.clone() for key, value in head.state_dict().items()}
    test = _normals_task(4, 1)
    config = replace(DPT_RECIPE.scaled(iterations=20, batch_size=4), learning_rate=1e-3)
    result = dpt_normals_probe(_normals_task(8, 0), test, config=config, head=head)
    assert not torch.equal(head.dpt.project.weight, before["dpt.project.weight"])
    loaded = dense_heads.load_dense_head(dense_heads.save_dense_head(head, tmp_path / "normals.safetensors"))
    again = evaluate_dense_probe(loaded, *test, NormalsMetric(), lambda normals: normals)
    assert again["mean"] == pytest.approx(result["mean"], rel=1e-5)
