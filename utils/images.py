"""Images as files: grids (PNG) and .npz sample sets in the ADM/EDM evaluators' layout."""

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from utils.checkpoint import atomic_write
from utils.errors import UserFileError


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


def save_grid(path: str, images: torch.Tensor, nrow: int | None = None) -> None:
    """Write ``image_grid(images, nrow=nrow)`` to ``path``; the format follows the file extension (PNG, JPEG, ...)."""
    try:
        image_grid(images, nrow=nrow).save(path)
    except ValueError as err:  # PIL: an extension it has no writer for
        raise UserFileError(f"cannot write the grid {path} ({err}); give --grid a name ending in .png") from err
