"""``tipstorch eval``: parser, data planning and whole runs on tiny trees in the real layouts."""

import argparse
import json
import math

import numpy as np
import pytest
import torch

import tipstorch
from tests.eval import layouts
from tests.helpers import tiny_tips
from tipstorch.cli.eval import add_eval_parser, parse_data, plan_runs, run_eval
from tipstorch.eval.context import limit
from tipstorch.eval.datasets import SquareTargets
from tipstorch.eval.quick import QUICK_TASKS
from tipstorch.eval.tasks import TASKS


def parse(argv):
    parser = argparse.ArgumentParser(prog="tipstorch")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["eval", *argv])


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    tipstorch.save_model(tiny_tips(), path)
    return path


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {
        "imagenet": layouts.imagenet(root / "imagenet"),
        "voc": layouts.voc(root / "voc"),
        "ade20k": layouts.ade20k(root / "ade"),
        "nyu": layouts.nyu_bts(root / "nyu"),
        "coco": layouts.karpathy(root / "coco", "coco"),
        "flickr30k": layouts.karpathy(root / "flickr", "flickr30k"),
        "docci": layouts.docci(root / "docci"),
    }


SMOKE = ["--image-size", "28", "--max-samples", "4", "--probe-iterations", "2", "--probe-batch-size", "2",
         "--batch-size", "4", "--device", "cpu"]
STANDARD_TASKS = "zeroshot-cls,zeroshot-seg,retrieval,knn,linear,seg-probe,depth-probe,depth-dpt"
EXPECTED_RUNS = {
    "imagenet/zeroshot_cls", "imagenet/knn", "imagenet/linear", "ade20k/zeroshot_seg", "voc/zeroshot_seg",
    "coco/retrieval", "flickr30k/retrieval", "docci/retrieval", "voc/seg_probe", "ade20k/seg_probe",
    "nyu/depth_probe", "nyu/depth_dpt",
}


