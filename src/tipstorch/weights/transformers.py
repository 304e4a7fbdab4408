"""transformers' ``Tipsv2Model`` layout (the ``google/tipsv2-*`` repositories): ``config.json`` and
``model.safetensors`` with split q/k/v and SwiGLU projections. We read and write it, so a tipstorch
model runs in transformers too.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from tipstorch.models.text import TextConfig
from tipstorch.models.tips import TIPSConfig, TIPSModel
from tipstorch.models.vit import VisionConfig
from tipstorch.weights.official import TEMPERATURE_KEY
from tipstorch.weights.state_io import (
    CheckpointError,
    atomic_write,
    load_checked,
    read_safetensors,
    require_key,
)


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
        parts = [require_key(state, name, source) for name in theirs]
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


# the tokenizer files a transformers Tipsv2 directory may carry, in order of preference: the SentencePiece
# model (google/tipsv2-* on the hub), then the tokenizer.json that transformers' Tipsv2Tokenizer saves
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def load_transformers(path: str | os.PathLike) -> TIPSModel:
    """Load a transformers Tipsv2 directory (config.json + model.safetensors) or its safetensors file.
    When the directory carries its own tokenizer (``TOKENIZER_FILES``) the model's config names it."""
    path = Path(path)
    weights = path / "model.safetensors" if path.is_dir() else path
    config_file = weights.parent / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{weights}: transformers checkpoints need the config.json beside them ({config_file})")
    config = config_from_transformers(json.loads(config_file.read_text()))
    own_tokenizer = next((f for f in TOKENIZER_FILES if (weights.parent / f).is_file()), None)
    if own_tokenizer is not None:
        config = replace(config, tokenizer=str(weights.parent / own_tokenizer))
    state, _ = read_safetensors(weights)
    model = TIPSModel(config)
    load_checked(model, from_transformers_state(state, config, str(weights)), str(weights))
    return model

