"""Shared fixtures: tiny model configs and a SentencePiece model trained on the spot."""

from __future__ import annotations

import io

import pytest
import sentencepiece
import torch

from tipstorch.models.text import TextConfig
from tipstorch.models.tips import TIPSConfig
from tipstorch.models.vit import VisionConfig

SPM_CORPUS = [
    "a photo of a dog on the left of a red car",
    "a cat sitting above a blue square, next to a green circle",
    "Two people walking on the beach at sunset with a yellow umbrella",
    "the quick brown fox jumps over the lazy dog",
    "a small ring in front of a large triangle on a striped background",
    "satellite image of fields and rivers, aerial view of a city",
]


def tiny_config(ffn: str = "mlp", pos_grid: int = 4, width: int = 48) -> TIPSConfig:
    """A 2-block model small enough for fast tests (heads = width / 16)."""
    heads = width // 16
    hidden = 96 if ffn == "swiglu" else 4 * width
    return TIPSConfig(
        vision=VisionConfig(embed_dim=width, depth=2, num_heads=heads, mlp_hidden_dim=hidden, ffn=ffn,
                            pos_grid=pos_grid, layer_scale_init=0.5),
        text=TextConfig(width=width, depth=2, num_heads=heads, mlp_dim=2 * width, vocab_size=300, context_length=16),
        image_size=pos_grid * 14,
        temperature=0.02,
    )


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter with random values so that no term (biases, gammas, norms) is trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1 + (0.5 if parameter.ndim == 1 else 0.0))
    return module


@pytest.fixture(scope="session")
def spm_model_path(tmp_path_factory) -> str:
    """A 200-piece SentencePiece model with the official TIPS id layout (pad 0, no BOS/EOS)."""
    directory = tmp_path_factory.mktemp("spm")
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS * 20), model_writer=buffer, vocab_size=120,
        pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, model_type="unigram", minloglevel=2,
        hard_vocab_limit=False,
    )
    path = directory / "tokenizer.model"
    path.write_bytes(buffer.getvalue())
    return str(path)
