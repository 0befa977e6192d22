"""Frechet Inception Distance: Inception features, reference-statistics cache, Frechet distance.

Protocol (EDM's): generated images are quantised to uint8 by rounding, fed to the Inception-v3
network of the TF FID code (torch-fidelity's port of it, 2048-d pool features), and
their mean and covariance are compared with those of the training set.

A feature extractor is any callable ``uint8 [B, 3, H, W] -> [B, D]``; an optional ``key``
attribute names it in the file name of cached reference statistics.
"""

import hashlib
import os
import re
import tempfile
from typing import Callable, Iterator

import numpy as np
import scipy.linalg
import torch
import torch.distributed

import meanflow
from utils.data import fold_seed, load_dataset

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"
WEIGHTS_ENV = "MEANFLOW_INCEPTION_WEIGHTS"

Extractor = Callable[[torch.Tensor], torch.Tensor]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (float, [B, C, H, W]) -> uint8 [B, C, H, W].

    Adding 128 rather than 127.5 before the truncating cast rounds to the nearest level (EDM).
    """
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def frechet_distance(mu1, sigma1, mu2, sigma2, *, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    d = |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).
    mu: [D]; sigma: [D, D] (numpy arrays or tensors).
    """
    mu1, mu2 = (np.asarray(_numpy(m), dtype=np.float64).reshape(-1) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(_numpy(s), dtype=np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"shapes do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}"
        )
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # A (near-)singular product: shift both covariances by eps * I, as the TF FID code does.
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    # Round-off leaves a tiny imaginary part on a matrix whose true square root is real.
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _numpy(x):
    return x.detach().cpu().numpy() if torch.is_tensor(x) else x


# ---------------------------------------------------------------- Inception weights and features


def _download(url: str, dst: str) -> None:
    """Fetch ``url`` to ``dst`` (torch.hub writes a temporary file and renames it)."""
    torch.hub.download_url_to_file(url, dst, progress=True)


def _missing_weights_message(reason: str) -> str:
    return (
        f"{reason}. FID needs the Inception-v3 weights file {WEIGHTS_FILE} (torch-fidelity's "
        f"'inception-v3-compat'). Download it from {WEIGHTS_URL} on a machine with network access, then "
        f"pass --inception_weights /path/to/{WEIGHTS_FILE} (evaluate.py), set {WEIGHTS_ENV}=/path/to/{WEIGHTS_FILE}, "
        f"or copy it to {default_weights_path()}"
    )


def default_weights_path() -> str:
    """Where torch.hub (and torch-fidelity) keep the weights: $TORCH_HOME/hub/checkpoints/."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILE)


def resolve_inception_weights(weights_path: str | None = None, *, download: bool = True) -> str:
    """Path of a local copy of the Inception weights.

    Order: ``weights_path``, then $MEANFLOW_INCEPTION_WEIGHTS, then the torch.hub cache; only when
    none gives a file (and ``download``) is the file fetched, into the torch.hub cache.
    """
    explicit = weights_path or os.environ.get(WEIGHTS_ENV)
    if explicit:
        if not os.path.isfile(explicit):
            raise FileNotFoundError(_missing_weights_message(f"Inception weights not found at {explicit}"))
        return explicit
    cached = default_weights_path()
    if os.path.isfile(cached):
        return cached
    if not download:
        raise FileNotFoundError(_missing_weights_message(f"Inception weights not found at {cached}"))
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    try:
        _download(WEIGHTS_URL, cached)
    except Exception as err:  # network errors come in many types (URLError, OSError, HTTPError, ...)
        raise RuntimeError(_missing_weights_message(f"could not download the Inception weights ({err})")) from err
    return cached


def file_digest(path: str, length: int = 8) -> str:
    """First ``length`` hex digits of the file's SHA-256 (torch.hub's naming convention)."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()[:length]


