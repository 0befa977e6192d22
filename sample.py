"""Draw MeanFlow samples from a checkpoint (ours or the authors'): a .npz of uint8 images and/or a PNG grid.

    python sample.py --ckpt output/digits/checkpoint-last.pth --num_samples 64 --grid samples.png
    torchrun --nproc_per_node 8 sample.py --ckpt model.pth --num_samples 50000 --ema net_ema1 --out samples.npz

    python sample.py --ckpt output/digits-cond/checkpoint-last.pth --num_samples 200 --out s.npz --grid g.png
    torchrun --nproc_per_node 8 sample.py --ckpt output/imagenet256-xl2/checkpoint-last.pth --num_samples 50000 \
        --out in256.npz                    # latents decoded by the VAE that the checkpoint names: 256x256 images
    python sample.py --ckpt iMF-B-2.pth --ema net --num_samples 100 --grid g.png --omega 1 4 8   # one grid each

The .npz holds N x H x W x C uint8 images under ``arr_0`` (the ADM/EDM evaluators' format), and for a
class-conditional checkpoint their class indices under ``arr_1`` (the ADM convention): sample i takes
``--class_labels[i % K]``, by default class i % num_classes (balanced); its grid has one row per class. Sample i
comes from noise seeded by (seed, i), so the noise does not depend on batch size or process count
(the images are then equal up to the floating-point differences of kernels chosen per batch size).
A latent model's samples are decoded to images by the VAE its checkpoint names (--vae: another copy).
An iMF network samples with the guidance --omega, --t_min, --t_max (default: the checkpoint's, or the
authors' for their model sizes, their 2-step XL/2 setting first; training.build.sampling_guidance); several values write one file per
setting, its values in the name: --omega 1 4 --out s.npz writes s_omega1_0.4-0.65.npz and s_omega4_0.4-0.65.npz.
"""

import argparse
from pathlib import Path

import torch

from training.build import load_network, read_checkpoint, sampling_guidance
from training.sampling import Guidance, image_decoder, sample_images
from utils.cli import HelpFormatter, add_guidance_flags, parse_model_config
from utils.distributed import cleanup, init_distributed
from utils.errors import UserValueError, exit_on_user_error
from utils.images import class_rows, save_grid, save_npz
from utils.latents import LatentSpace
from utils.sampling import class_indices


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Sample a MeanFlow checkpoint (ours, the authors' CIFAR-10 release, or the iMF authors' iMF-*.pth). "
        "Run with torchrun to split the samples over processes.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--ckpt", required=True, help="checkpoint file (.pth), or the authors' JAX DiT checkpoint folder "
                   "(needs jax, flax, orbax-checkpoint; --ema net: their params, net_ema: their EMA params)")
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
    p.add_argument("--vae", default=None, help="latent checkpoints: the VAE that decodes the samples, mse, ema or "
                   "a local folder, instead of the one the checkpoint names (default: that one)")
    add_guidance_flags(p, each="a file each")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda when available")
    args = p.parse_args(argv)
    if not args.out and not args.grid:
        p.error("nothing to write: give --out FILE.npz and/or --grid FILE.png")
    if min(args.num_samples, args.steps, args.batch_size, args.grid_count) < 1:
        p.error("--num_samples, --steps, --batch_size and --grid_count must be >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    env = init_distributed(args.device)
    try:
        model_config = parse_model_config(args.model_config)
        ckpt = read_checkpoint(args.ckpt, model_config)
        net = load_network(ckpt, ema=args.ema, model_config=model_config, device=env.device)
        shape = (net.in_channels, net.img_resolution, net.img_resolution)
        settings = sampling_guidance(ckpt, net, args.steps, omega=args.omega, t_min=args.t_min, t_max=args.t_max)
        decode = image_decoder(LatentSpace.of_checkpoint(ckpt), vae=args.vae, device=env.device)
        try:
            labels = class_indices(net, torch.arange(args.num_samples), args.class_labels)
        except ValueError as err:
            raise UserValueError(f"--class_labels: {err}") from err
        for guidance in settings:
            images = sample_images(
                net, num_samples=args.num_samples, img_shape=shape, seed=args.seed, steps=args.steps,
                batch_size=args.batch_size, device=env.device, env=env, progress=env.rank == 0,
                classes=args.class_labels, decode=decode, guidance=guidance,
            )
            if env.rank == 0:
                write(args, images, labels, guidance, sweep=len(settings) > 1)
    finally:
        cleanup()


def named(path: str, guidance: Guidance) -> str:
    """path with the setting in its name: s.npz -> s_omega4_0.4-0.65.npz."""
    p = Path(path)
    return str(p.with_name(f"{p.stem}_omega{guidance.omega:g}_{guidance.t_min:g}-{guidance.t_max:g}{p.suffix}"))


def write(args: argparse.Namespace, images: torch.Tensor, labels: torch.Tensor | None, guidance: Guidance | None,
          *, sweep: bool) -> None:
    """--out and --grid of one guidance setting (of several: in files named after it)."""
    note = "" if guidance is None else f" ({guidance})"
    if args.out:
        out = named(args.out, guidance) if sweep else args.out
        save_npz(out, images, labels)
        print(f"wrote {images.shape[0]} images {tuple(images.shape[1:])} to {out}"
              + ("" if labels is None else ", their classes under arr_1") + note)
    if args.grid:
        grid, nrow = images[: args.grid_count], None
        if labels is not None:
            grid, nrow = class_rows(images, labels, args.grid_count)
        out = named(args.grid, guidance) if sweep else args.grid
        save_grid(out, grid, nrow=nrow)
        print(f"wrote a grid of {grid.shape[0]} images to {out}{note}")


if __name__ == "__main__":
    with exit_on_user_error():
        main()
