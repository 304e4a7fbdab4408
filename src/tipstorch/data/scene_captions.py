"""Captions of a rendered scene at four granularities, mirroring the kinds TIPS / TIPSv2 train on.

- ``alt``: noisy web alt-text (paper Fig. 3 top): names the main object most of the time, often
  with a fine shade word ("crimson") that no synthetic caption has, sometimes a wrong colour,
  always some distractor words ("clipart", "$9.99"), never positions;
- ``object``: an object list ("a red circle and a blue square"), like the paper's "PaliGemma
  object list" ablation (Tab. 8);
- ``spatial``: a short PaliGemma-like caption with truthful relations (left of / right of /
  above / below from visible centroids, in front of / behind from occlusion) and positions;
- ``detailed``: a long Gemini-like description (TIPSv2): object count, floor, light, then every
  object with size, texture, colour, shape, position and a relation. With four objects it can
  exceed 64 tokens and is then truncated, as long captions are in the paper (DOCCI, App. A.4.3).

Objects are named "<colour> <shape>", unique within a scene, so every phrase picks one instance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tipstorch.data.scenes import NamedColour, SceneObject

RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below", "in front of", "behind")
RELATION_MARGIN = 0.1  # left/right/above/below are stated only beyond this fraction of the short side

SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "round", "disc", "dot"),
    "ellipse": ("ellipse", "oval", "egg"),
    "ring": ("ring", "donut", "hoop"),
    "crescent": ("crescent", "moon"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "pyramid"),
    "star": ("star",),
    "cross": ("cross", "plus"),
}
ALT_DISTRACTORS: tuple[str, ...] = (
    "stock photo", "clipart", "png", "vector", "illustration", "wallpaper", "hd", "4k", "free download",
    "icon", "logo", "design", "template", "abstract", "geometric", "art print", "sticker", "for sale",
    "best price", "$9.99", "new", "2023", "set", "pattern", "poster", "toy", "shapes", "kids", "3d render",
    "cute", "shop now", "image", "photo", "jpg", "transparent", "isolated", "cartoon", "emoji",
)  # fmt: skip
_ALT_SEPARATORS = (" ", ", ", " - ", " | ")
_ALT_NAMES_MAIN = 0.85  # probability that alt-text names the main object at all
_ALT_SHADE, _ALT_BASIC = 0.4, 0.4  # ... with its shade word, its basic colour word (else no colour)
_ALT_CANONICAL_SHAPE = 0.6  # ... with the shape's own name rather than any synonym
_ALT_NAMES_ANOTHER = 0.3  # probability of also naming another object's shape
_POSITIONS = {
    ("top", "left"): "in the top left",
    ("top", "centre"): "at the top",
    ("top", "right"): "in the top right",
    ("middle", "left"): "on the left",
    ("middle", "centre"): "in the centre",
    ("middle", "right"): "on the right",
    ("bottom", "left"): "in the bottom left",
    ("bottom", "centre"): "at the bottom",
    ("bottom", "right"): "in the bottom right",
}
_COUNT_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight")
_SIZE_PHRASES = {"small": "small", "medium": "medium-sized", "large": "large"}


def spatial_relation(a: SceneObject, b: SceneObject, short_side: int) -> str | None:
    """Relation of ``a`` to ``b`` as seen in the image, or None when it is too close to call.

    Occlusion wins ("in front of" / "behind"); otherwise the larger centroid offset decides,
    if it exceeds RELATION_MARGIN * short_side. Image rows grow downwards.
    """
    if b.instance_id in a.occludes:
        return "in front of"
    if a.instance_id in b.occludes:
        return "behind"
    dx = a.centroid[0] - b.centroid[0]
    dy = a.centroid[1] - b.centroid[1]
    if max(abs(dx), abs(dy)) < RELATION_MARGIN * short_side:
        return None
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def floor_phrase(colour: str, texture: str) -> str:
    """'a checkered beige floor', 'a beige floor with stripes', ..."""
    if texture == "striped":
        return f"a {colour} floor with stripes"
    return f"a {texture} {colour} floor"


def _name(obj: SceneObject) -> str:
    return f"{obj.colour.name} {obj.shape}"


def _a(phrase: str) -> str:
    """The phrase with its indefinite article ('an orange ring', 'a red star')."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


