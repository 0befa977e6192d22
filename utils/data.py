"""The table of datasets (facts, loaders, quality figure), and randomness derived from (seed, keys) alone.

Data order and flips depend only on (seed, epoch, step, sample index), never on the number of
processes or on process state, so a run resumes exactly and a rank's slice of a global batch is
what the single-process run would have seen in those rows.
"""
import functools
import hashlib
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from utils.errors import UserFileError, UserValueError

DIGITS_TRAIN = 1500  # of 1797 scikit-learn digits; the other 297 are held out


class ImageData:
    """A dataset split held in memory: uint8 images [N, C, H, W] in 0..255 and their class labels [N].

    batch() is the training step's view of it: the float images of some rows, flipped by a keyed
    draw. A latent dataset offers the same batch() (utils/latents.py).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4 or labels.shape != (images.shape[0],):
            raise ValueError(f"expected uint8 images [N, C, H, W] and labels [N], got {images.dtype} "
                             f"{tuple(images.shape)} and {tuple(labels.shape)}")
        self.images, self.labels = images, labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def to(self, device: torch.device | str) -> "ImageData":
        """The images moved to `device` once (training indexes them there); the labels stay on the host."""
        self.images = self.images.to(device)
        return self

    def batch(self, idx: torch.Tensor, *, generator: Callable[[str], torch.Generator], rows: slice, total: int,
              flip: bool, device: torch.device | str) -> torch.Tensor:
        """float32 [len(idx), C, H, W] in [-1, 1] on `device`: the images idx (host LongTensor), which are
        rows `rows` of a global batch of `total`; with `flip`, each mirrored by a coin of generator("flip")."""
        x = to_float(self.images[to_device(idx, self.images.device)]).to(device)
        if flip:
            x = random_hflip(x, generator("flip"), offset=rows.start, total=total)
        return x


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset of the table: its facts, and how to load it.

    quality: the figure evaluation reports for samples of it: "inception" (FID, utils/fid.py) or
        "digits" (utils/digits_quality.py).
    open(root, train, download) -> the split's data (ImageData, or a LatentDataset); FileNotFoundError
        naming `files` when the data is missing and cannot be downloaded.
    latent: the items are VAE latents (utils/latents.py): channels and resolution are the latents',
        and samples are decoded by the VAE before they are scored.
    reference: where the published FID reference statistics come from, for a dataset scored only
        against them ("": computed from the training set and cached, utils/fid.py).
    """
    name: str
    channels: int
    resolution: int
    train_size: int   # items in the training split
    num_classes: int  # labelled classes (every dataset here has labels)
    flip: bool        # horizontal flips keep an image in the data distribution (train.py's --flip overrides)
    quality: str
    open: Callable[[Path, bool, bool], ImageData]
    files: str        # what to put under --data_path
    latent: bool = False
    reference: str = ""

    @property
    def img_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.resolution, self.resolution)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,C,H,W] in 0..255 -> float32 in [-1, 1] (x / 127.5 - 1)."""
    return images.to(torch.float32) / 127.5 - 1


def _not_found(what: str, data_path: Path, files: str, download: bool, cause: Exception) -> FileNotFoundError:
    # Without a download attempt torchvision's own message ("use download=True") would only confuse.
    how = f"it could not be downloaded ({type(cause).__name__}: {cause})" if download else "download=False"
    return FileNotFoundError(
        f"{what} not found under {data_path} and {how}: "
        f"put {files} under {data_path}, or pass --data_path with the folder that holds them")


CIFAR10_FILES = "cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/)"


def _cifar10(root: Path, train: bool, download: bool) -> ImageData:
    """CIFAR-10's python batches (cifar-10-batches-py/data_batch_1..5, test_batch), read here; torchvision
    only downloads and extracts the archive (checking its checksum)."""
    folder = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    if not all((folder / name).is_file() for name in names):
        # An archive placed by hand is verified and extracted by the download path without any network.
        download = download or (root / "cifar-10-python.tar.gz").exists()
        try:
            if not download:
                raise FileNotFoundError(f"no {folder}")
            from torchvision.datasets import CIFAR10
            CIFAR10(str(root), train=train, download=True)
        except Exception as e:  # torchvision raises RuntimeError offline-missing, URLError/OSError on failed download
            raise _not_found("CIFAR-10", root, CIFAR10_FILES, download, e) from e
    images, labels = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            batch = pickle.load(f, encoding="latin1")  # the format's own serialisation
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(batch["labels"])
    return ImageData(torch.from_numpy(np.concatenate(images)), torch.tensor(labels))


MNIST_FILES = "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte(.gz)"


def _mnist(root: Path, train: bool, download: bool) -> ImageData:
    """MNIST as the release trains on it: PIL bilinear resize 28 -> 32, grey copied to 3 channels (DATASETS)."""
    from PIL import Image
    from torchvision.datasets import MNIST
    download = download or (root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").exists()
    try:
        mnist = MNIST(str(root), train=train, download=download)
    except Exception as e:
        raise _not_found("MNIST", root, MNIST_FILES, download, e) from e
    data = mnist.data.numpy()  # uint8 [N, 28, 28]
    channels, height, width = DATASETS["mnist"].img_shape
    resized = np.stack([np.asarray(Image.fromarray(im).resize((width, height), Image.Resampling.BILINEAR))
                        for im in data])
    images = torch.from_numpy(resized)[:, None].expand(-1, channels, -1, -1).contiguous()
    return ImageData(images, torch.as_tensor(mnist.targets))


def _digits(root: Path, train: bool, download: bool) -> ImageData:
    """scikit-learn's 8x8 digits (values 0..16) as uint8 [N,1,8,8] in 0..255, no upsampling, with their labels.

    train=True: the first 1500 images after a fixed permutation; train=False: the other 297.
    """
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = torch.round(torch.from_numpy(digits.images) * 255 / 16).to(torch.uint8)[:, None]
    order = torch.randperm(len(images), generator=make_generator(0, "digits-split"))
    rows = order[:DIGITS_TRAIN] if train else order[DIGITS_TRAIN:]
    return ImageData(images[rows].contiguous(), torch.from_numpy(digits.target).long()[rows])


IMAGENET_TRAIN = 1281167  # images in ILSVRC2012's training set
LATENT_FILES = "the folder that prepare_latents.py --out wrote (dataset.json and its shards)"
ADM_REFERENCES = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet"


def _latent_folder(name: str, image_resolution: int) -> Callable:
    """The loader of a latent entry: the folder --data_path as prepare_latents.py wrote it, checked against
    the entry's latent shape and number of classes."""
    def open_latents(root: Path, train: bool, download: bool):
        from utils.latents import DESCRIPTION_FILE, LatentDataset  # utils.latents imports this module

        spec = DATASETS[name]
        if not train:
            raise UserValueError(f"{name} has no held-out split: its FID reference is {spec.reference}")
        if not (root / DESCRIPTION_FILE).is_file():
            raise FileNotFoundError(
                f"no latents under {root} ({DESCRIPTION_FILE} missing: not made yet, or unfinished): encode the "
                f"images with prepare_latents.py --data_path IMAGENET/train --out FOLDER --resolution "
                f"{image_resolution} (run again to finish a folder), then pass --data_path FOLDER")
        data = LatentDataset(root)
        classes = len(data.description["classes"])
        if data.shape != spec.img_shape or classes > spec.num_classes:
            raise UserFileError(
                f"{root} holds latents {data.shape} of {classes} classes; {name} trains on {spec.img_shape} of at "
                f"most {spec.num_classes} ({image_resolution}px crops encoded by the SD VAE): pass --data_path "
                f"with such a folder, or the dataset that fits this one")
        return data
    return open_latents


