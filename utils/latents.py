"""VAE latents on disk (written once by prepare_latents.py), the training-time reader, and latent normalizations.

A latent folder holds `dataset.json` (written last: a folder without it is unfinished) and, per shard
k of `shard_size` images, three .npy files that np.load(mmap_mode="r") maps without reading them:

    shard-<k>.labels.npy  int64   [n]                  ImageFolder class index
    shard-<k>.std.npy     float16 [n, 2, C, H, W]      posterior std
    shard-<k>.mean.npy    float32 [n, 2, C, H, W]      posterior mean

Axis 1 is the view: 0 the image, 1 its horizontal mirror, ENCODED from the flipped image (a
flipped latent is not the latent of the flipped image). The mean stays float32: its float16
rounding (|mean| * 2^-11, about 1e-3 at |mean| = 4) is not small next to the posterior std of the
SD VAE, which is tiny. The std is float16: its rounding is relative (2^-11 of itself; 3e-8 at
most below 6e-5), so negligible in mean + std * eps whatever its size. docs/imagenet.md has the sizes.
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from utils.checkpoint import atomic_write
from utils.data import to_device
from utils.errors import UserFileError

FORMAT = "meanflow-latents-1"
DESCRIPTION_FILE = "dataset.json"
SHARD_ARRAYS = ("labels", "std", "mean")  # the order they are written in; "mean" last
DTYPES = {"labels": np.dtype(np.int64), "std": np.dtype(np.float16), "mean": np.dtype(np.float32)}


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def shard_path(folder: str | Path, k: int, array: str) -> Path:
    """File of `array` ("labels", "std" or "mean") of shard k."""
    return Path(folder) / f"{shard_name(k)}.{array}.npy"


def shard_finished(folder: str | Path, k: int) -> bool:
    """Each file is written atomically (complete or absent), so a shard whose files all exist is whole."""
    return all(shard_path(folder, k, a).is_file() for a in SHARD_ARRAYS)


def write_shard(folder: str | Path, k: int, *, mean: np.ndarray, std: np.ndarray, labels: np.ndarray) -> None:
    """Write shard k: mean, std [n, 2, C, H, W] (any float dtype, stored as DTYPES), labels [n]."""
    arrays = {"labels": labels, "std": std, "mean": mean}
    n = len(labels)
    for name in SHARD_ARRAYS:
        a = np.ascontiguousarray(arrays[name], dtype=DTYPES[name])
        if a.shape[0] != n or (name != "labels" and (a.ndim != 5 or a.shape[1] != 2)):
            raise ValueError(f"shard {k}: {name} has shape {a.shape}, expected [{n}, 2, C, H, W] / [{n}]")
        atomic_write(shard_path(folder, k, name), lambda f, a=a: np.save(f, a, allow_pickle=False),
                     what=f"latent shard {name}")


def write_description(folder: str | Path, description: dict, name: str = DESCRIPTION_FILE) -> None:
    text = json.dumps(description, indent=1) + "\n"
    atomic_write(Path(folder) / name, lambda f: f.write(text.encode()), what="latent folder description")


def read_description(folder: str | Path, name: str = DESCRIPTION_FILE) -> dict | None:
    """The JSON file `name` of `folder`, or None when it does not exist."""
    path = Path(folder) / name
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserFileError(f"{path} is damaged ({type(e).__name__}: {e}); delete it and run prepare_latents.py "
                            f"again") from e


class LatentDataset:
    """The latents of a folder written by prepare_latents.py, memory-mapped.

    len(ds) images; ds.labels LongTensor [N] (host); ds.shape (C, H, W); ds.description the
    dataset.json dict. ds.batch(...) draws the training latents of one step.
    """

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        description = read_description(folder)
        if description is None:
            state = ("does not exist" if not folder.is_dir()
                     else "has no dataset.json (unfinished or not a latent folder)")
            raise UserFileError(f"latent folder {folder} {state}: make it with prepare_latents.py, or run the "
                                f"same prepare_latents.py command again to finish it")
        if description.get("format") != FORMAT:
            raise UserFileError(f"{folder / DESCRIPTION_FILE} has format {description.get('format')!r}, expected "
                                f"{FORMAT!r}: make the folder again with this version of prepare_latents.py")
        self.folder = folder
        self.description = description
        self.shape: tuple[int, int, int] = tuple(description["latent_shape"])
        counts = [s["count"] for s in description["shards"]]
        # Shard s holds views (2 per image) starts[s] .. starts[s + 1] - 1 of the flattened [2N] index.
        self._view_starts = 2 * np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._mean, self._std, labels = [], [], []
        for k, n in enumerate(counts):
            arrays = {a: self._open(k, a, n) for a in SHARD_ARRAYS}
            # Reshaping a C-contiguous memmap gives a view: row 2 i + v is view v of image i.
            self._mean.append(arrays["mean"].reshape(2 * n, *self.shape))
            self._std.append(arrays["std"].reshape(2 * n, *self.shape))
            labels.append(np.asarray(arrays["labels"]))
        self.labels = torch.from_numpy(np.concatenate(labels)) if labels else torch.empty(0, dtype=torch.long)
        if len(self.labels) != description["count"]:
            raise UserFileError(f"{folder}: the shards hold {len(self.labels)} images, dataset.json says "
                                f"{description['count']}; make the folder again")

    def _open(self, k: int, array: str, n: int) -> np.ndarray:
        path = shard_path(self.folder, k, array)
        try:
            a = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserFileError(f"cannot read {path} ({type(e).__name__}: {e}); make the folder again") from e
        expected = (n,) if array == "labels" else (n, 2, *self.shape)
        if a.shape != expected or a.dtype != DTYPES[array]:
            raise UserFileError(f"{path} holds {a.dtype} {a.shape}, expected {DTYPES[array]} {expected}; "
                                f"make the folder again")
        return a

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"LatentDataset({str(self.folder)!r}, {len(self)} images, latents {self.shape})"

    def moments(self, idx: torch.Tensor, mirror: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of images `idx` (LongTensor [b]) in view `mirror` (bool [b]): float32 [b, C, H, W] each.

        The rows are read in sorted order, shard by shard (the memmaps are read forward, and each
        shard is visited once), then put back in the order asked for.
        """
        keys = 2 * idx.numpy().astype(np.int64) + mirror.numpy().astype(np.int64)
        if len(keys) and (keys.min() < 0 or keys.max() >= self._view_starts[-1]):
            raise IndexError(f"image indices must be in 0..{len(self) - 1}, got {idx.min()}..{idx.max()}")
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        bounds = np.searchsorted(sorted_keys, self._view_starts)  # rows of each shard within sorted_keys
        mean = np.empty((len(keys), *self.shape), np.float32)
        std = np.empty((len(keys), *self.shape), np.float32)
        for s in np.flatnonzero(bounds[1:] > bounds[:-1]):
            rows = order[bounds[s]:bounds[s + 1]]
            local = sorted_keys[bounds[s]:bounds[s + 1]] - self._view_starts[s]
            mean[rows] = self._mean[s][local]
            std[rows] = self._std[s][local]
        return torch.from_numpy(mean), torch.from_numpy(std)

    def to(self, device: str | torch.device) -> "LatentDataset":
        """The dataset itself: the memory maps stay on the host, batch() moves each batch to the device."""
        return self

    def batch(self, idx: torch.Tensor, *, generator: Callable[[str], torch.Generator], rows: slice, total: int,
              flip: bool, device: str | torch.device) -> torch.Tensor:
        """The RAW training latents of this rank's rows of a global batch: float32 [b, C, H, W] on `device`.

        idx: LongTensor [b] (host), the dataset indices of rows `rows` (a slice of length b) of a global
        batch of `total` rows. generator(purpose) returns a fresh CPU generator keyed by (seed, step,
        purpose). Each draw depends on the row's place in the global batch only, so the rows of N
        processes concatenate to what one process draws:
            mirror = torch.rand(total, generator=generator("flip"))[rows] < 0.5     (only when flip)
            eps[k] = torch.randn((C, H, W), generator=generator(f"latent/{rows.start + k}"))
        and the latent is mean + std * eps of the chosen view, a sample of the VAE posterior.
        """
        start, stop, step = rows.indices(total)
        if step != 1 or stop - start != len(idx):
            raise ValueError(f"rows {rows} must be a contiguous slice of {len(idx)} rows of a batch of {total}")
        if flip:
            mirror = torch.rand(total, generator=generator("flip"))[rows] < 0.5
        else:
            mirror = torch.zeros(len(idx), dtype=torch.bool)
        # One generator per row: drawing the global batch's noise and slicing it would cost every
        # process O(global batch), 8 ms per step at 256 x 4 x 32 x 32 and 4 times that at 512.
        eps = torch.empty((len(idx), *self.shape))
        for k, row in enumerate(range(start, stop)):
            torch.randn(self.shape, generator=generator(f"latent/{row}"), out=eps[k])
        mean, std = self.moments(idx, mirror)
        return to_device(torch.addcmul(mean, std, eps), device)