class InceptionFeatures:
    """2048-d pool features of the FID Inception-v3 (torch-fidelity 'inception-v3-compat').

    ``key`` ("inception-v3-compat-<sha256 prefix of the weights>") identifies the extractor in the
    names of cached reference statistics.
    """

    def __init__(self, weights_path: str | None = None, device: str | torch.device = "cpu", *, download: bool = True):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = resolve_inception_weights(weights_path, download=download)
        self.key = f"inception-v3-compat-{file_digest(path)}"
        self.device = torch.device(device)
        try:
            model = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048"], feature_extractor_weights_path=path
            )
        except Exception as err:  # unpickling and state-dict mismatches raise several types
            raise RuntimeError(
                f"could not load Inception weights from {path} ({err}); the file must be torch-fidelity's "
                f"{WEIGHTS_FILE} (download it from {WEIGHTS_URL})"
            ) from err
        self.model = model.to(self.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] (any H, W: resized to 299 inside) -> float32 [B, 2048]."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        return self.model(images.to(self.device))[0]


def extractor_key(extractor: Extractor) -> str:
    """Name of a feature extractor for cache keys: its ``key`` attribute, else its qualified name."""
    key = getattr(extractor, "key", None)
    if key is None:
        key = getattr(extractor, "__qualname__", type(extractor).__qualname__)
    return str(key)


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

    def all_reduce(self, dist=None) -> None:
        """Sum over the ranks of ``dist`` (a DistEnv; no-op for None or one process).

        Every rank must call this. A rank that saw no samples contributes zeros.
        """
        if dist is None or dist.world_size <= 1:
            return
        device = dist.device
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


def shard(num_items: int, dist=None) -> torch.Tensor:
    """Indices 0..num_items-1 of this rank's contiguous share (concatenated in rank order = all)."""
    indices = torch.arange(num_items)
    if dist is None or dist.world_size <= 1:
        return indices
    return indices.tensor_split(dist.world_size)[dist.rank]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True)


def _is_rank0(dist) -> bool:
    return dist is None or dist.rank == 0


def _all_ranks(flag: bool, dist=None) -> bool:
    """True when ``flag`` holds on every rank of ``dist``."""
    if dist is None or dist.world_size <= 1:
        return flag
    t = torch.tensor([int(flag)], device=dist.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def _on_every_rank(fn, dist=None):
    """Run ``fn`` and agree across ranks that it succeeded; if it raised on any rank, every rank
    raises, so none is left waiting in a collective (the failing rank re-raises its own error)."""
    error = None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks are told
        error, result = e, None
    if not _all_ranks(error is None, dist):
        if error is not None:
            raise error
        raise RuntimeError("another process failed while loading FID data (see its error above)")
    return result


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


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, *, key: str | None = None, count: int | None = None) -> None:
    """Write mu, sigma (EDM's .npz layout) plus our key and count, atomically (temp file + rename)."""
    extra = {} if key is None else {"key": np.array(key)}
    if count is not None:
        extra["count"] = np.array(count, dtype=np.int64)
    savez_atomic(path, mu=mu, sigma=sigma, **extra)


