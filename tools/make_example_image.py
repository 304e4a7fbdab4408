"""Render the example picture shipped in tipstorch/assets (used by the README and the CLI tests).

    python tools/make_example_image.py
"""

from pathlib import Path

from tipstorch.data.scenes import ScenesConfig, ScenesDataset

ASSET = Path(__file__).resolve().parents[1] / "src" / "tipstorch" / "assets" / "example_scene.png"


def main() -> None:
    sample = ScenesDataset(ScenesConfig(image_size=224, seed=2024), length=16)[14]
    sample.image.save(ASSET, optimize=True)
    print(f"wrote {ASSET}: {sample.captions['object']}")


if __name__ == "__main__":
    main()
