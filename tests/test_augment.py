import math

import pytest
import torch

from utils.augment import NUM_LABELS, AugmentPipe


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n=8, c=3, h=32, w=32, seed=0) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=gen(seed)) * 2 - 1


def zero_params(total: int) -> dict[str, torch.Tensor]:
    keys = ["xflip", "scale_w", "aniso_w", "aniso_r", "tx_w", "ty_w"]
    return {k: torch.zeros(total) for k in keys}


def blob(n, h=32, w=32, cx=15.5, cy=15.5, sx=3.0, sy=3.0) -> torch.Tensor:
    """Gaussian blobs [n, 1, h, w] centred at (cx, cy) pixels."""
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    img = torch.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))
    return img.expand(n, 1, h, w).contiguous()


def moments(img: torch.Tensor):
    """Centroid (x, y) and standard deviations (x, y) of non-negative images [n, 1, h, w], each [n]."""
    h, w = img.shape[2:]
    y, x = torch.meshgrid(torch.arange(h, dtype=img.dtype), torch.arange(w, dtype=img.dtype), indexing="ij")
    m = img[:, 0].clamp(min=0)
    mass = m.sum(dim=(1, 2))
    mx, my = (m * x).sum(dim=(1, 2)) / mass, (m * y).sum(dim=(1, 2)) / mass
    vx = (m * (x - mx[:, None, None]) ** 2).sum(dim=(1, 2)) / mass
    vy = (m * (y - my[:, None, None]) ** 2).sum(dim=(1, 2)) / mass
    return mx, my, vx.sqrt(), vy.sqrt()


def test_p_zero_is_identity():
    x = images()
    out, labels = AugmentPipe(p=0)(x, gen(0))
    assert torch.equal(out, x)
    assert labels.shape == (8, NUM_LABELS) and labels.dtype == torch.float32 and not labels.any()


def test_xflip_only_exact():
    x = images(n=32)
    pipe = AugmentPipe(p=1, xflip=1, scale=0, aniso=0, translate_frac=0)
    out, labels = pipe(x, gen(1))
    flipped = labels[:, 0] == 1
    assert 0 < flipped.sum() < 32
    assert torch.equal(out[flipped], x[flipped].flip(3))
    assert torch.equal(out[~flipped], x[~flipped])
    assert set(labels[:, 0].tolist()) <= {0.0, 1.0}
    assert not labels[:, 1:].any()  # transforms that are off leave their labels zero


def test_whole_pixel_translation_shifts_content_by_labelled_amount():
    x = images(n=2, seed=3)
    pipe = AugmentPipe(p=1)
    params = zero_params(2)
    # 0.25 * W * translate_frac_std = 1 pixel right; -0.5 * H * 0.125 = 2 pixels up.
    params["tx_w"] = torch.tensor([0.25, 0.0])
    params["ty_w"] = torch.tensor([-0.5, 0.0])
    out, labels = pipe.apply(x, params)
    assert torch.equal(labels[0], torch.tensor([0, 0, 0, 0, 0.25, -0.5]))
    # Content at (y, x) moves to (y - 2, x + 1); compare away from the reflected borders.
    assert torch.allclose(out[0, :, 4:-6, 4:-4], x[0, :, 6:-4, 3:-5], atol=1e-5)
    # The untransformed image in the same batch comes back to within the filters' rounding.
    assert torch.allclose(out[1], x[1], atol=3e-5)


def test_random_translation_moves_blob_by_label():
    x = blob(64).float()
    pipe = AugmentPipe(p=1, xflip=0, scale=0, aniso=0, translate_frac=1, translate_frac_std=0.05)
    out, labels = pipe(x, gen(4))
    mx, my, _, _ = moments(out.double())
    assert not labels[:, :4].any()
    assert torch.allclose(mx - 15.5, labels[:, 4].double() * 32 * 0.05, atol=0.02)
    assert torch.allclose(my - 15.5, labels[:, 5].double() * 32 * 0.05, atol=0.02)


def test_isotropic_and_anisotropic_scaling_known_answer():
    x = blob(3).float()
    pipe = AugmentPipe(p=1)
    params = zero_params(3)
    params["scale_w"] = torch.tensor([1.0, 0.0, 0.0])   # enlarge by 2**0.2
    params["aniso_w"] = torch.tensor([0.0, -1.0, 1.0])  # r = 0: x by 2**(0.2 w), y by its inverse
    params["aniso_r"] = torch.tensor([0.0, 0.0, math.pi / 2])  # r = pi/2: the axes swap roles
    out, labels = pipe.apply(x, params)
    _, _, sx, sy = moments(out.double())
    a = 2 ** 0.2
    # rtol: bilinear resampling widens a blob by ~0.2%; a wrong direction is off by ~15%.
    assert torch.allclose(sx, torch.tensor([3 * a, 3 / a, 3 / a], dtype=torch.float64), rtol=5e-3)
    assert torch.allclose(sy, torch.tensor([3 * a, 3 * a, 3 * a], dtype=torch.float64), rtol=5e-3)
    assert torch.allclose(labels[:, 1:4], torch.tensor([[1.0, 0, 0], [0, -1, 0], [0, 0, 1]]), atol=1e-6)


