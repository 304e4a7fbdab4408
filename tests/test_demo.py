"""The demo's callbacks without a browser: every failure is one line of text, never an exception."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tipstorch.cli import demo
from tipstorch.data.formats import ADE20K_CLASS_NAMES
from tipstorch.weights.factory import scenes_tokenizer_path

SCENE = scenes_tokenizer_path().with_name("example_scene.png")


@pytest.fixture(scope="module")
def handlers():
    return demo.DemoHandlers(demo.prepare_demo_model("tips-tiny", random=True))


def test_without_a_trained_model_the_banner_says_random(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prepared = demo.prepare_demo_model(None)
    assert (
        "randomly initialised" in prepared.description
        and "runs/tiny_cpu/final.safetensors" in prepared.description
    )
    assert "random, untrained" in prepared.head_notes["depth"]
    assert "--segmentation-head FILE" in prepared.head_notes["segmentation"]


def test_the_main_job_model_is_used_when_it_exists(tmp_path, monkeypatch):
    from tipstorch.weights.factory import create_model
    from tipstorch.weights.tipstorch_file import save_model

    monkeypatch.chdir(tmp_path)
    save_model(create_model("tips-tiny"), tmp_path / "runs" / "tiny_cpu" / "final.safetensors")
    prepared = demo.prepare_demo_model(None)
    assert "the main job's tiny TIPSv2" in prepared.description


def test_every_tab_returns_pictures_for_an_image(handlers):
    segmentation, areas, status = demo._safely(handlers.segment, 2)(str(SCENE), "circle, star, floor")
    assert (
        status == "" and isinstance(segmentation, Image.Image) and set(areas) == {"circle", "star", "floor"}
    )
    classes, areas, status = demo._safely(handlers.classes, 2)(str(SCENE))
    assert status == "" and classes.height == 448 and set(areas) <= set(ADE20K_CLASS_NAMES)
    assert sum(areas.values()) == pytest.approx(1.0, abs=1e-2)
    pca, status = demo._safely(handlers.pca, 1)(str(SCENE), 0.3)
    assert status == "" and np.asarray(pca).std() > 0
    depth, summary, status = demo._safely(handlers.depth, 2)(str(SCENE))
    assert status == "" and depth.size == Image.open(SCENE).size and "random, untrained" in summary
    normals, _, status = demo._safely(handlers.normals, 2)(str(SCENE))
    assert status == "" and normals.size == Image.open(SCENE).size
    probabilities, table, status = demo._safely(handlers.similarity, 2)(str(SCENE), "a ball\n\na star")
    assert status == "" and set(probabilities) == {"a ball", "a star"} and len(table) == 2


def test_the_ade20k_tab_shows_the_given_head(tmp_path):
    from tests.test_dense_commands import ade20k_zip

    head = ade20k_zip(tmp_path / "head.zip", winner=2)
    prepared = demo.prepare_demo_model("tips-tiny", random=True, head_sources={"segmentation": str(head)})
    assert prepared.head_notes["segmentation"] == f"`{head}`"
    _, areas, status = demo._safely(demo.DemoHandlers(prepared).classes, 2)(str(SCENE))
    assert status == "" and areas == {"sky": 1.0}


def test_bad_inputs_become_one_message(handlers, tmp_path):
    (tmp_path / "words.png").write_text("no pixels here")
    cases = [
        (handlers.segment, 2, (None, "a, b"), "Upload an image first"),
        (handlers.segment, 2, (str(tmp_path / "words.png"), "a, b"), "words.png: not an image file"),
        (handlers.segment, 2, (str(SCENE), " ,  "), "Type at least two different labels"),
        (handlers.classes, 2, (None,), "Upload an image first"),
        (handlers.similarity, 2, (str(SCENE), "\n \n"), "Type at least one text"),
    ]
    for handler, outputs, args, message in cases:
        result = demo._safely(handler, outputs)(*args)
        assert result[:-1] == (None,) * outputs
        assert result[-1].startswith("**Error:**") and message in result[-1], result[-1]


def test_an_unexpected_failure_shows_no_traceback(caplog):
    def broken(upload):
        raise RuntimeError("boom")

    result = demo._safely(broken, 1)("x")
    assert result == (None, "**Error:** the model failed on this input (RuntimeError); see the server log")
    assert "boom" in caplog.text
