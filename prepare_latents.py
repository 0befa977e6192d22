"""Encode an ImageFolder tree (ImageNet's train folder) once into VAE latents for training.

    torchrun --nproc_per_node 8 prepare_latents.py --data_path /data/ILSVRC2012/train --out /data/in256-latents-mse

Each image is centre-cropped as ADM crops it, and the VAE posterior (mean, std) of the crop and of
its horizontal mirror is stored in shards of --shard_size images (format: utils/latents.py). A
shard is written atomically and never recomputed, so a killed run continues where it stopped when
the same command is run again; dataset.json is written last. Shard k goes to process k mod W.
The files are byte-identical whether or not the run was interrupted and whatever the number of
processes; they are not across batch sizes, devices or library versions (the VAE's kernels round
differently), only close (docs/imagenet.md).
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from utils.distributed import cleanup, init_distributed
from utils.errors import UserFileError, UserRunError, UserValueError, exit_on_user_error
from utils.imagefolder import files_digest, list_image_folder, load_image
from utils.latents import (DESCRIPTION_FILE, DTYPES, FORMAT, SHARD_ARRAYS, read_description, shard_finished,
                           shard_name, write_description, write_shard)
from utils.vae import encode_moments, latent_shape, load_vae, vae_source

PENDING_FILE = "prepare.json"  # the settings of an unfinished folder, checked when a run resumes
# Processes wait for each other only at the start and at the end; a resumed run can leave one of
# them with many more shards to encode than another.
WAIT_S = 48 * 3600.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_path", required=True, help="ImageFolder root: one sub-folder of images per class")
    p.add_argument("--out", required=True, help="output folder of the latents (created; resumed when unfinished)")
    p.add_argument("--resolution", type=int, default=256, help="crop size in pixels: 256 or 512 (latents 32 or 64)")
    p.add_argument("--vae", default="mse", help="mse, ema (stabilityai/sd-vae-ft-*) or a local AutoencoderKL folder")
    p.add_argument("--batch_size", type=int, default=64, help="images per encoder call (each also encodes its mirror)")
    p.add_argument("--shard_size", type=int, default=10000, help="images per shard file")
    p.add_argument("--workers", type=int, default=8, help="image-decoding worker processes per process (0: inline)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    p.add_argument("--limit", type=int, default=None, help="encode only the first N images (a quick try)")
    args = p.parse_args(argv)
    for name in ("resolution", "batch_size", "shard_size", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserValueError(f"--{name} {value} must be at least 1")
    if args.workers < 0:
        raise UserValueError(f"--workers {args.workers} must be at least 0")
    return args


# ---------------------------------------------------------------- agreement between processes


def _all_true(flag: bool, env) -> bool:
    if env.world_size <= 1:
        return flag
    t = torch.tensor([int(flag)], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _on_every_rank(fn, env, *, rank0_only: bool = False):
    """Run fn (on rank 0 only with rank0_only) and agree that it succeeded: if it raised anywhere, it
    raises on every rank, so that none waits for the others forever."""
    error, result = None, None
    if not rank0_only or env.rank == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, once the other ranks know
            error = e
    if not _all_true(error is None, env):
        raise error if error is not None else UserRunError("another process failed (see its error above)")
    return result


# ---------------------------------------------------------------- images


class _Images(torch.utils.data.Dataset):
    """Centre-cropped uint8 images [3, R, R] of a list of paths; a failure is returned, not raised, so that
    the main process reports it as one line instead of a worker's traceback."""

    def __init__(self, paths: list[str], resolution: int):
        self.paths, self.resolution = paths, resolution

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return load_image(self.paths[i], self.resolution)
        except UserFileError as e:
            return str(e)


def _as_list(items):
    """collate_fn: a batch stays a list (it may hold error messages)."""
    return items


