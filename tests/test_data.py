"""utils/data.py: in-memory datasets, offline errors, and randomness that only depends on (seed, keys)."""
import struct
from urllib.error import URLError

import numpy as np
import pytest
import torch

from utils.data import (batch_indices, fold_seed, load_dataset, make_generator, open_dataset, random_hflip,
                        steps_per_epoch, to_device, to_float)


def test_fold_seed_is_a_fixed_hash():
    # sha256 of "i1:0|s5:epoch|i1:3", first 8 bytes little-endian, top bit cleared.
    assert fold_seed(0, "epoch", 3) == 6217613437221794153
    assert fold_seed(1, 1) != fold_seed(1, "1")
    assert fold_seed(0, 12) != fold_seed(0, 1, 2)
    with pytest.raises(ValueError, match="int or str"):
        fold_seed(0, 1.5)


def test_make_generator_depends_only_on_keys():
    a = torch.rand(4, generator=make_generator(3, "step", 10))
    b = torch.rand(4, generator=make_generator(3, "step", 10))
    c = torch.rand(4, generator=make_generator(3, "step", 11))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_epoch_permutation_covers_each_item_once():
    n, batch = 103, 10
    steps = steps_per_epoch(n, batch)
    assert steps == 10  # the last 3 items of each epoch's order are dropped
    epochs = [torch.cat([batch_indices(5, e, n, batch, s) for s in range(steps)]) for e in range(2)]
    for seen in epochs:
        assert len(seen) == 100 and len(set(seen.tolist())) == 100 and 0 <= seen.min() and seen.max() < n
    assert not torch.equal(epochs[0], epochs[1])
    assert torch.equal(epochs[0], torch.cat([batch_indices(5, 0, n, batch, s) for s in range(steps)]))
    with pytest.raises(ValueError, match="out of range"):
        batch_indices(5, 0, n, batch, steps)


def test_rank_slices_concatenate_to_global_batch():
    world, global_batch = 4, 12
    full = batch_indices(0, 2, 50, global_batch, 3)
    local = global_batch // world
    assert torch.equal(torch.cat([full[r * local:(r + 1) * local] for r in range(world)]), full)


def test_hflip_rank_slice_equals_single_process():
    images = torch.arange(8 * 2 * 3 * 4, dtype=torch.float32).view(8, 2, 3, 4)
    whole = random_hflip(images, make_generator(0, "flip", 5))
    flipped = (whole != images).flatten(1).any(dim=1)
    assert 0 < flipped.sum() < 8  # some rows flipped, some not, for this seed
    assert torch.equal(whole[flipped], images[flipped].flip(-1))
    parts = [random_hflip(images[r * 2:(r + 1) * 2], make_generator(0, "flip", 5), offset=r * 2, total=8)
             for r in range(4)]
    assert torch.equal(torch.cat(parts), whole)


def test_to_float_range():
    x = to_float(torch.tensor([0, 255], dtype=torch.uint8))
    assert x.dtype == torch.float32 and x.tolist() == [-1.0, 1.0]


def test_digits_shapes_range_and_split():
    from sklearn.datasets import load_digits
    train, test = load_dataset("digits"), load_dataset("digits", train=False)
    assert train.shape == (1500, 1, 8, 8) and test.shape == (297, 1, 8, 8) and train.dtype == torch.uint8
    assert train.min() == 0 and train.max() == 255
    assert torch.equal(load_dataset("digits"), train)  # the split is fixed
    # Together the splits hold every original image exactly once.
    originals = torch.round(torch.from_numpy(load_digits().images) * 255 / 16).to(torch.uint8)
    assert sorted(torch.cat([train, test]).flatten(1).tolist()) == sorted(originals.flatten(1).tolist())
    # Labels follow the same rows: (image, label) pairs of both splits are the original pairs.
    labels = torch.cat([open_dataset("digits", train=True).labels, open_dataset("digits", train=False).labels])
    pairs = [row + [y] for row, y in zip(torch.cat([train, test]).flatten(1).tolist(), labels.tolist())]
    expected = [row + [y] for row, y in zip(originals.flatten(1).tolist(), load_digits().target.tolist())]
    assert sorted(pairs) == sorted(expected)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        load_dataset("svhn")


@pytest.mark.parametrize("download", [False, True])
def test_missing_cifar10_names_file_and_flag(tmp_path, monkeypatch, download):
    import torchvision.datasets.cifar as cifar

    def offline(*args, **kwargs):
        raise URLError("network is unreachable")
    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("cifar10", data_path=tmp_path, download=download)
    message = str(err.value)
    assert "cifar-10-python.tar.gz" in message and "--data_path" in message and str(tmp_path) in message
    assert ("unreachable" in message) == download


def test_missing_mnist_names_files(tmp_path, monkeypatch):
    import torchvision.datasets.mnist as mnist

    def offline(*args, **kwargs):
        raise URLError("network is unreachable")
    monkeypatch.setattr(mnist, "download_and_extract_archive", offline)
    with pytest.raises(FileNotFoundError, match=r"train,t10k.*--data_path"):
        load_dataset("mnist", data_path=tmp_path)


