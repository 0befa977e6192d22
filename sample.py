"""Draw MeanFlow samples from a checkpoint (ours or the authors'): a .npz of uint8 images and/or a PNG grid.

    python sample.py --ckpt output/digits/checkpoint-last.pth --num_samples 64 --grid samples.png
    torchrun --nproc_per_node 8 sample.py --ckpt model.pth --num_samples 50000 --ema net_ema1 --out samples.npz

    python sample.py --ckpt output/digits-cond/checkpoint-last.pth --num_samples 200 --out s.npz --grid g.png

The .npz holds N x H x W x C uint8 images under ``arr_0`` (the ADM/EDM evaluators' format), and for a
class-conditional checkpoint their class indices under ``arr_1`` (the ADM convention): sample i takes
``--class_labels[i % K]``, by default class i % num_classes (balanced); its grid has one row per class. Sample i
comes from noise seeded by (seed, i), so the noise does not depend on batch size or process count
(the images are then equal up to the floating-point differences of kernels chosen per batch size).
"""

import argparse
import json
import math
import os

import numpy as np
import torch
import torch.distributed
import torch.nn.functional as F
from PIL import Image

from utils.checkpoint import atomic_write, load_network
from utils.distributed import cleanup, init_distributed
from utils.errors import UserFileError, UserValueError, exit_on_user_error
from utils.sampling import class_indices, generate, shard


def load_model(
    ckpt,
    *,
    ema: str = "net_ema",
    model_config: dict | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, tuple[int, int, int]]:
    """(network in eval mode, image shape (C, H, W)) from a checkpoint path or loaded dict."""
    net = load_network(ckpt, ema=ema, model_config=model_config, device=device)
    return net, (net.in_channels, net.img_resolution, net.img_resolution)


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


def image_grid(images: torch.Tensor, *, nrow: int | None = None, min_cell: int = 32, padding: int = 2) -> Image.Image:
    """PIL image of uint8 [N, C, H, W] images (C = 1 or 3) in a grid of ``nrow`` columns.

    Images smaller than ``min_cell`` pixels are enlarged by an integer factor (nearest neighbour).
    """
    from torchvision.utils import make_grid

    n, c, h, w = images.shape
    if images.dtype != torch.uint8 or c not in (1, 3):
        raise ValueError(f"expected uint8 images [N, 1|3, H, W], got {images.dtype} {tuple(images.shape)}")
    scale = max(1, math.ceil(min_cell / max(h, w)))
    x = images.float()
    if scale > 1:
        x = F.interpolate(x, scale_factor=scale, mode="nearest")
    nrow = nrow or math.ceil(math.sqrt(n))
    grid = make_grid(x, nrow=nrow, padding=padding, pad_value=255.0)
    return Image.fromarray(grid.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())


