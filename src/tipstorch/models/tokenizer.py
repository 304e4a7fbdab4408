"""SentencePiece tokenizer with the settings of the official TIPS text tower.

The official code lower-cases text with ``tf.strings.lower`` (ASCII letters only), tokenizes it with
SentencePiece without BOS/EOS, truncates to 64 ids and right-pads with id 0. We reproduce that with the
``sentencepiece`` package, so no TensorFlow is needed. A ``tokenizer.json`` (what transformers' Tipsv2Tokenizer
saves) is read with the ``tokenizers`` package instead; it was converted from the same SentencePiece model.

An empty text (or one of whitespace only) gives a row of pad ids, as the official tokenizer does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


class _TokenizerJson:
    """A ``tokenizer.json`` behind the two SentencePieceProcessor calls that ``Tokenizer`` makes."""

    def __init__(self, path: Path) -> None:
        try:
            import tokenizers
        except ImportError as error:
            raise ImportError(f"reading {path} needs the tokenizers package: pip install tokenizers") from error
        try:
            self.backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises its own Exception type for a bad file
            raise ValueError(f"{path} is not a valid tokenizer.json: {error}") from error

    def get_piece_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str, add_bos: bool, add_eos: bool) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_bos or add_eos).ids


class Tokenizer:
    """Callable text -> ids: ``tokenizer(["a dog", "a cat"])`` gives a LongTensor [B, context_length]."""

    def __init__(self, model_path: str | Path, context_length: int = 64) -> None:
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {model_path}")
        if model_path.suffix == ".json":
            self.processor = _TokenizerJson(model_path)
        else:
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
            ids[row, : len(encoded)] = torch.tensor(encoded, dtype=torch.long)
        return ids

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size}, context_length={self.context_length})"


class LazyTokenizer:
    """A tokenizer loaded on first use (``load()`` is called once, when text is first encoded or an
    attribute is read), so commands that only encode images never fetch one."""

    def __init__(self, load: Callable[[], Tokenizer]) -> None:
        self._load = load
        self._tokenizer: Tokenizer | None = None

    @property
    def loaded(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = self._load()
        return self._tokenizer

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        return self.loaded(texts)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.loaded, name)