def savez_atomic(path: str, **arrays: np.ndarray) -> None:
    """np.savez to a temporary file beside `path`, then rename: a reader never sees half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_stats(path: str, *, key: str | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """(mu, sigma) from an .npz with keys mu, sigma (ours or EDM's reference files).

    With ``key``: returns None when the file records a different key (stale cache). A file
    without a key (e.g. EDM's cifar10-32x32.npz put there by hand) is trusted.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference statistics {path} not found; compute them with `python evaluate.py ref`")
    with np.load(path, allow_pickle=False) as f:
        if "mu" not in f or "sigma" not in f:
            raise RuntimeError(f"{path} is not a statistics file: it needs arrays 'mu' and 'sigma', has {list(f.keys())}")
        if key is not None and "key" in f and str(f["key"]) != key:
            return None
        return f["mu"].astype(np.float64), f["sigma"].astype(np.float64)


def dataset_stats(
    images: torch.Tensor,
    *,
    extractor: Extractor,
    dist=None,
    batch_size: int = 250,
    progress: bool = True,
    desc: str = "reference",
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the features of ``images`` ([N, C, H, W], uint8 or float in [-1, 1]).

    Each rank reads its share of the rows; the sums are combined over ranks.
    """
    stats = FeatureStats()
    indices = shard(images.shape[0], dist)
    with _progress(images.shape[0], desc, progress and _is_rank0(dist)) as bar:
        for batch in indices.split(batch_size):
            x = images[batch]
            stats.add_images(x if x.dtype == torch.uint8 else to_uint8(x), extractor)
            bar.update(len(batch) * (1 if dist is None else dist.world_size))
    stats.all_reduce(dist)
    return stats.mean_cov()


def reference_stats(
    dataset: str,
    *,
    data_path: str = "./data",
    split: str = "train",
    extractor: Extractor,
    cache_dir: str | None = None,
    dist=None,
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
    cached = _on_every_rank(lambda: load_stats(path, key=key) if os.path.isfile(path) else None, dist)
    # Every rank must take the same branch, or the collectives below would wait forever.
    if _all_ranks(cached is not None, dist):
        return cached
    # Rank 0 loads first (it may download), then the others read what it fetched. Each stage is
    # agreed on by all ranks, so a failure on one raises everywhere instead of stranding the rest.
    def load(download_now: bool):
        return load_dataset(dataset, data_path=data_path, train=split == "train", download=download_now)

    images = _on_every_rank(lambda: load(download) if _is_rank0(dist) else None, dist)
    images = _on_every_rank(lambda: images if _is_rank0(dist) else load(False), dist)
    mu, sigma = dataset_stats(
        images, extractor=extractor, dist=dist, batch_size=batch_size, progress=progress, desc=f"{dataset} {split}"
    )
    if _is_rank0(dist):
        save_stats(path, mu, sigma, key=key, count=images.shape[0])
    return mu, sigma


# ---------------------------------------------------------------- generated samples


def sample_noise(
    seed: int, indices: torch.Tensor, shape: tuple[int, ...], device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Noise [len(indices), *shape]; row k depends only on (seed, indices[k]).

    Drawn on the CPU from one generator per sample, so it is the same on every device, batch
    size and number of processes.
    """
    rows = []
    for i in torch.as_tensor(indices).reshape(-1).tolist():
        g = torch.Generator().manual_seed(fold_seed(seed, int(i)))
        rows.append(torch.randn(tuple(shape), generator=g))
    if not rows:
        return torch.empty((0, *shape), device=device)
    return torch.stack(rows).to(device)


@torch.no_grad()
def generate(
    net,
    indices: torch.Tensor,
    *,
    seed: int,
    img_shape: tuple[int, int, int],
    steps: int = 1,
    batch_size: int = 250,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (batch indices [b], uint8 images [b, C, H, W]) of the samples ``indices``.

    Sample i is ``meanflow.sample(net, sample_noise(seed, [i]), steps)`` quantised by ``to_uint8``.
    ``net`` should be in eval mode.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    for batch in torch.as_tensor(indices).split(batch_size):
        noise = sample_noise(seed, batch, img_shape, device)
        yield batch, to_uint8(meanflow.sample(net, noise, steps=steps))


def fid_of_network(
    net,
    *,
    ref: tuple[np.ndarray, np.ndarray],
    num_samples: int,
    batch_size: int = 250,
    img_shape: tuple[int, int, int],
    seed: int = 0,
    steps: int = 1,
    extractor: Extractor,
    device: str | torch.device = "cpu",
    dist=None,
    progress: bool = True,
) -> float:
    """FID of ``num_samples`` samples of ``net`` (``steps``-step MeanFlow sampler) against ``ref``.

    With ``dist`` (a DistEnv, every rank calls this) the samples are split over the ranks;
    ``batch_size`` is per rank. Noise is seeded per sample, so the value does not depend on
    batch size or world size (up to floating-point differences between kernels). The network
    is put in eval mode for the call.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples={num_samples} must be >= 2")
    was_training = getattr(net, "training", False)
    if was_training:
        net.eval()
    stats = FeatureStats()
    world = 1 if dist is None else dist.world_size
    try:
        with _progress(num_samples, f"FID {steps}-step", progress and _is_rank0(dist)) as bar:
            batches = generate(
                net, shard(num_samples, dist), seed=seed, img_shape=img_shape, steps=steps,
                batch_size=batch_size, device=device,
            )
            for batch, images in batches:
                stats.add_images(images, extractor)
                bar.update(len(batch) * world)
    finally:
        if was_training:
            net.train()
    stats.all_reduce(dist)
    mu, sigma = stats.mean_cov()
    return frechet_distance(mu, sigma, *ref)
