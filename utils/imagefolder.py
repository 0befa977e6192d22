"""Images of an ImageFolder tree (ROOT/<class>/<image>), listed as torchvision lists them, and ADM's centre crop.

The crop is the one of ADM (guided-diffusion), DiT and the MeanFlow authors' JAX code: halve the
image with a BOX filter while its short side is at least twice the target, resize with BICUBIC
so that the short side equals the target, then cut the centre square.
"""
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from utils.errors import UserFileError


def list_image_folder(root: str | Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(image path, class index)]) in torchvision ImageFolder's order.

    Classes are the sub-folders of `root` sorted by name (the wnids of ILSVRC2012, so index i is
    ImageNet class i); images are ImageFolder's files (IMG_EXTENSIONS, any case) in its walk order.
    Raises UserFileError naming `root` when it is missing, has no class folders or a class has no images.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    root = Path(root)
    layout = "expected ROOT/<class>/<image>.JPEG, e.g. the ILSVRC2012 train folder with one sub-folder per wnid"
    if not root.is_dir():
        raise UserFileError(f"image folder {root} not found: pass --data_path with the folder of class "
                            f"sub-folders ({layout})")
    try:
        classes, class_to_idx = find_classes(root)
        samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as e:  # torchvision's messages for no class folder / a class without images
        raise UserFileError(f"no images under {root}: {str(e).splitlines()[0]} ({layout})") from e
    return classes, samples


def files_digest(root: str | Path, samples: list[tuple[str, int]]) -> str:
    """SHA-256 of the image paths relative to `root` and their labels: identifies a listing."""
    sha = hashlib.sha256()
    for path, label in samples:
        sha.update(f"{os.path.relpath(path, root)}\t{label}\n".encode())
    return sha.hexdigest()


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop: PIL image (RGB) -> uint8 array [size, size, 3].

    The BOX halvings first (each averages 2 x 2 blocks exactly) keep the final BICUBIC step from
    aliasing on large images; the crop offset rounds down, so an odd surplus leaves one more
    column (row) on the right (bottom).
    """
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """The image at `path`, converted to RGB and centre-cropped: uint8 [3, size, size].

    Raises UserFileError naming the file when PIL cannot read it.
    """
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")  # also decodes: a truncated file fails here
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserFileError(f"cannot read image {path} ({type(e).__name__}: {e}); replace it with a readable "
                            f"copy and run the same command again (finished shards are kept)") from e
    return torch.tensor(center_crop_arr(rgb, size)).permute(2, 0, 1).contiguous()
