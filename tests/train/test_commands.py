"""``tipstorch train``: parser, recipe names, end-to-end runs, resume, exit on SIGTERM (subprocess)."""

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tipstorch
from tests.train.loop_helpers import TINY
from tipstorch.cli.train import add_train_parser
from tipstorch.train.config import ConfigError, resolve_config, shipped_configs, shipped_configs_dir
from tipstorch.train.run_state import FINAL, LAST, load_checkpoint

REPO = Path(__file__).resolve().parents[2]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tipstorch")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["train", *argv])


def tiny_args(out_dir: Path, *argv: str) -> list[str]:
    return ["--out-dir", str(out_dir), *[arg for item in TINY for arg in ("--set", item)], *argv]


def test_parser_collects_repeated_sets_and_the_options():
    args = parse("--config", "tips", "--set", "loop.steps=5", "--set", "optim.lr=1e-4", "--init", "x.safetensors",
                 "--out-dir", "runs/x", "--steps", "7")
    assert (args.config, args.overrides, args.init, args.out_dir, args.steps) == (
        "tips", ["loop.steps=5", "optim.lr=1e-4"], "x.safetensors", "runs/x", 7)
    assert args.resume is None and args.func.__name__ == "run_train"
    assert parse("--resume").resume is not None and parse("--resume", "runs/a").resume == "runs/a"


def test_recipes_ship_inside_the_package_and_resolve_by_bare_name():
    assert shipped_configs_dir().is_relative_to(Path(tipstorch.__file__).parent)
    assert {"tiny_cpu", "tips", "tipsv2", "clip_only", "tips_g14_paper"} <= set(shipped_configs())
    assert resolve_config("tiny_cpu") == resolve_config("tiny_cpu.yaml") == shipped_configs_dir() / "tiny_cpu.yaml"


def test_unknown_recipe_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match=r"no such file, nor a shipped recipe \(shipped: .*tiny_cpu"):
        resolve_config("tiny_gpu")


def test_a_path_is_read_as_given(tmp_path):
    path = tmp_path / "tiny_cpu.yaml"
    path.write_text("loop:\n  steps: 3\n")
    assert resolve_config(path) == path


def test_train_runs_writes_the_export_and_resumes_to_more_steps(tmp_path, capsys):
    args = parse(*tiny_args(tmp_path, "--steps", "3"))
    args.func(args)
    assert "trained to step 3" in capsys.readouterr().out
    assert tipstorch.load_model(tmp_path / FINAL) is not None
    args = parse("--resume", "--out-dir", str(tmp_path), "--steps", "5")  # config from the checkpoint
    args.func(args)
    assert "resumed at step 3" in capsys.readouterr().out
    state, _ = load_checkpoint(tmp_path)
    assert state["step"] == 5 and state["config"]["model"]["vision"]["embed_dim"] == 32


def test_init_and_resume_together_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="--init starts a new run"):
        args = parse("--resume", str(tmp_path), "--init", "tips-tiny")
        args.func(args)


def test_non_finite_loss_exits_with_a_clear_message(tmp_path):
    args = parse(*tiny_args(tmp_path, "--steps", "3", "--set", "optim.lr=1e30", "--set", "schedule.warmup_steps=0"))
    with pytest.raises(SystemExit, match=r"error: non-finite loss or gradient at step \d+"):
        args.func(args)


SUBPROCESS = """
import argparse, sys
from tipstorch.cli.train import add_train_parser
parser = argparse.ArgumentParser()
add_train_parser(parser.add_subparsers())
args = parser.parse_args(["train", *sys.argv[1:]])
args.func(args)
"""


def test_sigterm_to_the_process_group_writes_a_checkpoint_and_exits_with_128_plus_15(tmp_path):
    # As a cluster's scancel or Ctrl-C do: the signal reaches the DataLoader worker too.
    argv = tiny_args(tmp_path, "--steps", "100000", "--set", "loop.log_every=1", "--set", "data.num_workers=1")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]), OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-c", SUBPROCESS, *argv], env=env, cwd=tmp_path, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "log.jsonl"
    deadline = time.monotonic() + 60
    while not (log.exists() and log.read_text().count("\n") >= 3) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err
    state, path = load_checkpoint(tmp_path)
    assert path == tmp_path / LAST and 3 <= state["step"] < 100000
    assert f"stopped by SIGTERM at step {state['step']}" in out and "--resume" in out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_eval_normals_restarts_reach_the_quick_evaluation_and_a_bad_value_is_refused(monkeypatch):
    import tipstorch.cli.train as train_cli
    from tipstorch.train.config import EvalCfg, load_config, resolve_config

    seen = []
    monkeypatch.setattr(train_cli, "quick_evaluation", lambda model, tokenizer, settings, **_: seen.append(settings))
    train_cli._quick_evaluation(EvalCfg(quick=True, normals_restarts=1))(None, None)
    train_cli._quick_evaluation(EvalCfg(quick=True))(None, None)
    assert [settings.normals_restarts for settings in seen] == [1, train_cli.QUICK_SETTINGS.normals_restarts] == [1, 2]
    assert load_config(resolve_config("tiny_cpu")).eval.normals_restarts == 1
    with pytest.raises(SystemExit, match="normals_restarts must be >= 1, got 0"):
        train_cli._quick_evaluation(EvalCfg(quick=True, normals_restarts=0))
