"""The paper's Table 1 ladder on the built-in scenes, at equal compute, over several seeds.

Every variant trains the same model for the same steps, batch and image sizes (the main job's
``tiny_cpu`` settings); only the loss terms, the captions and the teacher differ:

  a  clip_only        CLIP on the noisy alt-text, one CLS (Table 1 (A))
  b  dual_cls         + synthetic spatial captions on the second CLS (Table 1 (B))
  c  self_distill     + self-distillation, DINO on local crops, full EMA teacher (Table 1 (C))
  d  tips             + masked image modelling, iBOT on masked tokens = TIPS (Table 1 (D))
  e  tipsv2           iBOT++, head-only EMA, multi-granularity captions = TIPSv2 (= tiny_cpu)
  d+ tips_ibotpp      TIPS with iBOT++ only (single change: iBOT vs iBOT++)
  e- tipsv2_full_ema  TIPSv2 with a full EMA teacher (single change: head-only vs full EMA)
  a+ alt_ssl          (a) + self-distillation + masked modelling, no synthetic captions (control:
                      do the self-supervised terms add when the captions say little?); not in the
                      default sweep: ``--variants a,a+``

The configs are the shipped recipes of those names (``src/tipstorch/configs``).

Each (variant, seed) trains in its own process (``tipstorch train``; peak memory is that process
tree's maximum resident set), then ``tipstorch eval --tasks quick`` scores the exported model. Results:
``OUT/results.json`` (every run), ``OUT/ablation.md`` (mean +- std over seeds, then each rung against the
one before: better / worse only beyond the seed spread) and ``OUT/ablation.png``. A run whose directory
in ``OUT`` already holds a result.json is read back, not trained again (``--force`` reruns it), so a
sweep can be split over machines or sessions: copy the run directories into one ``OUT`` and rerun.

    python benchmarks/ablation.py --seeds 0,1,2 --out runs/ablation     # the full sweep
    python benchmarks/ablation.py --quick --out runs/ablation-quick     # every variant trains and evaluates
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

CLI = [sys.executable, "-m", "tipstorch.cli"]


@dataclass(frozen=True)
class Variant:
    key: str
    config: str
    label: str
    in_full_sweep: bool = True  # run by default (the ladder and single changes); else only on request


VARIANTS: tuple[Variant, ...] = (
    Variant("a", "clip_only", "CLIP, alt-text, one CLS"),
    Variant("b", "dual_cls", "+ spatial captions, dual CLS"),
    Variant("c", "self_distill", "+ self-distillation"),
    Variant("d", "tips", "+ masked modelling (TIPS)"),
    Variant("e", "tipsv2", "TIPSv2 (main job)"),
    Variant("d+", "tips_ibotpp", "TIPS + iBOT++"),
    Variant("e-", "tipsv2_full_ema", "TIPSv2, full EMA"),
    Variant("a+", "alt_ssl", "(a) + self-distillation + masking", in_full_sweep=False),
)
CONTROLS = ("d+", "e-", "a+")  # single changes and controls, off the ladder

# (metric key in eval.json, column title, higher is better)
METRICS: tuple[tuple[str, str, bool], ...] = (
    ("seg_probe/miou", "seg probe mIoU", True),
    ("depth_probe/rmse", "depth RMSE", False),
    ("normals_dpt/mean_deg", "normals mean deg", False),
    ("zeroshot_seg/miou", "zero-shot seg mIoU", True),
    ("zeroshot_cls/top1", "zero-shot cls top1", True),
    ("retrieval_alt/i2t_r1", "CLS1 alt i2t R@1", True),
    ("retrieval/i2t_r1", "CLS2 spatial i2t R@1", True),
    ("train/seconds_per_step", "s/step", False),
    ("train/peak_rss_gb", "peak GB", False),
)


def run_measured(command: list[str], log: Path, threads: int) -> tuple[float, float]:
    """Run a command to completion with ``threads`` OpenMP threads; (wall seconds, peak resident set in GB
    of it and its children)."""
    start = time.perf_counter()
    env = os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {os.waitstatus_to_exitcode(status)}); see {log}")
    return seconds, usage.ru_maxrss / 2**20


def seconds_per_step(run_dir: Path) -> float:
    """Median over the logged windows of seconds per optimiser step (log.jsonl's images_per_s is the
    rate of the last step of each window; the first window, which holds start-up, is left out)."""
    lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    batch = yaml.safe_load((run_dir / "config.yaml").read_text())["loop"]["batch_size"]
    rates = [line["train"]["images_per_s"] for line in lines if "train" in line]
    rates = rates[1:] or rates
    return statistics.median(batch / rate for rate in rates) if rates else math.nan


def machine() -> dict[str, object]:
    """What the sweep ran on (its seconds per step, and the last bits of its figures, depend on it): the CPU
    model, the kernels torch picked and whether training chose bf16 (``loop.bf16: auto``)."""
    import torch

    from tipstorch.models.precision import native_bf16

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return {"cpu": names[0] if names else "unknown", "cores": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native_bf16("cpu")}


def run_one(variant: Variant, seed: int, args: argparse.Namespace) -> tuple[dict, bool]:
    """Train and evaluate one (variant, seed); (its result, whether it was read from an earlier result.json)."""
    run_dir = args.out / f"{variant.config}-seed{seed}"
    result_file = run_dir / "result.json"
    if result_file.exists() and not args.force:
        return json.loads(result_file.read_text()), True
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = [f"loop.seed={seed}", f"loop.steps={args.steps}", f"loop.out_dir={run_dir}", "eval.quick=false",
                f"loop.checkpoint_every={args.steps}", *args.set]
    train = [*CLI, "train", "--config", variant.config, *[x for s in settings for x in ("--set", s)]]
    # the cores are shared out between the parallel runs: an evaluation with every core's threads next to
    # another run's waits on its own OpenMP threads (measured: the DPT probe 7.5 min instead of ~1)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    train_seconds, peak_gb = run_measured(train, run_dir / "train.log", threads)
    evaluate = [*CLI, "eval", "--model", str(run_dir / "final.safetensors"), "--tasks", "quick",
                "--out", str(run_dir / "eval.json"), "--seed", str(seed), *args.eval_args]
    eval_seconds, _ = run_measured(evaluate, run_dir / "eval.log", threads)
    metrics = {key.removeprefix("scenes/"): value
               for key, value in json.loads((run_dir / "eval.json").read_text())["metrics"].items()}
    result = {"variant": variant.key, "config": variant.config, "seed": seed, "steps": args.steps,
              "metrics": metrics, "train_seconds": train_seconds, "eval_seconds": eval_seconds, "peak_rss_gb": peak_gb,
              "seconds_per_step": seconds_per_step(run_dir)}
    result_file.write_text(json.dumps(result, indent=1))
    print(f"{variant.key:>3} seed {seed}: " + ", ".join(f"{title} {metrics.get(key, math.nan):.3f}"
                                                       for key, title, _ in METRICS[:7]), flush=True)
    return result, False


def recorded_minutes(results: list[dict]) -> dict[str, float | int]:
    """Training and evaluation time summed over the runs, as each run recorded it when it ran (so a sweep read
    back from earlier result.json files still states its cost); runs from before eval_seconds was recorded
    are counted in `without_eval_time`."""
    timed = [run["eval_seconds"] for run in results if "eval_seconds" in run]
    return {"train": sum(run["train_seconds"] for run in results) / 60, "eval": sum(timed) / 60,
            "without_eval_time": len(results) - len(timed)}


def figures(run: dict) -> dict[str, float]:
    """One run's figures under the METRICS keys: its evaluation metrics plus its time per step and memory."""
    return {**run["metrics"], "train/seconds_per_step": run["seconds_per_step"], "train/peak_rss_gb": run["peak_rss_gb"]}