def save_npz(path: str, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    """Write uint8 [N, C, H, W] as N x H x W x C under ``arr_0`` and class indices [N] under ``arr_1``, atomically."""
    arrays = dict(arr_0=images.permute(0, 2, 3, 1).contiguous().numpy())
    if labels is not None:
        arrays["arr_1"] = labels.numpy()
    atomic_write(path, lambda f: np.savez(f, **arrays), what="samples")


def class_rows(images: torch.Tensor, labels: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
    """(images of about ``count`` samples, one row per requested class in order of first appearance;
    images per row): every row as long as that of the rarest class."""
    classes = list(dict.fromkeys(labels.tolist()))
    per_class = [images[labels == c] for c in classes]
    per_row = max(1, min(min(len(p) for p in per_class), count // len(classes)))
    return torch.cat([p[:per_row] for p in per_class]), per_row


def parse_model_config(text: str | None) -> dict | None:
    """--model_config: a JSON object or the path of a JSON file."""
    if not text:
        return None
    if os.path.isfile(text):
        with open(text) as f:
            source = f.read()
    else:
        source = text
    try:
        config = json.loads(source)
    except json.JSONDecodeError as err:
        raise UserValueError(f"--model_config {text!r} is neither a JSON file nor a JSON object ({err})") from err
    if not isinstance(config, dict):
        raise UserValueError(f"--model_config must be a JSON object of SongUNet arguments, got {text!r}")
    return config


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except unset ones (None) and off switches."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Sample a MeanFlow checkpoint (ours or the authors' CIFAR-10 release). "
        "Run with torchrun to split the samples over processes.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--ckpt", required=True, help="checkpoint file (.pth)")
    p.add_argument("--num_samples", type=int, default=64, help="number of images")
    p.add_argument("--steps", type=int, default=1, help="sampling steps (1 = one network evaluation)")
    p.add_argument("--ema", default="net_ema", help="network in the checkpoint: net, net_ema, net_ema1, ...")
    p.add_argument("--seed", type=int, default=0, help="sample i uses noise seeded by (seed, i)")
    p.add_argument("--out", default=None, help="output .npz (uint8 N x H x W x C under arr_0)")
    p.add_argument("--grid", default=None, help="output PNG with a grid of the first --grid_count images "
                   "(class-conditional: one row per class)")
    p.add_argument("--grid_count", type=int, default=100, help="images in the grid")
    p.add_argument("--class_labels", type=int, nargs="+", default=None, metavar="K",
                   help="class-conditional checkpoints: sample i takes class K[i %% len(K)] "
                   "(default: i %% num_classes, all classes equally often)")
    p.add_argument("--batch_size", type=int, default=256, help="images per forward pass and process")
    p.add_argument("--model_config", default=None,
                   help="SongUNet kwargs as JSON (or a JSON file) for checkpoints without a stored config; "
                   "inferred from the weights when omitted")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda when available")
    args = p.parse_args(argv)
    if not args.out and not args.grid:
        p.error("nothing to write: give --out FILE.npz and/or --grid FILE.png")
    if min(args.num_samples, args.steps, args.batch_size, args.grid_count) < 1:
        p.error("--num_samples, --steps, --batch_size and --grid_count must be >= 1")
    return args


def save_grid(path: str, images: torch.Tensor, nrow: int | None = None) -> None:
    """Write ``image_grid(images, nrow=nrow)`` to ``path``; the format follows the file extension (PNG, JPEG, ...)."""
    try:
        image_grid(images, nrow=nrow).save(path)
    except ValueError as err:  # PIL: an extension it has no writer for
        raise UserFileError(f"cannot write the grid {path} ({err}); give --grid a name ending in .png") from err


def main(argv=None) -> None:
    args = parse_args(argv)
    env = init_distributed(args.device)
    try:
        net, shape = load_model(args.ckpt, ema=args.ema, model_config=parse_model_config(args.model_config),
                                device=env.device)
        try:
            labels = class_indices(net, torch.arange(args.num_samples), args.class_labels)
        except ValueError as err:
            raise UserValueError(f"--class_labels: {err}") from err
        images = sample_images(
            net, num_samples=args.num_samples, img_shape=shape, seed=args.seed, steps=args.steps,
            batch_size=args.batch_size, device=env.device, env=env, progress=env.rank == 0,
            classes=args.class_labels,
        )
        if env.rank == 0:
            if args.out:
                save_npz(args.out, images, labels)
                print(f"wrote {images.shape[0]} images {tuple(images.shape[1:])} to {args.out}"
                      + ("" if labels is None else f", their classes under arr_1"))
            if args.grid:
                grid, nrow = images[: args.grid_count], None
                if labels is not None:
                    grid, nrow = class_rows(images, labels, args.grid_count)
                save_grid(args.grid, grid, nrow=nrow)
                print(f"wrote a grid of {grid.shape[0]} images to {args.grid}")
    finally:
        cleanup()


if __name__ == "__main__":
    with exit_on_user_error():
        main()
