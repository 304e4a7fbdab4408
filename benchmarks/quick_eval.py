"""Seconds per task of the quick evaluation (``tipstorch.eval.quick``) on one model, at a given thread count.

The main job runs this evaluation twice (before and after training), so its tasks' times are most of
the job's time besides training. Each task runs on its own (it renders its scenes again), so the sum is
a little above one joint run.

    PYTHONPATH=src python benchmarks/quick_eval.py --model runs/tiny_cpu/final.safetensors --threads 2
    PYTHONPATH=src python benchmarks/quick_eval.py --random --threads 1 --normals-restarts 2
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

import tipstorch
from tipstorch.eval.quick import QUICK_SETTINGS, QUICK_TASKS, quick_evaluation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tips-tiny", help="registered name or checkpoint (default: tips-tiny)")
    parser.add_argument("--random", action="store_true", help="random weights for a registered name")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--normals-restarts", type=int, default=1, help="1 = the main job's setting")
    parser.add_argument("--tasks", default=",".join(QUICK_TASKS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.random:
        model = tipstorch.create_model(args.model, pretrained=False)
    else:
        model = tipstorch.load_model(args.model)
    model.eval()
    tokenizer = tipstorch.get_tokenizer(model)
    settings = replace(QUICK_SETTINGS, normals_restarts=args.normals_restarts, progress=False)
    print(f"| task | seconds | ({args.threads} threads, {args.normals_restarts} normals decoder(s)) |")
    print("|---|---:|---|")
    total = 0.0
    for task in args.tasks.split(","):
        start = time.perf_counter()
        quick_evaluation(model, tokenizer, settings, tasks=[task])
        seconds = time.perf_counter() - start
        total += seconds
        print(f"| {task} | {seconds:.1f} | |", flush=True)
    print(f"| total | {total:.1f} | |")


if __name__ == "__main__":
    main()
