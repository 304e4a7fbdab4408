"""Training-step throughput and model FLOP utilisation (MFU), measured so that a shared, noisy machine can
still compare variants: interleaved rounds, medians, the spread and the matmul peak of the same rounds.

    python benchmarks/train_step.py [--configs tiny_cpu tips_s14 tips_b14] [--batches 8 32] [--rounds 5]
        [--variants "model.fused_attention=true" "" "loop.bf16=false"] [--threads 1] [--json out.json]

Every (config, batch, variant) gets its own ``Trainer`` on one synthetic batch shaped as its recipe
(data loading excluded: see benchmarks/scenes.py); a variant is a comma-separated list of config
overrides ("" = the config as shipped). Each round times one ``Trainer.train_step`` of every row in turn
and a square matmul in bf16 and fp32 (the peak under the load of that round), so a burst of load from
another process hits every row alike. Printed per row: median images/s, the spread (slowest and
fastest round over the median), the ratio to the first variant of its (config, batch), CPU seconds per
step (this process only: with one thread it hardly depends on the other processes' load), GFLOP per step,
MFU = the median over rounds of the step's FLOP/s / the peak of its dtype in the same round, the same
from CPU time (FLOPs / (CPU s / threads) / peak: on a loaded machine the figure an idle one would give,
if the peak itself was measured while the matmul had its cores; its spread tells), and the step's peak memory: the peak resident set of the
process during one step above its resident set before it (Linux: ``/proc/self/clear_refs`` resets the
peak; the gradients of the step before are freed first), i.e. activations, gradients and temporaries.
FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on the warm-up step (matmuls, convolutions and attention,
forward and backward; element-wise work and the optimiser are not counted), CPU flash attention being
added to its table with torch's own sdpa formulas.
Run from the repository root with the package installed (``pip install -e .``) or ``PYTHONPATH=src``.

Measured (shared 2-core AMX Xeon under another job's load, so CPU s/step, not images/s; 3 rounds):
``--configs tips_s14 --batches 8 --rounds 3 --variants "loop.bf16=false" "model.fused_attention=true" ""
"loop.bf16_mode=weights"``: 20.3 / 12.3 / 10.3 / 9.4 CPU s per step, MFU (CPU time) 76% (fp32) / 12.7% /
15.1% / 16.4%, step peak 2120 / 948 / 1102 / 1038 MB (bf16 peak 861 GFLOP/s). ``--configs tiny_cpu
--batches 32 --rounds 3 --variants "" "loop.bf16_mode=weights" "loop.bf16=false"``: 0.89 / 0.82 / 2.02
CPU s per step, step peak 117 / 72 / 212 MB.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from matmul_peak import fraction_of_peak, interleaved_rounds
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
            grad_out, query, key, value
        )
    ),
}



def _resident_bytes(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, from /proc/self/status."""
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field}:\s+(\d+) kB", status.read()).group(1)) * 1024


