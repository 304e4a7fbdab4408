"""Shared fixtures: a SentencePiece model trained on the spot."""

from __future__ import annotations

import io

import pytest
import sentencepiece

SPM_CORPUS = [
    "a photo of a dog on the left of a red car",
    "a cat sitting above a blue square, next to a green circle",
    "Two people walking on the beach at sunset with a yellow umbrella",
    "the quick brown fox jumps over the lazy dog",
    "a small ring in front of a large triangle on a striped background",
    "satellite image of fields and rivers, aerial view of a city",
]


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
