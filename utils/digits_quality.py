"""A quality figure for generated 8x8 digits (the CPU quickstart), with real digits for scale.

A small scikit-learn MLP classifier (64 ReLU units) is trained on the training split of
scikit-learn's digits, the images `utils.data.load_dataset("digits")` returns. A set of images
is scored by
    fd          Frechet distance between its hidden-layer features and the training digits'
                (the FID recipe with a digit classifier in place of Inception; lower is better)
    confidence  mean top-class probability (blurry or malformed digits score low)
    classes     effective number of classes, exp(entropy of the predicted-class histogram);
                10 when all digits are equally frequent, lower when the model drops some
    label_accuracy  (for images with requested labels, a class-conditional model) the fraction
                the classifier assigns to their requested label
The held-out real digits, scored the same way with as many samples, show what "good" reads as.
"""

import functools
import warnings

import numpy as np
import torch

from utils.data import dataset_info, open_dataset
from utils.fid import frechet_distance
from utils.sampling import to_uint8


def _pixels(images: torch.Tensor) -> np.ndarray:
    """uint8 [N,1,8,8] or float in [-1, 1] -> float64 [N, 64] in [0, 1] (generated images quantised like data)."""
    if images.dtype != torch.uint8:
        images = to_uint8(images.detach().float().cpu())
    return images.reshape(len(images), -1).cpu().numpy().astype(np.float64) / 255.0


@functools.lru_cache(maxsize=2)
def _fitted_classifier(seed: int, hidden: int):
    """The classifier, fitted once per process and settings (a few seconds; it only predicts afterwards)."""
    from sklearn.neural_network import MLPClassifier
    train_split = open_dataset("digits", train=True)
    classifier = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=150, random_state=seed)
    with warnings.catch_warnings():  # 150 epochs reach ~97% held-out accuracy; ignore "not converged"
        warnings.simplefilter("ignore")
        classifier.fit(_pixels(train_split.images), train_split.labels.numpy())
    return classifier


class DigitsQuality:
    """Scores sets of 8x8 digit images against the training digits (see the module docstring)."""

    def __init__(self, seed: int = 0, hidden: int = 64):
        train_split, held_out = open_dataset("digits", train=True), open_dataset("digits", train=False)
        train = _pixels(train_split.images)
        self.held_out = held_out.images
        self.count = len(self.held_out)
        self.classifier = _fitted_classifier(seed, hidden)
        self.accuracy = float(self.classifier.score(_pixels(self.held_out), held_out.labels.numpy()))
        hidden_train = self._hidden(train)
        # Units that never fire on the data would make the covariances singular.
        self.live = hidden_train.std(axis=0) > 1e-6
        features = hidden_train[:, self.live]
        self.ref = features.mean(axis=0), np.cov(features, rowvar=False)

    def _hidden(self, pixels: np.ndarray) -> np.ndarray:
        return np.maximum(pixels @ self.classifier.coefs_[0] + self.classifier.intercepts_[0], 0.0)

    def features(self, pixels: np.ndarray) -> np.ndarray:
        """Activations [N, D] of the hidden units that fire on the training digits; pixels [N, 64] in [0, 1]."""
        return self._hidden(pixels)[:, self.live]

    def score(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        """dict(fd, confidence, classes, count) of images [N,1,8,8] (uint8, or float in [-1, 1]); N >= 2.

        labels: the classes [N] the images were generated for; adds label_accuracy.
        """
        pixels = _pixels(images)
        features = self.features(pixels)
        with warnings.catch_warnings():  # units silent on a poor sample set make its covariance singular
            warnings.simplefilter("ignore")
            fd = frechet_distance(features.mean(axis=0), np.cov(features, rowvar=False), *self.ref)
        probs = self.classifier.predict_proba(pixels)
        hist = np.bincount(probs.argmax(axis=1), minlength=dataset_info("digits").num_classes) / len(probs)
        entropy = -(hist[hist > 0] * np.log(hist[hist > 0])).sum()
        result = dict(fd=float(fd), confidence=float(probs.max(axis=1).mean()), classes=float(np.exp(entropy)),
                      count=len(images))
        if labels is not None:
            result["label_accuracy"] = float((probs.argmax(axis=1) == np.asarray(labels).reshape(-1)).mean())
        return result

    def real_score(self) -> dict:
        """The same figures for the held-out real digits (the classifier never saw them)."""
        return self.score(self.held_out)