def summarise(results: list[dict]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """variant key -> metric key -> (mean, sample std, number of seeds)."""
    table: dict[str, dict[str, tuple[float, float, int]]] = {}
    for variant in VARIANTS:
        runs = [r for r in results if r["variant"] == variant.key]
        if not runs:
            continue
        values: dict[str, list[float]] = {}
        for run in runs:
            row = figures(run)
            for key, _, _ in METRICS:
                if key in row:
                    values.setdefault(key, []).append(float(row[key]))
        table[variant.key] = {
            key: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for key, v in values.items()
        }
    return table


def format_table(table: dict[str, dict[str, tuple[float, float, int]]]) -> str:
    """Markdown: one row per variant, mean +- std over seeds for every metric."""
    header = "| rung | variant | seeds | " + " | ".join(f"{title} {'↑' if up else '↓'}" for _, title, up in METRICS) + " |"
    lines = [header, "|---|---|---:|" + "---:|" * len(METRICS)]
    for variant in VARIANTS:
        row = table.get(variant.key)
        if row is None:
            continue
        seeds = max(count for _, _, count in row.values())
        cells = [f"{row[key][0]:.3f} ± {row[key][1]:.3f}" if key in row else "-" for key, _, _ in METRICS]
        lines.append(f"| {variant.key} | {variant.label} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# (from, to, what changes): the ladder's rungs and the single changes the paper's targets name
STEPS: tuple[tuple[str, str, str], ...] = (
    ("a", "b", "+ spatial captions, dual CLS"),
    ("b", "c", "+ self-distillation"),
    ("c", "d", "+ masked modelling"),
    ("d", "e", "TIPS -> TIPSv2"),
    ("d", "d+", "iBOT -> iBOT++"),
    ("e-", "e", "full -> head-only EMA"),
)


def format_comparisons(results: list[dict]) -> str:
    """Markdown: for every step of STEPS, the change of each metric's mean (signed so that + is better)
    against the seed spread, the larger of the two rungs' std over seeds. A change counts as ``better`` or
    ``worse`` only when it exceeds that spread; otherwise it is ``noise``."""
    table = summarise(results)
    by_seed = {(run["variant"], run["seed"]): figures(run) for run in results}
    header = "| step | change | " + " | ".join(title for _, title, _ in METRICS) + " |"
    lines = ["Each rung against the one before (mean change, + = better; `better` / `worse` only when larger "
             "than the larger seed std of the two rungs, else `noise`; k/n: in k of the n training seeds the "
             "two rungs share, the later rung is better):", "", header,
             "|---|---|" + "---:|" * len(METRICS)]
    for start, end, label in STEPS:
        if start not in table or end not in table:
            continue
        cells = []
        for key, _, up in METRICS:
            if key not in table[start] or key not in table[end]:
                cells.append("-")
                continue
            (mean_from, std_from, _), (mean_to, std_to, _) = table[start][key], table[end][key]
            gain = (mean_to - mean_from) * (1 if up else -1)
            spread = max(std_from, std_to)
            verdict = "better" if gain > spread else "worse" if gain < -spread else "noise"
            paired = [(by_seed[end, seed][key] - by_seed[start, seed][key]) * (1 if up else -1)
                      for variant, seed in by_seed if variant == start and key in by_seed[start, seed]
                      and key in by_seed.get((end, seed), {})]
            cells.append(f"{gain:+.3f} {verdict} ({sum(g > 0 for g in paired)}/{len(paired)})")
        lines.append(f"| {start} -> {end} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(table: dict[str, dict[str, tuple[float, float, int]]], path: Path) -> None:
    """One panel per metric: mean with a bar of +- one std over seeds, variants in ladder order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [v.key for v in VARIANTS if v.key in table]
    figure, axes = plt.subplots(3, 3, figsize=(13, 10))
    for axis, (metric, title, up) in zip(axes.flat, METRICS, strict=True):
        means = [table[k].get(metric, (math.nan, 0.0, 0))[0] for k in keys]
        spreads = [table[k].get(metric, (math.nan, 0.0, 0))[1] for k in keys]
        axis.bar(keys, means, yerr=spreads, capsize=3, color=["#9aa" if k in CONTROLS else "#4a7" for k in keys])
        axis.set_title(f"{title} ({'higher' if up else 'lower'} is better)", fontsize=10)
        low = min(m - s for m, s in zip(means, spreads, strict=True))
        high = max(m + s for m, s in zip(means, spreads, strict=True))
        margin = 0.15 * (high - low) if high > low else 0.1 * abs(high) + 1e-3
        axis.set_ylim(low - margin, high + margin)
    figure.suptitle("TIPS ablation ladder on scenes (mean ± std over seeds)")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


QUICK_EVAL_ARGS = ["--max-samples", "32", "--probe-iterations", "5"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="comma list of training seeds")
    parser.add_argument("--steps", type=int, default=None, help="steps of every variant (default: the main job's)")
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--variants", default=None,
                        help="comma list of rung keys (default: all but the control a+; with --quick: all)")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (each gets cpu_count // jobs torch threads and draws its own batches)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 steps, one seed, a tiny evaluation")
    parser.add_argument("--force", action="store_true", help="rerun runs that already have a result.json")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every variant's training (e.g. data.scenes_objects=[4,8])")
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    if args.variants is None:
        chosen = [v for v in VARIANTS if v.in_full_sweep or args.quick]
    else:
        unknown = set(args.variants.split(",")) - {v.key for v in VARIANTS}
        if unknown:
            parser.error(f"--variants: unknown rung(s) {sorted(unknown)}; known: {[v.key for v in VARIANTS]}")
        chosen = [v for v in VARIANTS if v.key in args.variants.split(",")]
    if args.quick:
        args.steps, seeds, args.eval_args = args.steps or 3, seeds[:1], QUICK_EVAL_ARGS
    else:
        args.eval_args = []
        if args.steps is None:
            from tipstorch.train.config import load_config, resolve_config

            args.steps = load_config(resolve_config("tiny_cpu")).loop.steps
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    jobs = [(variant, seed) for seed in seeds for variant in chosen]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        outcomes = list(pool.map(lambda job: run_one(job[0], job[1], args), jobs))
    minutes = (time.perf_counter() - start) / 60
    results = [result for result, _ in outcomes]
    reused = sum(was_read for _, was_read in outcomes)
    table = summarise(results)
    ran_on = machine()
    spent = recorded_minutes(results)
    (args.out / "results.json").write_text(json.dumps({"steps": args.steps, "seeds": seeds, "minutes": minutes, "runs_reused": reused,
                                                       "run_minutes": spent, "machine": ran_on, "runs": results,
                                                       "summary": table}, indent=1))
    markdown = format_table(table) + "\n" + format_comparisons(results)
    precision = "bf16" if ran_on["native_bf16"] else "float32"
    earlier = f"; {reused} of them read from an earlier sweep's result.json, not rerun" if reused else ""
    untimed = (f", {spent['without_eval_time']} runs without a recorded evaluation time"
               if spent["without_eval_time"] else "")
    (args.out / "ablation.md").write_text(markdown + f"\n{len(jobs)} runs of {args.steps} steps, seeds {seeds}, "
                                          f"{args.jobs} in parallel: {minutes:.1f} min on {ran_on['cores']} cores "
                                          f"of an {ran_on['cpu']} (training in {precision}){earlier}. The runs "
                                          f"themselves, as recorded when each ran: training {spent['train']:.1f} min, "
                                          f"evaluation {spent['eval']:.1f} min (process time summed over the runs"
                                          f"{untimed}).\n")
    plot(table, args.out / "ablation.png")
    print(markdown + f"{len(jobs)} runs ({reused} read, not rerun) in {minutes:.1f} min; "
          f"wrote {args.out}/results.json, ablation.md, ablation.png")


if __name__ == "__main__":
    main()
