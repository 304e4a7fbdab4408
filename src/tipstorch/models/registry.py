"""Named TIPS / TIPSv2 models: their shapes and where their official weights live.

Sizes (vision width / depth / heads / MLP; text depth and MLP) follow the official PyTorch release:
``pytorch/image_encoder.py`` and ``pytorch/run_text_encoder_inference.py`` of google-deepmind/tips.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tipstorch.models.dense import DENSE_TASKS
from tipstorch.models.text import TextConfig
from tipstorch.models.tips import TIPSConfig
from tipstorch.models.tokenizer import SCENES_TOKENIZER
from tipstorch.models.vit import VisionConfig

CHECKPOINT_BASE_URL = "https://storage.googleapis.com/tips_data/"

# size: (width, depth, heads, mlp hidden, ffn, text depth, text mlp)
_SIZES: dict[str, tuple[int, int, int, int, str, int, int]] = {
    "s14": (384, 12, 6, 1536, "mlp", 12, 1536),
    "b14": (768, 12, 12, 3072, "mlp", 12, 3072),
    "l14": (1024, 24, 16, 4096, "mlp", 12, 4096),
    "so400m14": (1152, 27, 16, 4304, "mlp", 27, 4304),
    "g14": (1536, 40, 24, 4096, "swiglu", 12, 6144),
}


def size_configs(size: str, pos_grid: int = 32) -> tuple[VisionConfig, TextConfig]:
    """Vision and text configs of a released size ("s14", "b14", "l14", "so400m14", "g14")."""
    width, depth, heads, mlp, ffn, text_depth, text_mlp = _SIZES[size]
    vision = VisionConfig(
        embed_dim=width, depth=depth, num_heads=heads, mlp_hidden_dim=mlp, ffn=ffn, pos_grid=pos_grid
    )
    text = TextConfig(width=width, depth=text_depth, num_heads=heads, mlp_dim=text_mlp)
    return vision, text


def heads_for_width(width: int) -> int:
    """Number of attention heads of the released model with this width (for shape inference)."""
    for size_width, _, heads, *_ in _SIZES.values():
        if size_width == width:
            return heads
    raise ValueError(
        f"no released TIPS model has width {width}; pass an explicit config to load this checkpoint"
    )


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its config (which names its tokenizer) and its official weight files
    (URLs, None for models that exist only randomly initialised)."""

    name: str
    config: TIPSConfig
    vision_url: str | None
    text_url: str | None
    description: str

    @property
    def has_weights(self) -> bool:
        return self.vision_url is not None


def _official(name: str, size: str, stem: str, version: str, description: str, image_size: int = 448) -> ModelSpec:
    pos_grid = image_size // 14
    vision, text = size_configs(size, pos_grid=pos_grid)
    url = f"{CHECKPOINT_BASE_URL}{version}/checkpoints/pytorch/{stem}"
    return ModelSpec(
        name=name,
        config=TIPSConfig(vision=replace(vision, layer_scale_init=1.0), text=text, image_size=image_size),
        vision_url=f"{url}_vision.npz",
        text_url=f"{url}_text.npz",
        description=description,
    )


def _tiny() -> ModelSpec:
    vision = VisionConfig(embed_dim=192, depth=6, num_heads=3, mlp_hidden_dim=768, pos_grid=16)
    text = TextConfig(width=192, depth=4, num_heads=3, mlp_dim=768, vocab_size=512)  # the scenes tokenizer
    return ModelSpec(
        name="tips-tiny",
        config=TIPSConfig(vision=vision, text=text, image_size=224, temperature=0.07, tokenizer=SCENES_TOKENIZER),
        vision_url=None,
        text_url=None,
        description="tiny ViT/14 for CPU pretraining on the built-in scenes data (random init)",
    )


_REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        _official("tipsv2-b14", "b14", "tips_v2_oss_b14", "v2_0", "TIPSv2 B/14, 448 px"),
        _official("tipsv2-l14", "l14", "tips_v2_oss_l14", "v2_0", "TIPSv2 L/14, 448 px"),
        _official("tipsv2-so400m14", "so400m14", "tips_v2_oss_so14", "v2_0", "TIPSv2 SO400m/14, 448 px"),
        _official("tipsv2-g14", "g14", "tips_v2_oss_g14", "v2_0", "TIPSv2 g/14 (SwiGLU), 448 px"),
        _official("tips-v1-s14", "s14", "tips_oss_s14_highres_distilled", "v1_0", "TIPS S/14 HR, distilled"),
        _official("tips-v1-b14", "b14", "tips_oss_b14_highres_distilled", "v1_0", "TIPS B/14 HR, distilled"),
        _official("tips-v1-l14", "l14", "tips_oss_l14_highres_distilled", "v1_0", "TIPS L/14 HR, distilled"),
        _official(
            "tips-v1-so400m14", "so400m14", "tips_oss_so400m14_highres_largetext_distilled", "v1_0",
            "TIPS SO400m/14 HR, large text tower, distilled",
        ),
        _official("tips-v1-g14", "g14", "tips_oss_g14_highres", "v1_0", "TIPS g/14 HR, 448 px"),
        _official(
            "tips-v1-g14-lowres", "g14", "tips_oss_g14_lowres", "v1_0", "TIPS g/14 LR, 224 px", image_size=224
        ),
        _tiny(),
    ]
}


def list_models(pretrained: bool = False) -> list[str]:
    """Registered model names; with ``pretrained`` only those with official weights."""
    return sorted(name for name, spec in _REGISTRY.items() if spec.has_weights or not pretrained)


def get_model_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None


# ---------------------------------------------------------------------------------------------
# Released DPT heads (Scenic zips of Flax arrays; official notebook pytorch/TIPS_decoder_inference.ipynb)

_DENSE_HEAD_STEMS: dict[str, str] = {
    "tipsv2-b14": "tips_v2_b14",
    "tipsv2-l14": "tips_v2_l14",
    "tipsv2-so400m14": "tips_v2_so400m14",
    "tipsv2-g14": "tips_v2_g14",
}


@dataclass(frozen=True)
class DenseHeadSpec:
    """A released DPT head: the model whose features it reads, its task and where its zip lives
    (``size_bytes``, when known, is checked after download besides the server-announced size)."""

    model_name: str
    task: str
    url: str
    size_bytes: int | None = None


def list_dense_heads() -> list[tuple[str, str]]:
    """(model name, task) of every released DPT head."""
    return [(name, task) for name in sorted(_DENSE_HEAD_STEMS) for task in DENSE_TASKS]


def get_dense_head_spec(model_name: str, task: str) -> DenseHeadSpec:
    if task not in DENSE_TASKS:
        raise ValueError(f"unknown dense task {task!r}; choose from {', '.join(DENSE_TASKS)}")
    stem = _DENSE_HEAD_STEMS.get(model_name)
    if stem is None:
        raise ValueError(
            f"no released DPT heads for model {model_name!r}; released for: {', '.join(sorted(_DENSE_HEAD_STEMS))}"
        )
    url = f"{CHECKPOINT_BASE_URL}v2_0/checkpoints/scenic/{stem}_{task}_dpt.zip"
    return DenseHeadSpec(model_name, task, url)
