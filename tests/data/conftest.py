"""Fixtures of the data tests: the shipped scenes tokenizer through a minimal [B, 64] wrapper."""

from __future__ import annotations

from pathlib import Path

import pytest
import sentencepiece as spm
import torch

import tipstorch

SCENES_TOKENIZER = Path(tipstorch.__file__).parent / "assets" / "scenes_tokenizer.model"


class SentencePieceTokenize:
    """texts -> LongTensor [B, length]: lower-cased, no BOS/EOS, truncated, padded with id 0."""

    def __init__(self, model_file: Path, length: int = 64) -> None:
        self.processor = spm.SentencePieceProcessor(model_file=str(model_file))
        self.length = length

    def __call__(self, texts: list[str]) -> torch.Tensor:
        tokens = torch.zeros(len(texts), self.length, dtype=torch.long)
        for row, ids in enumerate(self.processor.encode([t.lower() for t in texts])):
            ids = ids[: self.length]
            tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return tokens


@pytest.fixture(scope="session")
def scenes_tokenizer_file() -> Path:
    return SCENES_TOKENIZER


@pytest.fixture(scope="session")
def tokenize() -> SentencePieceTokenize:
    return SentencePieceTokenize(SCENES_TOKENIZER)
