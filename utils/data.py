"""Datasets held in memory as uint8 tensors, and randomness derived from (seed, keys) alone.

Data order and flips depend only on (seed, epoch, step, sample index), never on the number of
processes or on process state, so a run resumes exactly and a rank's slice of a global batch is
what the single-process run would have seen in those rows.
"""
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from utils.errors import UserValueError

DIGITS_TRAIN = 1500  # of 1797 scikit-learn digits; the other 297 are held out


@dataclass(frozen=True)
class DatasetInfo:
    """What the rest of the code needs to know of a dataset without loading it."""
    name: str
    channels: int
    resolution: int
    train_size: int   # images in the training split
    num_classes: int  # labelled classes (every dataset here has labels)
    flip: bool        # horizontal flips keep an image in the data distribution

    @property
    def img_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.resolution, self.resolution)


# The one table of dataset facts. MNIST is trained as the release does: 32x32, grey copied to RGB.
# Only CIFAR-10 is flipped: a mirrored 2, 3, 4, 7 or 9 is not a digit.
DATASETS = {
    "cifar10": DatasetInfo("cifar10", channels=3, resolution=32, train_size=50000, num_classes=10, flip=True),
    "mnist": DatasetInfo("mnist", channels=3, resolution=32, train_size=60000, num_classes=10, flip=False),
    "digits": DatasetInfo("digits", channels=1, resolution=8, train_size=DIGITS_TRAIN, num_classes=10, flip=False),
}


def dataset_info(name: str) -> DatasetInfo:
    """The facts of dataset `name`; UserValueError (a ValueError) naming the choices for an unknown one."""
    if name not in DATASETS:
        raise UserValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,C,H,W] in 0..255 -> float32 in [-1, 1] (x / 127.5 - 1)."""
    return images.to(torch.float32) / 127.5 - 1


def _not_found(what: str, data_path: Path, files: str, download: bool, cause: Exception) -> FileNotFoundError:
    # Without a download attempt torchvision's own message ("use download=True") would only confuse.
    how = f"it could not be downloaded ({type(cause).__name__}: {cause})" if download else "download=False"
    return FileNotFoundError(
        f"{what} not found under {data_path} and {how}: "
        f"put {files} under {data_path}, or pass --data_path with the folder that holds them")


def _cifar10(root: Path, train: bool, download: bool) -> torch.Tensor:
    from torchvision.datasets import CIFAR10
    # An archive placed by hand is verified and extracted by the download path without any network.
    download = download or (root / "cifar-10-python.tar.gz").exists()
    try:
        data = CIFAR10(str(root), train=train, download=download).data  # numpy uint8 [N, 32, 32, 3]
    except Exception as e:  # torchvision raises RuntimeError offline-missing, URLError/OSError on failed download
        raise _not_found("CIFAR-10", root, "cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/)",
                         download, e) from e
    return torch.from_numpy(np.ascontiguousarray(data)).permute(0, 3, 1, 2).contiguous()


def _mnist(root: Path, train: bool, download: bool) -> torch.Tensor:
    """MNIST as the release trains on it: PIL bilinear resize 28 -> 32, grey copied to 3 channels (DATASETS)."""
    from PIL import Image
    from torchvision.datasets import MNIST
    download = download or (root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").exists()
    try:
        data = MNIST(str(root), train=train, download=download).data.numpy()  # uint8 [N, 28, 28]
    except Exception as e:
        files = "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte(.gz)"
        raise _not_found("MNIST", root, files, download, e) from e
    channels, height, width = DATASETS["mnist"].img_shape
    resized = np.stack([np.asarray(Image.fromarray(im).resize((width, height), Image.Resampling.BILINEAR))
                        for im in data])
    return torch.from_numpy(resized)[:, None].expand(-1, channels, -1, -1).contiguous()


def _digits_split(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits (values 0..16) as uint8 [N,1,8,8] in 0..255, no upsampling, and labels [N].

    train=True: the first 1500 images after a fixed permutation; train=False: the other 297.
    """
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = torch.round(torch.from_numpy(digits.images) * 255 / 16).to(torch.uint8)[:, None]
    order = torch.randperm(len(images), generator=make_generator(0, "digits-split"))
    rows = order[:DIGITS_TRAIN] if train else order[DIGITS_TRAIN:]
    return images[rows].contiguous(), torch.from_numpy(digits.target).long()[rows]


def load_digits_labels(train: bool = True) -> torch.Tensor:
    """Class labels 0..9, LongTensor [N], row for row with load_dataset("digits", train=train)."""
    return _digits_split(train)[1]


