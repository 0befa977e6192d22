#!/usr/bin/env bash
# MeanFlow on CIFAR-10, the paper's configuration (tr_sampler v0, logit-normal(-2, 2) for t and r).
# Settings: train.py --preset cifar10-v0; extra arguments are passed on and override it, e.g.
#   bash cifar10_v0.sh --output_dir /scratch/run1 --batch_size 64
# One node with 8 GPUs by default. Several nodes: run this on every node with NNODES, NODE_RANK,
# MASTER_ADDR (the address of node 0) and MASTER_PORT set. Re-running continues from
# OUTPUT_DIR/checkpoint-last.pth. Relative paths are taken from the current folder.
set -euo pipefail
# On SIGTERM (preemption) torchrun forwards the signal and kills the workers after this many
# seconds; train.py needs the current step plus a checkpoint write (recent torchrun reads it;
# older torchrun waits 30 s).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}"
HERE="$(cd "$(dirname "$0")" && pwd)"
exec torchrun \
    --nproc_per_node="${GPUS_PER_NODE:-8}" \
    --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --master_port="${MASTER_PORT:-29500}" \
    "$HERE/train.py" --preset cifar10-v0 "$@"
