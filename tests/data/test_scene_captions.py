"""Scenes captions are truthful to the rendered geometry, also after a horizontal flip."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tipstorch.data.captions import flip_caption
from tipstorch.data.sample import ImageTextSample
from tipstorch.data.scene_captions import ALT_DISTRACTORS, RELATION_MARGIN, RELATIONS
from tipstorch.data.scenes import OBJECT_COLOURS, ScenesConfig, ScenesDataset

SIZE = 96
SAMPLES = [ScenesDataset(ScenesConfig(image_size=SIZE, seed=11)).sample(i) for i in range(150)]
RELATION = "|".join(RELATIONS)
SPATIAL_CLAUSE = re.compile(rf"an? (\w+) (\w+) is ({RELATION}) the (\w+) (\w+)\.", re.IGNORECASE)
DETAILED_CLAUSE = re.compile(
    rf"(\w+) (\w+) (?:in|at|on) the [\w ]+?, ({RELATION}) the (\w+) (\w+)\.", re.IGNORECASE
)
POSITION = re.compile(
    r"(\w+) (\w+) (in the top left|at the top|in the top right|on the left|in the centre|on the right|"
    r"in the bottom left|at the bottom|in the bottom right)\b",
    re.IGNORECASE,
)
CELLS = {
    "in the top left": ("top", "left"), "at the top": ("top", "centre"), "in the top right": ("top", "right"),
    "on the left": ("middle", "left"), "in the centre": ("middle", "centre"), "on the right": ("middle", "right"),
    "in the bottom left": ("bottom", "left"), "at the bottom": ("bottom", "centre"),
    "in the bottom right": ("bottom", "right"),
}  # fmt: skip


def _masks_by_name(sample: ImageTextSample, instance_mask: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
    return {(o.colour.name, o.shape): instance_mask == o.instance_id for o in sample.objects}


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return xs.mean(), ys.mean()


def _adjacent(a: np.ndarray, b: np.ndarray) -> bool:
    grown = a.copy()
    grown[1:] |= a[:-1]
    grown[:-1] |= a[1:]
    grown[:, 1:] |= a[:, :-1]
    grown[:, :-1] |= a[:, 1:]
    return bool((grown & b).any())


def _holds(relation: str, a: np.ndarray, b: np.ndarray, depth: np.ndarray) -> bool:
    """Does 'A <relation> B' hold for visible masks a, b and the depth map?"""
    (ax, ay), (bx, by) = _centroid(a), _centroid(b)
    margin = RELATION_MARGIN * SIZE
    return {
        "to the left of": ax < bx - margin,
        "to the right of": ax > bx + margin,
        "above": ay < by - margin,
        "below": ay > by + margin,
        "in front of": _adjacent(a, b) and depth[a].max() < depth[b].min(),
        "behind": _adjacent(a, b) and depth[a].min() > depth[b].max(),
    }[relation]


def _check_relations(sample: ImageTextSample, text: str, pattern: re.Pattern, instance_mask, depth) -> int:
    masks = _masks_by_name(sample, instance_mask)
    found = 0
    for colour_a, shape_a, relation, colour_b, shape_b in pattern.findall(text):
        a = masks[(colour_a.lower(), shape_a)]
        b = masks[(colour_b.lower(), shape_b)]
        assert _holds(relation.lower(), a, b, depth), (sample.key, text)
        found += 1
    return found


def _third(fraction: float, names: tuple[str, str, str]) -> str:
    offset = fraction - 0.5
    return names[0] if offset < -1 / 6 else names[2] if offset > 1 / 6 else names[1]


def _check_positions(sample: ImageTextSample, text: str, instance_mask) -> int:
    masks = _masks_by_name(sample, instance_mask)
    height, width = instance_mask.shape
    found = 0
    for colour, shape, phrase in POSITION.findall(text):
        cx, cy = _centroid(masks[(colour.lower(), shape)])
        row, col = CELLS[phrase.lower()]
        assert row == _third((cy + 0.5) / height, ("top", "middle", "bottom")), (sample.key, text)
        assert col == _third((cx + 0.5) / width, ("left", "centre", "right")), (sample.key, text)
        found += 1
    return found


def test_spatial_relations_hold_in_the_masks_and_depth():
    stated = sum(
        _check_relations(s, s.captions["spatial"], SPATIAL_CLAUSE, s.instance_mask, s.depth) for s in SAMPLES
    )
    assert stated > 100


def test_detailed_relations_hold_in_the_masks_and_depth():
    stated = sum(
        _check_relations(s, s.captions["detailed"], DETAILED_CLAUSE, s.instance_mask, s.depth)
        for s in SAMPLES
    )
    assert stated > 100


def test_every_relation_kind_is_used():
    text = " ".join(s.captions["spatial"] for s in SAMPLES).lower()
    assert all(f" {relation} the " in text for relation in RELATIONS)


def test_positions_in_captions_match_the_centroids():
    stated = sum(
        _check_positions(s, s.captions["spatial"] + " " + s.captions["detailed"], s.instance_mask)
        for s in SAMPLES
    )
    assert stated > 200


def test_flipped_captions_hold_on_the_flipped_image():
    stated = 0
    for s in SAMPLES:
        flipped_mask, flipped_depth = s.instance_mask[:, ::-1], s.depth[:, ::-1]
        for key, pattern in (("spatial", SPATIAL_CLAUSE), ("detailed", DETAILED_CLAUSE)):
            text = flip_caption(s.captions[key])
            stated += _check_relations(s, text, pattern, flipped_mask, flipped_depth)
            stated += _check_positions(s, text, flipped_mask)
    assert stated > 300


def test_unflipped_left_right_claims_fail_on_the_flipped_image():
    """Guards the test above: without flip_caption, mirrored images contradict the captions."""
    contradicted = 0
    for s in SAMPLES:
        masks = _masks_by_name(s, s.instance_mask[:, ::-1])
        for colour_a, shape_a, relation, colour_b, shape_b in SPATIAL_CLAUSE.findall(s.captions["spatial"]):
            if relation in ("to the left of", "to the right of"):
                a, b = masks[(colour_a.lower(), shape_a)], masks[(colour_b.lower(), shape_b)]
                contradicted += not _holds(relation, a, b, s.depth[:, ::-1])
    assert contradicted > 20


def test_object_caption_lists_exactly_the_visible_objects_with_their_shapes():
    for s in SAMPLES:
        named = re.findall(r"an? (\w+) (\w+)", s.captions["object"])
        assert named == [(o.colour.name, o.shape) for o in s.objects]
        for colour, shape in named:
            mask = _masks_by_name(s, s.instance_mask)[(colour, shape)]
            assert np.unique(s.class_mask[mask]).tolist() == [ScenesDataset.class_names.index(shape)]


def test_colour_words_match_the_pixel_chromaticity():
    chroma = np.array([c.rgb for c in OBJECT_COLOURS]) / np.array([c.rgb for c in OBJECT_COLOURS]).sum(
        1, keepdims=True
    )
    for s in SAMPLES[:60]:
        pixels = np.asarray(s.image, dtype=np.float64)
        for obj in s.objects:
            total = pixels[s.instance_mask == obj.instance_id].sum(0)
            nearest = OBJECT_COLOURS[int(np.argmin(((chroma - total / total.sum()) ** 2).sum(1)))]
            assert nearest.name == obj.colour.name, (s.key, obj.colour, nearest)


def test_detailed_caption_mentions_every_object_count_and_floor():
    words = ("one", "two", "three", "four")
    for s in SAMPLES:
        text = s.captions["detailed"].lower()
        assert text.startswith(words[len(s.objects) - 1])
        assert "floor" in text
        assert all(f"{o.texture} {o.colour.name} {o.shape}" in text for o in s.objects[:3])


@pytest.mark.parametrize(
    "word", ["left", "right", "above", "below", "front", "behind", "top", "bottom", "centre"]
)
def test_alt_text_carries_no_spatial_words(word):
    assert not any(re.search(rf"\b{word}\b", s.captions["alt"]) for s in SAMPLES)


def test_alt_text_is_noisy_but_often_names_the_main_object():
    distractor_words = set(" ".join(ALT_DISTRACTORS).split())
    names_main = sum(s.objects[0].shape in s.captions["alt"] for s in SAMPLES)
    assert 0.4 * len(SAMPLES) < names_main < len(SAMPLES)
    assert all(set(s.captions["alt"].replace(",", " ").split()) & distractor_words for s in SAMPLES)
    shades = {c.shade for c in OBJECT_COLOURS}
    assert any(set(s.captions["alt"].split()) & shades for s in SAMPLES)


def test_alt_text_sometimes_names_a_wrong_colour():
    names = {c.name for c in OBJECT_COLOURS} | {c.shade for c in OBJECT_COLOURS}
    by_word = {c.name: c.name for c in OBJECT_COLOURS} | {c.shade: c.name for c in OBJECT_COLOURS}
    wrong = right = 0
    for s in SAMPLES:
        words = [w for w in re.split(r"[ ,|-]+", s.captions["alt"]) if w in names]
        for word in words[:1]:
            right += by_word[word] == s.objects[0].colour.name
            wrong += by_word[word] != s.objects[0].colour.name
    assert right > wrong > 0