def load_labels(name: str, data_path: str | Path = "./data", train: bool = True, download: bool = True) -> torch.Tensor:
    """Class labels 0..num_classes-1, LongTensor [N], row for row with load_dataset(name, data_path, train)."""
    dataset_info(name)
    root = Path(data_path)
    if name == "digits":
        return load_digits_labels(train)
    from torchvision.datasets import CIFAR10, MNIST
    loader, what, files = ((CIFAR10, "CIFAR-10", "cifar-10-python.tar.gz") if name == "cifar10" else
                           (MNIST, "MNIST", "MNIST/raw/{train,t10k}-labels-idx1-ubyte(.gz)"))
    try:
        return torch.as_tensor(loader(str(root), train=train, download=download).targets).long()
    except Exception as e:
        raise _not_found(what, root, files, download, e) from e


def load_dataset(name: str, data_path: str | Path = "./data", train: bool = True,
                 download: bool = True) -> torch.Tensor:
    """All images of a dataset split as one uint8 tensor [N,C,H,W] in 0..255 (convert batches with to_float).

    [C, H, W] is dataset_info(name).img_shape; N is its train_size for the training split.
    Raises FileNotFoundError naming the files to provide when a dataset is missing and cannot be downloaded.
    """
    dataset_info(name)  # an unknown name fails here, naming the choices
    root = Path(data_path)
    if name == "cifar10":
        return _cifar10(root, train, download)
    if name == "mnist":
        return _mnist(root, train, download)
    return _digits_split(train)[0]


def fold_seed(seed: int, *keys: int | str) -> int:
    """Stable 63-bit seed from (seed, *keys): the same in every process, Python run and platform.

    Keys are ints or strings; their type is part of the hash, so 1 and "1" give different seeds.
    """
    parts = []
    for k in (seed, *keys):
        if isinstance(k, bool) or not isinstance(k, (int, str)):
            raise ValueError(f"fold_seed keys must be int or str, got {k!r} of type {type(k).__name__}")
        parts.append(f"{'i' if isinstance(k, int) else 's'}{len(str(k))}:{k}")
    digest = hashlib.sha256("|".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def make_generator(seed: int, *keys: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded with fold_seed(seed, *keys)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(fold_seed(seed, *keys))
    return gen


def steps_per_epoch(num_items: int, global_batch: int) -> int:
    """Full global batches per epoch (the incomplete last batch is dropped)."""
    if global_batch <= 0 or global_batch > num_items:
        raise ValueError(f"global batch {global_batch} must be in 1..{num_items} (the dataset size)")
    return num_items // global_batch


def batch_indices(seed: int, epoch: int, num_items: int, global_batch: int, step_in_epoch: int) -> torch.Tensor:
    """Dataset indices of one global batch: LongTensor [global_batch].

    Epoch `epoch` visits the items in the order of a permutation seeded by (seed, epoch); step k takes
    rows [k*global_batch, (k+1)*global_batch). Rank r of W then uses rows [r*B, (r+1)*B) with B = global_batch/W.
    """
    steps = steps_per_epoch(num_items, global_batch)
    if not 0 <= step_in_epoch < steps:
        raise ValueError(f"step_in_epoch {step_in_epoch} out of range: an epoch has {steps} steps")
    order = _epoch_order(seed, epoch, num_items)
    return order[step_in_epoch * global_batch:(step_in_epoch + 1) * global_batch].clone()


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, num_items: int) -> torch.Tensor:
    """The permutation of epoch `epoch`: drawn once per epoch, not once per step."""
    return torch.randperm(num_items, generator=make_generator(seed, "epoch", epoch))


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy a small host tensor (random draws) to `device` without waiting for the device.

    A plain host-to-GPU copy from pageable memory synchronises the stream, i.e. the host waits for
    all queued GPU work; staging through pinned memory makes it asynchronous.
    """
    device = torch.device(device)
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    # Pinned memory keeps a view's strides, and the copy kernel turns a non-contiguous source
    # into a contiguous temporary in pageable memory, which makes the copy block the host again.
    return x.contiguous().pin_memory().to(device, non_blocking=True)


def random_hflip(images: torch.Tensor, generator: torch.Generator, offset: int = 0,
                 total: int | None = None) -> torch.Tensor:
    """Flip each image left-right with probability 1/2 (the release's RandomHorizontalFlip on CIFAR-10).

    images: [B,C,H,W], rows offset..offset+B of a global batch of `total` (default B) images. The coin
    flips are drawn for all `total` rows from `generator`, so every rank slices the same draws.
    """
    total = images.shape[0] if total is None else total
    if offset < 0 or offset + images.shape[0] > total:
        raise ValueError(f"rows {offset}..{offset + images.shape[0]} do not fit in a batch of {total}")
    coins = torch.rand(total, generator=generator, device=generator.device)[offset:offset + images.shape[0]]
    flip = to_device(coins < 0.5, images.device).view(-1, *([1] * (images.dim() - 1)))
    return torch.where(flip, images.flip(-1), images)
