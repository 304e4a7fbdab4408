"""``tipstorch train``: pretrain, continue pretraining a released model, or resume a run.

    tipstorch train                                   # tiny_cpu: a few minutes on 2 cores, then before/after eval
    tipstorch train --config tipsv2 --set loop.steps=800 --set optim.lr=5e-4
    tipstorch train --config my.yaml --init tipsv2-b14 --set data.source='shards/{000..099}.tar'
    tipstorch train --resume runs/tiny_cpu            # continue a killed run exactly
    torchrun --nproc_per_node 2 -m tipstorch.cli train --config tipsv2   # DDP (gloo on CPU, nccl on GPU)
    torchrun --nproc_per_node 8 -m tipstorch.cli train --config tips_l14 --set loop.parallel=fsdp \
        --set loop.meta_init=true --set optim.name=adamw                 # FSDP2, sharded checkpoints
    examples/slurm_train.sh                                              # several nodes (SLURM, c10d rendezvous)

Exit status: 0 when training completed, 1 on a non-finite loss (the last good checkpoint is kept),
128 + signal number when stopped by SIGTERM / SIGINT (after writing a checkpoint).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch.distributed as dist

from tipstorch.eval.quick import QUICK_SETTINGS, QUICK_TASKS, check_scene_tasks, quick_evaluation
from tipstorch.eval.report import format_comparison
from tipstorch.train.config import (
    EvalCfg,
    TrainCfg,
    config_from_dict,
    load_config,
    resolve_config,
    shipped_configs,
)
from tipstorch.train.loop import Evaluate, NonFiniteLossError, Trainer, TrainResult
from tipstorch.train.run_state import load_checkpoint
from tipstorch.weights.factory import get_tokenizer

DEFAULT_CONFIG = "tiny_cpu"
RESUME_OUT_DIR = "<out dir>"
EVAL_FILE = "eval.json"


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``train`` to a ``tipstorch`` subparsers object; it dispatches to ``run_train`` (``args.func``)."""
    train = subparsers.add_parser(
        "train",
        help="pretrain with the TIPS / TIPSv2 recipe (default: tiny model on built-in scenes, then eval)",
        description="Train with a recipe (YAML). Shipped recipes: " + ", ".join(shipped_configs()) + ".",
    )
    train.add_argument("--config", help=f"shipped recipe name or YAML path (default: {DEFAULT_CONFIG}; "
                                        "with --resume: the checkpoint's own)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set loop.steps=100 --set optim.lr=3e-4 (repeatable)")
    train.add_argument("--resume", nargs="?", const=RESUME_OUT_DIR, metavar="PATH",
                       help="continue a run from its directory or a .pt checkpoint (default: the out dir)")
    train.add_argument("--init", metavar="NAME_OR_PATH",
                       help="start from a released model (e.g. tipsv2-b14) or a checkpoint: towers loaded; a .pt "
                            "training checkpoint also continues its heads, EMA teacher and centres")
    train.add_argument("--out-dir", help="run directory for logs and checkpoints (default: loop.out_dir)")
    train.add_argument("--steps", type=int, help="total optimiser steps (same as --set loop.steps=N)")
    train.set_defaults(func=run_train)
    return train


def _quick_evaluation(cfg: EvalCfg) -> Evaluate:
    """The quick evaluation of ``eval.tasks`` (empty: its default tasks), as the trainer calls it."""
    try:
        chosen = check_scene_tasks(cfg.tasks) if cfg.tasks else QUICK_TASKS
        restarts = QUICK_SETTINGS.normals_restarts if cfg.normals_restarts is None else cfg.normals_restarts
        settings = replace(QUICK_SETTINGS, normals_restarts=restarts)
    except ValueError as error:
        raise SystemExit(f"error: eval: {error}") from None
    return lambda model, tokenizer: quick_evaluation(model, tokenizer, settings, tasks=chosen, progress=True)


def _configure(args: argparse.Namespace) -> tuple[TrainCfg, Path, dict | None]:
    """The config, the run directory and (with --resume) the checkpoint state to continue from."""
    if args.resume is not None and args.init is not None:
        raise SystemExit("error: --init starts a new run and --resume continues one; use one of them")
    overrides = list(args.overrides) + ([f"loop.steps={args.steps}"] if args.steps is not None else [])
    state = None
    if args.resume is None:
        cfg = load_config(resolve_config(args.config or DEFAULT_CONFIG), overrides)
    else:
        if args.resume == RESUME_OUT_DIR:
            where = args.out_dir or load_config(resolve_config(args.config or DEFAULT_CONFIG), overrides).loop.out_dir
        else:
            where = args.resume
        state, path = load_checkpoint(where)
        if args.config:
            cfg = load_config(resolve_config(args.config), overrides)
        else:
            cfg = config_from_dict(state["config"], where=f"config saved in {path}", overrides=overrides)
        args.out_dir = args.out_dir or str(path.parent)
    if args.init is not None:
        cfg.model.init = args.init
    return cfg, Path(args.out_dir or cfg.loop.out_dir), state


def _report(result: TrainResult, out_dir: Path) -> None:
    if result.status == "interrupted":
        print(f"stopped by {result.signal_name} at step {result.step}; checkpoint {result.checkpoint}; "
              f"continue with: tipstorch train --resume {out_dir}")
        return
    print(f"trained to step {result.step}; model: {result.export} (tipstorch.load_model reads it)")
    if result.eval_before is not None and result.eval_after is not None:
        print(format_comparison({"before": result.eval_before, "after": result.eval_after}))
        (out_dir / EVAL_FILE).write_text(json.dumps({"before": result.eval_before, "after": result.eval_after}, indent=2))


def run_train(args: argparse.Namespace) -> None:
    cfg, out_dir, state = _configure(args)
    evaluate = _quick_evaluation(cfg.eval) if cfg.eval.quick else None
    trainer = Trainer(cfg, get_tokenizer, out_dir=out_dir, resume=state, evaluate=evaluate)
    main = trainer.context.is_main
    if main:
        parameters = sum(p.numel() for p in trainer.student.parameters())
        start = f"resumed at step {trainer.step}" if state is not None else (f"from {cfg.model.init}" if cfg.model.init else "from scratch")
        print(f"{cfg.name}: {parameters / 1e6:.1f}M trainable parameters, {start}, {cfg.loop.steps} steps of "
              f"{cfg.loop.batch_size} images on {trainer.context.world_size} process(es); run directory {out_dir}")
    try:
        result = trainer.fit()
    except NonFiniteLossError as error:
        raise SystemExit(f"error: {error}") from None
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if main:
        _report(result, out_dir)
    if result.status == "interrupted":
        raise SystemExit(128 + (result.signal_number or 15))
