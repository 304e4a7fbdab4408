"""Image-encoder throughput: tipstorch vs transformers' Tipsv2VisionModel on the same weights, measured so
that a shared, noisy machine can still compare them: interleaved rounds, medians, spread, same-run peak.

    python benchmarks/inference.py [--model tipsv2-b14] [--sizes 224 448] [--batch 8] [--rounds 5]
        [--precisions fp32 bf16-autocast bf16-weights]

Both implementations get identical random weights (tipstorch writes them in the transformers format) and
live in this one process. Each round runs one forward of every row (implementation x precision x size)
in turn and a square matmul in bf16 and fp32, so a burst of load from another process hits every row
alike. ``bf16-autocast`` is what the CLI's ``--bf16`` does; ``bf16-weights`` casts the model to bfloat16
(both implementations, as transformers' ``torch_dtype=torch.bfloat16`` does). Printed per row: median
images/s, spread (slowest and fastest round over the median), fraction of the matmul peak of the
row's dtype (median over rounds, each forward against the peak of its own round; FLOPs counted with
``FlopCounterMode``: matmuls, convolutions and attention), the ratio to transformers at the same precision
and size (median over rounds of the two forwards of a round), and the max abs difference of the outputs
(all tokens after the final norm) from transformers' fp32 output.

Measured (shared 2-core Xeon under another job's load, 2 threads, wall clock):
``--sizes 224 448 --batch 2 --rounds 2 --precisions fp32 bf16-weights``: tipstorch / transformers 0.99x and
0.93x in fp32, 1.10x and 1.13x with bf16 weights at 224 and 448 px (spread 0.87-1.13).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from matmul_peak import fraction_of_peak, interleaved_rounds, paired_ratio
from torch.utils.flop_counter import FlopCounterMode

PRECISIONS = ("fp32", "bf16-autocast", "bf16-weights")
# oneDNN's fused linear (tipstorch's bf16 CPU inference, models/fused_linear.py): x [..., in] @ w [out, in]^T
FUSED_LINEAR_FLOPS = {
    torch.ops.mkldnn._linear_pointwise: (
        lambda tokens, weight, *args, out_shape=None, **kwargs: 2 * math.prod(tokens) * weight[0]
    ),
}



def encoders(weights_dir: Path) -> dict[str, Callable[[torch.dtype], Callable]]:
    """Implementation name -> (dtype -> forward of images [B, 3, H, W] -> tokens [B, 2 + N, D])."""
    import transformers

    import tipstorch

    def ours(dtype: torch.dtype) -> Callable:
        model = tipstorch.load_model(weights_dir / "model.safetensors").to(dtype).eval()

        def run(images: torch.Tensor) -> torch.Tensor:
            features = model.encode_image(images.to(dtype))
            return torch.cat([features.global_cls[:, None], features.spatial_cls[:, None], features.flat], 1)

        return run

    def theirs(dtype: torch.dtype) -> Callable:
        model = transformers.Tipsv2VisionModel.from_pretrained(weights_dir / "hf").to(dtype).eval()
        return lambda images: model(pixel_values=images.to(dtype)).last_hidden_state

    return {"tipstorch": ours, "transformers": theirs}


class Row:
    def __init__(self, implementation: str, precision: str, size: int, batch: int, build: Callable) -> None:
        self.implementation, self.precision, self.size, self.batch = implementation, precision, size, batch
        self.forward = build(torch.bfloat16 if precision == "bf16-weights" else torch.float32)
        self.images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
        self.dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        with FlopCounterMode(display=False, custom_mapping=FUSED_LINEAR_FLOPS) as counter:
            self.output = self.run().float()  # also the warm-up
        self.flops = counter.get_total_flops()
        self.seconds: list[float] = []

    def run(self) -> torch.Tensor:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if self.precision == "bf16-autocast" else None
        with torch.inference_mode(), autocast or contextlib.nullcontext():
            return self.forward(self.images)

    def time_forward(self) -> None:
        start = time.perf_counter()
        self.run()
        self.seconds.append(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tipsv2-b14")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    args = parser.parse_args()

    import tipstorch
    from tipstorch.weights.transformers import save_transformers

    with tempfile.TemporaryDirectory() as directory:
        model = tipstorch.create_model(args.model)
        tipstorch.save_model(model, Path(directory) / "model.safetensors")
        save_transformers(model, Path(directory) / "hf")
        del model
        builders = encoders(Path(directory))
        rows = [
            Row(implementation, precision, size, args.batch, build)
            for size in args.sizes
            for precision in args.precisions
            for implementation, build in builders.items()
        ]
    peaks = interleaved_rounds(args.rounds, [row.time_forward for row in rows])
    peak = {dtype: statistics.median(rates) for dtype, rates in peaks.items()}
    print(
        f"{args.model}, random weights, batch {args.batch}, {torch.get_num_threads()} threads, {args.rounds} "
        f"interleaved rounds; matmul peak (median): bf16 {peak[torch.bfloat16] / 1e9:.0f} GFLOP/s, "
        f"fp32 {peak[torch.float32] / 1e9:.0f} GFLOP/s\n"
    )
    print("| size | precision | implementation | img/s | spread | of peak | vs transformers | max abs diff |")
    print("|---:|---|---|---:|---|---:|---:|---:|")
    reference = {(row.size, row.precision): row for row in rows if row.implementation == "transformers"}
    exact = {
        row.size: row.output
        for row in rows
        if row.implementation == "transformers" and row.precision == "fp32"
    }
    for row in rows:
        seconds = statistics.median(row.seconds)
        fraction = fraction_of_peak(row.flops, row.seconds, peaks[row.dtype])
        theirs = reference.get((row.size, row.precision))
        ratio = paired_ratio(theirs.seconds, row.seconds) if theirs is not None else float("nan")
        diff = (row.output - exact[row.size]).abs().max().item() if row.size in exact else float("nan")
        print(
            f"| {row.size} | {row.precision} | {row.implementation} | {row.batch / seconds:.2f} | "
            f"{min(row.seconds) / seconds:.2f}-{max(row.seconds) / seconds:.2f} | {100 * fraction:.0f}% | "
            f"{ratio:.2f}x | {diff:.2e} |"
        )


if __name__ == "__main__":
    main()
