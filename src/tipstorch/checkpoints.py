"""Checkpoint formats: official PyTorch npz, transformers' Tipsv2 safetensors, and our own safetensors.

* Official npz (google-deepmind/tips, ``pytorch/``): one file for the vision tower, one for the text
  tower, whose ``temperature`` scalar divides cosine similarities. Key names equal our module names.
* transformers (``Tipsv2Model``, the ``google/tipsv2-*`` repositories): ``config.json`` and
  ``model.safetensors`` with split q/k/v and SwiGLU projections. We read and write it, so a tipstorch
  model runs in transformers too.
* tipstorch safetensors: our state dict with the model config stored in the file's metadata.

Every file is read without unpickling (``np.load(allow_pickle=False)``, safetensors). A key that is
missing, unexpected or of the wrong shape raises :class:`CheckpointError` naming the file, the key,
and the expected and found shapes.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from tipstorch.models.registry import heads_for_width
from tipstorch.models.text import TextConfig
from tipstorch.models.tips import TIPSConfig, TIPSModel
from tipstorch.models.vit import VisionConfig

TIPSTORCH_FORMAT = "tipstorch"
TEMPERATURE_KEY = "temperature"


class CheckpointError(ValueError):
    """A checkpoint file is unreadable or does not fit the model."""


# ---------------------------------------------------------------------------------------------
# Reading and checking


def read_npz(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All arrays of an npz file as float/int tensors, read with ``allow_pickle=False``."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: torch.from_numpy(np.array(archive[key])) for key in archive.files}
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError) as error:
        size = path.stat().st_size if path.exists() else 0
        raise CheckpointError(f"{path}: cannot be read as an npz archive ({size} bytes; truncated?): {error}") from error


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a safetensors file."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot be read as safetensors (truncated?): {error}") from error


def load_checked(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``module`` after checking that keys and shapes match exactly."""
    expected = module.state_dict()
    problems = [f"missing key {key} (expected shape {list(expected[key].shape)})" for key in expected if key not in state]
    problems += [f"unexpected key {key} (shape {list(state[key].shape)})" for key in state if key not in expected]
    problems += [
        f"key {key}: expected shape {list(expected[key].shape)}, found {list(state[key].shape)}"
        for key in expected
        if key in state and expected[key].shape != state[key].shape
    ]
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CheckpointError(f"{source} does not fit the model:\n  {shown}")
    module.load_state_dict({key: value.to(expected[key].dtype) for key, value in state.items()})


def _count_indexed(state: dict[str, torch.Tensor], pattern: str) -> int:
    indices = {int(match.group(1)) for key in state if (match := re.fullmatch(pattern, key))}
    return max(indices) + 1 if indices else 0


