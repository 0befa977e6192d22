"""Samples of a network, indexed (utils/sampling.py): generated in batches, gathered over processes, and FID.

Sample i comes from noise seeded by (seed, i) and, for a class-conditional network, asks for class
i % num_classes (or the i-th of given classes), so a set of samples does not depend on batch size
or process count. ``env`` below is the process environment (a utils.distributed.DistEnv; every
rank calls the function) or None for a single process.
"""

from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed

import meanflow
from utils.fid import FeatureStats, frechet_distance, from_rank0, is_rank0, on_every_rank, progress_bar
from utils.inception import Extractor
from utils.sampling import class_indices, sample_noise, shard, to_uint8


@torch.no_grad()
def generate(
    net,
    indices: torch.Tensor,
    *,
    seed: int,
    img_shape: tuple[int, int, int],
    steps: int = 1,
    batch_size: int = 250,
    device: str | torch.device = "cpu",
    classes=None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (batch indices [b], uint8 images [b, C, H, W]) of the samples ``indices``.

    Sample i is ``meanflow.sample(net, sample_noise(seed, [i]), steps)`` quantised by ``to_uint8``;
    for a class-conditional net with the class ``class_indices(net, [i], classes)``.
    ``net`` should be in eval mode.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    for batch in torch.as_tensor(indices).split(batch_size):
        noise = sample_noise(seed, batch, img_shape, device)
        labels = class_indices(net, batch, classes)
        if labels is not None:
            labels = labels.to(device)
        yield batch, to_uint8(meanflow.sample(net, noise, steps=steps, labels=labels))


def sample_images(
    net,
    *,
    num_samples: int,
    img_shape: tuple[int, int, int],
    seed: int = 0,
    steps: int = 1,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    env=None,
    progress: bool = False,
    classes=None,
) -> torch.Tensor:
    """uint8 [N, C, H, W] samples 0..N-1 of ``net``; with ``env`` (a DistEnv) each rank draws its share
    and rank 0 returns all of them (the other ranks return their own share). classes: see
    ``utils.sampling.class_indices`` (sample i of a class-conditional net takes classes[i % K])."""
    from tqdm.auto import tqdm

    indices = shard(num_samples, env)
    parts = []
    with tqdm(total=len(indices), desc=f"{steps}-step samples", unit="img", disable=not progress) as bar:
        for batch, images in generate(
            net, indices, seed=seed, img_shape=img_shape, steps=steps, batch_size=batch_size, device=device,
            classes=classes,
        ):
            parts.append(images.cpu())
            bar.update(len(batch))
    local = torch.cat(parts) if parts else torch.empty((0, *img_shape), dtype=torch.uint8)
    if env is None or env.world_size <= 1:
        return local
    gathered = [None] * env.world_size if env.rank == 0 else None
    torch.distributed.gather_object(local.numpy(), gathered, dst=0)
    if env.rank != 0:
        return local
    # Shares are contiguous and in rank order, so concatenation restores sample order.
    return torch.from_numpy(np.concatenate(gathered))


def fid_of_network(
    net,
    *,
    ref: tuple[np.ndarray, np.ndarray],
    num_samples: int,
    batch_size: int = 250,
    img_shape: tuple[int, int, int],
    seed: int = 0,
    steps: int = 1,
    extractor: Extractor,
    device: str | torch.device = "cpu",
    env=None,
    progress: bool = True,
) -> float:
    """FID of ``num_samples`` samples of ``net`` (``steps``-step MeanFlow sampler) against ``ref``.

    With ``env`` (a DistEnv, every rank calls this) the samples are split over the ranks;
    ``batch_size`` is per rank. Noise is seeded per sample, so the value does not depend on
    batch size or world size (up to floating-point differences between kernels). The network
    is put in eval mode for the call. Every rank returns the same value, computed on rank 0 on
    ``device``.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples={num_samples} must be >= 2")
    was_training = getattr(net, "training", False)
    if was_training:
        net.eval()
    stats = FeatureStats()
    world = 1 if env is None else env.world_size
    try:
        with progress_bar(num_samples, f"FID {steps}-step", progress and is_rank0(env)) as bar:
            batches = generate(
                net, shard(num_samples, env), seed=seed, img_shape=img_shape, steps=steps,
                batch_size=batch_size, device=device,
            )
            for batch, images in batches:
                stats.add_images(images, extractor)
                bar.update(len(batch) * world)
    finally:
        if was_training:
            net.train()
    stats.all_reduce(env)
    # Rank 0 alone takes the distance (two 2048-d eigendecompositions); the others receive it.
    value = on_every_rank(lambda: frechet_distance(*stats.mean_cov(), *ref, device=device)
                           if is_rank0(env) else 0.0, env)
    return from_rank0(value, env)
