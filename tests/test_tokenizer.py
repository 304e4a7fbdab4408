"""The tokenizer reproduces the official settings: ASCII lower-casing, no BOS/EOS, 64 ids, pad 0."""

from __future__ import annotations

import pytest
import sentencepiece
import torch

from tipstorch.models.tokenizer import Tokenizer, ascii_lower


@pytest.fixture(scope="module")
def processor(spm_model_path):
    return sentencepiece.SentencePieceProcessor(model_file=spm_model_path)


def test_ids_equal_sentencepiece_with_official_settings(spm_model_path, processor):
    tokenizer = Tokenizer(spm_model_path)
    texts = ["A Photo of a DOG on the left of a red car", "satellite image of fields"]
    ids = tokenizer(texts)
    assert ids.shape == (2, 64) and ids.dtype == torch.long
    for row, text in zip(ids, texts, strict=True):
        expected = processor.encode(text.lower())
        assert row[: len(expected)].tolist() == expected
        assert (row[len(expected):] == 0).all()


def test_long_text_is_truncated_to_the_context_length(spm_model_path, processor):
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)
    ids = Tokenizer(spm_model_path)(text)
    assert ids[0].tolist() == processor.encode(text)[:64]
    assert (ids[0] != 0).all()


def test_lower_casing_touches_ascii_only_like_tf_strings_lower():
    assert ascii_lower("A Dog ÉCOLE Ünïcode") == "a dog École Ünïcode"


def test_empty_text_gives_all_padding_ids_like_the_official_tokenizer(spm_model_path):
    ids = Tokenizer(spm_model_path)(["a dog", "", "   "])
    assert ids[0, 0] != 0
    assert ids[1:].tolist() == [[0] * 64, [0] * 64]  # official: an empty string gives 64 pad ids


def test_missing_or_corrupt_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="bad.model is not a valid SentencePiece model"):
        Tokenizer(bad)