def step_peak_bytes(step: Callable[[], object]) -> float:
    """Peak resident memory of the process while ``step`` runs, above the resident memory before it (NaN
    where /proc/self/clear_refs cannot reset the peak, i.e. off Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current VmRSS
    except OSError:
        step()
        return float("nan")
    before = _resident_bytes("VmRSS")
    step()
    return float(_resident_bytes("VmHWM") - before)


def synthetic_batch(trainer: Trainer, batch: int) -> dict[str, torch.Tensor]:
    """Random tensors shaped as the recipe's batch (captions of the text tower's length, random non-pad ids)."""
    data, generator = trainer.cfg.data, torch.Generator().manual_seed(0)
    patches = (data.global_size // 14) ** 2
    text = trainer.model.config.text
    return {
        "global_crop": torch.rand(batch, 3, data.global_size, data.global_size, generator=generator),
        "local_crops": torch.rand(
            batch, data.num_local_crops, 3, data.local_size, data.local_size, generator=generator
        ),
        "patch_mask": torch.rand(batch, patches, generator=generator).argsort(1)
        < round(data.mask_ratio * patches),
        "alt_tokens": torch.randint(1, text.vocab_size, (batch, text.context_length), generator=generator),
        "synthetic_tokens": torch.randint(
            1, text.vocab_size, (batch, text.context_length), generator=generator
        ),
    }


class Row:
    """One (config, batch, variant): its trainer, batch, FLOPs per step and the timings of every round."""

    def __init__(self, config: str, batch: int, variant: str, out_dir: str) -> None:
        self.config, self.batch, self.variant = config, batch, variant
        overrides = [f"loop.batch_size={batch}", "loop.steps=1000", "eval.quick=false", "loop.threads=0"]
        overrides += [item for item in variant.split(",") if item]
        cfg = load_config(resolve_config(config), overrides)
        self.trainer = Trainer(cfg, get_tokenizer, out_dir=out_dir)
        self.bf16 = self.trainer.bf16  # loop.bf16 resolved ("auto": where the device has bf16 matmuls)
        self.inputs = synthetic_batch(self.trainer, batch)
        with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter:
            self.trainer.train_step(self.inputs)  # also the warm-up
        self.flops = counter.get_total_flops()
        self.trainer.optimizer.zero_grad(set_to_none=True)
        self.peak_bytes = step_peak_bytes(lambda: self.trainer.train_step(self.inputs))
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def time_step(self) -> None:
        cpu, wall = time.process_time(), time.perf_counter()
        self.trainer.train_step(self.inputs)
        self.wall.append(time.perf_counter() - wall)
        self.cpu.append(time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["tiny_cpu"], help="config names or yaml paths")
    parser.add_argument("--batches", nargs="+", type=int, default=[32])
    parser.add_argument(
        "--variants", nargs="+", default=[""], help='comma-separated overrides per variant ("" = as shipped)'
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per row, interleaved")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (the loop.threads of every row)"
    )
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out_dir:
        rows = [
            Row(config, batch, variant, out_dir)
            for config in args.configs
            for batch in args.batches
            for variant in args.variants
        ]
        peaks = interleaved_rounds(args.rounds, [row.time_step for row in rows])
    peak = {dtype: statistics.median(rates) for dtype, rates in peaks.items()}
    spread = {dtype: (min(rates) / peak[dtype], max(rates) / peak[dtype]) for dtype, rates in peaks.items()}
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} interleaved rounds; matmul peak "
        f"(median, spread): bf16 {peak[torch.bfloat16] / 1e9:.0f} GFLOP/s ({spread[torch.bfloat16][0]:.2f}-"
        f"{spread[torch.bfloat16][1]:.2f}), fp32 {peak[torch.float32] / 1e9:.0f} GFLOP/s "
        f"({spread[torch.float32][0]:.2f}-{spread[torch.float32][1]:.2f})\n"
    )
    print(
        "| config | batch | variant | images/s | spread | vs first | CPU s/step | GFLOP/step | MFU | MFU (CPU time) "
        "| step peak MB |"
    )
    print("|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|")
    results, first = [], {}
    for row in rows:
        seconds = statistics.median(row.wall)
        reference = first.setdefault((row.config, row.batch), seconds)
        row_peaks = peaks[torch.bfloat16 if row.bf16 else torch.float32]
        mfu = fraction_of_peak(row.flops, row.wall, row_peaks)
        cpu_mfu = fraction_of_peak(row.flops, [cpu / args.threads for cpu in row.cpu], row_peaks)
        result = {
            "config": row.config,
            "batch": row.batch,
            "variant": row.variant or "as shipped",
            "images_per_s": row.batch / seconds,
            "spread": [min(row.wall) / seconds, max(row.wall) / seconds],
            "speedup_vs_first": reference / seconds,
            "cpu_s_per_step": statistics.median(row.cpu),
            "gflop_per_step": row.flops / 1e9,
            "mfu": mfu,
            "mfu_cpu_time": cpu_mfu,
            "step_peak_mb": row.peak_bytes / 1e6,
        }
        results.append(result)
        print(
            f"| {row.config} | {row.batch} | {result['variant']} | {result['images_per_s']:.2f} | "
            f"{result['spread'][0]:.2f}-{result['spread'][1]:.2f} | {result['speedup_vs_first']:.2f}x | "
            f"{result['cpu_s_per_step']:.2f} | {result['gflop_per_step']:.0f} | {100 * mfu:.1f}% | "
            f"{100 * cpu_mfu:.1f}% | {result['step_peak_mb']:.0f} |"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
