"""Memory per GPU of TIPS pretraining, per model size, at bf16, with FSDP over N GPUs; S and B checked on CPU.

    PYTHONPATH=src python benchmarks/memory_table.py [--gpus 1 8 64] [--batch-per-gpu 64]
        [--measure S B] [--measure-batch 2]

The recipe is the paper's (tips_g14_paper.yaml: 224 px global crop, 6 local crops at 98, 75% masking,
DINO and iBOT heads of 32k prototypes / 2048 hidden / 256 bottleneck, full EMA teacher, Adafactor, the
contrastive terms on a separate unmasked pass) on each released architecture. Counts come from the
models built on the meta device (no memory). Per GPU, with FSDP over N GPUs (N = 1: unsharded, as DDP):

- params: fp32 master weights of the student, / N;  grads: fp32 (FSDP reduces in fp32), / N;
- optimiser: AdamW's two fp32 moments, / N (FSDP needs AdamW: torch.optim.Adafactor does not run on
  DTensor shards; under DDP the paper's Adafactor holds only a row and a column vector per matrix, a
  full vector per 1-D tensor, ``--optimizer adafactor``);  teacher: the fp32 EMA copy (backbone + heads), / N;
- gathered: the bf16 all-gathered weights of the two largest FSDP units in flight (one computing, one
  prefetched), not sharded;
- activations: what autograd keeps for the backward at ``--batch-per-gpu`` samples (64 = the paper's global
  batch of 16384 over 256 accelerators), in bf16, per token per block 10 D + 2 H (MLP) or 10 D + 3 H
  (SwiGLU) values (norm inputs and outputs, q/k/v, attention output, projections, MLP hidden; fused
  attention keeps no score matrix), plus the fp32 logits and targets of the DINO / iBOT losses
  (2 x 32768 x 4 bytes per scored token); ``ckpt`` with ``model.grad_checkpointing`` (one D per token per
  block kept, one block recomputed at a time) .

``--measure``: one training step of that size on this CPU (fp32, the recipe above, ``--measure-batch``
samples) in a fresh process: its peak resident memory above the process before the Trainer was built,
printed beside the same estimate for that setting (fp32 values and activations, N = 1).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass

import torch

from tipstorch.models.registry import get_model_spec
from tipstorch.models.tips import TIPSModel
from tipstorch.models.vit import NUM_PREFIX_TOKENS
from tipstorch.train.config import HeadCfg, LossCfg
from tipstorch.train.student import TIPSStudent

SIZES = {"S": "tips-v1-s14", "B": "tipsv2-b14", "L": "tipsv2-l14", "SO400m": "tipsv2-so400m14", "g": "tipsv2-g14"}
HEADS = HeadCfg()  # the paper's: 32768 prototypes, hidden 2048, bottleneck 256, 3 layers
GLOBAL, LOCAL, LOCAL_CROPS, PATCH = 224, 98, 6, 14
GB = 1024**3


@dataclass
class Sizes:
    """Element counts of one architecture in the paper's recipe."""

    student: int
    teacher: int
    adafactor: int  # Adafactor state values (AdamW: 2 x student)
    largest_unit: int  # the largest FSDP unit (a block, a head or a tower's own tensors)
    activations: int  # values kept for the backward per sample
    loss_values: int  # fp32 loss logits and targets per sample


def _adafactor_state(parameter: torch.Tensor) -> int:
    if parameter.ndim < 2:
        return parameter.numel()
    rows, cols = parameter.shape[-2], parameter.shape[-1]
    batch = parameter.numel() // (rows * cols)
    return batch * (rows + cols)


def _block_values(width: int, hidden: int, swiglu: bool) -> int:
    return 10 * width + (3 if swiglu else 2) * hidden


