"""End to end: the demo server on a free loopback port, driven by headless Chromium through Playwright.

Uploads the bundled scene, types labels, clicks, checks that the segmentation picture appears and
changes with the labels; then bad uploads (not an image, a decompression bomb) and empty labels, each
one message in the page, and the server still answering afterwards. Saves a screenshot to
``$TIPSTORCH_TEST_ARTIFACTS`` (default ``test-artifacts/``). Skipped, with the reason, only where
Chromium (Debian package ``chromium``) or the ``demo`` extra is not installed.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SCENE = REPO / "src" / "tipstorch" / "assets" / "example_scene.png"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install '.[demo]')"
)
pytest.importorskip("gradio", reason="gradio is not installed (pip install '.[demo]')")
if shutil.which("chromium") is None:
    pytest.skip("no chromium executable on PATH (apt-get install chromium)", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_serving(url: str, server: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"demo server exited with {server.returncode}:\n{server.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"demo server did not answer at {url} within {timeout} s")


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory):
    """A demo server (random tips-tiny: the working directory has no runs/) on a free loopback port."""
    port = _free_port()
    workdir = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, "-m", "tipstorch.cli", "demo", "--port", str(port)]
    server = subprocess.Popen(
        command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_serving(url, server)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture(scope="module")
def page(demo_url):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=shutil.which("chromium"), headless=True, args=CHROMIUM_ARGS
        )
        tab = browser.new_page(viewport={"width": 1280, "height": 1000})
        tab.set_default_timeout(30_000)
        tab.goto(demo_url)
        tab.wait_for_selector("#banner")
        yield tab
        browser.close()


def _image_at(page, selector: str) -> np.ndarray:
    source = page.locator(f"{selector} img").first.get_attribute("src")
    response = page.request.get(source)
    assert response.ok, source
    return np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB"))


def _upload(page, path: Path) -> None:
    """Put ``path`` in the upload box (clearing a file already there)."""
    clear = page.locator("#upload button[aria-label='Clear']")
    if clear.count():
        clear.first.click()
    page.locator("#upload input[type=file]").set_input_files(str(path))


def _segment(page, labels: str, previous: str | None) -> str:
    page.locator("#labels textarea").fill(labels)
    page.locator("#segment-button").click()
    if previous is None:
        page.wait_for_selector("#segment-output img")
    else:
        page.wait_for_function(
            "prev => { const img = document.querySelector('#segment-output img'); return img && img.src !== prev; }",
            arg=previous,
        )
    return page.locator("#segment-output img").first.get_attribute("src")


def test_segmentation_in_the_browser_follows_the_labels_and_survives_bad_uploads(page, tmp_path):
    assert "randomly initialised" in page.locator("#banner").inner_text()
    _upload(page, SCENE)
    page.wait_for_selector("#preview img")

    first_source = _segment(page, "red, green, blue", None)
    first = _image_at(page, "#segment-output")
    assert first.shape[0] >= 224 and first.std() > 0
    _segment(page, "sky, ground, ball, star", first_source)
    second = _image_at(page, "#segment-output")
    # A randomly initialised model may paint most pixels with one label either way (how much depends on
    # the CPU's last bits), so the figure is only required to change; the areas must name the new labels.
    assert first.shape != second.shape or not np.array_equal(first, second)
    scores = page.locator("#segment-scores").inner_text()
    assert all(label in scores for label in ("sky", "ground", "ball", "star")), scores
    assert not any(label in scores for label in ("red", "green", "blue")), scores

    artifacts = Path(os.environ.get("TIPSTORCH_TEST_ARTIFACTS", REPO / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(artifacts / "demo_browser.png"), full_page=True)

    page.locator("#labels textarea").fill(" , ")
    page.locator("#segment-button").click()
    page.wait_for_selector("#segment-status:has-text('Type at least two different labels')")

    not_an_image = tmp_path / "holiday.png"
    not_an_image.write_text("these are words, not pixels")
    _upload(page, not_an_image)
    page.wait_for_selector("#upload-status:has-text('holiday.png: not an image file')")

    bomb = tmp_path / "bomb.png"
    Image.new("1", (10_000, 9_000)).save(bomb)  # 90 Mpx (above the 89.5 Mpx limit) in a few kB
    _upload(page, bomb)
    page.wait_for_selector("#upload-status:has-text('decompression bomb')")
    page.locator("#labels textarea").fill("red, green")
    page.locator("#segment-button").click()
    page.wait_for_selector("#segment-status:has-text('bomb.png')")
    assert "Traceback" not in page.content()

    _upload(page, SCENE)  # the server still works
    page.wait_for_selector("#preview img")
    page.locator("#segment-button").click()
    page.wait_for_selector("#segment-output img")
    page.wait_for_function("() => !document.querySelector('#segment-status').innerText.includes('Error')")

    page.get_by_role("tab", name="ADE20K classes").click()  # the released segmentation head's tab
    page.locator("#ade20k-button").click()
    page.wait_for_selector("#ade20k-output img")
    assert _image_at(page, "#ade20k-output").std() > 0
    assert "Error" not in page.locator("#ade20k-status").inner_text()
