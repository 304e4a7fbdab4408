"""The curation job end to end on shards of coloured images: selection, copies, dedup, report."""

from __future__ import annotations

import json

import pytest

from tests.engine.fakes import MeanColourEmbedder, colour_png, colour_record
from tipstorch.data.records import iter_records, write_record_shards
from tipstorch.engine.curate import HISTOGRAM_FILE, REPORT_FILE, CurateJob, Target, run_curation
from tipstorch.engine.curation import CurationConfig


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Pool: 12 red, 12 green, 12 blue images in 3 shards, plus ``red-copy`` (the bytes of red-0)
    and ``blue-copy``. Target folder: 8 red and 4 green images. Eval folder: the bytes of green-5."""
    root = tmp_path_factory.mktemp("curate")
    records = [
        colour_record(f"{c}-{i}", c, seed=100 * n + i)
        for n, c in enumerate(["red", "green", "blue"])
        for i in range(12)
    ]
    records.append({**records[0], "__key__": "red-copy"})
    records.append({**records[24], "__key__": "blue-copy"})
    write_record_shards(records, root / "pool", shard_size=13)
    (root / "target").mkdir()
    for i in range(8):
        (root / "target" / f"r{i}.png").write_bytes(colour_png("red", seed=1000 + i))
    for i in range(4):
        (root / "target" / f"g{i}.png").write_bytes(colour_png("green", seed=2000 + i))
    (root / "eval" / "val").mkdir(parents=True)
    (root / "eval" / "val" / "leak.png").write_bytes(records[17]["png"])
    return root, {r["__key__"]: r for r in records}


def _job(root, out, **kw) -> CurateJob:
    target = Target(root / "target", CurationConfig(clusters=2, samples=None, radius_percentile=100.0))
    return CurateJob(
        pool=root / "pool", targets=[target], out_dir=out, progress=False, dedup_threshold=0.99999, **kw
    )


def test_selection_is_the_target_colours_copied_byte_for_byte(dataset, tmp_path):
    root, pool = dataset
    run_curation(_job(root, tmp_path / "out", eval_sets=[root / "eval"]), MeanColourEmbedder())
    written = [r for shard in sorted((tmp_path / "out").glob("*.tar")) for r in iter_records(shard)]
    keys = [r["__key__"] for r in written]
    assert keys and all(k.startswith(("red", "green")) for k in keys)
    assert all(r == pool[r["__key__"]] for r in written)  # every member byte-equal to the pool's


def test_planted_duplicates_are_removed_and_reported_with_their_keys(dataset, tmp_path):
    root, _ = dataset
    report = run_curation(_job(root, tmp_path / "out", eval_sets=[root / "eval"]), MeanColourEmbedder())
    within = report.duplicates["within_selection"]
    assert [(d["key"], d["duplicate_of"]["key"]) for d in within] == [("red-copy", "red-0")]
    assert [(d["key"], d["eval_key"]) for d in report.duplicates["against_eval"]] == [("green-5", "val/leak")]
    keys = {r["__key__"] for shard in (tmp_path / "out").glob("*.tar") for r in iter_records(shard)}
    assert "red-copy" not in keys and "green-5" not in keys and "red-0" in keys


def test_report_counts_clusters_and_draws_the_histogram(dataset, tmp_path):
    root, _ = dataset
    run_curation(_job(root, tmp_path / "out"), MeanColourEmbedder())
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    (target,) = report["targets"]
    rows = sorted(target["per_cluster"], key=lambda row: -row["target_images"])
    assert [row["target_images"] for row in rows] == [8, 4]
    assert sum(row["selected"] for row in rows) == target["selected"]
    assert report["written"]["samples"] == target["selected"] - len(report["duplicates"]["within_selection"])
    assert (tmp_path / "out" / HISTOGRAM_FILE).read_bytes().startswith(b"\x89PNG")


def test_two_targets_are_curated_independently_and_merged(dataset, tmp_path):
    root, _ = dataset
    (tmp_path / "blue").mkdir()
    for i in range(3):
        (tmp_path / "blue" / f"b{i}.png").write_bytes(colour_png("blue", seed=3000 + i))
    job = _job(root, tmp_path / "out")
    job.targets = [*job.targets, Target(tmp_path / "blue", CurationConfig(clusters=1, samples=5))]
    report = run_curation(job, MeanColourEmbedder())
    assert [t["selected"] for t in report.targets][1] == 5
    keys = {r["__key__"] for shard in (tmp_path / "out").glob("*.tar") for r in iter_records(shard)}
    assert sum(k.startswith("blue") for k in keys) == 5


def test_rerun_reads_the_embedding_cache(dataset, tmp_path):
    root, _ = dataset
    run_curation(_job(root, tmp_path / "out"), MeanColourEmbedder())
    again = MeanColourEmbedder()
    run_curation(_job(root, tmp_path / "out"), again)
    assert again.embedded == 0


def test_duplicate_pool_keys_across_shards_are_refused(tmp_path):
    write_record_shards([colour_record("a", "red", 0)], tmp_path / "pool", prefix="x")
    write_record_shards([colour_record("a", "red", 1)], tmp_path / "pool", prefix="y")
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "t.png").write_bytes(colour_png("red", 5))
    job = CurateJob(
        tmp_path / "pool",
        [Target(tmp_path / "target", CurationConfig(clusters=1))],
        tmp_path / "out",
        progress=False,
    )
    with pytest.raises(ValueError, match="pool key 'a' is in both .*x-000000.tar and .*y-000000.tar"):
        run_curation(job, MeanColourEmbedder())
