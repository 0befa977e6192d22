"""Speed of the training-time latent reader (utils.latents.LatentDataset.batch) on one CPU thread.

    python bench_latents.py                      # 20,000 synthetic 256x256 latents, batch 256
    python bench_latents.py --batch 32 --world 8 # DiT-XL/2's global batch of 256 over 8 processes: rank 0

Writes a latent folder of synthetic moments in the real format and sizes into a temporary folder
(about 1 GB for 20,000 images), then times batch() for random indices: the memory-mapped gather of
the chosen view's mean and std, the keyed flip draw (for the global batch) and noise draws (per
row), and mean + std * eps. The files are in the page cache after writing, as a dataset that fits
in memory is after its first epoch.
"""
import argparse
import tempfile
import time

import numpy as np
import torch

from utils.data import make_generator
from utils.latents import FORMAT, LatentDataset, shard_name, write_description, write_shard


def make_synthetic(folder: str, *, images: int, resolution: int, shard_size: int, seed: int = 0) -> None:
    """A latent folder of `images` random moments of the SD VAE's shape at `resolution`."""
    shape = (4, resolution // 8, resolution // 8)
    rng = np.random.default_rng(seed)
    shards = []
    for k, start in enumerate(range(0, images, shard_size)):
        n = min(shard_size, images - start)
        mean = rng.standard_normal((n, 2, *shape), dtype=np.float32) * 5
        std = np.exp(rng.uniform(-9, -3, (n, 2, *shape))).astype(np.float32)
        write_shard(folder, k, mean=mean, std=std, labels=rng.integers(0, 1000, n))
        shards.append({"name": shard_name(k), "start": start, "count": n})
    write_description(folder, {"format": FORMAT, "latent_shape": list(shape), "count": images, "shards": shards})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--resolution", type=int, default=256)
    # ImageNet in 10,000-image shards has 129 of them, so a batch of 256 reads from about 111;
    # 200-image shards give 20,000 images as many shards per batch.
    p.add_argument("--shard_size", type=int, default=200)
    p.add_argument("--batch", type=int, default=256, help="rows of this process")
    p.add_argument("--world", type=int, default=1, help="processes sharing the global batch (the flip draw covers all)")
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    total = args.batch * args.world
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        make_synthetic(folder, images=args.images, resolution=args.resolution, shard_size=args.shard_size)
        ds = LatentDataset(folder)
        print(f"{ds}: written in {time.perf_counter() - t0:.1f} s")
        times = []
        for step in range(args.steps + 5):
            idx = torch.randint(len(ds), (total,), generator=make_generator(1, "bench", step))[:args.batch]
            t = time.perf_counter()
            z = ds.batch(idx, generator=lambda purpose: make_generator(0, step, purpose), rows=slice(0, args.batch),
                         total=total, flip=True, device="cpu")
            times.append(time.perf_counter() - t)
        assert z.shape == (args.batch, *ds.shape) and z.dtype == torch.float32
        per_batch = float(np.median(times[5:]))
        print(f"batch {args.batch} of {total}, {args.images} images in {args.shard_size}-image shards, 1 thread: "
              f"{per_batch * 1e3:.1f} ms per batch (median of {args.steps}), {args.batch / per_batch:,.0f} latents/s")


if __name__ == "__main__":
    main()