# The one table of datasets. MNIST is trained as the release does: 32x32, grey copied to RGB.
# Only CIFAR-10 is flipped: a mirrored 2, 3, 4, 7 or 9 is not a digit; the MeanFlow and iMF code
# never mirror ImageNet (their latent datasets store no mirror and ignore their flip setting).
DATASETS = {
    "cifar10": DatasetSpec("cifar10", channels=3, resolution=32, train_size=50000, num_classes=10, flip=True,
                           quality="inception", open=_cifar10, files=CIFAR10_FILES),
    "mnist": DatasetSpec("mnist", channels=3, resolution=32, train_size=60000, num_classes=10, flip=False,
                         quality="inception", open=_mnist, files=MNIST_FILES),
    "digits": DatasetSpec("digits", channels=1, resolution=8, train_size=DIGITS_TRAIN, num_classes=10, flip=False,
                          quality="digits", open=_digits, files="nothing (the digits ship with scikit-learn)"),
    "imagenet256-latent": DatasetSpec(
        "imagenet256-latent", channels=4, resolution=32, train_size=IMAGENET_TRAIN, num_classes=1000, flip=False,
        quality="inception", open=_latent_folder("imagenet256-latent", 256), files=LATENT_FILES, latent=True,
        reference=f"ADM's reference batch VIRTUAL_imagenet256_labeled.npz ({ADM_REFERENCES}/256/"
                  f"VIRTUAL_imagenet256_labeled.npz)"),
    "imagenet512-latent": DatasetSpec(
        "imagenet512-latent", channels=4, resolution=64, train_size=IMAGENET_TRAIN, num_classes=1000, flip=False,
        quality="inception", open=_latent_folder("imagenet512-latent", 512), files=LATENT_FILES, latent=True,
        reference=f"ADM's reference batch VIRTUAL_imagenet512.npz ({ADM_REFERENCES}/512/VIRTUAL_imagenet512.npz)"),
}


def dataset_info(name: str) -> DatasetSpec:
    """The table entry of dataset `name`; UserValueError (a ValueError) naming the choices for an unknown one."""
    if name not in DATASETS:
        raise UserValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def open_dataset(name: str, data_path: str | Path = "./data", train: bool = True, download: bool = True) -> ImageData:
    """A dataset split with its labels. Raises FileNotFoundError naming the files to provide when it is
    missing and cannot be downloaded."""
    return dataset_info(name).open(Path(data_path), train, download)


def load_dataset(name: str, data_path: str | Path = "./data", train: bool = True,
                 download: bool = True) -> torch.Tensor:
    """All images of a dataset split as one uint8 tensor [N,C,H,W] in 0..255 (convert batches with to_float)."""
    return open_dataset(name, data_path, train, download).images


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
