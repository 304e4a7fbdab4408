#!/bin/bash
# TIPS pretraining on several nodes with SLURM: one torchrun agent per node, 8 GPUs each, FSDP.
#
#   sbatch --nodes 4 examples/slurm_train.sh tips_g14_paper runs/tips_g14 --set data.source='/data/webli/{000000..011599}.tar'
#
# FSDP needs AdamW (torch.optim.Adafactor, the paper's optimiser, does not run on DTensor shards): pass
# an AdamW learning rate (--set optim.lr=...; the recipe's 5e-4 is Adafactor's relative step), or drop
# the three FSDP settings for DDP with Adafactor when the model fits on one GPU.
# Arguments: recipe (shipped name or YAML), run directory (on a file system every node sees: sharded
# checkpoints are written there by all ranks), then any further `tipstorch train` options.
# The job resumes its run directory when it holds a checkpoint, so a resubmitted (or requeued, after a
# preemption or node failure) job continues exactly. SLURM sends SIGTERM 5 minutes before the time limit
# (--signal); torchrun passes it to the trainers, which finish their step, write a checkpoint and exit
# with status 143: submit the same command again to continue.
#SBATCH --job-name=tips
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail

config=${1:?recipe name or YAML}
run_dir=${2:?run directory}
shift 2

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
resume=()
if [[ -e "$run_dir/last.pt" || -d "$run_dir/last.dcp" || -e "$run_dir/previous.pt" || -d "$run_dir/previous.dcp" ]]; then
    resume=(--resume "$run_dir")
fi

export OMP_NUM_THREADS=$((SLURM_CPUS_PER_TASK / 8))
# One task per node: each runs a torchrun agent; the agents meet at the head node (c10d rendezvous),
# which sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR for the trainers (nccl on GPUs).
srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_NNODES" \
    --nproc-per-node 8 \
    --rdzv-id "$SLURM_JOB_ID" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$head_node:29500" \
    -m tipstorch.cli train \
    --config "$config" --out-dir "$run_dir" "${resume[@]}" \
    --set loop.parallel=fsdp --set loop.meta_init=true --set optim.name=adamw \
    "$@"
