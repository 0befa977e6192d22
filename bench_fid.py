"""Time FID's Frechet distance (utils.fid.frechet_distance) beside the scipy.linalg.sqrtm formula it replaced.

    OMP_NUM_THREADS=1 python bench_fid.py                 # as under torchrun: one CPU thread
    python bench_fid.py --device cuda --samples 1000      # on a GPU; fewer samples than dimensions

Covariances of --samples random --dim-dimensional features (rank-deficient when samples <= dim),
as FID's Inception features give. Prints the seconds of each and their relative difference.
"""

import argparse
import platform
import time

import numpy as np
import scipy.linalg
import torch

from utils.fid import frechet_distance


def sqrtm_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The formula of the TF FID code: tr sqrtm(sigma1 sigma2), real part."""
    covmean = np.real(scipy.linalg.sqrtm(sigma1 @ sigma2))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def random_stats(rng: np.random.Generator, samples: int, dim: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    features = scale * rng.standard_normal((samples, dim)) + rng.standard_normal(dim)
    return features.mean(0), np.cov(features, rowvar=False)


def timed(fn, *args):
    """(fn(*args), seconds); frechet_distance returns a Python float, so a GPU has finished."""
    tic = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - tic


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=2048, help="feature dimension (Inception pool: 2048)")
    p.add_argument("--samples", type=int, default=5000, help="feature vectors per covariance")
    p.add_argument("--device", default="cpu", help="where frechet_distance runs: cpu or cuda")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    stats = (*random_stats(rng, args.samples, args.dim, 1.0), *random_stats(rng, args.samples, args.dim, 1.1))
    if args.device.startswith("cuda"):  # first call pays for CUDA's start and the solver's load
        frechet_distance(*stats, device=args.device)
    ours, t_ours = timed(lambda: frechet_distance(*stats, device=args.device))
    theirs, t_theirs = timed(sqrtm_distance, *stats)
    print(f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; dim {args.dim}, {args.samples} samples")
    print(f"eigh  ({args.device}): {t_ours:7.2f} s  FID {ours:.10g}")
    print(f"sqrtm (cpu): {t_theirs:7.2f} s  FID {theirs:.10g}")
    print(f"relative difference {abs(ours - theirs) / abs(theirs):.2e}, speed-up {t_theirs / t_ours:.1f}x")


if __name__ == "__main__":
    main()
