"""README "Train on your own data", end to end on a tiny folder: folder -> shards -> caption ->
curate -> train -> eval, every step through the ``tipstorch`` command line."""

from __future__ import annotations

import json
import shlex

import pytest
import torch

import tipstorch
from tests.engine.fakes import colour_png
from tests.engine.tiny_paligemma import save_tiny_paligemma
from tipstorch.cli import main
from tipstorch.data.records import iter_records


def run_command(command: str) -> None:
    main(shlex.split(command))


def _tiny_curation_model(path) -> str:
    """tips-tiny, random, with its LayerScale gammas at 1 so that different images get different
    CLS embeddings (at init they are ~0 and every image embeds alike)."""
    torch.manual_seed(0)
    model = tipstorch.create_model("tips-tiny")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gamma"):
                parameter.fill_(1.0)
    tipstorch.save_model(model, path)
    return str(path)


@pytest.fixture
def own_data(tmp_path):
    """photos/: 6 red, 6 green, 6 blue images with alt-text sidecars, and red-dup (red-0's pixels);
    target/: 4 red + 2 green images; labelled/: an ImageNet-style folder (train/ and val/ per class)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for colour_index, colour in enumerate(["red", "green", "blue"]):
        for i in range(6):
            (photos / f"{colour}-{i}.png").write_bytes(colour_png(colour, 10 * colour_index + i, size=32))
            (photos / f"{colour}-{i}.txt").write_text(f"img_{colour_index}{i}.jpg my photo")
    (photos / "red-dup.png").write_bytes((photos / "red-0.png").read_bytes())
    (photos / "red-dup.txt").write_text("copy of my photo")
    (tmp_path / "target").mkdir()
    for i, colour in enumerate(["red"] * 4 + ["green"] * 2):
        (tmp_path / "target" / f"t{i}.png").write_bytes(colour_png(colour, 100 + i, size=32))
    for split, count in (("train", 3), ("val", 2)):
        for colour_index, colour in enumerate(["red", "green", "blue"]):
            folder = tmp_path / "labelled" / split / colour
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{i}.png").write_bytes(colour_png(colour, 1000 + 10 * colour_index + i, size=32))
    return tmp_path


def test_folder_to_shards_to_caption_to_curate_to_train_to_eval(own_data):
    root = own_data
    captioner = save_tiny_paligemma(root / "captioner")
    curation_model = _tiny_curation_model(root / "tiny.safetensors")

    # the README's commands, with the tiny captioner / curation model and a few training steps
    run_command(
        f"data write-shards --from-folder {root}/photos --out {root}/pool --shard-size 8 --format png"
    )
    run_command(
        f"caption --shards {root}/pool --captioner {captioner} --local-files-only --device cpu "
        "--field 'spatial=caption en' --field 'detailed=describe en' --max-new-tokens 5"
    )
    run_command(
        f"curate --pool {root}/pool --target {root}/target --clusters 2 --model {curation_model} "
        f"--device cpu --image-size 56 --dedup-threshold 0.99999 --out {root}/curated"
    )
    run_command(
        f"train --config tiny_cpu --set data.source={root}/curated --set loop.steps=2 --set loop.batch_size=4 "
        f"--set data.num_workers=0 --set eval.quick=false --out-dir {root}/run"
    )
    run_command(
        f"eval --model {root}/run/final.safetensors --tasks knn --data imagenet={root}/labelled "
        f"--image-size 56 --out {root}/eval.json"
    )

    curated = [r for shard in sorted((root / "curated").glob("*.tar")) for r in iter_records(shard)]
    keys = {r["__key__"] for r in curated}
    assert keys and all(key.startswith(("red", "green")) for key in keys)  # like the target: no blue
    assert not {"red-0", "red-dup"} <= keys  # the duplicate pair was cut to one (if it was drawn)
    for record in curated:
        meta = json.loads(record["json"])
        assert meta["caption"].endswith("my photo") and meta["spatial"] and meta["detailed"]
    report = json.loads((root / "curated" / "curation_report.json").read_text())
    assert {d["key"] for d in report["duplicates"]["within_selection"]} <= {"red-dup"}  # the later one goes
    results = json.loads((root / "eval.json").read_text())
    assert results["details"]["imagenet/knn"] == {"num_train": 9, "num_test": 6, "num_skipped": 0}
    assert 0.0 <= results["metrics"]["imagenet/knn/top1"] <= 1.0
