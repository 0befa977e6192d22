"""Sample indexing: sample i's noise is seeded by (seed, i) alone and its class is i's; quantisation to uint8.

So a set of samples does not depend on batch size or number of processes (up to the floating-point
differences of kernels chosen per batch size), and any rank can draw any share of it. The
generation itself is training/sampling.py's.
"""

import torch

from utils.data import fold_seed


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (float, [B, C, H, W]) -> uint8 [B, C, H, W].

    Adding 128 rather than 127.5 before the truncating cast rounds to the nearest level (EDM).
    """
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def shard(num_items: int, env=None) -> torch.Tensor:
    """Indices 0..num_items-1 of this rank's contiguous share (concatenated in rank order = all).

    env: the process environment (a utils.distributed.DistEnv); None or one process takes all.
    """
    indices = torch.arange(num_items)
    if env is None or env.world_size <= 1:
        return indices
    return indices.tensor_split(env.world_size)[env.rank]


def sample_noise(
    seed: int, indices: torch.Tensor, shape: tuple[int, ...], device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Noise [len(indices), *shape]; row k depends only on (seed, indices[k]).

    Drawn on the CPU from one generator per sample, so it is the same on every device, batch
    size and number of processes.
    """
    rows = []
    for i in torch.as_tensor(indices).reshape(-1).tolist():
        g = torch.Generator().manual_seed(fold_seed(seed, int(i)))
        rows.append(torch.randn(tuple(shape), generator=g))
    if not rows:
        return torch.empty((0, *shape), device=device)
    return torch.stack(rows).to(device)


def class_indices(net, indices: torch.Tensor, classes=None) -> torch.Tensor | None:
    """LongTensor [len(indices)]: sample i's class, classes[i % len(classes)]; None for an unconditional net.

    A class-conditional net has num_classes > 0; classes defaults to 0..num_classes-1,
    so any run of num_classes consecutive samples holds every class once.
    """
    num_classes = getattr(net, "num_classes", 0)
    if not num_classes:
        if classes is not None:
            raise ValueError("class labels given, but the network is unconditional (num_classes 0)")
        return None
    classes = torch.arange(num_classes) if classes is None else torch.as_tensor(classes, dtype=torch.long).reshape(-1)
    if len(classes) == 0 or classes.min() < 0 or classes.max() >= num_classes:
        raise ValueError(f"class labels must be in 0..{num_classes - 1}, got {classes.tolist()}")
    return classes[torch.as_tensor(indices).reshape(-1).long() % len(classes)]