def test_same_seed_same_output_different_seed_differs():
    x = images(n=16)
    pipe = AugmentPipe(p=0.5)
    a, la = pipe(x, gen(5))
    b, lb = pipe(x, gen(5))
    c, lc = pipe(x, gen(6))
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(la, lc)


@pytest.mark.parametrize("p", [0.12, 0.6])
def test_slices_match_full_batch(p):
    x = images(n=24, seed=7)
    pipe = AugmentPipe(p=p)
    full, full_labels = pipe(x, gen(8))
    for offset in (0, 8, 16):
        part, part_labels = pipe(x[offset:offset + 8], gen(8), offset=offset, total=24)
        assert torch.equal(part_labels, full_labels[offset:offset + 8])
        assert torch.allclose(part, full[offset:offset + 8], atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_shape_and_dtype(dtype):
    x = images(n=4, c=1, h=16, w=24).to(dtype)
    out, labels = AugmentPipe(p=1)(x, gen(9))
    assert out.shape == x.shape and out.dtype == dtype
    assert labels.shape == (4, NUM_LABELS) and labels.dtype == torch.float32


def test_firing_frequencies_match_p():
    n, p = 20000, 0.12
    pipe = AugmentPipe(p=p)
    labels = pipe.labels(pipe.sample_params(n, gen(10)))

    def close(count, prob):
        return abs(count - n * prob) < 5 * math.sqrt(n * prob * (1 - prob))

    assert close(int((labels[:, 0] == 1).sum()), 0.5)  # xflip=1e8: always a fair coin
    assert close(int((labels[:, 1] != 0).sum()), p)
    aniso = (labels[:, 2] != 0) | (labels[:, 3] != 0)
    assert close(int(aniso.sum()), p)
    assert close(int(((labels[:, 4] != 0) & (labels[:, 5] != 0)).sum()), p)
    assert torch.equal(labels[:, 4] != 0, labels[:, 5] != 0)  # both offsets fire together
    # Among fired anisotropic scalings, half are axis-aligned (r = 0: the sine column is zero).
    fired = int(aniso.sum())
    axis_aligned = int((aniso & (labels[:, 3] == 0)).sum())
    assert abs(axis_aligned - fired / 2) < 5 * math.sqrt(fired / 4)
    # The scale draws are standard normal.
    assert abs(labels[labels[:, 1] != 0, 1].std().item() - 1) < 0.1


def test_identity_rows_return_input():
    x = images(n=64, seed=11)
    out, labels = AugmentPipe()(x, gen(12))
    still = ~labels[:, 1:].ne(0).any(dim=1)
    assert still.any() and not still.all()
    expected = torch.where(labels[:, 0].view(-1, 1, 1, 1) == 1, x.flip(3), x)
    assert torch.allclose(out[still], expected[still], atol=3e-5, rtol=0)
    # When no image of the batch moves, the resampling is skipped: exact.
    flips_only = AugmentPipe(p=1, scale=0, aniso=0, translate_frac=0)
    out, labels = flips_only(x, gen(12))
    assert torch.equal(out, torch.where(labels[:, 0].view(-1, 1, 1, 1) == 1, x.flip(3), x))


def test_validation():
    with pytest.raises(ValueError, match="p=1.5"):
        AugmentPipe(p=1.5)
    with pytest.raises(ValueError, match="p=-0.1"):
        AugmentPipe(p=-0.1)
    with pytest.raises(ValueError, match="yflip"):
        AugmentPipe(yflip=1)
    with pytest.raises(ValueError, match="rotate_frac"):
        AugmentPipe(rotate_frac=1)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        AugmentPipe()(torch.zeros(3, 32, 32), gen(0))
    with pytest.raises(ValueError, match="floating-point"):
        AugmentPipe()(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), gen(0))
    with pytest.raises(ValueError, match="total=8"):
        AugmentPipe()(images(n=4), gen(0), offset=6, total=8)
    with pytest.raises(ValueError, match="generator"):
        AugmentPipe()(images(n=4))


@pytest.mark.parametrize("pipe", [AugmentPipe(p=0), AugmentPipe(p=1, scale=0, aniso=0, translate_frac=0),
                                  AugmentPipe(p=1)], ids=["p0", "flips_only", "resampled"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_output_is_contiguous_on_every_branch(pipe, memory_format):
    """A compiled training step guards on its input's strides: all branches give the same ones."""
    x = images(n=8).to(memory_format=memory_format)
    out, labels = pipe(x, gen(13))
    assert out.is_contiguous() and out.stride() == images(n=8).stride()
    assert labels.is_contiguous()


def test_filters_run_without_cudnn_benchmark(monkeypatch):
    """The padded shape changes with the draws: no autotuning inside, the caller's setting after."""
    seen = []
    conv2d = torch.nn.functional.conv2d

    def record(*args, **kwargs):
        seen.append(torch.backends.cudnn.benchmark)
        return conv2d(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", record)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    AugmentPipe(p=1)(images(n=4), gen(14))
    assert seen == [False] * 4
    assert torch.backends.cudnn.benchmark is True

    def fail(*args, **kwargs):
        raise RuntimeError("conv failed")

    monkeypatch.setattr(torch.nn.functional, "conv2d", fail)
    with pytest.raises(RuntimeError, match="conv failed"):
        AugmentPipe(p=1)(images(n=4), gen(14))
    assert torch.backends.cudnn.benchmark is True
