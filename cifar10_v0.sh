#!/usr/bin/env bash
# MeanFlow on CIFAR-10, the paper's configuration (tr_sampler v0, logit-normal(-2, 2) for t and r).
# Settings: train.py --preset cifar10-v0; extra arguments are passed on and override it, e.g.
#   bash cifar10_v0.sh --output_dir /scratch/run1 --batch_size 64
# GPUS_PER_NODE (8), NNODES (1), NODE_RANK (0), MASTER_ADDR, MASTER_PORT: see launch.sh.
exec "$(dirname "$0")/launch.sh" cifar10-v0 "$@"
