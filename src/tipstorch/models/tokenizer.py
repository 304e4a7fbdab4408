"""SentencePiece tokenizer with the settings of the official TIPS text tower.

The official code lower-cases text with ``tf.strings.lower`` (ASCII letters only), tokenizes it with
SentencePiece without BOS/EOS, truncates to 64 ids and right-pads with id 0. We reproduce that with the
``sentencepiece`` package, so no TensorFlow is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import sentencepiece
import torch

from tipstorch.models.text import PAD_ID

OFFICIAL_TOKENIZER_URL = "https://storage.googleapis.com/tips_data/v1_0/checkpoints/tokenizer.model"
OFFICIAL_TOKENIZER = "official"  # the 32k SentencePiece model of TIPS v1 and v2
SCENES_TOKENIZER = "scenes"  # the small SentencePiece model for the built-in scenes data (tipstorch/assets)

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_lower(text: str) -> str:
    """Lower-case ASCII letters only, as ``tf.strings.lower`` does; other characters are kept."""
    return text.translate(_ASCII_LOWER)


class Tokenizer:
    """Callable text -> ids: ``tokenizer(["a dog", "a cat"])`` gives a LongTensor [B, context_length]."""

    def __init__(self, model_path: str | Path, context_length: int = 64) -> None:
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {model_path}")
        try:
            self.processor = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
        except (RuntimeError, OSError) as error:
            raise ValueError(f"{model_path} is not a valid SentencePiece model: {error}") from error
        self.model_path = model_path
        self.context_length = context_length

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Ids of one text, lower-cased, without BOS/EOS, truncated to the context length."""
        return self.processor.encode(ascii_lower(text), add_bos=False, add_eos=False)[: self.context_length]

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        ids = torch.full((len(texts), self.context_length), PAD_ID, dtype=torch.long)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text at index {row} is {type(text).__name__}, expected str")
            encoded = self.encode(text)
            if not encoded:
                raise ValueError(f"text at index {row} is empty after tokenization: {text!r}")
            ids[row, : len(encoded)] = torch.tensor(encoded, dtype=torch.long)
        return ids

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size}, context_length={self.context_length})"
