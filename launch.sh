#!/usr/bin/env bash
# torchrun for train.py: launch.sh PRESET [train.py flags...]; used by cifar10_v0.sh and cifar10_v1.sh.
# One node with 8 GPUs by default. Several nodes: run it on every node with NNODES, NODE_RANK,
# MASTER_ADDR (the address of node 0) and MASTER_PORT set. Besides NCCL, training runs a small
# gloo group, which binds to the address the host name resolves to; where that is a loopback or
# unroutable address the job hangs at start. Set GLOO_SOCKET_IFNAME (an interface name, e.g. eth0),
# or only NCCL_SOCKET_IFNAME: train.py then gives gloo the first interface it selects (not from an
# exclusion list such as ^docker,lo). GPUS_PER_NODE must not exceed the GPUs each node makes
# visible. Re-running continues from OUTPUT_DIR/checkpoint-last.pth. Relative paths are taken from
# the current folder.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PRESET="$1"
shift
# On SIGTERM (preemption) torchrun forwards the signal and kills the workers after this many
# seconds; train.py needs the current step plus a checkpoint write (recent torchrun reads it;
# older torchrun waits 30 s).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}"
exec torchrun \
    --nproc_per_node="${GPUS_PER_NODE:-8}" \
    --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --master_port="${MASTER_PORT:-29500}" \
    "$HERE/train.py" --preset "$PRESET" "$@"
