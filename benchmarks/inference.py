"""Image-encoder throughput and peak memory: tipstorch vs transformers' Tipsv2Model, same weights.

    python benchmarks/inference.py [--model tipsv2-b14] [--sizes 224 448] [--batches 1 8] [--bf16]

Both implementations get identical random B/14 weights (tipstorch writes them in the transformers
format). Each measurement runs in a fresh subprocess so that peak memory (growth of the peak RSS during
the forward passes, over the RSS once the model is loaded) is not polluted by the other runs. Prints a markdown table with images/s, peak MB and
the max abs difference of the outputs (all tokens after the final norm).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in MB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def worker(implementation: str, weights: str, size: int, batch: int, bf16: bool, repeats: int) -> dict:
    torch.manual_seed(0)
    images = torch.rand(batch, 3, size, size)
    if implementation == "tipstorch":
        import tipstorch

        model = tipstorch.load_model(weights)

        def run():
            features = model.encode_image(images)
            return torch.cat([features.global_cls[:, None], features.spatial_cls[:, None], features.flat], 1)
    else:
        import transformers

        model = transformers.Tipsv2VisionModel.from_pretrained(weights).eval()

        def run():
            return model(pixel_values=images).last_hidden_state

    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        reset_peak_rss()
        baseline = status_mb("VmRSS")
        output = run()  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            output = run()
        elapsed = time.perf_counter() - start
    return {
        "images_per_s": batch * repeats / elapsed,
        "peak_mb": status_mb("VmHWM") - baseline,
        "output": output.float().flatten()[:: max(1, output.numel() // 200_000)].tolist(),
    }


def measure(implementation: str, weights: Path, size: int, batch: int, bf16: bool, repeats: int) -> dict:
    command = [sys.executable, __file__, "--worker", implementation, str(weights), str(size), str(batch),
               str(int(bf16)), str(repeats)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tipsv2-b14")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="also measure with bf16 autocast")
    args = parser.parse_args()

    import tipstorch
    from tipstorch.weights.transformers import save_transformers

    with tempfile.TemporaryDirectory() as directory:
        model = tipstorch.create_model(args.model)
        ours_path = tipstorch.save_model(model, Path(directory) / "model.safetensors")
        hf_path = save_transformers(model, Path(directory) / "hf")
        del model
        print(f"{args.model}, random weights, {torch.get_num_threads()} threads\n")
        print("| precision | size | batch | tipstorch img/s | transformers img/s | speed-up | tipstorch peak MB | transformers peak MB | max abs diff |")
        print("|---|---|---|---|---|---|---|---|---|")
        for bf16 in [False, True] if args.bf16 else [False]:
            for size in args.sizes:
                for batch in args.batches:
                    ours = measure("tipstorch", ours_path, size, batch, bf16, args.repeats)
                    theirs = measure("transformers", hf_path, size, batch, bf16, args.repeats)
                    diff = max(abs(a - b) for a, b in zip(ours["output"], theirs["output"], strict=True))
                    print(f"| {'bf16' if bf16 else 'fp32'} | {size} | {batch} | {ours['images_per_s']:.2f} | "
                          f"{theirs['images_per_s']:.2f} | {ours['images_per_s'] / theirs['images_per_s']:.2f}x | "
                          f"{ours['peak_mb']:.0f} | {theirs['peak_mb']:.0f} | {diff:.2e} |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        implementation, weights, size, batch, bf16, repeats = sys.argv[2:8]
        print(json.dumps(worker(implementation, weights, int(size), int(batch), bool(int(bf16)), int(repeats))))
    else:
        main()
