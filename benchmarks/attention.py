"""Fused (``F.scaled_dot_product_attention``) against written-out attention (``models/attention.py``): the
measurement behind ``attention.use_fused_attention``, the rule that ``fused_attention: auto`` follows.

    python benchmarks/attention.py [--tokens 18 66 258 1026] [--dtypes bfloat16 float32] [--rounds 5]
        [--threads 1] [--heads 6] [--head-dim 64] [--batch-tokens 16384]

For each (dtype, sequence length L, pass) it times both forms on queries / keys / values [B, H, L, d]
(B chosen so that B * L is about ``--batch-tokens``, the work of one training micro-batch), forward only
(inference) and forward + backward (training), in interleaved rounds, and prints the median CPU seconds
(this process's CPU time: on a shared machine it hardly depends on the others' load; one thread), the
spread (fastest and slowest round over the median) and written-out / fused: below 1 the written-out form
is cheaper. L = 18, 66, 258, 1026 are the tokens (2 CLS + patches) of 56, 112, 224 and 448 px crops.
Run from the repository root with the package installed (``pip install -e .``) or ``PYTHONPATH=src``.
Measured with the defaults (5 rounds, one thread of a shared AMX Xeon): the table of ``models/attention.py``,
e.g. written out / fused = 0.11 (bf16, 18 tokens, forward + backward), 0.57 (bf16, 258), 1.18 (bf16,
1026), 1.68 (fp32, 258), 3.46 (bf16 forward, 1026).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from tipstorch.models.attention import attention


def timed_pass(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, fused: bool, backward: bool
) -> Callable[[], float]:
    """A callable running one pass and returning its CPU seconds."""
    grad = torch.randn_like(query)

    def run() -> float:
        start = time.process_time()
        if backward:
            inputs = [tensor.detach().requires_grad_(True) for tensor in (query, key, value)]
            attention(*inputs, fused=fused).backward(grad)
        else:
            with torch.no_grad():
                attention(query, key, value, fused=fused)
        return time.process_time() - start

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", nargs="+", type=int, default=[18, 66, 258, 1026])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--heads", type=int, default=6, help="6: S/14; 12: B/14")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch-tokens", type=int, default=16384, help="B * L of every row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for length in args.tokens:
            batch = max(1, args.batch_tokens // length)
            shape = (batch, args.heads, length, args.head_dim)
            tensors = [torch.randn(shape, generator=generator).to(dtype) for _ in range(3)]
            for backward in (False, True):
                timers = {
                    fused: timed_pass(*tensors, fused=fused, backward=backward) for fused in (True, False)
                }
                for timer in timers.values():
                    timer()  # warm-up
                rows.append(((dtype_name, length, batch, backward), timers, {True: [], False: []}))
    for _ in range(args.rounds):
        for _, timers, seconds in rows:
            for fused, timer in timers.items():
                seconds[fused].append(timer())
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} interleaved rounds, "
        f"{args.heads} heads x {args.head_dim}, B * L ~ {args.batch_tokens}; CPU ms per pass (median, spread)\n"
    )
    print("| dtype | L | B | pass | fused ms | spread | written out ms | spread | written out / fused |")
    print("|---|---:|---:|---|---:|---|---:|---|---:|")
    for (dtype_name, length, batch, backward), _, seconds in rows:
        medians = {fused: statistics.median(values) for fused, values in seconds.items()}
        spreads = {
            fused: f"{min(values) / medians[fused]:.2f}-{max(values) / medians[fused]:.2f}"
            for fused, values in seconds.items()
        }
        print(
            f"| {dtype_name} | {length} | {batch} | {'fwd+bwd' if backward else 'fwd'} | "
            f"{1e3 * medians[True]:.1f} | {spreads[True]} | {1e3 * medians[False]:.1f} | {spreads[False]} | "
            f"{medians[False] / medians[True]:.2f} |"
        )


if __name__ == "__main__":
    main()
