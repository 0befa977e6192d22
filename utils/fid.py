"""Frechet Inception Distance: feature statistics, the reference-statistics cache, Frechet distance.

Protocol (EDM's): generated images are quantised to uint8 by rounding, fed to the Inception-v3
network of the TF FID code (utils/inception.py, 2048-d pool features), and their mean and
covariance are compared with those of the training set.

``env`` below is the process environment (a utils.distributed.DistEnv, every rank calls the
function) or None for a single process.
"""

import os
import re
import zipfile

import numpy as np
import torch
import torch.distributed

from utils.checkpoint import atomic_write
from utils.data import load_dataset
from utils.errors import UserFileError
from utils.inception import Extractor, extractor_key, resolve_inception_weights
from utils.sampling import shard, to_uint8


def frechet_distance(mu1, sigma1, mu2, sigma2, *, device: str | torch.device = "cpu") -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    d = |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).
    mu: [D]; sigma: [D, D] (numpy arrays or tensors), symmetric positive semi-definite. device: where
    the two eigendecompositions run (a GPU does D = 2048 in well under a second).

    tr (sigma1 sigma2)^(1/2) is the sum of the square roots of the eigenvalues of the symmetric
    matrix sigma1^(1/2) sigma2 sigma1^(1/2), which has the same eigenvalues as sigma1 sigma2. Two
    symmetric eigendecompositions replace scipy.linalg.sqrtm's Schur form of a general matrix:
    several times faster, and rank-deficient covariances (fewer samples than dimensions) need no
    offset, their round-off eigenvalues just below zero being clamped to zero.
    """
    mu1, mu2 = (_float64(m, device).reshape(-1) for m in (mu1, mu2))
    sigma1, sigma2 = (torch.atleast_2d(_float64(s, device)) for s in (sigma1, sigma2))
    d = mu1.numel()
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (d, d):
        raise ValueError(f"shapes do not match: mu1 {tuple(mu1.shape)}, sigma1 {tuple(sigma1.shape)}, "
                         f"mu2 {tuple(mu2.shape)}, sigma2 {tuple(sigma2.shape)}")
    w, v = torch.linalg.eigh(sigma1)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T
    product = root1 @ sigma2 @ root1
    tr_covmean = torch.linalg.eigvalsh((product + product.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2.0 * tr_covmean)


def _float64(x, device) -> torch.Tensor:
    return torch.as_tensor(x).detach().to(device=device, dtype=torch.float64)


# ---------------------------------------------------------------- statistics


class FeatureStats:
    """Running float64 count, sum [D] and sum of outer products [D, D] of feature vectors."""

    def __init__(self):
        self.count = 0
        self.sum: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None

    def add_images(self, images: torch.Tensor, extractor: Extractor) -> None:
        """Features of uint8 images [B, C, H, W]; grey (C = 1) images are repeated to 3 channels."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        self.add(extractor(images.contiguous()))

    def add(self, features: torch.Tensor) -> None:
        """features: [B, D]."""
        f = features.detach().to(torch.float64).reshape(features.shape[0], -1)
        if self.sum is None:
            self.sum = f.new_zeros(f.shape[1])
            self.outer = f.new_zeros(f.shape[1], f.shape[1])
        self.count += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def all_reduce(self, env=None) -> None:
        """Sum over the ranks of ``env`` (a DistEnv; no-op for None or one process).

        Every rank must call this. A rank that saw no samples contributes zeros.
        """
        if env is None or env.world_size <= 1:
            return
        device = env.device
        dim = torch.tensor([0 if self.sum is None else self.sum.numel()], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(dim, op=torch.distributed.ReduceOp.MAX)
        d = int(dim.item())
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=device)
        total = torch.zeros(d, dtype=torch.float64, device=device) if self.sum is None else self.sum.to(device)
        outer = torch.zeros(d, d, dtype=torch.float64, device=device) if self.outer is None else self.outer.to(device)
        for t in (count, total, outer):
            torch.distributed.all_reduce(t)
        self.count, self.sum, self.outer = int(count.item()), total, outer

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [D], sigma [D, D]) in float64; sigma is the unbiased (n - 1) covariance."""
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.count}")
        n = self.count
        mu = self.sum / n
        sigma = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True)


# ---------------------------------------------------------------- agreement between ranks


def is_rank0(env) -> bool:
    return env is None or env.rank == 0


def _all_ranks(flag: bool, env=None) -> bool:
    """True when ``flag`` holds on every rank of ``env``."""
    if env is None or env.world_size <= 1:
        return flag
    t = torch.tensor([int(flag)], device=env.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def from_rank0(value: float, env=None) -> float:
    """Rank 0's ``value`` on every rank of ``env``."""
    if env is None or env.world_size <= 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    torch.distributed.broadcast(t, src=0)
    return float(t.item())


def on_every_rank(fn, env=None):
    """Run ``fn`` and agree across ranks that it succeeded; if it raised on any rank, every rank
    raises, so none is left waiting in a collective (the failing rank re-raises its own error)."""
    error = None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks are told
        error, result = e, None
    if not _all_ranks(error is None, env):
        if error is not None:
            raise error
        raise UserFileError("another process failed while loading FID data (see its error above)")
    return result


# ---------------------------------------------------------------- Inception weights


