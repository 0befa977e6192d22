"""The FID feature extractor: Inception-v3 of the TF FID code (torch-fidelity's port), and its weights file.

A feature extractor is any callable ``uint8 [B, 3, H, W] -> [B, D]``; an optional ``key``
attribute names it in the file name of cached reference statistics.
"""

import hashlib
import os
import socket
from typing import Callable

import torch

from utils.errors import UserFileError

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"
WEIGHTS_ENV = "MEANFLOW_INCEPTION_WEIGHTS"

Extractor = Callable[[torch.Tensor], torch.Tensor]


def _download(url: str, dst: str) -> None:
    """Fetch ``url`` to ``dst`` (torch.hub writes a temporary file and renames it)."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # an unreachable host must not hang the start of a run
    try:
        torch.hub.download_url_to_file(url, dst, progress=True)
    finally:
        socket.setdefaulttimeout(old)


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
        raise UserFileError(_missing_weights_message(f"could not download the Inception weights ({err})")) from err
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

    OUTPUTS = ["2048"]  # torch-fidelity's names of what one forward returns; the pool features first

    def __init__(self, weights_path: str | None = None, device: str | torch.device = "cpu", *, download: bool = True):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = resolve_inception_weights(weights_path, download=download)
        self.key = f"inception-v3-compat-{file_digest(path)}"
        self.device = torch.device(device)
        try:
            model = FeatureExtractorInceptionV3(
                "inception-v3-compat", self.OUTPUTS, feature_extractor_weights_path=path
            )
        except Exception as err:  # unpickling and state-dict mismatches raise several types
            raise UserFileError(
                f"could not load Inception weights from {path} ({err}); the file must be torch-fidelity's "
                f"{WEIGHTS_FILE} (download it from {WEIGHTS_URL})"
            ) from err
        self.model = model.to(self.device)

    @torch.no_grad()
    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        return self.model(images.to(self.device))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] (any H, W: resized to 299 inside) -> float32 [B, 2048]."""
        return self._forward(images)[0]


def extractor_key(extractor: Extractor) -> str:
    """Name of a feature extractor for cache keys: its ``key`` attribute, else its qualified name."""
    key = getattr(extractor, "key", None)
    if key is None:
        key = getattr(extractor, "__qualname__", type(extractor).__qualname__)
    return str(key)


# ---------------------------------------------------------------- pool features and logits, Inception Score


class InceptionFeaturesLogits(InceptionFeatures):
    """The pool features and the 1008 class logits of one forward pass of the FID Inception-v3.

    Called, it gives the 2048-d pool features, identical to InceptionFeatures' and under the same
    ``key`` (cached reference statistics stay valid); ``features_and_logits`` also gives the logits
    that the Inception Score reads: torch-fidelity's 'logits_unbiased', the pool features times the
    classifier's weights without its bias, which is what ADM's evaluator and the original TF
    Inception Score code use.
    """

    OUTPUTS = ["2048", "logits_unbiased"]

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B, 3, H, W] (resized to 299 inside) -> (float32 [B, 2048], float32 [B, 1008])."""
        features, logits = self._forward(images)
        return features, logits


def inception_score(scores, splits: int = 10, *, probabilities: bool = False) -> tuple[float, float]:
    """Inception Score (mean, std over `splits`) of class logits [N, K] (or probabilities with probabilities=True).

    IS = exp(E_x KL(p(y|x) || p(y))), p(y) the mean prediction of a split. Split i holds rows
    i N / splits .. (i + 1) N / splits - 1 in the given order, which for N = 50,000 are ADM's
    consecutive splits of 5,000 (torch-fidelity shuffles the rows first, with seed 2020). Float64;
    the std is over splits (ddof 0), as torch-fidelity reports it; ADM prints the mean only.
    """
    p = torch.as_tensor(scores).to(torch.float64)
    if p.dim() != 2 or p.shape[0] < splits or splits < 1:
        raise ValueError(f"need [N, K] scores with N >= splits >= 1, got {tuple(p.shape)} and splits={splits}")
    if not probabilities:
        p = p.softmax(dim=1)
    n = p.shape[0]
    per_split = []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        marginal = part.mean(dim=0, keepdim=True)
        # xlogy: 0 log 0 = 0, for probabilities that are exactly 0
        kl = (torch.special.xlogy(part, part) - torch.special.xlogy(part, marginal)).sum(dim=1).mean()
        per_split.append(kl.exp())
    values = torch.stack(per_split)
    return float(values.mean()), float(values.std(correction=0))
