"""The Stable Diffusion VAE (diffusers' AutoencoderKL): loading by name or folder, posterior moments, decoding.

Latents here are RAW: the posterior of the VAE as it comes, without the 0.18215 factor or any
other normalization (utils.latents.LatentNorm applies those).
"""
import os
from pathlib import Path

import torch

from utils.data import to_float
from utils.errors import UserFileError, UserValueError
from utils.sampling import to_uint8

# The two fine-tuned decoders of the SD VAE (same encoder); the MeanFlow and iMF papers use "mse"
# (their JAX code loads the Flax ports pcuenq/sd-vae-ft-{mse,ema}-flax of these repositories).
VAE_REPOS = {"mse": "stabilityai/sd-vae-ft-mse", "ema": "stabilityai/sd-vae-ft-ema"}
WEIGHTS_FILES = "config.json and diffusion_pytorch_model.safetensors"


def vae_source(vae: str) -> dict:
    """What `vae` names, as recorded in a latent folder: {"name", "repo", "path"} (repo or path is None).

    `vae` is "mse", "ema" or a folder holding a diffusers AutoencoderKL (WEIGHTS_FILES).
    """
    if vae in VAE_REPOS:
        return {"name": vae, "repo": VAE_REPOS[vae], "path": None}
    if os.path.isdir(vae):
        return {"name": Path(vae).name, "repo": None, "path": str(Path(vae).resolve())}
    raise UserValueError(f"unknown VAE {vae!r}: pass --vae mse, --vae ema or --vae /path/to/folder "
                         f"(a folder with {WEIGHTS_FILES}, e.g. a download of {VAE_REPOS['mse']})")


def load_vae(vae: str = "mse", *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """An AutoencoderKL in eval mode on `device`: "mse" / "ema" from the Hugging Face cache (downloaded
    when missing and a network is there), or a local folder.

    Raises UserValueError for an unknown name, UserFileError (one line, naming the repository and
    --vae) when the weights are neither cached nor downloadable or the folder holds no VAE.
    """
    from diffusers import AutoencoderKL

    source = vae_source(vae)
    where = source["repo"] or source["path"]
    kwargs = dict(torch_dtype=dtype, low_cpu_mem_usage=False)  # without `accelerate` the default only warns
    try:
        if source["repo"] is None:
            model = AutoencoderKL.from_pretrained(where, local_files_only=True, **kwargs)
        else:
            try:  # the cache first: offline, the hub client would retry the network for half a minute
                model = AutoencoderKL.from_pretrained(where, local_files_only=True, **kwargs)
            except OSError:
                model = AutoencoderKL.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if source["repo"] is None:
            raise UserFileError(f"no diffusers AutoencoderKL in {where} ({reason}): the folder needs "
                                f"{WEIGHTS_FILES}, e.g. a download of {VAE_REPOS['mse']}") from e
        raise UserFileError(f"VAE {where} not found in the Hugging Face cache and it could not be downloaded "
                            f"({reason}): download it ({WEIGHTS_FILES}) on a machine with network access and "
                            f"pass --vae /path/to/folder") from e
    return model.to(device).eval().requires_grad_(False)


def downsampling(vae) -> int:
    """Pixels per latent along each side: 2 per down block after the first (8 for the SD VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_shape(vae, resolution: int) -> tuple[int, int, int]:
    """(C, H, W) of the latents of `resolution` x `resolution` images: (4, 32, 32) at 256 for the SD VAE."""
    factor = downsampling(vae)
    if resolution <= 0 or resolution % factor:
        raise UserValueError(f"resolution {resolution} must be a positive multiple of {factor} "
                             f"(the VAE's downsampling)")
    return (vae.config.latent_channels, resolution // factor, resolution // factor)


@torch.no_grad()
def encode_moments(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior of uint8 images [B, 3, H, W] (0..255): (mean, std), float32 [B, C, H/f, W/f] each.

    The images are scaled to [-1, 1] (x / 127.5 - 1) on the VAE's device; std = exp(logvar / 2)
    with diffusers' clamp of logvar to [-30, 20]. Both on the VAE's device.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    param = next(vae.parameters())
    x = to_float(images.to(param.device)).to(param.dtype)
    posterior = vae.encode(x).latent_dist
    return posterior.mean.float(), posterior.std.float()


@torch.no_grad()
def decode(vae, latents: torch.Tensor, *, batch_size: int = 32) -> torch.Tensor:
    """RAW latents [B, C, h, w] -> uint8 images [B, 3, h*f, w*f] on the latents' device.

    Decoded `batch_size` at a time on the VAE's device, then quantised as ADM-format samples are
    (utils.sampling.to_uint8: x * 127.5 + 128, clamped, truncated, i.e. rounded to the nearest level).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    param = next(vae.parameters())
    out = [to_uint8(vae.decode(z.to(param.device, param.dtype)).sample.float()).to(latents.device)
           for z in latents.split(batch_size)]
    if not out:
        factor = downsampling(vae)
        return torch.empty((0, 3, latents.shape[2] * factor, latents.shape[3] * factor), dtype=torch.uint8,
                           device=latents.device)
    return torch.cat(out)