@pytest.fixture(scope="module")
def standard_run(model_path, trees, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    data = [arg for key, path in trees.items() for arg in ("--data", f"{key}={path}")]
    args = parse(["--model", str(model_path), "--tasks", STANDARD_TASKS, *data, *SMOKE,
                  "--class-names", str(trees["imagenet"] / "class_names.json"),
                  "--out", str(out / "results.json"), "--table", str(out / "table.md")])
    report = run_eval(args)
    return report, out


# ------------------------------------------------------------------ parser and planning


def test_parser_reads_tasks_data_and_defaults():
    args = parse(["--model", "tips-tiny", "--random", "--tasks", "knn, quick,knn", "--data", "imagenet=/x",
                  "--data", "scenes"])
    assert args.tasks == ["knn", "quick"]
    assert args.data == ["imagenet=/x", "scenes"]
    assert (args.random, args.bf16, args.batch_size, args.max_samples, str(args.out)) == (
        True, False, 32, None, "eval_results.json")
    assert args.func is run_eval


def test_parser_rejects_an_unknown_task(capsys):
    with pytest.raises(SystemExit):
        parse(["--tasks", "knn,segmentation"])
    assert "unknown task" in capsys.readouterr().err


def test_missing_data_names_the_task_and_every_key_it_accepts():
    with pytest.raises(SystemExit, match="task seg-probe needs .*--data voc=PATH or --data ade20k=PATH or --data scenes"):
        plan_runs(["knn", "seg-probe"], {"imagenet": None})


def test_plan_runs_each_task_on_every_dataset_given_for_it():
    data = {"voc": None, "ade20k": None, "imagenet": None}
    assert plan_runs(["zeroshot-seg", "quick"], data) == [
        ("zeroshot-seg", "ade20k"), ("zeroshot-seg", "voc"), ("quick", "scenes")]


@pytest.mark.parametrize(
    ("entry", "message"),
    [("imagenett=/x", "unknown --data key"), ("nyu", "needs a path"), ("coco=/does/not/exist", "no such file")],
)
def test_bad_data_entries_are_one_clear_error(entry, message):
    with pytest.raises(SystemExit, match=message):
        parse_data([entry])


def test_scenes_needs_no_path():
    assert parse_data(["scenes"]) == {"scenes": None}


# ------------------------------------------------------------------ whole runs on the standard layouts


def test_standard_run_reports_every_task_on_every_dataset(standard_run):
    report, _ = standard_run
    assert {key.rsplit("/", 1)[0] for key in report["metrics"]} == EXPECTED_RUNS
    assert set(report["details"]) == set(report["protocol"]) == set(report["seconds"]) == EXPECTED_RUNS


def test_standard_run_metrics_are_finite_and_named_per_protocol(standard_run):
    metrics = standard_run[0]["metrics"]
    assert all(math.isfinite(value) for value in metrics.values())
    assert {"coco/retrieval/i2t_r1", "coco/retrieval/t2i_r10", "nyu/depth_probe/rmse", "nyu/depth_dpt/delta1",
            "ade20k/zeroshot_seg/miou", "voc/seg_probe/miou", "imagenet/knn/top1"} <= set(metrics)


def test_standard_run_writes_the_json_with_model_data_and_protocol(standard_run, model_path, trees):
    report, out = standard_run
    written = json.loads((out / "results.json").read_text())
    assert written == json.loads(json.dumps(report))
    assert written["model"] == str(model_path) and written["tasks"] == STANDARD_TASKS.split(",")
    assert written["data"]["nyu"] == str(trees["nyu"])
    assert written["protocol"]["ade20k/zeroshot_seg"] == {"short_side": 28, "window": 28, "stride": 21, "templates": "tcl9"}
    assert written["protocol"]["voc/seg_probe"]["iterations"] == 2
    assert written["details"]["imagenet/knn"]["num_train"] == 4


def test_standard_run_table_has_a_row_per_metric(standard_run, model_path):
    report, out = standard_run
    rows = (out / "table.md").read_text().strip().splitlines()[2:]
    assert len(rows) == len(report["metrics"])
    assert f"| nyu/depth_probe/rmse | ↓ | {report['metrics']['nyu/depth_probe/rmse']:.4f} |" in rows


def test_scenes_tasks_run_the_quick_evaluation(model_path, tmp_path, capsys):
    args = parse(["--model", str(model_path), "--tasks", "quick,normals-dpt", *SMOKE, "--out", str(tmp_path / "r.json")])
    report = run_eval(args)
    quick_metrics = {key.split("/")[1] for key in report["metrics"]}
    assert all(key.startswith("scenes/") for key in report["metrics"])
    assert quick_metrics == {TASKS[task].name for task in QUICK_TASKS} | {"retrieval_alt"}
    assert report["details"]["scenes/knn"]["num_train"] == 4  # --max-samples caps the scenes
    assert "scenes/normals_dpt/mean_deg" in capsys.readouterr().out


def test_corrupt_image_is_skipped_and_counted(model_path, tmp_path, capsys):
    root = layouts.imagenet(tmp_path / "in")
    (root / "val" / "n01440764" / "broken.JPEG").write_bytes(b"not a jpeg")
    args = parse(["--model", str(model_path), "--tasks", "knn", "--data", f"imagenet={root}", "--image-size", "28",
                  "--out", str(tmp_path / "r.json")])
    report = run_eval(args)
    assert report["details"]["imagenet/knn"]["num_skipped"] == 1
    assert report["details"]["imagenet/knn"]["num_test"] == 9
    assert "skipped 1 corrupt sample" in capsys.readouterr().err


def test_zeroshot_on_wnid_folders_asks_for_class_names(model_path, trees, tmp_path):
    args = parse(["--model", str(model_path), "--tasks", "zeroshot-cls", "--data", f"imagenet={trees['imagenet']}",
                  "--out", str(tmp_path / "r.json")])
    with pytest.raises(SystemExit, match="--class-names"):
        run_eval(args)


def test_missing_split_folder_is_one_error_naming_the_expected_layout(model_path, tmp_path):
    layouts.imagenet(tmp_path / "in")
    (tmp_path / "in" / "train").rename(tmp_path / "in" / "training")
    args = parse(["--model", str(model_path), "--tasks", "knn", "--data", f"imagenet={tmp_path / 'in'}",
                  "--out", str(tmp_path / "r.json")])
    with pytest.raises(SystemExit, match=r"knn on imagenet: imagenet: expected .*train/<class>/<image>"):
        run_eval(args)
    assert not (tmp_path / "r.json").exists()


def test_train_and_val_with_different_class_folders_name_the_differing_classes(model_path, tmp_path):
    layouts.imagenet(tmp_path / "in")
    (tmp_path / "in" / "val" / "n01443537").rename(tmp_path / "in" / "val" / "n09999999")
    args = parse(["--model", str(model_path), "--tasks", "knn", "--data", f"imagenet={tmp_path / 'in'}",
                  "--out", str(tmp_path / "r.json")])
    with pytest.raises(SystemExit, match=r"differ.*only in train: \['n01443537'\], only in val: \['n09999999'\]"):
        run_eval(args)


# ------------------------------------------------------------------ dense targets and subsets


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, target):
        self.target = target

    def __len__(self):
        return 1

    def __getitem__(self, index):
        return None, self.target


def test_square_targets_resize_labels_nearest():
    labels = np.array([[0, 0, 7, 7], [255, 255, 7, 7]])
    _, target = SquareTargets(_Pairs(labels), size=4)[0]
    assert target.dtype == torch.int64 and target.shape == (4, 4)
    assert set(target.unique().tolist()) == {0, 7, 255}
    assert target[:2, 2:].eq(7).all() and target[2:, :2].eq(255).all()


def test_square_targets_apply_the_eigen_crop_to_nyu_frames():
    depth = np.full((480, 640), 3.0, dtype=np.float32)
    _, target = SquareTargets(_Pairs(depth), size=48, eigen_crop=True)[0]
    assert target.dtype == torch.float32
    assert target[0].eq(0).all() and target[:, 0].eq(0).all()  # rows < 45, cols < 41 are outside
    assert target[24, 24] == 3.0


def test_limit_takes_a_seeded_subset_in_dataset_order():
    dataset = list(range(100))
    subset = limit(dataset, 10, seed=3)
    indices = list(subset.indices)
    assert len(subset) == 10 and indices == sorted(indices)
    assert indices == list(limit(dataset, 10, seed=3).indices) != list(limit(dataset, 10, seed=4).indices)
    assert limit(dataset, None, seed=3) is dataset

