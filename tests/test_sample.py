"""sample.py, training/sampling.py and utils/sampling.py: the authors' checkpoint layout loads and samples as
their code does; output independent of batching; user errors end in one line (utils/errors.py)."""

import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed
import torch.multiprocessing as mp
from PIL import Image

from conftest import free_port
import meanflow
import sample
from training.build import load_network
from training.sampling import sample_images
from utils.cli import parse_model_config
from utils.distributed import DistEnv, cleanup
from utils.errors import UserFileError, UserValueError, exit_on_user_error
from utils.images import image_grid
from utils.sampling import sample_noise, to_uint8

ROOT = Path(__file__).resolve().parents[1]


def test_to_uint8_rounds_like_edm():
    levels = torch.arange(256, dtype=torch.float32)
    assert torch.equal(to_uint8(levels / 127.5 - 1).long(), levels.long())
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0, (100.6 / 127.5) - 1])
    assert to_uint8(x).tolist() == [0, 0, 128, 255, 255, 101]


def test_sample_noise_depends_only_on_seed_and_index():
    full = sample_noise(3, torch.arange(6), (1, 2, 2))
    part = sample_noise(3, torch.tensor([4, 1]), (1, 2, 2))
    assert full.shape == (6, 1, 2, 2) and torch.equal(part, full[[4, 1]])
    assert not torch.equal(sample_noise(4, torch.arange(6), (1, 2, 2)), full)


def test_official_network_reproduces_reference_one_step_sample(fixtures_dir):
    path = fixtures_dir / "official_unet_small.pt"
    ref = torch.load(path, weights_only=True)
    expected = ref["outputs"]["sample_1step_net_ema1"]
    # With the stored config, and inferred from the weights alone as for the authors' checkpoints.
    for ckpt in (str(path), {"model": ref["model"]}):
        net = load_network(ckpt, ema="net_ema1")
        assert (net.in_channels, net.img_resolution) == (3, 32)
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
    net = load_network(ckpt, ema="net_ema1")
    x = to_uint8(meanflow.sample(net, sample_noise(3, torch.tensor([4]), (3, 32, 32)), steps=2))
    assert np.array_equal(a[4], x[0].permute(1, 2, 0).numpy())
    grid = Image.open(tmp_path / "g.png")
    assert grid.size == (3 * 34 + 2, 2 * 34 + 2)


def test_image_grid_enlarges_small_grey_images():
    images = torch.arange(4 * 64, dtype=torch.uint8).reshape(4, 1, 8, 8)
    grid = image_grid(images, nrow=2, padding=0)
    assert grid.size == (64, 64) and grid.mode == "RGB"
    assert np.asarray(grid)[:32, :32, 0].tolist() == np.kron(images[0, 0].numpy(), np.ones((4, 4))).tolist()


