"""Synthetic captions into shard json: fields written, images untouched, resumable, bad samples kept."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.engine.fakes import colour_png, colour_record
from tests.engine.tiny_paligemma import WORDS, save_tiny_paligemma
from tipstorch.data.captions import CaptionSampler
from tipstorch.data.records import iter_records, write_record_shards
from tipstorch.data.shards import ShardDataset
from tipstorch.engine.captioning import PROGRESS_DIR, CaptionTask, caption_shards
from tipstorch.engine.transformers_captioner import TransformersCaptioner

TASKS = [CaptionTask("spatial", "caption en"), CaptionTask("detailed", "describe en")]


def _pixels_hash(image: Image.Image) -> str:
    return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()


class CountingCaptioner:
    """Wraps a captioner; counts captions per (key, prompt) and raises KeyboardInterrupt (a kill)
    once ``fail_after`` calls have been made."""

    def __init__(self, inner, keys_by_pixels: dict[str, str], fail_after: int | None = None) -> None:
        self.inner, self.keys_by_pixels, self.fail_after = inner, keys_by_pixels, fail_after
        self.calls = 0
        self.captioned: dict[tuple[str, str], int] = {}

    def __call__(self, images: list[Image.Image], prompt: str) -> list[str]:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        texts = self.inner(images, prompt)
        for image in images:
            key = (self.keys_by_pixels[_pixels_hash(image)], prompt)
            self.captioned[key] = self.captioned.get(key, 0) + 1
        return texts


def echo_captioner(images: list[Image.Image], prompt: str) -> list[str]:
    """A fake captioner: the prompt and the image's dominant channel."""
    names = ("red", "green", "blue")
    return [
        f"{prompt}: {names[int(torch.tensor(list(i.resize((1, 1)).getpixel((0, 0)))).argmax())]}"
        for i in images
    ]


@pytest.fixture(scope="module")
def tiny_paligemma(tmp_path_factory):
    return save_tiny_paligemma(tmp_path_factory.mktemp("paligemma") / "tiny")


@pytest.fixture
def shards(tmp_path):
    """Two shards of 5 coloured images each (json with an alt-text); keys k00..k09."""
    records = [colour_record(f"k{i:02d}", ["red", "green", "blue"][i % 3], i) for i in range(10)]
    write_record_shards(records, tmp_path / "in", shard_size=5)
    return sorted((tmp_path / "in").glob("*.tar")), {r["__key__"]: r for r in records}


def _keys_by_pixels(records: dict[str, dict]) -> dict[str, str]:
    return {_pixels_hash(Image.open(io.BytesIO(r["png"]))): key for key, r in records.items()}


def _read(directory):
    return {r["__key__"]: r for shard in sorted(directory.glob("*.tar")) for r in iter_records(shard)}


def test_tiny_paligemma_writes_every_field_and_leaves_images_untouched(shards, tiny_paligemma, tmp_path):
    paths, records = shards
    captioner = TransformersCaptioner(str(tiny_paligemma), max_new_tokens=6, local_files_only=True)
    summary = caption_shards(paths, captioner, TASKS, out_dir=tmp_path / "out", batch_size=3, progress=False)
    assert summary.captioned == {"spatial": 10, "detailed": 10}
    written = _read(tmp_path / "out")
    assert list(written) == list(records)
    for key, record in written.items():
        meta = json.loads(record["json"])
        assert meta["alt"] == json.loads(records[key]["json"])["alt"]
        for field in ("spatial", "detailed"):
            words = meta[field].split()
            assert 1 <= len(words) <= 6 and set(words) <= set(WORDS), meta[field]
        assert record["png"] == records[key]["png"]  # byte for byte
    # the training reader and TIPSv2's multi-granularity sampler read the new fields
    sampler = CaptionSampler({"spatial": 1.0, "detailed": 1.0})
    generator = torch.Generator().manual_seed(0)
    drawn = {
        sampler(sample.captions, generator)[0] for sample in ShardDataset(tmp_path / "out") for _ in range(4)
    }
    assert drawn == {"spatial", "detailed"}


def test_tiny_paligemma_run_killed_mid_shard_resumes_without_duplicates_or_losses(
    shards, tiny_paligemma, tmp_path
):
    paths, records = shards
    captioner = TransformersCaptioner(str(tiny_paligemma), max_new_tokens=4, local_files_only=True)
    keys_by_pixels = _keys_by_pixels(records)
    first = CountingCaptioner(captioner, keys_by_pixels, fail_after=8)  # 6 calls a shard: dies in shard 1
    with pytest.raises(KeyboardInterrupt):
        caption_shards(paths, first, TASKS, out_dir=tmp_path / "out", batch_size=2, progress=False)
    assert [p.name for p in (tmp_path / "out").glob("*.tar")] == ["shard-000000.tar"]
    second = CountingCaptioner(captioner, keys_by_pixels)
    caption_shards(paths, second, TASKS, out_dir=tmp_path / "out", batch_size=2, progress=False)
    total = {
        k: first.captioned.get(k, 0) + second.captioned.get(k, 0)
        for k in {*first.captioned, *second.captioned}
    }
    assert total == {(key, task.prompt): 1 for key in records for task in TASKS}
    assert second.captioned and all(k not in first.captioned for k in second.captioned)
    written = _read(tmp_path / "out")
    assert list(written) == list(records)
    assert all(json.loads(r["json"]).keys() >= {"alt", "spatial", "detailed"} for r in written.values())
    assert not list((tmp_path / "out" / PROGRESS_DIR).glob("*.partial.jsonl"))


