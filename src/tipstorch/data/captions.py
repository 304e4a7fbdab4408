"""Caption sources of a sample, the per-sample caption draw, and captions of mirrored images.

A sample carries captions keyed by source: ``alt`` (noisy web alt-text), ``object`` (object list),
``spatial`` (PaliGemma-like, with relations), ``detailed`` (Gemini-like, long) and ``caption`` (a
generic caption of unknown kind, e.g. from a folder's captions file). TIPS trains CLS1 on the
alt-text and CLS2 on a synthetic caption (paper Sec. 3.1); TIPSv2 draws the synthetic caption per
sample among several granularities ("randomly alternating between them during training to avoid
shortcutting on coarse keywords", TIPSv2 project page). ``CaptionSampler`` is that draw.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

CAPTION_SOURCES: tuple[str, ...] = ("alt", "object", "spatial", "detailed", "caption")

_MIRRORED = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost"}
_MIRROR_PATTERN = re.compile(r"\b(" + "|".join(_MIRRORED) + r")\b", re.IGNORECASE)


def flip_caption(text: str) -> str:
    """The caption of the horizontally mirrored image: swaps left <-> right as whole words, keeping case.

    Collation applies it to every caption of a sample whose global crop was flipped. We swap
    words rather than disable flips for spatial captions because the paper flips the global crop
    (Sec. 3.2 "Discussion": "the global crop is a larger random crop with horizontal flips") and
    the spatial and detailed captions are the ones the flip would otherwise make false ("to the
    left of", "in the top left of the image"); swapping keeps every caption truthful and keeps the
    augmentation. Above/below and in front of/behind are unchanged by a horizontal flip.

    The swap is lexical: in free web text "right" meaning "correct" is swapped too; the built-in
    scenes captions never use it that way.
    """

    def swap(match: re.Match[str]) -> str:
        word = match.group(0)
        mirrored = _MIRRORED[word.lower()]
        if word.isupper():
            return mirrored.upper()
        return mirrored.capitalize() if word[0].isupper() else mirrored

    return _MIRROR_PATTERN.sub(swap, text)


def available_captions(captions: Mapping[str, object]) -> dict[str, str]:
    """The known caption sources of a sample that hold non-empty text."""
    return {s: v for s in CAPTION_SOURCES if isinstance(v := captions.get(s), str) and v.strip()}


class CaptionSampler:
    """Draws one caption per sample from weighted sources, among those the sample has.

    weights: source -> relative weight (>= 0). Sources a sample lacks (or has empty) are left out
        and the remaining weights renormalised; e.g. {"spatial": 1, "detailed": 1} is TIPSv2's
        alternation between PaliGemma-like and Gemini-like captions, {"spatial": 1} is TIPS v1.
    fallback: sources tried in order when the sample has none of the weighted ones.
    """

    def __init__(self, weights: Mapping[str, float], fallback: Sequence[str] = ("caption", "alt")) -> None:
        unknown = [s for s in [*weights, *fallback] if s not in CAPTION_SOURCES]
        if unknown:
            raise ValueError(f"unknown caption sources {unknown}; expected any of {CAPTION_SOURCES}")
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"caption weights must be >= 0 with a positive sum, got {dict(weights)}")
        self.weights = {s: float(w) for s, w in weights.items() if w > 0}
        self.fallback = tuple(fallback)

    def __call__(
        self, captions: Mapping[str, str], generator: torch.Generator | None = None
    ) -> tuple[str, str]:
        """(source, text) for one sample; raises ValueError naming the sources if nothing fits."""
        have = available_captions(captions)
        present = [(s, w) for s, w in self.weights.items() if s in have]
        if present:
            draw = float(torch.rand((), generator=generator)) * sum(w for _, w in present)
            for source, weight in present:
                draw -= weight
                if draw < 0:
                    return source, have[source]
            return present[-1][0], have[present[-1][0]]
        for source in self.fallback:
            if source in have:
                return source, have[source]
        raise ValueError(
            f"sample has no caption among {sorted(self.weights)} or fallback {list(self.fallback)}; "
            f"it has {sorted(captions)}"
        )