class SceneCaptioner:
    """Builds the four captions of a scene; randomness comes from the scene's own generator."""

    def __init__(self, palette: Sequence[NamedColour], wrong_colour_prob: float = 0.15) -> None:
        self.palette = tuple(palette)
        self.wrong_colour_prob = wrong_colour_prob

    def __call__(
        self,
        objects: Sequence[SceneObject],
        floor_colour: str,
        floor_texture: str,
        size_hw: tuple[int, int],
        rng: np.random.Generator,
    ) -> dict[str, str]:
        """objects: ordered by instance id (largest visible first). Returns source -> caption."""
        short_side = min(size_hw)
        relations = {
            (a.instance_id, b.instance_id): spatial_relation(a, b, short_side)
            for a in objects
            for b in objects
            if a is not b
        }
        floor = floor_phrase(floor_colour, floor_texture)
        return {
            "alt": self.alt(objects, rng),
            "object": self.object_list(objects),
            "spatial": self.spatial(objects, relations, floor, rng),
            "detailed": self.detailed(objects, relations, floor),
        }

    def alt(self, objects: Sequence[SceneObject], rng: np.random.Generator) -> str:
        """Noisy alt-text: distractors, maybe the main object (shade or basic colour), maybe another."""
        words: list[str] = []
        if rng.random() < _ALT_NAMES_MAIN:
            main = objects[0]
            colour = main.colour
            if rng.random() < self.wrong_colour_prob:
                others = [c for c in self.palette if c.name != colour.name]
                colour = others[rng.integers(len(others))]
            choice = rng.random()
            colour_word = (
                colour.shade
                if choice < _ALT_SHADE
                else colour.name
                if choice < _ALT_SHADE + _ALT_BASIC
                else ""
            )
            synonyms = SHAPE_SYNONYMS[main.shape]
            canonical = rng.random() < _ALT_CANONICAL_SHAPE
            shape_word = synonyms[0] if canonical else synonyms[rng.integers(len(synonyms))]
            words.append(f"{colour_word} {shape_word}".strip())
            if len(objects) > 1 and rng.random() < _ALT_NAMES_ANOTHER:
                words.append(objects[1 + rng.integers(len(objects) - 1)].shape)
        count = int(rng.integers(1, 5))
        distractors = [
            ALT_DISTRACTORS[i] for i in rng.choice(len(ALT_DISTRACTORS), size=count, replace=False)
        ]
        split = int(rng.integers(0, count + 1))
        parts = distractors[:split] + words + distractors[split:]
        return _ALT_SEPARATORS[rng.integers(len(_ALT_SEPARATORS))].join(parts)

    @staticmethod
    def object_list(objects: Sequence[SceneObject]) -> str:
        """'a red circle, a blue square and a green star'."""
        names = [_a(_name(o)) for o in objects]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]

    @staticmethod
    def spatial(
        objects: Sequence[SceneObject],
        relations: dict[tuple[int, int], str | None],
        floor: str,
        rng: np.random.Generator,
    ) -> str:
        """Main object with its position, then each other object related to one already named."""
        anchor = objects[0]
        opening = f"{_a(_name(anchor))} {_POSITIONS[anchor.position]}"
        floor_first = rng.random() < 0.5
        sentences = [_sentence(f"{opening} on {floor}" if floor_first else opening)]
        named = [anchor]
        for obj in objects[1:]:
            partner = next((n for n in named if relations[(obj.instance_id, n.instance_id)]), None)
            if partner is None:
                sentences.append(_sentence(f"{_a(_name(obj))} is {_POSITIONS[obj.position]}"))
            else:
                relation = relations[(obj.instance_id, partner.instance_id)]
                sentences.append(_sentence(f"{_a(_name(obj))} is {relation} the {_name(partner)}"))
            named.append(obj)
        if not floor_first:
            sentences.append(_sentence(f"everything stands on {floor}"))
        return " ".join(sentences)

    @staticmethod
    def detailed(
        objects: Sequence[SceneObject],
        relations: dict[tuple[int, int], str | None],
        floor: str,
    ) -> str:
        """Count, floor and light, then every object with size, texture, colour, shape, position and
        its relation to the largest one."""
        count = len(objects)
        noun = "object" if count == 1 else "objects"
        sentences = [_sentence(f"{_COUNT_WORDS[count]} {noun} on {floor}, lit from the top left")]
        anchor = objects[0]
        for index, obj in enumerate(objects):
            phrase = _a(f"{_SIZE_PHRASES[obj.size]} {obj.texture} {_name(obj)} {_POSITIONS[obj.position]}")
            if index == 0:
                sentences.append(_sentence(("the largest is " if count > 1 else "it is ") + phrase))
                continue
            relation = relations[(obj.instance_id, anchor.instance_id)]
            if relation is not None:
                phrase += f", {relation} the {_name(anchor)}"
            sentences.append(_sentence(phrase))
        return " ".join(sentences)
