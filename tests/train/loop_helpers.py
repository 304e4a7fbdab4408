"""A very small training recipe for the loop tests: width-32 one-block towers, 28 px global crops (2x2
patches), two 14 px local crops, 64 prototypes, scenes generated at 42 px, no DataLoader workers, fp32."""

from __future__ import annotations

import itertools
import os
import signal
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from tipstorch.train.config import TrainCfg, load_config, resolve_config
from tipstorch.train.loop import Trainer
from tipstorch.weights.factory import get_tokenizer

TINY = [
    "model.vision={embed_dim: 32, depth: 1, num_heads: 2, mlp_hidden_dim: 64, pos_grid: 2, layer_scale_init: 0.1}",
    "model.text={width: 32, depth: 1, num_heads: 2, mlp_dim: 64}",
    "heads.num_prototypes=64", "heads.hidden_dim=32", "heads.bottleneck_dim=16",
    "data.scenes_size=42", "data.global_size=28", "data.local_size=14", "data.num_local_crops=2",
    "data.num_samples=512", "data.num_workers=0",
    "loop.batch_size=8", "loop.steps=40", "loop.checkpoint_every=1000", "loop.log_every=5", "loop.bf16=false",
    "schedule.warmup_steps=4", "schedule.ibot_teacher_temp_warmup_steps=8", "eval.quick=false",
]


def tiny_cfg(*overrides: str, config: str = "tiny_cpu") -> TrainCfg:
    return load_config(resolve_config(config), [*TINY, *overrides])


def tiny_trainer(out_dir: Path, *overrides: str, config: str = "tiny_cpu", **kwargs) -> Trainer:
    return Trainer(tiny_cfg(*overrides, config=config), get_tokenizer, out_dir=out_dir, **kwargs)


def losses(history: Iterable[dict[str, float]]) -> list[dict[str, float]]:
    """The loss parts of each step (without timings)."""
    return [{key: value for key, value in step.items() if key != "images_per_s"} for step in history]


def parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def signal_after(batches: Iterable[dict], count: int, number: int = signal.SIGTERM) -> Iterator[dict]:
    """Yield the batches and send ``number`` to this process just before the ``count``-th one is trained on."""
    for index, batch in enumerate(batches):
        if index == count - 1:
            os.kill(os.getpid(), number)
        yield batch


def first(batches: Iterable[dict], count: int) -> list[dict]:
    return list(itertools.islice(batches, count))