def test_cli_needs_an_output_and_parses_model_config(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sample.parse_args(["--ckpt", "x.pth"])
    assert "nothing to write" in capsys.readouterr().err
    assert parse_model_config('{"model_channels": 8}') == {"model_channels": 8}
    with pytest.raises(ValueError, match="model_config"):
        parse_model_config("[1, 2]")


def toy_net(z, t, h, aug_cond=None):
    return 0.5 * z - 0.3 * torch.tanh(z) * t.view(-1, 1, 1, 1)


def _sample_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        env = DistEnv(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"), backend="gloo")
        images = sample_images(toy_net, num_samples=7, img_shape=(1, 4, 4), seed=1, steps=2, batch_size=2,
                                      env=env)
        np.save(os.path.join(out_dir, f"rank{rank}.npy"), images.numpy())
    finally:
        cleanup()


@pytest.mark.slow
def test_two_processes_gather_the_single_process_samples(tmp_path):
    single = sample_images(toy_net, num_samples=7, img_shape=(1, 4, 4), seed=1, steps=2, batch_size=3)
    mp.spawn(_sample_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    assert np.array_equal(np.load(tmp_path / "rank0.npy"), single.numpy())
    assert np.array_equal(np.load(tmp_path / "rank1.npy"), single[4:].numpy())


# ---------------------------------------------------------------- user errors


@pytest.mark.parametrize("error", [UserValueError("bad --x\n  value"), UserFileError("damaged file"),
                                   FileNotFoundError("missing.pth"), PermissionError(13, "Permission denied")])
def test_user_errors_exit_with_one_line(error, capsys):
    with pytest.raises(SystemExit) as info, exit_on_user_error():
        raise error
    err = capsys.readouterr().err
    assert info.value.code == 1 and err.count("\n") == 1 and err.startswith("error: "), err
    assert isinstance(UserValueError("x"), ValueError) and isinstance(UserFileError("x"), RuntimeError)


@pytest.mark.parametrize("error", [TypeError("bug"), RuntimeError("bug"), ValueError("bug"), SystemExit(2)])
def test_other_exceptions_pass_through(error, capsys):
    with pytest.raises(type(error)), exit_on_user_error():
        raise error
    assert capsys.readouterr().err == ""


def _run_sample_main(argv: list[str], monkeypatch) -> None:
    """Run sample.py as `python sample.py ARGV` does, in this process."""
    monkeypatch.setattr(sys, "argv", ["sample.py"] + argv)
    runpy.run_path(str(ROOT / "sample.py"), run_name="__main__")


@pytest.mark.slow
def test_cli_user_error_prints_one_line_without_traceback(tmp_path):
    run = subprocess.run([sys.executable, "sample.py", "--ckpt", str(tmp_path / "missing.pth"), "--out",
                          str(tmp_path / "x.npz"), "--device", "cpu"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint") and "missing.pth" in lines[0], run.stderr


def test_cli_user_errors(fixtures_dir, tmp_path, monkeypatch, capsys):
    ckpt = str(fixtures_dir / "official_unet_small.pt")
    no_config = tmp_path / "no_config.pth"  # as the authors' files: weights only
    torch.save({"model": torch.load(ckpt, weights_only=True)["model"]}, no_config)
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(b"PK\x03\x04 half a checkpoint")
    (tmp_path / "file").write_text("x")
    common = ["--num_samples", "2", "--device", "cpu"]
    cases = [
        (["--ckpt", str(damaged), "--out", str(tmp_path / "a.npz")], "truncated or not a checkpoint"),
        (["--ckpt", ckpt, "--ema", "net_ema7", "--out", str(tmp_path / "a.npz")], "no network 'net_ema7'"),
        (["--ckpt", str(no_config), "--model_config", '{"channels": 3}', "--out", str(tmp_path / "a.npz")],
         "--model_config"),
        (["--ckpt", ckpt, "--ema", "net", "--out", str(tmp_path / "file" / "a.npz")], "not writable"),
        (["--ckpt", ckpt, "--ema", "net", "--grid", str(tmp_path / "grid.xyz")], "grid.xyz"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as info:
            _run_sample_main(argv + common, monkeypatch)
        err = capsys.readouterr().err.splitlines()  # a progress bar may come first
        assert info.value.code == 1 and err[-1].startswith("error: ") and message in err[-1], err
        assert sum("error" in line for line in err) == 1
    # Flags out of range are argparse's usage errors (exit 2).
    with pytest.raises(SystemExit) as info:
        _run_sample_main(["--ckpt", ckpt, "--out", str(tmp_path / "a.npz"), "--steps", "0"], monkeypatch)
    assert info.value.code == 2 and "--steps" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_programming_error_keeps_traceback(fixtures_dir, tmp_path):
    # A bug inside the sampler (here: a TypeError planted in training.sampling.generate) is not a user error.
    code = ("import runpy, sys, training.sampling\n"
            "def broken(*args, **kwargs):\n    raise TypeError('a bug, not a user error')\n"
            "training.sampling.generate = broken\n"
            "sys.argv = ['sample.py'] + sys.argv[1:]\n"
            "runpy.run_path('sample.py', run_name='__main__')\n")
    run = subprocess.run([sys.executable, "-c", code, "--ckpt", str(fixtures_dir / "official_unet_small.pt"),
                          "--out", str(tmp_path / "x.npz"), "--device", "cpu"], cwd=ROOT, capture_output=True,
                         text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert run.returncode != 0 and "Traceback" in run.stderr and "TypeError: a bug" in run.stderr, run.stderr
    assert "error: a bug" not in run.stderr


def test_class_conditional_checkpoint_writes_labels_and_class_rows(tmp_path):
    """Balanced labels (i % 10) under arr_1 by default, --class_labels cycled; sample i with label c is the
    network's sample of class c from noise (seed, i); the grid has one row per class."""
    from models.unet import SongUNet
    config = dict(img_resolution=8, in_channels=1, out_channels=1, label_dim=10, model_channels=4,
                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    torch.manual_seed(0)
    net = SongUNet(**config).eval()
    path = tmp_path / "cond.pth"
    torch.save({"model": {f"net.{k}": v for k, v in net.state_dict().items()}, "model_config": config}, path)
    common = ["--ckpt", str(path), "--num_samples", "25", "--device", "cpu", "--ema", "net"]
    sample.main(common + ["--out", str(tmp_path / "a.npz"), "--grid", str(tmp_path / "g.png"), "--grid_count", "20"])
    sample.main(common + ["--out", str(tmp_path / "b.npz"), "--class_labels", "3", "7"])
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a["arr_1"].tolist() == [i % 10 for i in range(25)]
    assert b["arr_1"].tolist() == [(3, 7)[i % 2] for i in range(25)]
    noise = sample_noise(0, torch.tensor([3, 4]), (1, 8, 8))
    expected = to_uint8(meanflow.sample(net, noise, labels=torch.tensor([3, 3])))
    assert np.array_equal(a["arr_0"][3], expected[0].permute(1, 2, 0).numpy())
    assert np.array_equal(b["arr_0"][4], expected[1].permute(1, 2, 0).numpy())
    width, height = Image.open(tmp_path / "g.png").size
    assert 4.5 * width < height < 5.5 * width  # 10 rows of 2
    with pytest.raises(UserValueError, match="0..9"):
        sample.main(common + ["--out", str(tmp_path / "c.npz"), "--class_labels", "10"])


# ---------------------------------------------------------------- iMF: guidance chosen at sampling time


def _imf_checkpoint(path: Path, **recorded) -> torch.nn.Module:
    """A checkpoint of ours holding a small iMF network (1 x 8 x 8, 10 classes; its constant-initialised
    parameters given noise so that the guidance inputs change u), with the guidance its run recorded."""
    from models.imf_dit import ImfDiT
    config = dict(img_resolution=8, in_channels=1, num_classes=10, patch_size=2, hidden_size=16, depth=2, num_heads=2,
                  aux_head_depth=1)
    torch.manual_seed(0)
    net = ImfDiT(**config)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    torch.save({"model": {f"net.{k}": v for k, v in net.state_dict().items()}, "network": "imf_dit",
                "model_config": config, "config": dict(arch="imf_dit", **recorded)}, path)
    return net.eval()


def test_an_imf_checkpoint_samples_with_its_guidance_and_each_of_a_sweep(tmp_path):
    """No flags: the guidance the run recorded; --omega 1 3: a file per setting, named after it, each the network's
    samples with those inputs (the interval still the recorded one)."""
    net = _imf_checkpoint(tmp_path / "imf.pth", omega=4.0, t_min=0.2, t_max=0.8)
    common = ["--ckpt", str(tmp_path / "imf.pth"), "--num_samples", "12", "--device", "cpu", "--ema", "net"]
    sample.main(common + ["--out", str(tmp_path / "a.npz")])
    sample.main(common + ["--out", str(tmp_path / "s.npz"), "--grid", str(tmp_path / "g.png"), "--omega", "1", "3"])
    noise, labels = sample_noise(0, torch.arange(12), (1, 8, 8)), torch.arange(12) % 10

    def expected(omega):
        return to_uint8(meanflow.sample(net, noise, labels=labels, omega=omega, t_min=0.2, t_max=0.8)).permute(0, 2, 3, 1)

    assert np.array_equal(np.load(tmp_path / "a.npz")["arr_0"], expected(4.0).numpy())
    for omega in (1, 3):
        assert np.array_equal(np.load(tmp_path / f"s_omega{omega}_0.2-0.8.npz")["arr_0"], expected(omega).numpy())
        assert (tmp_path / f"g_omega{omega}_0.2-0.8.png").is_file()
    assert not np.array_equal(expected(1.0).numpy(), expected(3.0).numpy())
    assert not (tmp_path / "s.npz").exists()


def test_guidance_flags_name_what_is_wrong(tmp_path):
    """A network without guidance inputs refuses them; an interval or scale no network trains on is refused."""
    from models.unet import SongUNet
    config = dict(img_resolution=8, in_channels=1, out_channels=1, label_dim=10, model_channels=4,
                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    torch.save({"model": {f"net.{k}": v for k, v in SongUNet(**config).state_dict().items()}, "model_config": config},
               tmp_path / "unet.pth")
    _imf_checkpoint(tmp_path / "imf.pth")
    out = ["--out", str(tmp_path / "x.npz"), "--num_samples", "2", "--device", "cpu", "--ema", "net"]
    with pytest.raises(UserValueError, match="--omega --t_max: guidance at sampling time is an input of iMF's network"):
        sample.main(["--ckpt", str(tmp_path / "unet.pth"), "--omega", "2", "--t_max", "0.5", *out])
    with pytest.raises(UserValueError, match=r"interval \[0.7, 0.6\]"):
        sample.main(["--ckpt", str(tmp_path / "imf.pth"), "--t_min", "0.7", "--t_max", "0.6", *out])
    with pytest.raises(UserValueError, match="omega 0.5: a guidance scale is >= 1"):
        sample.main(["--ckpt", str(tmp_path / "imf.pth"), "--omega", "0.5", *out])
    assert not (tmp_path / "x.npz").exists()
