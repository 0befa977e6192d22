"""Write an iMF network of a checkpoint in the authors' layout, so that their PyTorch evaluate.py runs on it.

    python export_imf.py --ckpt output/imagenet256-imf-b2/checkpoint-last.pth --out iMF-ours-B-2.pth

The file is what their iMF-*.pth are: the state dict of their iMeanFlow built for inference (every key under
net., no v-head). It prints the command of their evaluate.py (branch torch of Lyy-iiis/imeanflow) with the
checkpoint's guidance. Their script builds only their four sizes (B/2 ... XL/2: 1000 classes, 32 x 32 x 4
latents) and decodes with sd-vae-ft-mse after iMF's normalization; another network exports too, with a note
that their script cannot evaluate it. sample.py, evaluate.py and load_network read the file back with
--ema net, as they read theirs: the layout records neither the data nor the guidance, so one of their
sizes is taken as theirs (their latent space and guidance) and another network as a model of images
(--model_config '{"img_resolution": R}' for a side other than 32, the guidance flags for its setting).
"""

import argparse

import torch

from training.build import export_imf, imf_release_latent, imf_size, load_network, read_checkpoint, sampling_guidance
from utils.cli import HelpFormatter
from utils.errors import exit_on_user_error
from utils.latents import LatentSpace


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Write an iMF network of a checkpoint in the authors' layout "
                                "(their iMF-*.pth), for their evaluate.py.", formatter_class=HelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint of an iMF run (--arch imf_dit)")
    p.add_argument("--ema", default="net_ema", help="network in the checkpoint: net, net_ema, net_ema1, ...")
    p.add_argument("--out", required=True, help="output .pth")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    ckpt = read_checkpoint(args.ckpt)
    net = load_network(ckpt, ema=args.ema)
    torch.save(export_imf(net), args.out)
    size = imf_size(net)
    print(f"wrote {args.out}: {args.ema} of {args.ckpt} in the authors' layout"
          + (f" (their imfDiT_{size.replace('/', '_')})" if size else ""))
    if size is None:
        print("note: not one of their four configurations (B/2, M/2, L/2, XL/2 on 32 x 32 x 4 latents with 1000 "
              "classes), which their evaluate.py builds: it cannot evaluate this network")
        return
    latent, theirs = LatentSpace.of_checkpoint(ckpt), imf_release_latent()
    if latent is None or latent.norm != theirs.norm or latent.vae_name != theirs.vae_name:
        # A local copy of sd-vae-ft-mse is recorded by its folder, which may well be the same VAE.
        norm = "iMF's" if latent is not None and latent.norm == theirs.norm else "another"
        ours = "a model of images" if latent is None else f"latents of {latent.vae_name} with {norm} normalization"
        print(f"note: their evaluate.py decodes with sd-vae-ft-mse after iMF's normalization; this checkpoint is "
              f"{ours}: unless that is the same, their figures would not be of this model's images")
    guidance = sampling_guidance(ckpt, net, 1)[0]
    print(f"their evaluate.py: torchrun --nproc-per-node=8 evaluate.py evaluate --ckpt-path {args.out} --workdir "
          f"fid_output --model imfDiT_{size.replace('/', '_')} --cfg-omega {guidance.omega:g} --interval-min "
          f"{guidance.t_min:g} --interval-max {guidance.t_max:g}")


if __name__ == "__main__":
    with exit_on_user_error():
        main()