def inception_weights(weights_path: str | None = None, *, env=None, download: bool = True) -> str:
    """Path of this rank's copy of the Inception weights file.

    The first process of each node (local rank 0) resolves it first (utils.inception.
    resolve_inception_weights, downloading into the node's torch.hub cache when it is missing and
    ``download``), then the node's other processes find the file it fetched: one download per node,
    so nodes need not share a cache (a path every node sees, --inception_weights or
    $MEANFLOW_INCEPTION_WEIGHTS, needs no download at all). A failure on any rank raises on every rank.
    """
    first = env is None or env.local_rank == 0
    path = on_every_rank(lambda: resolve_inception_weights(weights_path, download=download) if first else None, env)
    return on_every_rank(lambda: path if first else resolve_inception_weights(weights_path, download=False), env)


# ---------------------------------------------------------------- reference statistics


def reference_key(dataset: str, split: str, extractor: Extractor) -> str:
    """Cache key of reference statistics, also their file name (without .npz)."""
    raw = f"{dataset}-{split}-{extractor_key(extractor)}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", raw)


def reference_path(dataset: str, *, split: str = "train", extractor: Extractor, cache_dir: str | None = None,
                   data_path: str = "./data") -> str:
    """The cache file of reference statistics: <cache_dir>/<key>.npz, cache_dir defaulting to <data_path>/fid_refs."""
    cache_dir = cache_dir or os.path.join(data_path, "fid_refs")
    return os.path.join(cache_dir, reference_key(dataset, split, extractor) + ".npz")


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, *, key: str | None = None,
               count: int | None = None) -> None:
    """Write mu, sigma (EDM's .npz layout) plus our key and count, atomically."""
    extra = {} if key is None else {"key": np.array(key)}
    if count is not None:
        extra["count"] = np.array(count, dtype=np.int64)
    atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma, **extra), what="statistics file")


def load_stats(path: str, *, key: str | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """(mu, sigma) from an .npz with keys mu, sigma (ours or EDM's reference files).

    With ``key``: returns None when the file records a different key (stale cache). A file
    without a key (e.g. EDM's cifar10-32x32.npz put there by hand) is trusted.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference statistics {path} not found; compute them with `python evaluate.py ref`")
    try:
        f = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, zipfile.BadZipFile) as e:  # not NumPy's format, or a damaged file
        raise UserFileError(f"{path} is not a statistics file ({type(e).__name__}: {e}); give an .npz with "
                            f"arrays 'mu' and 'sigma', e.g. one written by `python evaluate.py ref --out`") from e
    if not isinstance(f, np.lib.npyio.NpzFile):  # a single-array .npy file
        raise UserFileError(f"{path} holds one array, not a statistics file; give an .npz with arrays 'mu' and 'sigma'")
    with f:
        if "mu" not in f or "sigma" not in f:
            raise UserFileError(f"{path} is not a statistics file: it needs arrays 'mu' and 'sigma', "
                                f"has {list(f.keys())}")
        if key is not None and "key" in f and str(f["key"]) != key:
            return None
        return f["mu"].astype(np.float64), f["sigma"].astype(np.float64)


def dataset_stats(
    images: torch.Tensor,
    *,
    extractor: Extractor,
    env=None,
    batch_size: int = 250,
    progress: bool = True,
    desc: str = "reference",
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the features of ``images`` ([N, C, H, W], uint8 or float in [-1, 1]).

    Each rank reads its share of the rows; the sums are combined over ranks.
    """
    stats = FeatureStats()
    indices = shard(images.shape[0], env)
    with progress_bar(images.shape[0], desc, progress and is_rank0(env)) as bar:
        for batch in indices.split(batch_size):
            x = images[batch]
            stats.add_images(x if x.dtype == torch.uint8 else to_uint8(x), extractor)
            bar.update(len(batch) * (1 if env is None else env.world_size))
    stats.all_reduce(env)
    return stats.mean_cov()


def reference_stats(
    dataset: str,
    *,
    data_path: str = "./data",
    split: str = "train",
    extractor: Extractor,
    cache_dir: str | None = None,
    env=None,
    batch_size: int = 250,
    download: bool = True,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Inception statistics (mu [D], sigma [D, D]) of a whole dataset split, cached.

    The cache file ``<cache_dir>/<dataset>-<split>-<extractor key>.npz`` (cache_dir defaults to
    ``<data_path>/fid_refs``) stores the key too, so a different dataset, split or extractor never
    reuses it. All ranks compute (sharded) and return the statistics; rank 0 writes the file.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} must be 'train' or 'test'")
    key = reference_key(dataset, split, extractor)
    path = reference_path(dataset, split=split, extractor=extractor, cache_dir=cache_dir, data_path=data_path)
    cached = on_every_rank(lambda: load_stats(path, key=key) if os.path.isfile(path) else None, env)
    # Every rank must take the same branch, or the collectives below would wait forever.
    if _all_ranks(cached is not None, env):
        return cached
    # Rank 0 loads first (it may download), then the others read what it fetched. Each stage is
    # agreed on by all ranks, so a failure on one raises everywhere instead of stranding the rest.
    def load(download_now: bool):
        return load_dataset(dataset, data_path=data_path, train=split == "train", download=download_now)

    images = on_every_rank(lambda: load(download) if is_rank0(env) else None, env)
    images = on_every_rank(lambda: images if is_rank0(env) else load(False), env)
    mu, sigma = dataset_stats(
        images, extractor=extractor, env=env, batch_size=batch_size, progress=progress, desc=f"{dataset} {split}"
    )
    if is_rank0(env):
        save_stats(path, mu, sigma, key=key, count=images.shape[0])
    return mu, sigma
