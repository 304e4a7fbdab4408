"""Training-step throughput and model FLOP utilisation (MFU) of the TIPS recipe on this machine.

    python benchmarks/train_step.py [--models s14 b14] [--dtypes bf16 fp32] [--batch 4] [--steps 2] [--json out.json]

For each model (the paper recipe ``tips_<model>.yaml``: full EMA teacher, 32k prototypes, one 224 px
global crop + 6 local crops at 98 px, masked and unmasked passes, two captions of 64 tokens) it times
``Trainer.train_step`` on synthetic batches (data loading excluded: see benchmarks/scenes.py) and
prints a markdown table: images/s, seconds per step, model FLOPs per step, achieved FLOP/s and MFU =
achieved / peak. The peak is measured here, right after each row's steps (so under the same machine
load): a large square matmul in the same dtype (bf16 under autocast, fp32 otherwise). FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one
step (matmuls, convolutions and attention, forward and backward; the optimiser's element-wise work is not
counted), CPU flash attention being added to its table with torch's own sdpa formulas.
Run from the repository root with the package installed (``pip install -e .``) or ``PYTHONPATH=src``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from tipstorch.train.config import load_config, resolve_config
from tipstorch.train.loop import Trainer
from tipstorch.weights.factory import get_tokenizer

ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: (
        lambda query, key, value, *args, out_shape=None, **kwargs: sdpa_flop_count(query, key, value)
    ),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        lambda grad_out, query, key, value, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(
            grad_out, query, key, value)
    ),
}


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 8) -> float:
    """FLOP/s of a [size, size] @ [size, size] matmul in ``dtype`` (best of ``repeats``)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def synthetic_batch(trainer: Trainer, batch: int) -> dict[str, torch.Tensor]:
    """Random tensors shaped as the recipe's batch (captions of 64 random non-pad tokens)."""
    data, generator = trainer.cfg.data, torch.Generator().manual_seed(0)
    patches = (data.global_size // 14) ** 2
    vocab = trainer.model.config.text.vocab_size
    return {
        "global_crop": torch.rand(batch, 3, data.global_size, data.global_size, generator=generator),
        "local_crops": torch.rand(batch, data.num_local_crops, 3, data.local_size, data.local_size, generator=generator),
        "patch_mask": torch.rand(batch, patches, generator=generator).argsort(1) < round(data.mask_ratio * patches),
        "alt_tokens": torch.randint(1, vocab, (batch, 64), generator=generator),
        "synthetic_tokens": torch.randint(1, vocab, (batch, 64), generator=generator),
    }


def measure(model: str, dtype: str, batch: int, steps: int) -> dict:
    cfg = load_config(resolve_config(f"tips_{model}"), [f"loop.batch_size={batch}", f"loop.bf16={dtype == 'bf16'}",
                                                       "loop.steps=1000", "model.grad_checkpointing=false"])
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = Trainer(cfg, get_tokenizer, out_dir=out_dir)
        inputs = synthetic_batch(trainer, batch)
        with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter:
            trainer.train_step(inputs)  # also the warm-up
        flops = counter.get_total_flops()
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(inputs)
        seconds = (time.perf_counter() - start) / steps
    peak = matmul_peak(torch.bfloat16 if dtype == "bf16" else torch.float32)  # under the same load as the step
    achieved = flops / seconds
    return {
        "model": model, "dtype": dtype, "batch": batch, "images_per_s": batch / seconds, "seconds_per_step": seconds,
        "gflop_per_step": flops / 1e9, "achieved_gflop_s": achieved / 1e9, "peak_gflop_s": peak / 1e9,
        "mfu": achieved / peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["s14", "b14"], choices=["s14", "b14", "l14"])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    parser.add_argument("--batch", type=int, default=4, help="images per step")
    parser.add_argument("--steps", type=int, default=2, help="timed steps (after one counted warm-up step)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = [measure(model, dtype, args.batch, args.steps) for model in args.models for dtype in args.dtypes]
    print("\n| model | dtype | batch | images/s | s/step | GFLOP/step | achieved GFLOP/s | peak GFLOP/s | MFU |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['model']} | {row['dtype']} | {row['batch']} | {row['images_per_s']:.2f} | "
              f"{row['seconds_per_step']:.2f} | {row['gflop_per_step']:.0f} | {row['achieved_gflop_s']:.0f} | "
              f"{row['peak_gflop_s']:.0f} | {100 * row['mfu']:.1f}% |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
