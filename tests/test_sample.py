"""sample.py: the authors' checkpoint layout loads and samples as their code does; output independent of batching."""

import os

import numpy as np
import pytest
import torch
import torch.distributed
import torch.multiprocessing as mp
from PIL import Image

from conftest import free_port
import meanflow
import sample
from utils.distributed import DistEnv, cleanup
from utils.fid import sample_noise, to_uint8


def test_official_network_reproduces_reference_one_step_sample(fixtures_dir):
    path = fixtures_dir / "official_unet_small.pt"
    ref = torch.load(path, weights_only=True)
    expected = ref["outputs"]["sample_1step_net_ema1"]
    # With the stored config, and inferred from the weights alone as for the authors' checkpoints.
    for ckpt in (str(path), {"model": ref["model"]}):
        net, shape = sample.load_model(ckpt, ema="net_ema1")
        assert shape == (3, 32, 32)
        out = meanflow.sample(net, ref["inputs"]["noise"], steps=1)
        rel = (out - expected).norm() / expected.norm()
        assert rel < 1e-4, f"relative error {rel:.2e}"


def test_cli_output_does_not_depend_on_batch_size(fixtures_dir, tmp_path):
    ckpt = str(fixtures_dir / "official_unet_small.pt")
    common = ["--ckpt", ckpt, "--num_samples", "5", "--ema", "net_ema1", "--steps", "2", "--seed", "3",
              "--device", "cpu"]
    sample.main(common + ["--batch_size", "2", "--out", str(tmp_path / "a.npz"), "--grid", str(tmp_path / "g.png")])
    sample.main(common + ["--batch_size", "5", "--out", str(tmp_path / "b.npz")])
    a, b = (np.load(tmp_path / f"{n}.npz")["arr_0"] for n in "ab")
    assert a.shape == (5, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    # Sample i is the sampler applied to the noise of (seed, i).
    net, shape = sample.load_model(ckpt, ema="net_ema1")
    x = to_uint8(meanflow.sample(net, sample_noise(3, torch.tensor([4]), shape), steps=2))
    assert np.array_equal(a[4], x[0].permute(1, 2, 0).numpy())
    grid = Image.open(tmp_path / "g.png")
    assert grid.size == (3 * 34 + 2, 2 * 34 + 2)


def test_image_grid_enlarges_small_grey_images():
    images = torch.arange(4 * 64, dtype=torch.uint8).reshape(4, 1, 8, 8)
    grid = sample.image_grid(images, nrow=2, padding=0)
    assert grid.size == (64, 64) and grid.mode == "RGB"
    assert np.asarray(grid)[:32, :32, 0].tolist() == np.kron(images[0, 0].numpy(), np.ones((4, 4))).tolist()


def test_cli_needs_an_output_and_parses_model_config(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sample.parse_args(["--ckpt", "x.pth"])
    assert "nothing to write" in capsys.readouterr().err
    assert sample.parse_model_config('{"model_channels": 8}') == {"model_channels": 8}
    with pytest.raises(ValueError, match="model_config"):
        sample.parse_model_config("[1, 2]")


def toy_net(z, t, h, aug_cond=None):
    return 0.5 * z - 0.3 * torch.tanh(z) * t.view(-1, 1, 1, 1)


def _sample_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        dist = DistEnv(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"), backend="gloo")
        images = sample.sample_images(toy_net, num_samples=7, img_shape=(1, 4, 4), seed=1, steps=2, batch_size=2,
                                      dist=dist)
        np.save(os.path.join(out_dir, f"rank{rank}.npy"), images.numpy())
    finally:
        cleanup()


def test_two_processes_gather_the_single_process_samples(tmp_path):
    single = sample.sample_images(toy_net, num_samples=7, img_shape=(1, 4, 4), seed=1, steps=2, batch_size=3)
    mp.spawn(_sample_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    assert np.array_equal(np.load(tmp_path / "rank0.npy"), single.numpy())
    assert np.array_equal(np.load(tmp_path / "rank1.npy"), single[4:].numpy())