def _require(state: dict[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"{source}: missing key {key}")
    return state[key]


def infer_vision_config(state: dict[str, torch.Tensor], source: str) -> VisionConfig:
    """A VisionConfig from the shapes of an official-layout vision state dict."""
    width = _require(state, "cls_token", source).shape[-1]
    depth = _count_indexed(state, r"blocks\.(\d+)\.norm1\.weight")
    swiglu = "blocks.0.mlp.w12.weight" in state
    hidden_key = "blocks.0.mlp.w12.weight" if swiglu else "blocks.0.mlp.fc1.weight"
    hidden = _require(state, hidden_key, source).shape[0] // (2 if swiglu else 1)
    grid = math.isqrt(_require(state, "pos_embed", source).shape[1] - 1)
    return VisionConfig(
        embed_dim=width, depth=depth, num_heads=heads_for_width(width), mlp_hidden_dim=hidden,
        ffn="swiglu" if swiglu else "mlp", pos_grid=grid, layer_scale_init=1.0,
    )


def infer_text_config(state: dict[str, torch.Tensor], source: str) -> TextConfig:
    """A TextConfig from the shapes of an official-layout text state dict."""
    vocab, width = _require(state, "token_embedding.weight", source).shape
    return TextConfig(
        width=width,
        depth=_count_indexed(state, r"transformer\.resblocks\.(\d+)\.ln_1\.weight"),
        num_heads=heads_for_width(width),
        mlp_dim=_require(state, "transformer.resblocks.0.mlp.c_fc.weight", source).shape[0],
        vocab_size=vocab,
    )


# ---------------------------------------------------------------------------------------------
# Official npz


def text_path_for(vision_path: str) -> str:
    """The official text-tower file that accompanies a ``*_vision.npz`` file (path or URL)."""
    if not vision_path.endswith("_vision.npz"):
        raise CheckpointError(
            f"{vision_path}: cannot find its text tower; official vision files end in _vision.npz, "
            "or pass the text file explicitly"
        )
    return vision_path[: -len("_vision.npz")] + "_text.npz"


def load_official(
    vision_path: str | os.PathLike, text_path: str | os.PathLike, config: TIPSConfig | None = None
) -> TIPSModel:
    """Build a TIPSModel from the official PyTorch npz pair; the config is inferred if not given."""
    vision_state = read_npz(vision_path)
    text_state = read_npz(text_path)
    if "token_embedding.weight" in vision_state or "cls_token" in text_state:
        raise CheckpointError(f"{vision_path} / {text_path}: vision and text files are swapped")
    temperature = _require(text_state, TEMPERATURE_KEY, str(text_path)).reshape(())
    text_state.pop(TEMPERATURE_KEY)
    text_state.pop("temperature_contrastive", None)
    if config is None:
        vision_config = infer_vision_config(vision_state, str(vision_path))
        config = TIPSConfig(
            vision=vision_config,
            text=infer_text_config(text_state, str(text_path)),
            image_size=vision_config.pos_grid * vision_config.patch_size,
        )
    model = TIPSModel(config)
    load_checked(model.visual, vision_state, str(vision_path))
    load_checked(model.text, text_state, str(text_path))
    with torch.no_grad():
        model.temperature.fill_(float(temperature))
    return model


def save_official(model: TIPSModel, vision_path: str | os.PathLike, text_path: str | os.PathLike) -> None:
    """Write a model as the official npz pair (float32 arrays, official key names)."""
    vision = {key: value.detach().float().cpu().numpy() for key, value in model.visual.state_dict().items()}
    text = {key: value.detach().float().cpu().numpy() for key, value in model.text.state_dict().items()}
    text[TEMPERATURE_KEY] = np.asarray(model.temperature.detach().float().cpu().numpy())
    atomic_write(Path(vision_path), lambda path: np.savez(path, **vision))
    atomic_write(Path(text_path), lambda path: np.savez(path, **text))


# ---------------------------------------------------------------------------------------------
# transformers' Tipsv2Model layout


def _transformers_key_map(config: TIPSConfig) -> list[tuple[str, list[str]]]:
    """Pairs (our key, transformers keys). Several transformers keys are equal slices of our tensor
    along dim 0: q/k/v of a fused projection, or the SwiGLU gate and up projections."""
    pairs: list[tuple[str, list[str]]] = []
    embed = "vision_model.embeddings."
    pairs += [
        ("visual.cls_token", [embed + "cls_token"]),
        ("visual.register_tokens", [embed + "register_tokens"]),
        ("visual.mask_token", [embed + "mask_token"]),
        ("visual.pos_embed", [embed + "position_embeddings"]),
    ]
    for param in ("weight", "bias"):
        pairs.append((f"visual.patch_embed.proj.{param}", [f"{embed}patch_embeddings.projection.{param}"]))
        pairs.append((f"visual.norm.{param}", [f"vision_model.layernorm.{param}"]))
        pairs.append((f"text.ln_final.{param}", [f"text_model.final_layer_norm.{param}"]))
    for index in range(config.vision.depth):
        ours, theirs = f"visual.blocks.{index}.", f"vision_model.encoder.layer.{index}."
        pairs += [(ours + "ls1.gamma", [theirs + "layer_scale1.lambda1"]), (ours + "ls2.gamma", [theirs + "layer_scale2.lambda1"])]
        for param in ("weight", "bias"):
            qkv = [f"{theirs}attention.{name}_proj.{param}" for name in "qkv"]
            pairs += [
                (f"{ours}norm1.{param}", [f"{theirs}norm1.{param}"]),
                (f"{ours}norm2.{param}", [f"{theirs}norm2.{param}"]),
                (f"{ours}attn.qkv.{param}", qkv),
                (f"{ours}attn.proj.{param}", [f"{theirs}attention.o_proj.{param}"]),
            ]
            if config.vision.ffn == "swiglu":
                pairs += [
                    (f"{ours}mlp.w12.{param}", [f"{theirs}mlp.gate_proj.{param}", f"{theirs}mlp.up_proj.{param}"]),
                    (f"{ours}mlp.w3.{param}", [f"{theirs}mlp.down_proj.{param}"]),
                ]
            else:
                pairs += [(f"{ours}mlp.fc{n}.{param}", [f"{theirs}mlp.fc{n}.{param}"]) for n in (1, 2)]
    pairs.append(("text.token_embedding.weight", ["text_model.embeddings.token_embedding.weight"]))
    for index in range(config.text.depth):
        ours, theirs = f"text.transformer.resblocks.{index}.", f"text_model.encoder.layers.{index}."
        pairs += [
            (ours + "attn.in_proj_weight", [f"{theirs}self_attn.{name}_proj.weight" for name in "qkv"]),
            (ours + "attn.in_proj_bias", [f"{theirs}self_attn.{name}_proj.bias" for name in "qkv"]),
        ]
        for param in ("weight", "bias"):
            pairs += [
                (f"{ours}attn.out_proj.{param}", [f"{theirs}self_attn.out_proj.{param}"]),
                (f"{ours}ln_1.{param}", [f"{theirs}layer_norm1.{param}"]),
                (f"{ours}ln_2.{param}", [f"{theirs}layer_norm2.{param}"]),
                (f"{ours}mlp.c_fc.{param}", [f"{theirs}mlp.fc1.{param}"]),
                (f"{ours}mlp.c_proj.{param}", [f"{theirs}mlp.fc2.{param}"]),
            ]
    pairs.append((TEMPERATURE_KEY, [TEMPERATURE_KEY]))
    return pairs


def transformers_config(config: TIPSConfig) -> dict:
    """The ``config.json`` of transformers' Tipsv2Model for this config."""
    vision, text = config.vision, config.text
    if vision.ffn == "swiglu":
        # transformers derives the SwiGLU width as round8(int(2/3 * int(D * mlp_ratio))).
        mlp_ratio = 1.5 * vision.mlp_hidden_dim / vision.embed_dim
        if vision.mlp_hidden_dim % 8 or (int(int(vision.embed_dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8 != vision.mlp_hidden_dim:
            raise CheckpointError(f"SwiGLU width {vision.mlp_hidden_dim} cannot be expressed in transformers' config")
    else:
        mlp_ratio = vision.mlp_hidden_dim / vision.embed_dim
        if int(vision.embed_dim * mlp_ratio) != vision.mlp_hidden_dim:
            raise CheckpointError(f"MLP width {vision.mlp_hidden_dim} cannot be expressed in transformers' config")
    return {
        "model_type": "tipsv2",
        "architectures": ["Tipsv2Model"],
        "temperature_init_value": float(config.temperature),
        "vision_config": {
            "model_type": "tipsv2_vision_model",
            "hidden_size": vision.embed_dim,
            "num_hidden_layers": vision.depth,
            "num_attention_heads": vision.num_heads,
            "mlp_ratio": mlp_ratio,
            "use_swiglu_ffn": vision.ffn == "swiglu",
            "image_size": vision.pos_grid * vision.patch_size,
            "patch_size": vision.patch_size,
            "layer_norm_eps": vision.norm_eps,
            "layerscale_value": vision.layer_scale_init,
            "num_register_tokens": 1,
        },
        "text_config": {
            "model_type": "tipsv2_text_model",
            "hidden_size": text.width,
            "num_hidden_layers": text.depth,
            "num_attention_heads": text.num_heads,
            "intermediate_size": text.mlp_dim,
            "vocab_size": text.vocab_size,
            "max_position_embeddings": text.context_length,
            "layer_norm_eps": text.norm_eps,
        },
    }


def config_from_transformers(hf_config: dict) -> TIPSConfig:
    """Our TIPSConfig from a transformers Tipsv2 ``config.json`` dict."""
    vision, text = hf_config.get("vision_config", {}), hf_config.get("text_config", {})
    width = vision.get("hidden_size", 768)
    mlp = int(width * vision.get("mlp_ratio", 4))
    swiglu = vision.get("use_swiglu_ffn", False)
    image_size = vision.get("image_size", 448)
    patch = vision.get("patch_size", 14)
    return TIPSConfig(
        vision=VisionConfig(
            embed_dim=width,
            depth=vision.get("num_hidden_layers", 12),
            num_heads=vision.get("num_attention_heads", 12),
            mlp_hidden_dim=(int(mlp * 2 / 3) + 7) // 8 * 8 if swiglu else mlp,
            ffn="swiglu" if swiglu else "mlp",
            patch_size=patch,
            pos_grid=image_size // patch,
            layer_scale_init=vision.get("layerscale_value", 1.0),
            norm_eps=vision.get("layer_norm_eps", 1e-6),
        ),
        text=TextConfig(
            width=text.get("hidden_size", 768),
            depth=text.get("num_hidden_layers", 12),
            num_heads=text.get("num_attention_heads", 12),
            mlp_dim=text.get("intermediate_size", 3072),
            vocab_size=text.get("vocab_size", 32000),
            context_length=text.get("max_position_embeddings", 64),
            norm_eps=text.get("layer_norm_eps", 1e-5),
        ),
        image_size=image_size,
        temperature=hf_config.get("temperature_init_value", 0.005065968260169029),
    )


_HUB_PREFIXES = {"visual.": "vision_encoder.", "text.": "text_encoder."}
_HUB_VISION_MLP = {".mlp.fc1.": ".mlp.c_fc.", ".mlp.fc2.": ".mlp.c_proj."}


def _to_hub_key(key: str) -> str:
    for ours, theirs in _HUB_PREFIXES.items():
        if key.startswith(ours):
            key = theirs + key[len(ours):]
    if key.startswith("vision_encoder."):
        for ours, theirs in _HUB_VISION_MLP.items():
            key = key.replace(ours, theirs)
    return key


def _from_hub_key(key: str) -> str:
    if key.startswith("vision_encoder."):
        for ours, theirs in _HUB_VISION_MLP.items():
            key = key.replace(theirs, ours)
    for ours, theirs in _HUB_PREFIXES.items():
        if key.startswith(theirs):
            key = ours + key[len(theirs):]
    return key


def to_transformers_state(model: TIPSModel) -> dict[str, torch.Tensor]:
    """Our state dict in the on-disk layout of the ``google/tipsv2-*`` repositories, which
    transformers reads (and writes) with its Tipsv2 conversion mapping: official key names under
    ``vision_encoder.`` / ``text_encoder.``, the vision MLP named ``c_fc`` / ``c_proj``."""
    return {_to_hub_key(key): value.detach().clone().contiguous() for key, value in model.state_dict().items()}


def from_transformers_state(state: dict[str, torch.Tensor], config: TIPSConfig, source: str) -> dict[str, torch.Tensor]:
    """A transformers Tipsv2 state dict in our layout. Accepts the on-disk hub layout and the
    in-memory ``Tipsv2Model.state_dict()`` layout (split q/k/v and SwiGLU projections)."""
    if any(key.startswith("vision_encoder.") for key in state):
        converted = {_from_hub_key(key): value for key, value in state.items()}
        converted.setdefault(TEMPERATURE_KEY, torch.tensor(float(config.temperature)))  # published files omit it
        return converted
    converted = {}
    for ours, theirs in _transformers_key_map(config):
        if ours == TEMPERATURE_KEY and TEMPERATURE_KEY not in state:
            converted[ours] = torch.tensor(float(config.temperature))
            continue
        parts = [_require(state, name, source) for name in theirs]
        converted[ours] = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    known = {name for _, theirs in _transformers_key_map(config) for name in theirs}
    extra = sorted(set(state) - known - {"text_model.embeddings.position_ids"})
    if extra:
        raise CheckpointError(f"{source}: unexpected keys for a Tipsv2Model: {', '.join(extra[:10])}")
    return converted


def save_transformers(model: TIPSModel, directory: str | os.PathLike) -> Path:
    """Write ``config.json`` and ``model.safetensors`` that ``Tipsv2Model.from_pretrained`` loads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_config = transformers_config(model.config)
    hf_config["temperature_init_value"] = model.temperature.item()
    state = to_transformers_state(model)
    atomic_write(directory / "model.safetensors", lambda path: save_file(state, path, metadata={"format": "pt"}))
    atomic_write(directory / "config.json", lambda path: Path(path).write_text(json.dumps(hf_config, indent=2)))
    return directory


def load_transformers(path: str | os.PathLike) -> TIPSModel:
    """Load a transformers Tipsv2 directory (config.json + model.safetensors) or its safetensors file."""
    path = Path(path)
    weights = path / "model.safetensors" if path.is_dir() else path
    config_file = weights.parent / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{weights}: transformers checkpoints need the config.json beside them ({config_file})")
    config = config_from_transformers(json.loads(config_file.read_text()))
    state, _ = read_safetensors(weights)
    model = TIPSModel(config)
    load_checked(model, from_transformers_state(state, config, str(weights)), str(weights))
    return model


# ---------------------------------------------------------------------------------------------
# tipstorch safetensors


def save_model(model: TIPSModel, path: str | os.PathLike) -> Path:
    """Write a TIPSModel as one safetensors file, config in the metadata; atomic."""
    path = Path(path)
    metadata = {"format": TIPSTORCH_FORMAT, "config": json.dumps(model.config.to_dict())}
    state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    atomic_write(path, lambda target: save_file(state, target, metadata=metadata))
    return path


def load_tipstorch(path: str | os.PathLike) -> TIPSModel:
    state, metadata = read_safetensors(path)
    if metadata.get("format") != TIPSTORCH_FORMAT:
        raise CheckpointError(f"{path}: not a tipstorch safetensors file (no tipstorch metadata)")
    model = TIPSModel(TIPSConfig(**json.loads(metadata["config"])))
    load_checked(model, state, str(path))
    return model


def is_tipstorch_file(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("format") == TIPSTORCH_FORMAT
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot be read as safetensors (truncated?): {error}") from error


def atomic_write(path: Path, write) -> None:
    """Call ``write(temporary_path)`` then rename it to ``path``, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
