"""CUDA's float32 matmul and convolution settings for --precision (tf32, fp32, bf16)."""

import contextlib

import torch

PRECISIONS = ("tf32", "fp32", "bf16")


def apply_precision(precision: str) -> None:
    """CUDA's float32 matmul and convolution settings for --precision (no effect on CPU).

    bf16 keeps TF32 for what runs outside autocast (the loss arithmetic is elementwise).
    """
    tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The network's autocast dtype under --precision: bfloat16 for bf16, none otherwise."""
    return torch.bfloat16 if precision == "bf16" else None


@contextlib.contextmanager
def precision_settings(precision: str):
    """apply_precision(precision) for a block, then the settings that were in force before."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    apply_precision(precision)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])
