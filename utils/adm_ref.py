"""Reference statistics in the formats of other evaluation suites, and which reference a number was computed against.

ADM's reference batches (guided-diffusion's evaluator; for ImageNet 256x256
VIRTUAL_imagenet256_labeled.npz) hold `mu`, `sigma` (Inception pool features of the whole training
set), `mu_s`, `sigma_s` (its spatial features, for sFID) and `arr_0`, 10,000 images kept for
precision and recall. FID uses the stored `mu` and `sigma`: statistics of 10,000 images would be a
different (noisier, biased) reference. The MeanFlow authors' JAX code reads `ref_mu`, `ref_sigma`
(their README: statistics that follow ADM's); EDM's files and ours hold `mu`, `sigma`.
"""
import os
import zipfile
from dataclasses import dataclass

import numpy as np

from utils.errors import UserFileError


@dataclass(frozen=True)
class Reference:
    mu: np.ndarray     # [D] float64
    sigma: np.ndarray  # [D, D] float64
    kind: str          # "adm-reference-batch", "jax-ref-stats" or "stats"
    description: str   # one line: which file and which of its arrays


_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _npz_members(path: str) -> dict[str, tuple[int, ...]]:
    """{array name: shape} of an .npz file, read from the array headers only (arr_0 of ADM's
    ImageNet batch is 2 GB)."""
    try:
        with zipfile.ZipFile(path) as z:
            shapes = {}
            for name in z.namelist():
                if not name.endswith(".npy"):
                    continue
                with z.open(name) as f:
                    version = np.lib.format.read_magic(f)
                    if version not in _HEADER_READERS:
                        raise ValueError(f"{name}: .npy format version {version}")
                    shape, _, _ = _HEADER_READERS[version](f)
                shapes[name[:-4]] = shape
            return shapes
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise UserFileError(f"{path} is not an .npz file of reference statistics ({type(e).__name__}: {e}); "
                            f"give ADM's reference batch (e.g. VIRTUAL_imagenet256_labeled.npz) or a statistics "
                            f"file with arrays mu and sigma") from e


def _kind(path: str, members: dict) -> tuple[str, str, str, str]:
    """(kind, mu key, sigma key, description) of a statistics file."""
    name = os.path.basename(path)
    if "mu" in members and "arr_0" in members:
        n = members["arr_0"][0] if members["arr_0"] else 0
        return ("adm-reference-batch", "mu", "sigma",
                f"ADM reference batch {name}: its stored mu/sigma (Inception statistics of the whole training "
                f"set); its {n} images (arr_0) are not used for FID")
    if "ref_mu" in members:
        return ("jax-ref-stats", "ref_mu", "ref_sigma",
                f"statistics file {name} of the MeanFlow JAX code (ref_mu/ref_sigma)")
    if "mu" in members:
        return "stats", "mu", "sigma", f"statistics file {name} (mu/sigma)"
    raise UserFileError(f"{path} holds no reference statistics (arrays {sorted(members)}); give ADM's reference "
                        f"batch or a file with arrays mu and sigma (or ref_mu and ref_sigma)")


def describe_reference(path: str) -> str:
    """One line saying which statistics of `path` FID is computed against (reads no array)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference statistics {path} not found; pass --ref with an existing file")
    return _kind(path, _npz_members(path))[3]


def load_reference(path: str) -> Reference:
    """The FID reference in `path`: ADM's reference batch, the JAX code's ref_mu/ref_sigma file, or mu/sigma.

    Only the mean and covariance are read (not ADM's images).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference statistics {path} not found; pass --ref with an existing file")
    kind, mu_key, sigma_key, description = _kind(path, _npz_members(path))
    with np.load(path, allow_pickle=False) as f:
        mu, sigma = f[mu_key].astype(np.float64), f[sigma_key].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UserFileError(f"{path}: {mu_key} {mu.shape} and {sigma_key} {sigma.shape} are not a mean and covariance")
    return Reference(mu=mu, sigma=sigma, kind=kind, description=description)
