"""Zero-shot segmentation of one image, end to end (text classifier from the prompt templates, sliding
windows, values readout, upsampling to the image), timed as ``tipstorch segment`` runs it.

    python benchmarks/segmentation.py [--model tipsv2-b14] [--size 512] [--labels sky tree road car person]
        [--rounds 5] [--precisions fp32 bf16-autocast bf16-weights] [--threads 1]

Random weights (the timing does not depend on them) and the packaged scenes tokenizer (no download).
``bf16-autocast`` is what the CLI's ``--bf16`` does, ``bf16-weights`` casts the model to bfloat16. Rows
are interleaved round by round (a burst of load from another process hits every row alike); printed per
row: median seconds per image, the spread (slowest and fastest round over the median), CPU seconds per
image (this process only: with ``--threads 1`` it hardly depends on the other processes' load and is the
wall time of an idle core), and the share of the time spent in the text classifier (measured on its own
in the same rounds).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import numpy as np
import torch
from PIL import Image

PRECISIONS = ("fp32", "bf16-autocast", "bf16-weights")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tipsv2-b14")
    parser.add_argument("--size", type=int, default=512, help="side of the square test image")
    parser.add_argument("--labels", nargs="+", default=["sky", "tree", "road", "car", "person"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    import tipstorch
    from tipstorch.eval.dense_predict import zero_shot_segmentation
    from tipstorch.eval.zeroshot import ZeroShotSegConfig, segmentation_classifier
    from tipstorch.models.tokenizer import Tokenizer
    from tipstorch.weights.factory import scenes_tokenizer_path

    base = tipstorch.create_model(args.model).eval()
    tokenizer = Tokenizer(scenes_tokenizer_path(), base.config.text.context_length)
    size = base.image_size
    config = ZeroShotSegConfig(short_side=size, window=size, stride=size * 3 // 4)
    pixels = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    models = {precision: base for precision in args.precisions if precision != "bf16-weights"}
    if "bf16-weights" in args.precisions:
        models["bf16-weights"] = copy.deepcopy(base).to(torch.bfloat16)

    def mode(precision: str) -> contextlib.AbstractContextManager:
        if precision == "bf16-autocast":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def segment(precision: str) -> None:
        with torch.inference_mode(), mode(precision):
            zero_shot_segmentation(models[precision], tokenizer, image, args.labels, config)

    def classifier(precision: str) -> None:
        model = models[precision]
        with torch.inference_mode(), mode(precision):
            segmentation_classifier(model.encode_text, tokenizer, args.labels, config)

    seconds: dict[str, list[float]] = {precision: [] for precision in args.precisions}
    cpu_seconds: dict[str, list[float]] = {precision: [] for precision in args.precisions}
    text_seconds: dict[str, list[float]] = {precision: [] for precision in args.precisions}
    for precision in args.precisions:
        segment(precision)  # warm-up
    for _ in range(args.rounds):
        for precision in args.precisions:
            start, cpu = time.perf_counter(), time.process_time()
            segment(precision)
            seconds[precision].append(time.perf_counter() - start)
            cpu_seconds[precision].append(time.process_time() - cpu)
            start = time.perf_counter()
            classifier(precision)
            text_seconds[precision].append(time.perf_counter() - start)
    print(
        f"{args.model}, random weights, {args.size}x{args.size} image -> {size} px windows (stride "
        f"{config.stride}), {len(args.labels)} labels, {torch.get_num_threads()} threads, {args.rounds} "
        f"interleaved rounds\n"
    )
    print("| precision | s / image | spread | CPU s / image | text classifier share |")
    print("|---|---:|---|---:|---:|")
    for precision in args.precisions:
        median = statistics.median(seconds[precision])
        spread = f"{min(seconds[precision]) / median:.2f}-{max(seconds[precision]) / median:.2f}"
        share = statistics.median(text_seconds[precision]) / median
        cpu = statistics.median(cpu_seconds[precision])
        print(f"| {precision} | {median:.2f} | {spread} | {cpu:.2f} | {share:.0%} |")


if __name__ == "__main__":
    main()
