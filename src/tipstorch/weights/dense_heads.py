"""DPT heads from files: the released Scenic zips (through the download cache), transformers'
``tipsv2_dpt`` checkpoints (read and write) and tipstorch's own head files (probes).

    head = create_dense_head("tipsv2-b14", "depth", pretrained=True)   # downloads the zip once
    layers = model.visual.forward_intermediates(images, indices=head.config.layer_indices, norm=True,
                                                return_prefix_tokens=True, intermediates_only=True)
    depth = head(layers, image_size=images.shape[-2:])                   # [B, 1, H, W] metres

transformers' layout (``Tipsv2DptFor{DepthEstimation,NormalEstimation,SemanticSegmentation,
DensePrediction}.save_pretrained``): ``vision_encoder.*`` holds the vision tower in the official key
names, ``<task>_head.*`` one DPT per task with our parameter names minus the ``dpt.`` prefix, and
``<task>_head.<task>_head.*`` its per-pixel Linear. The backbone's ``out_indices`` are 1-based
hidden-state indices (0 = embeddings), i.e. block index + 1.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from tipstorch.models.dense import (
    ADE20K_NUM_CLASSES,
    DENSE_TASKS,
    DepthBinsConfig,
    DPTConfig,
    DPTDecoder,
    DPTDepthDecoder,
    create_dpt_decoder,
    dense_task_of,
    dpt_layer_indices,
    load_checked_state,
    load_scenic_dpt,
)
from tipstorch.models.registry import get_dense_head_spec, get_model_spec
from tipstorch.models.text import TextConfig
from tipstorch.models.tips import TIPSConfig, TIPSModel
from tipstorch.models.vit import VisionConfig, VisionTransformer
from tipstorch.weights import cache
from tipstorch.weights.state_io import CheckpointError, atomic_write, load_checked, read_safetensors
from tipstorch.weights.transformers import (
    config_from_transformers,
    from_transformers_state,
    to_transformers_state,
    transformers_config,
)

DENSE_HEAD_FORMAT = "tipstorch-dense-head"
TRANSFORMERS_ARCHITECTURES = {
    "depth": "Tipsv2DptForDepthEstimation",
    "normals": "Tipsv2DptForNormalEstimation",
    "segmentation": "Tipsv2DptForSemanticSegmentation",
}
# Scenic head name of each task (decoders.py _SCENIC_HEAD_NAMES), used to tell a zip's task
_SCENIC_HEADS = {
    "pixel_segmentation": "segmentation",
    "pixel_depth_classif": "depth",
    "pixel_normals": "normals",
}


def _place(decoder: DPTDecoder, device: str | torch.device | None, dtype: torch.dtype | None) -> DPTDecoder:
    decoder = decoder.to(device=device, dtype=dtype) if (device or dtype) else decoder
    return decoder.eval()


def create_dense_head(
    model_name: str,
    task: str,
    pretrained: bool = True,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> DPTDecoder:
    """The released DPT head of a registered model for ``task`` ("segmentation": 150 ADE20K classes,
    "depth": 256 bins over 0.001-10 m, "normals"), randomly initialised or with its released weights
    (downloaded to the cache on first use; ``TIPSTORCH_OFFLINE=1`` forbids it). Returned in eval mode;
    ``head.config.layer_indices`` are the blocks it reads."""
    spec = get_dense_head_spec(model_name, task)
    vision = get_model_spec(model_name).config.vision
    config = DPTConfig(vision.embed_dim, layer_indices=dpt_layer_indices(vision.depth))
    decoder = create_dpt_decoder(task, config)
    if pretrained:
        load_scenic_dpt(decoder, cache.download(spec.url, expected_size=spec.size_bytes))
    return _place(decoder, device, dtype)


def read_scenic_zip(path: str | os.PathLike, layer_indices: tuple[int, ...] | None = None) -> DPTDecoder:
    """A Scenic DPT zip as a decoder, its task (from the head's name) and shapes read from the arrays."""
    with np.load(path, allow_pickle=False) as archive:
        shapes = {key.removeprefix("decoder/"): archive[key].shape for key in archive.files}
    heads = [task for name, task in _SCENIC_HEADS.items() if f"{name}/kernel" in shapes]
    readout = shapes.get("dpt/reassemble_blocks/readout_projects_0/kernel")
    project = shapes.get("dpt/project/kernel")
    if len(heads) != 1 or readout is None or project is None:
        raise CheckpointError(
            f"{path}: not a Scenic DPT head zip (need dpt/... arrays and one of {list(_SCENIC_HEADS)})"
        )
    task = heads[0]
    config = DPTConfig(readout[1], channels=project[3], layer_indices=layer_indices)
    outputs = shapes[f"{next(n for n, t in _SCENIC_HEADS.items() if t == task)}/kernel"][1]
    decoder = create_dpt_decoder(task, config, num_classes=outputs, bins=DepthBinsConfig(num_bins=outputs))
    return load_scenic_dpt(decoder, path).eval()


# ---------------------------------------------------------------------------------------------
# tipstorch head files (e.g. probes trained by ``tipstorch eval``)


def save_dense_head(decoder: DPTDecoder, path: str | os.PathLike, model: str | None = None) -> Path:
    """Write a DPT decoder as one safetensors file, its task and config in the metadata; atomic.
    ``model`` records which model's features it was trained on."""
    path = Path(path)
    task = dense_task_of(decoder)
    metadata = {
        "format": DENSE_HEAD_FORMAT,
        "task": task,
        "dpt_config": json.dumps(asdict(decoder.config)),
        "num_outputs": str(decoder.head.out_features),
        "model": model or "",
    }
    if isinstance(decoder, DPTDepthDecoder):
        centres = decoder.bin_centers
        metadata["bins"] = json.dumps(
            asdict(DepthBinsConfig(len(centres), centres[0].item(), centres[-1].item()))
        )
    state = {key: value.detach().contiguous() for key, value in decoder.state_dict().items()}
    atomic_write(path, lambda target: save_file(state, target, metadata=metadata))
    return path


def load_dense_head(path: str | os.PathLike) -> DPTDecoder:
    """A DPT decoder from a file written by ``save_dense_head`` (or a Scenic zip); eval mode."""
    path = cache.resolve(path)
    if path.suffix in (".zip", ".npz"):
        return read_scenic_zip(path)
    state, metadata = read_safetensors(path)
    if metadata.get("format") != DENSE_HEAD_FORMAT:
        raise CheckpointError(
            f"{path}: not a tipstorch dense head file (metadata format {metadata.get('format')!r})"
        )
    config = DPTConfig(**json.loads(metadata["dpt_config"]))
    bins = DepthBinsConfig(**json.loads(metadata["bins"])) if "bins" in metadata else None
    decoder = create_dpt_decoder(
        metadata["task"], config, num_classes=int(metadata["num_outputs"]), bins=bins
    )
    load_checked_state(decoder, state, str(path))
    return decoder.eval()


def dense_head_model(path: str | os.PathLike) -> str | None:
    """The model a tipstorch head file says it was trained on (None if it does not say)."""
    _, metadata = read_safetensors(cache.resolve(path))
    return metadata.get("model") or None


# ---------------------------------------------------------------------------------------------
# transformers' tipsv2_dpt


@dataclass
class TransformersDPT:
    """A transformers ``tipsv2_dpt`` checkpoint: its vision tower and one DPT decoder per task."""

    visual: VisionTransformer
    heads: dict[str, DPTDecoder]
    image_size: int


def _vision_only_config(vision: VisionConfig) -> TIPSConfig:
    # transformers_config / config_from_transformers work on whole TIPS configs; the text side is unused
    text = TextConfig(
        width=vision.embed_dim, depth=1, num_heads=vision.num_heads, mlp_dim=8, vocab_size=2, context_length=2
    )
    return TIPSConfig(vision=vision, text=text, image_size=vision.pos_grid * vision.patch_size)


def save_transformers_dpt(
    model: TIPSModel | VisionTransformer, heads: Mapping[str, DPTDecoder], directory: str | os.PathLike
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that transformers' Tipsv2Dpt classes load: one task
    -> ``Tipsv2DptFor<Task>``, all three -> ``Tipsv2DptForDensePrediction``. The heads must read the same
    layers. A head without ``output_activation`` is written with ``depth_decoder_activation="linear"``
    so that transformers computes what the released weights expect (see ``DPTConfig``)."""
    visual = model.visual if isinstance(model, TIPSModel) else model
    if not heads or set(heads) - set(DENSE_TASKS):
        raise ValueError(f"heads must be a non-empty mapping of tasks in {DENSE_TASKS}, got {list(heads)}")
    configs = {task: head.config for task, head in heads.items()}
    first = next(iter(configs.values()))
    layers = first.layers_for(len(visual.blocks))
    for task, config in configs.items():
        if (
            config.layers_for(len(visual.blocks)) != layers
            or config.channels != first.channels
            or config.readout_index != 0
        ):
            raise ValueError(
                f"head {task!r} differs in layers/channels/readout from the others; transformers "
                "shares one backbone output and reads out CLS1 (readout_index=0)"
            )
    if set(heads) == set(DENSE_TASKS):
        architecture = "Tipsv2DptForDensePrediction"
    elif len(heads) == 1:
        architecture = TRANSFORMERS_ARCHITECTURES[next(iter(heads))]
    else:
        raise ValueError("transformers has classes for one task or all three, not for " + ", ".join(heads))
    vision_config = transformers_config(_vision_only_config(visual.config))["vision_config"]
    vision_config.update(
        out_indices=[index + 1 for index in layers], apply_layernorm=True, reshape_hidden_states=False
    )
    hf_config: dict = {
        "model_type": "tipsv2_dpt",
        "architectures": [architecture],
        "backbone_config": vision_config,
        "neck_hidden_sizes": list(first.post_process_channels),
        "fusion_hidden_size": first.channels,
        "reassemble_factors": [4, 2, 1, 0.5],
        "readout_activation": "gelu_pytorch_tanh",
    }
    if "depth" in heads:
        depth = heads["depth"]
        centres = depth.bin_centers
        hf_config.update(
            num_depth_bins=len(centres),
            min_depth=centres[0].item(),
            max_depth=centres[-1].item(),
            depth_decoder_activation="relu" if depth.config.output_activation else "linear",
        )
    if "segmentation" in heads:
        classes = heads["segmentation"].head.out_features
        hf_config["id2label"] = {str(i): f"LABEL_{i}" for i in range(classes)}
        hf_config["label2id"] = {f"LABEL_{i}": i for i in range(classes)}
    vision_state = {
        key: value
        for key, value in to_transformers_state(_wrap_visual(visual)).items()
        if key.startswith("vision_encoder.")
    }
    for task, head in heads.items():
        for key, value in head.state_dict().items():
            if key == "bin_centers":
                continue
            name = (
                f"{task}_head.{task}_head.{key[5:]}" if key.startswith("head.") else f"{task}_head.{key[4:]}"
            )
            vision_state[name] = value.detach().contiguous()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(
        directory / "model.safetensors", lambda path: save_file(vision_state, path, metadata={"format": "pt"})
    )
    atomic_write(
        directory / "config.json", lambda path: Path(path).write_text(json.dumps(hf_config, indent=2))
    )
    return directory


def _wrap_visual(visual: VisionTransformer) -> TIPSModel:
    """A TIPSModel around ``visual`` (a stub text tower) so the model-level key mapping applies."""
    model = TIPSModel(_vision_only_config(visual.config))
    model.visual = visual
    return model


def load_transformers_dpt(path: str | os.PathLike, follow_depth_activation: bool = False) -> TransformersDPT:
    """Read a transformers ``tipsv2_dpt`` directory (or its model.safetensors beside config.json).

    transformers applies a ReLU after the depth head's ``project`` conv (``depth_decoder_activation``,
    default "relu"); the released weights were trained without it (see ``DPTConfig``), so it is
    dropped unless ``follow_depth_activation`` asks to reproduce transformers' outputs exactly.
    """
    path = Path(path)
    weights = path / "model.safetensors" if path.is_dir() else path
    config_file = weights.parent / "config.json"
    if not config_file.exists():
        raise CheckpointError(
            f"{weights}: transformers checkpoints need the config.json beside them ({config_file})"
        )
    hf_config = json.loads(config_file.read_text())
    if hf_config.get("model_type") != "tipsv2_dpt":
        raise CheckpointError(
            f"{config_file}: model_type {hf_config.get('model_type')!r}, expected 'tipsv2_dpt'"
        )
    backbone = hf_config.get("backbone_config") or {}
    text_stub = {
        "hidden_size": backbone.get("hidden_size", 768),
        "num_attention_heads": backbone.get("num_attention_heads", 12),
    }
    tips_config = config_from_transformers({"vision_config": backbone, "text_config": text_stub})
    state, _ = read_safetensors(weights)
    if not any(key.startswith("vision_encoder.") for key in state):
        raise CheckpointError(
            f"{weights}: no vision_encoder.* keys; expected the tipsv2_dpt on-disk layout "
            "written by save_pretrained"
        )
    vision_state = {key: value for key, value in state.items() if key.startswith("vision_encoder.")}
    visual = VisionTransformer(tips_config.vision)
    converted = from_transformers_state(vision_state, tips_config, str(weights))
    load_checked(
        visual,
        {key[len("visual.") :]: value for key, value in converted.items() if key.startswith("visual.")},
        str(weights),
    )
    layers = tuple(i - 1 for i in backbone.get("out_indices", [3, 6, 9, 12]))
    heads: dict[str, DPTDecoder] = {}
    for task in DENSE_TASKS:
        prefix, linear = f"{task}_head.", f"{task}_head.{task}_head."
        head_state = {}
        for key, value in state.items():
            if key.startswith(linear):
                head_state["head." + key[len(linear) :]] = value
            elif key.startswith(prefix):
                head_state["dpt." + key[len(prefix) :]] = value
        if not head_state:
            continue
        relu = (
            task == "depth"
            and follow_depth_activation
            and hf_config.get("depth_decoder_activation", "relu") == "relu"
        )
        config = DPTConfig(
            backbone.get("hidden_size", 768),
            channels=hf_config.get("fusion_hidden_size", 256),
            output_activation=relu,
            layer_indices=layers,
        )
        bins = DepthBinsConfig(
            hf_config.get("num_depth_bins", 256),
            hf_config.get("min_depth", 1e-3),
            hf_config.get("max_depth", 10.0),
        )
        classes = len(hf_config.get("id2label") or {}) or ADE20K_NUM_CLASSES
        decoder = create_dpt_decoder(task, config, num_classes=classes, bins=bins)
        load_checked_state(decoder, head_state, f"{weights} ({task} head)")
        heads[task] = decoder.eval()
    if not heads:
        raise CheckpointError(f"{weights}: no <task>_head.* keys for any of {DENSE_TASKS}")
    return TransformersDPT(visual.eval(), heads, tips_config.image_size)


def dense_head_from(
    source: str, task: str, model_name: str | None = None, pretrained: bool = True
) -> DPTDecoder:
    """A head for ``task`` named by ``source``: "released" (the released head of ``model_name``), a
    tipstorch head file, a Scenic zip (path or URL) or a transformers ``tipsv2_dpt`` directory."""
    if source == "released":
        if model_name is None:
            raise ValueError(f"a released {task} head needs a registered model name")
        return create_dense_head(model_name, task, pretrained=pretrained)
    path = Path(source)
    if path.is_dir():
        heads = load_transformers_dpt(path).heads
        if task not in heads:
            raise CheckpointError(
                f"{path}: a transformers tipsv2_dpt checkpoint without a {task} head ({list(heads)})"
            )
        return heads[task]
    decoder = load_dense_head(source)
    if dense_task_of(decoder) != task:
        raise CheckpointError(f"{source}: a {dense_task_of(decoder)} head, not a {task} head")
    return decoder