def _write_idx(path, array: np.ndarray) -> None:
    """The MNIST file format: magic (0, 0, ubyte=8, ndim), big-endian dims, then the bytes."""
    path.write_bytes(struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
                     + array.astype(np.uint8).tobytes())


def test_mnist_matches_release_transform(tmp_path):
    from PIL import Image
    from torchvision.transforms.v2 import Compose, Grayscale, Resize, ToDtype, ToImage
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    digits = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28))
    for split in ("train", "t10k"):  # torchvision checks that both splits are present
        _write_idx(raw / f"{split}-images-idx3-ubyte", digits)
        _write_idx(raw / f"{split}-labels-idx1-ubyte", np.array([1, 2, 3]))
    split = open_dataset("mnist", data_path=tmp_path, train=False, download=False)
    ours = split.images
    assert ours.shape == (3, 3, 32, 32) and ours.dtype == torch.uint8
    assert split.labels.tolist() == [1, 2, 3] and split.labels.dtype == torch.long
    # The release's pipeline gives floats k/255 of the same uint8 values.
    release = Compose([Resize((32, 32)), Grayscale(num_output_channels=3), ToImage(),
                       ToDtype(torch.float32, scale=True)])
    expected = torch.stack([release(Image.fromarray(d.astype(np.uint8), mode="L")) for d in digits])
    assert torch.equal(ours, (expected * 255).round().to(torch.uint8))


def test_to_device_pins_a_contiguous_source(monkeypatch):
    """Pinned memory keeps a view's strides, and copying a non-contiguous pinned tensor stages it
    through pageable memory (a blocking copy). Pinning needs a CUDA driver: record it instead."""
    pinned = []

    class Pinned:
        def __init__(self, src):
            self.src = src

        def to(self, device, non_blocking=False):
            return self.src, torch.device(device), non_blocking

    def record(self):
        pinned.append(self)
        return Pinned(self)

    monkeypatch.setattr(torch.Tensor, "pin_memory", record)
    theta = torch.arange(36.0).view(4, 3, 3)[:, :2, :]  # the augmentation's affine matrices
    assert not theta.is_contiguous()
    src, device, non_blocking = to_device(theta, "cuda")
    assert src.is_contiguous() and torch.equal(src, theta)
    assert device == torch.device("cuda") and non_blocking
    assert to_device(theta, "cpu") is theta and len(pinned) == 1  # no pinning for a host target


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_device_copies_views_to_cuda():
    theta = torch.arange(36.0).view(4, 3, 3)[:, :2, :]
    assert torch.equal(to_device(theta, "cuda").cpu(), theta)


def test_cifar10_python_batches_load_with_their_labels(tmp_path):
    """CIFAR-10's own format: pickled dicts of 'data' (rows of 1024 red, 1024 green, 1024 blue bytes) and
    'labels', five training batches in order, then test_batch."""
    import pickle
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = dict(data=rng.integers(0, 256, size=(2, 3072), dtype=np.uint8),
                             labels=rng.integers(0, 10, size=2).tolist())
        with open(folder / name, "wb") as f:
            pickle.dump(batches[name], f)
    train = open_dataset("cifar10", data_path=tmp_path, train=True, download=False)
    assert train.images.shape == (10, 3, 32, 32) and len(train) == 10 and train.shape == (3, 32, 32)
    first = batches["data_batch_1"]["data"][1]
    assert torch.equal(train.images[1, 2], torch.from_numpy(first[2048:].reshape(32, 32)))  # blue plane, row-major
    assert train.labels.tolist() == sum((batches[f"data_batch_{i}"]["labels"] for i in range(1, 6)), [])
    test = open_dataset("cifar10", data_path=tmp_path, train=False, download=False)
    assert test.labels.tolist() == batches["test_batch"]["labels"] and len(test) == 2


def test_image_data_batch_flips_with_the_keyed_coin_of_the_global_batch():
    """ImageData.batch: the rows' images in [-1, 1], mirrored where the global batch's coin says so."""
    from utils.data import ImageData
    images = torch.randint(0, 256, (6, 1, 2, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = ImageData(images, torch.arange(6))
    idx = torch.tensor([5, 0, 3, 1])
    whole = data.batch(idx, generator=lambda p: make_generator(0, p), rows=slice(0, 4), total=4, flip=True,
                       device="cpu")
    expected = random_hflip(to_float(images[idx]), make_generator(0, "flip"))
    assert torch.equal(whole, expected)
    part = data.batch(idx[2:], generator=lambda p: make_generator(0, p), rows=slice(2, 4), total=4, flip=True,
                      device="cpu")
    assert torch.equal(part, whole[2:])
    assert torch.equal(data.batch(idx, generator=None, rows=slice(0, 4), total=4, flip=False, device="cpu"),
                       to_float(images[idx]))
