"""Screenshot of ``tipstorch demo`` for the README: start it on a free loopback port, upload the bundled
scene in headless Chromium, segment it into typed labels, save the page.

    python docs/pictures/screenshot_demo.py docs/pictures/demo.png [demo arguments, e.g. --model ...]
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

SCENE = Path(__file__).resolve().parents[2] / "src" / "tipstorch" / "assets" / "example_scene.png"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def main(out: str, demo_args: list[str]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "tipstorch.cli", "demo", "--port", str(port), *demo_args])
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(180):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(120_000)
            page.goto(url)
            page.locator("#upload input[type=file]").set_input_files(str(SCENE))
            page.wait_for_selector("#preview img")
            page.locator("#labels textarea").fill("sphere, star, floor")
            page.locator("#segment-button").click()
            page.wait_for_selector("#segment-output img")
            page.screenshot(path=out, full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=20)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