@dataclass(frozen=True)
class LatentNorm:
    """Per-channel affine map between RAW VAE latents and the network's space: x = (z - shift) * scale.

    It is applied to a sampled latent (mean + std * eps); being affine, that equals sampling from
    the posterior with mean (mean - shift) * scale and std std * scale.
    """
    shift: tuple[float, ...]
    scale: tuple[float, ...]

    def __post_init__(self):
        if len(self.shift) != len(self.scale) or not self.shift:
            raise ValueError(f"shift {self.shift} and scale {self.scale} need one entry per channel")

    def _view(self, values: tuple[float, ...], z: torch.Tensor) -> torch.Tensor:
        if z.dim() < 3 or z.shape[-3] != len(values):
            raise ValueError(f"expected latents [..., {len(values)}, H, W], got {tuple(z.shape)}")
        return torch.tensor(values, dtype=z.dtype, device=z.device).view(-1, 1, 1)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """RAW latents [..., C, H, W] -> network space."""
        return (z - self._view(self.shift, z)) * self._view(self.scale, z)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Network space [..., C, H, W] -> RAW latents (what the VAE decodes)."""
        return x / self._view(self.scale, x) + self._view(self.shift, x)

    def to_dict(self) -> dict:
        return {"shift": list(self.shift), "scale": list(self.scale)}

    @classmethod
    def from_dict(cls, d: dict) -> "LatentNorm":
        return cls(shift=tuple(float(v) for v in d["shift"]), scale=tuple(float(v) for v in d["scale"]))


# MeanFlow (DiT, LDM): z * 0.18215, the SD VAE's scaling_factor. The authors' JAX vae_util multiplies
# the posterior sample by 0.18215 and divides by it before decoding (0.18125 is a frequent mistype).
SD_SCALE = LatentNorm(shift=(0.0, 0.0, 0.0, 0.0), scale=(0.18215,) * 4)

# iMF: (z - mean) / std per channel, with the constants of its vae_util (JAX and PyTorch code alike),
# applied to the posterior sample. Dividing by std is multiplying by its reciprocal up to 1 ulp.
IMF_MEAN = (0.86488, -0.27787343, 0.21616915, 0.3738409)
IMF_STD = (4.85503674, 5.31922414, 3.93725398, 3.9870003)
IMF_NORM = LatentNorm(shift=IMF_MEAN, scale=tuple(1.0 / s for s in IMF_STD))

# The normalizations by name: a network's entry in models/networks.py names the one its authors train with.
NORMS = {"sd-scale": SD_SCALE, "imf": IMF_NORM}

# The entry of a latent model's checkpoint that says how its samples become images (LatentSpace.to_dict()).
CHECKPOINT_KEY = "latent"


@dataclass(frozen=True)
class LatentSpace:
    """What turns a latent model's samples into images, as its checkpoint records it under CHECKPOINT_KEY.

    norm: the network's normalization of the RAW latents, undone before decoding; vae: the VAE of the
    latent folder, its dataset.json record {"name", "repo", "path", "scaling_factor"}; resolution: the
    side in pixels of the images it decodes to.
    """
    norm: LatentNorm
    vae: dict
    resolution: int

    @property
    def vae_name(self) -> str:
        """The VAE as utils.vae.load_vae takes it: "mse" or "ema", or the folder it was loaded from."""
        return self.vae["name"] if self.vae.get("repo") else self.vae["path"]

    def to_dict(self) -> dict:
        return {"norm": self.norm.to_dict(), "vae": dict(self.vae), "resolution": self.resolution}

    @classmethod
    def from_dict(cls, d: dict) -> "LatentSpace":
        return cls(norm=LatentNorm.from_dict(d["norm"]), vae=dict(d["vae"]), resolution=int(d["resolution"]))

    @classmethod
    def of_checkpoint(cls, ckpt: dict) -> "LatentSpace | None":
        """The latent space of a checkpoint's networks; None for a model of images."""
        return cls.from_dict(ckpt[CHECKPOINT_KEY]) if CHECKPOINT_KEY in ckpt else None