def _shard_batches(shards: list[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Positions in the concatenated image list of `shards` ((start, count) each), cut in batches that
    start at each shard's beginning: a shard is encoded in the same batches by any process."""
    batches, offset = [], 0
    for _, count in shards:
        batches += [list(range(offset + b, offset + min(b + batch_size, count))) for b in range(0, count, batch_size)]
        offset += count
    return batches


# ---------------------------------------------------------------- the run


def settings(args, classes: list[str], samples: list, digest: str, vae) -> dict:
    """What determines the files: recorded in dataset.json, and checked when a run resumes."""
    return {
        "format": FORMAT,
        "vae": {**vae_source(args.vae), "scaling_factor": getattr(vae.config, "scaling_factor", None)},
        "resolution": args.resolution,
        "crop": "ADM center_crop_arr (BOX halvings, BICUBIC resize of the short side, centre square)",
        "latent_shape": list(latent_shape(vae, args.resolution)),
        "views": ["image", "horizontal mirror, encoded from the flipped crop"],
        "dtypes": {a: DTYPES[a].name for a in SHARD_ARRAYS},
        "count": len(samples),
        "shard_size": args.shard_size,
        "files_sha256": digest,
        "classes": classes,
    }


def _prepare_folder(out: Path, wanted: dict) -> bool:
    """Rank 0: check what `out` holds against `wanted`; True when it is already complete."""
    done = read_description(out)
    pending = read_description(out, PENDING_FILE)
    found = done or pending
    if found is not None:
        found = {k: v for k, v in found.items() if k != "shards"}
        if found != wanted:
            differ = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
            raise UserFileError(f"{out} holds latents made with other settings ({', '.join(differ)} differ); "
                                f"pass another --out or delete that folder")
        if done is not None:
            return True
    elif out.is_dir() and any(not p.name.endswith(".tmp") for p in out.iterdir()):
        raise UserFileError(f"{out} is not empty and holds no latents of prepare_latents.py; "
                            f"pass an empty or new --out")
    else:
        write_description(out, wanted, PENDING_FILE)
    for stale in out.glob(".*.tmp"):  # files of a write that a killed run left half done
        stale.unlink()
    return False


def _encode_shards(args, env, vae, samples: list, shards: list[tuple[int, int, int]], total_pending: int) -> None:
    """Encode and write this rank's `shards` ((k, start, count) each)."""
    from tqdm.auto import tqdm

    paths = [samples[i][0] for _, start, count in shards for i in range(start, start + count)]
    loader = torch.utils.data.DataLoader(
        _Images(paths, args.resolution), batch_sampler=_shard_batches([s[1:] for s in shards], args.batch_size),
        num_workers=args.workers, collate_fn=_as_list)
    batches = iter(loader)
    with tqdm(total=total_pending, desc="latents", unit="img", disable=env.rank != 0, dynamic_ncols=True) as bar:
        for k, start, count in shards:
            mean, std = [], []
            for _ in range(-(-count // args.batch_size)):
                items = next(batches)
                errors = [x for x in items if isinstance(x, str)]
                if errors:
                    raise UserFileError(errors[0])
                images = torch.stack(items)
                views = [encode_moments(vae, images), encode_moments(vae, images.flip(-1))]
                mean.append(torch.stack([m for m, _ in views], 1).cpu())
                std.append(torch.stack([s for _, s in views], 1).cpu())
                bar.update(len(items) * env.world_size)  # the others are assumed to keep pace
            labels = np.array([samples[i][1] for i in range(start, start + count)], dtype=np.int64)
            write_shard(args.out, k, mean=torch.cat(mean).numpy(), std=torch.cat(std).numpy(), labels=labels)


def run(args, env) -> None:
    out = Path(args.out)
    classes, samples = _on_every_rank(lambda: list_image_folder(args.data_path), env)
    samples = samples[:args.limit]
    # Every process lists the folder itself; they must agree, or their shards would not fit together.
    digest = files_digest(args.data_path, samples)
    if env.world_size > 1:
        low = torch.tensor([int(digest[:15], 16)], device=env.device)
        high = low.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if low.item() != high.item():
            raise UserRunError(f"the processes list different images under {args.data_path}; is the folder "
                               f"changing, or not the same on every node?")
    # Rank 0 loads first (it may download into the cache), then the others read the cache.
    vae = _on_every_rank(lambda: load_vae(args.vae, device=env.device), env, rank0_only=True)
    vae = _on_every_rank(lambda: vae if env.rank == 0 else load_vae(args.vae, device=env.device), env)
    wanted = settings(args, classes, samples, digest, vae)
    complete = _on_every_rank(lambda: _prepare_folder(out, wanted), env, rank0_only=True)
    if _all_true(not complete, env):
        starts = range(0, len(samples), args.shard_size)
        todo = [(k, s, min(args.shard_size, len(samples) - s)) for k, s in enumerate(starts)
                if not shard_finished(out, k)]
        mine = [s for s in todo if s[0] % env.world_size == env.rank]
        _on_every_rank(lambda: _encode_shards(args, env, vae, samples, mine, sum(s[2] for s in todo)), env)

        def finish():
            shards = []
            for k, s in enumerate(starts):
                if not shard_finished(out, k):
                    raise UserRunError(f"shard {k} of {out} is missing after the run; run the same command again")
                shards.append({"name": shard_name(k), "start": s, "count": min(args.shard_size, len(samples) - s)})
            write_description(out, {**wanted, "shards": shards})
            (out / PENDING_FILE).unlink()

        _on_every_rank(finish, env, rank0_only=True)
    if env.rank == 0:
        print(f"{out}: {len(samples)} images, latents {wanted['latent_shape']} of {args.resolution}x{args.resolution} "
              f"crops and their mirrors ({DESCRIPTION_FILE})", file=sys.stderr)


def main(argv=None) -> None:
    args = parse_args(argv)
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    # Full float32 in the encoder: TF32 convolutions (cuDNN's default) would round the moments far
    # more than their storage does.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    env = init_distributed(args.device, timeout_s=WAIT_S)
    try:
        run(args, env)
    finally:
        cleanup()
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


if __name__ == "__main__":
    with exit_on_user_error():
        main()
