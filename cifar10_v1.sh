#!/usr/bin/env bash
# MeanFlow on CIFAR-10, the improved configuration of the authors' release (tr_sampler v1; FID ~2.9 at 16000 epochs).
# Settings: train.py --preset cifar10-v1; extra arguments are passed on and override it, e.g.
#   bash cifar10_v1.sh --output_dir /scratch/run1 --batch_size 64
# GPUS_PER_NODE (8), NNODES (1), NODE_RANK (0), MASTER_ADDR, MASTER_PORT: see launch.sh.
exec "$(dirname "$0")/launch.sh" cifar10-v1 "$@"
