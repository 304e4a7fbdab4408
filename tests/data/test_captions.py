"""flip_caption and the per-sample caption draw."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from tipstorch.data.captions import CaptionSampler, available_captions, flip_caption


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a red circle to the left of a blue square", "a red circle to the right of a blue square"),
        ("In the top right. Left side.", "In the top left. Right side."),
        ("LEFT and right-hand", "RIGHT and left-hand"),
        ("the leftmost star", "the rightmost star"),
        ("bright copyright lefty", "bright copyright lefty"),
    ],
)
def test_flip_caption_swaps_whole_words_and_keeps_case(text, expected):
    assert flip_caption(text) == expected


def test_flip_caption_twice_is_the_identity():
    text = "A ring on the left, behind the star on the right; lit from the top left."
    assert flip_caption(flip_caption(text)) == text


def test_available_captions_keeps_known_nonempty_text_fields():
    assert available_captions(
        {"alt": "x", "spatial": " ", "detailed": None, "other": "y", "caption": "z"}
    ) == {
        "alt": "x",
        "caption": "z",
    }


def test_sampler_follows_the_weights():
    sampler = CaptionSampler({"spatial": 3.0, "detailed": 1.0})
    generator = torch.Generator().manual_seed(0)
    captions = {"alt": "a", "spatial": "s", "detailed": "d"}
    counts = Counter(sampler(captions, generator)[0] for _ in range(2000))
    assert set(counts) == {"spatial", "detailed"}
    assert 0.70 < counts["spatial"] / 2000 < 0.80


def test_sampler_draws_only_among_sources_the_sample_has():
    sampler = CaptionSampler({"object": 1.0, "spatial": 1.0, "detailed": 1.0})
    generator = torch.Generator().manual_seed(1)
    drawn = {sampler({"alt": "a", "detailed": "d", "spatial": ""}, generator) for _ in range(50)}
    assert drawn == {("detailed", "d")}


def test_sampler_falls_back_in_order_when_no_weighted_source_is_present():
    sampler = CaptionSampler({"spatial": 1.0}, fallback=("caption", "alt"))
    assert sampler({"alt": "noisy", "caption": "generic"}) == ("caption", "generic")
    assert sampler({"alt": "noisy"}) == ("alt", "noisy")


def test_sampler_names_what_the_sample_has_when_nothing_fits():
    with pytest.raises(ValueError, match=r"it has \['object'\]"):
        CaptionSampler({"spatial": 1.0})({"object": "o"})


def test_sampler_rejects_unknown_sources_and_bad_weights():
    with pytest.raises(ValueError, match="unknown caption sources"):
        CaptionSampler({"gemini": 1.0})
    with pytest.raises(ValueError, match="positive sum"):
        CaptionSampler({"spatial": 0.0})