def count(name: str, checkpointing: bool = False) -> Sizes:
    config = get_model_spec(name).config
    with torch.device("meta"):
        model = TIPSModel(config)
        student = TIPSStudent(model, HEADS, LossCfg())
    trainable = [parameter for parameter in student.parameters() if parameter.requires_grad]
    teacher = sum(p.numel() for p in model.visual.parameters()) + sum(
        p.numel() for head in (student.dino_head, student.ibot_head) for p in head.parameters()
    )
    units = [*model.visual.blocks, *model.text.transformer.resblocks, student.dino_head, student.ibot_head]
    vision, text = config.vision, config.text
    patches = (GLOBAL // PATCH) ** 2
    global_tokens, local_tokens = NUM_PREFIX_TOKENS + patches, NUM_PREFIX_TOKENS + (LOCAL // PATCH) ** 2
    vision_tokens = 2 * global_tokens + LOCAL_CROPS * local_tokens  # masked + unmasked global, local crops
    text_tokens = 2 * text.context_length  # alt-text and synthetic caption
    per_block = (
        (vision.embed_dim, vision_tokens * _block_values(vision.embed_dim, vision.mlp_hidden_dim, vision.ffn == "swiglu")),
        (text.width, text_tokens * _block_values(text.width, text.mlp_dim, False)),
    )
    if checkpointing:  # block inputs, plus one block's values being recomputed
        activations = vision.depth * vision_tokens * vision.embed_dim + text.depth * text_tokens * text.width
        activations += max(values for _, values in per_block)
    else:
        activations = vision.depth * per_block[0][1] + text.depth * per_block[1][1]
    head_tokens = patches + LOCAL_CROPS  # iBOT on every patch of the masked pass, DINO on each local crop
    head_hidden = head_tokens * (2 * 2 * HEADS.hidden_dim + HEADS.bottleneck_dim)  # linear + GELU outputs
    return Sizes(
        student=sum(p.numel() for p in trainable),
        teacher=teacher,
        adafactor=sum(_adafactor_state(p) for p in trainable),
        largest_unit=max(sum(p.numel() for p in unit.parameters()) for unit in units),
        activations=activations + head_hidden,
        loss_values=head_tokens * 2 * HEADS.num_prototypes,
    )


def per_gpu_gb(
    sizes: Sizes, gpus: int, batch: int, value_bytes: int = 2, optimiser: str = "adamw"
) -> dict[str, float]:
    """GB per GPU of each part (see the module docstring); ``value_bytes`` of the activations (bf16: 2)."""
    parts = {
        "params": 4 * sizes.student / gpus,
        "grads": 4 * sizes.student / gpus,
        "optimiser": 4 * (2 * sizes.student if optimiser == "adamw" else sizes.adafactor) / gpus,
        "teacher": 4 * sizes.teacher / gpus,
        "gathered": 2 * 2 * sizes.largest_unit if gpus > 1 else 0.0,
        "activations": batch * (value_bytes * sizes.activations + 4 * sizes.loss_values),
    }
    return {name: value / GB for name, value in parts.items()} | {"total": sum(parts.values()) / GB}


MEASURE = """
import json, resource, sys, tempfile, torch
sys.path.insert(0, "benchmarks")
from train_step import synthetic_batch
from tipstorch.train.config import load_config, resolve_config
from tipstorch.train.loop import Trainer
from tipstorch.weights.factory import get_tokenizer
name, batch = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(1)
cfg = load_config(resolve_config("tips_g14_paper"), [f"model.name={name}", "model.grad_checkpointing=false",
                  "model.vision={pos_grid: 16}", f"loop.batch_size={batch}", "loop.bf16=false", "eval.quick=false"])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
trainer = Trainer(cfg, lambda model: get_tokenizer(model), out_dir=tempfile.mkdtemp())
trainer.train_step(synthetic_batch(trainer, batch))
trainer.train_step(synthetic_batch(trainer, batch))  # the optimiser state exists from the first step on
print(json.dumps({"peak_gb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024**2}))
"""


def measure(name: str, batch: int) -> float:
    """Peak resident GB of two CPU training steps of ``name`` above the process before the Trainer."""
    result = subprocess.run([sys.executable, "-c", MEASURE, name, str(batch)], capture_output=True, text=True,
                            check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_gb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--batch-per-gpu", type=int, default=64)
    parser.add_argument("--measure", nargs="*", default=["S", "B"], choices=list(SIZES))
    parser.add_argument("--measure-batch", type=int, default=2)
    parser.add_argument("--optimizer", choices=["adamw", "adafactor"], default="adamw")
    args = parser.parse_args()
    header = f"{'size':7}{'params':>9}{'N':>4}{'params':>8}{'grads':>8}{'optim':>8}{'teacher':>8}{'gather':>8}"
    print(f"GB per GPU, bf16 compute, {args.optimizer}, full EMA teacher, {args.batch_per_gpu} images per GPU\n")
    print(header + f"{'activ':>8}{'ckpt':>8}{'total':>8}{'total ckpt':>11}")
    for size, name in SIZES.items():
        sizes, checkpointed = count(name), count(name, checkpointing=True)
        for gpus in args.gpus:
            plain = per_gpu_gb(sizes, gpus, args.batch_per_gpu, optimiser=args.optimizer)
            with_ckpt = per_gpu_gb(checkpointed, gpus, args.batch_per_gpu, optimiser=args.optimizer)
            print(f"{size:7}{sizes.student / 1e6:8.0f}M{gpus:4}" + "".join(
                f"{plain[part]:8.2f}" for part in ("params", "grads", "optimiser", "teacher", "gathered",
                                                   "activations"))
                  + f"{with_ckpt['activations']:8.2f}{plain['total']:8.2f}{with_ckpt['total']:11.2f}")
    if args.measure:
        print(f"\nCheck on this CPU: one process, fp32, Adafactor (the paper's recipe), {args.measure_batch} images, "
              "no checkpointing")
        for size in args.measure:
            estimate = per_gpu_gb(count(SIZES[size]), 1, args.measure_batch, value_bytes=4, optimiser="adafactor")
            print(f"{size:7} computed {estimate['total']:6.2f} GB   measured peak {measure(SIZES[size], args.measure_batch):6.2f} GB")


if __name__ == "__main__":
    main()