def test_a_torn_last_progress_line_is_captioned_again_once(shards, tmp_path):
    paths, records = shards
    counting = CountingCaptioner(echo_captioner, _keys_by_pixels(records), fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        caption_shards(paths[:1], counting, TASKS[:1], out_dir=tmp_path / "out", batch_size=2, progress=False)
    (partial,) = (tmp_path / "out" / PROGRESS_DIR).glob("*.partial.jsonl")
    lines = partial.read_text().splitlines()
    assert len(lines) == 4
    partial.write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])  # killed while writing line 4
    again = CountingCaptioner(echo_captioner, _keys_by_pixels(records))
    caption_shards(paths[:1], again, TASKS[:1], out_dir=tmp_path / "out", batch_size=2, progress=False)
    torn_key = json.loads(lines[3])["key"]
    assert again.captioned == {(k, "caption en"): 1 for k in [torn_key, "k04"]}


def test_unreadable_samples_are_skipped_counted_logged_and_kept(tmp_path, caplog):
    good = colour_record("good", "red", 0)
    bad_image = {"__key__": "bad-image", "png": b"not a png", "json": b'{"alt": "x"}'}
    bad_json = {"__key__": "bad-json", "png": colour_png("blue", 1), "json": b"{oops"}
    write_record_shards([good, bad_image, bad_json], tmp_path / "in")
    with caplog.at_level(logging.WARNING, logger="tipstorch.engine"):
        summary = caption_shards(
            sorted((tmp_path / "in").glob("*.tar")), echo_captioner, TASKS[:1], progress=False
        )
    assert sorted(key for _, key, _ in summary.skipped) == ["bad-image", "bad-json"]
    assert summary.captioned == {"spatial": 1}
    assert "bad-image" in caplog.text and "bad-json" in caplog.text
    written = _read(tmp_path / "in")  # rewritten in place
    assert written["bad-image"] == bad_image and written["bad-json"] == bad_json
    assert json.loads(written["good"]["json"]) == {"alt": "a red thing", "spatial": "caption en: red"}


def test_existing_captions_are_kept_unless_overwrite(tmp_path):
    record = {**colour_record("a", "green", 0), "json": b'{"spatial": "mine"}'}
    write_record_shards([record], tmp_path / "in")
    shards = sorted((tmp_path / "in").glob("*.tar"))
    summary = caption_shards(shards, echo_captioner, TASKS[:1], out_dir=tmp_path / "kept", progress=False)
    assert summary.kept == 1 and json.loads(_read(tmp_path / "kept")["a"]["json"])["spatial"] == "mine"
    caption_shards(
        shards, echo_captioner, TASKS[:1], out_dir=tmp_path / "new", overwrite=True, progress=False
    )
    assert json.loads(_read(tmp_path / "new")["a"]["json"])["spatial"] == "caption en: green"


def test_done_shards_are_not_captioned_again(shards, tmp_path):
    paths, records = shards
    caption_shards(paths, echo_captioner, TASKS, progress=False)  # in place
    again = CountingCaptioner(echo_captioner, _keys_by_pixels(records))
    summary = caption_shards(paths, again, TASKS, progress=False)
    assert again.calls == 0 and summary.shards_already_done == 2


def test_a_field_the_trainer_cannot_read_is_refused():
    with pytest.raises(ValueError, match="one of .*'spatial'.*got 'synthetic'"):
        CaptionTask("synthetic")


KILLED_CHILD = """
import itertools, sys, time
from pathlib import Path
from tipstorch.engine.captioning import CaptionTask, caption_shards

calls = itertools.count(1)

def stuck_on_the_eighth(images, prompt):  # shard 0 takes calls 1-5, shard 1 hangs in its third
    if next(calls) == 8:
        time.sleep(3600)
    return [f"{prompt} #{len(images)}" for _ in images]

shards = sorted(Path(sys.argv[1]).glob("*.tar"))
caption_shards(shards, stuck_on_the_eighth, [CaptionTask("spatial")], out_dir=sys.argv[2], batch_size=1, progress=False)
"""


def test_a_sigkilled_run_resumes_from_its_progress_file(shards, tmp_path):
    paths, records = shards
    out = tmp_path / "out"
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_CHILD, str(paths[0].parent), str(out)],
        env={**os.environ, "PYTHONPATH": str(root / "src")},
    )
    progress = out / PROGRESS_DIR
    deadline = time.monotonic() + 600  # a loaded machine may take minutes to start the child
    while time.monotonic() < deadline and child.poll() is None:  # wait for 2 captions of shard 1
        partial = list(progress.glob("shard-000001*.partial.jsonl")) if progress.is_dir() else []
        if partial and partial[0].read_text().count("}\n") >= 2:  # two complete lines
            break
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert time.monotonic() < deadline, "the child never reached shard 1"
    assert child.returncode == -signal.SIGKILL
    (partial,) = progress.glob("shard-000001*.partial.jsonl")
    logged = {json.loads(line)["key"] for line in partial.read_text().splitlines() if line.endswith("}")}
    assert logged == {"k05", "k06"}
    again = CountingCaptioner(echo_captioner, _keys_by_pixels(records))
    caption_shards(paths, again, TASKS[:1], out_dir=out, batch_size=1, progress=False)
    shard1 = {f"k{i:02d}" for i in range(5, 10)}
    assert {key for key, _ in again.captioned} == shard1 - logged  # only what the killed run had not logged
    written = _read(out)
    assert list(written) == list(records)
    assert all(json.loads(written[k]["json"])["spatial"] == "caption en #1" for k in logged)
