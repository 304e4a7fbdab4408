"""The shipped SentencePiece model for scenes captions: official settings, whole scenes words."""

from __future__ import annotations

import pytest
import sentencepiece as spm

from tipstorch.data.scene_captions import ALT_DISTRACTORS, SHAPE_SYNONYMS
from tipstorch.data.scenes import FLOOR_COLOURS, OBJECT_COLOURS, ScenesConfig, ScenesDataset


@pytest.fixture
def processor(scenes_tokenizer_file) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(scenes_tokenizer_file))


def test_model_uses_the_official_special_ids_and_a_small_vocabulary(processor, scenes_tokenizer_file):
    assert (processor.pad_id(), processor.unk_id(), processor.bos_id(), processor.eos_id()) == (0, 1, -1, -1)
    assert 256 <= processor.get_piece_size() <= 1024
    assert scenes_tokenizer_file.stat().st_size < 400_000


def test_scenes_captions_encode_without_unknown_pieces(processor):
    dataset = ScenesDataset(ScenesConfig(image_size=32, seed=777))
    texts = [t.lower() for i in range(100) for t in dataset.sample(i).captions.values()]
    texts += [*ALT_DISTRACTORS, *(w for ws in SHAPE_SYNONYMS.values() for w in ws)]
    texts += [c.shade for c in OBJECT_COLOURS] + [name for name, _ in FLOOR_COLOURS]
    assert all(processor.unk_id() not in ids for ids in processor.encode(texts))


def test_scenes_words_are_single_pieces(processor):
    words = ["circle", "crescent", "left", "right", "above", "behind", "purple", "checkered", "floor"]
    assert all(len(processor.encode(w)) == 1 for w in words)
