"""bench.py keeps working on CPU, and its FLOP count agrees with an independent count."""

import dataclasses
import json
import types

import pytest
import torch

import bench
from models.unet import SongUNet
from training.config import TrainConfig
from utils import data as data_utils
from utils.errors import exit_on_user_error


def test_cpu_smoke_run_reports_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--preset", "tiny", "--steps", "2", "--warmup", "1", "--device", "cpu", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    ours = report["ours"]
    assert report["device"] == "cpu" and report["batch_size"] == 8
    assert ours["images_per_s"] > 0 and ours["ms_per_step"] > 0
    assert ours["images_per_s"] == pytest.approx(8 / (ours["ms_per_step"] / 1e3))
    flops = report["flops"]
    # A training step is a JVP (about two forwards) plus a backward (about two more): 3x to 6x a forward.
    assert 3 * flops["forward_per_image"] < flops["train_step_per_image"] < 6 * flops["forward_per_image"]


def test_forward_flops_match_an_independent_count_for_the_tiny_network():
    """The counter's convolution and matmul FLOPs equal 2*MACs summed by hand over the layers."""
    from models.networks import unet_config
    from models.unet import SongUNet

    net = SongUNet(**unet_config((1, 8, 8), model_channels=4, channel_mult=[1, 2], num_blocks=1,
                                 attn_resolutions=[4], use_edm_aug=True))
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    macs = []

    def conv_hook(module, inputs, output):
        w = module.weight
        macs.append(output.numel() * w[0].numel())

    hooks = [m.register_forward_hook(conv_hook) for m in net.modules()
             if type(m).__name__ in ("Conv2d", "Linear") and getattr(m, "weight", None) is not None]
    counted = bench.count_flops(lambda: net(x, t, t, torch.zeros(2, 6)))
    for h in hooks:
        h.remove()
    by_layers = 2 * sum(macs)
    # Attention's two matmuls and the resampling convolutions come on top of the weight layers.
    assert by_layers <= counted < 1.5 * by_layers


def test_fused_adam_trains_as_the_default_adam():
    """--fused_adam changes the implementation only: the same three steps give the same weights."""
    import train
    from training.build import build_trainer
    from training.step import train_step
    from utils.data import ImageData
    from utils.distributed import init_distributed

    cfg = train.resolve_config(["--preset", "tiny", "--device", "cpu", "--not_compile"])
    env = init_distributed("cpu")
    images = bench.synthetic_images(cfg, 64)
    default = build_trainer(cfg, env, data=ImageData(images, torch.zeros(64)))
    fused = build_trainer(cfg, env, data=ImageData(images, torch.zeros(64)), fused_adam=True)
    first = {k: v.clone() for k, v in default.model.net.state_dict().items()}
    assert fused.optimizer.defaults["fused"] and not default.optimizer.defaults["fused"]
    assert {k: v for k, v in fused.optimizer.defaults.items() if k not in ("fused", "foreach")} == \
        {k: v for k, v in default.optimizer.defaults.items() if k not in ("fused", "foreach")}
    for step in range(3):
        torch.testing.assert_close(train_step(fused, step)[0], train_step(default, step)[0], rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(default.model.state_dict().items(), fused.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(default.model.net.state_dict()["enc.8x8_conv.weight"], first["enc.8x8_conv.weight"])


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "0"])
    assert "--steps 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--baseline", "/nonexistent"])
    assert "Gsunshine/py-meanflow" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # before any of our own timing is spent
        bench.parse_args(["--preset", "tiny", "--baseline", "/nonexistent"])
    assert "32x32 RGB preset" in capsys.readouterr().err


@pytest.mark.slow
def test_user_error_prints_one_line_and_exits_non_zero():
    """A batch larger than the training set, from the command line: one `error:` line, no traceback."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "bench.py", "--preset", "tiny", "--device", "cpu", "--compile", "off",
                           "--batch_size", "2000", "--steps", "1", "--warmup", "1", "--no_flops"], cwd=root,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: global batch 2000"), done.stderr


def test_programming_error_keeps_its_traceback(monkeypatch):
    def broken(device):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(bench, "init_distributed", broken)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        with exit_on_user_error():
            bench.main(["--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1"])


def test_cifar10_forward_flops_equal_the_published_count():
    """42.4 GFLOP per image for the release's CIFAR-10 network (counted independently with the same
    torch counter on the authors' code); on the meta device this costs no compute."""
    from models.unet import CIFAR10_CONFIG, SongUNet

    with torch.device("meta"):
        net = SongUNet(**CIFAR10_CONFIG)
        x, t, aug = torch.randn(2, 3, 32, 32), torch.rand(2), torch.zeros(2, 6)
    per_image = bench.count_flops(lambda: net(x, t, t, aug)) / 2
    assert per_image == pytest.approx(42.4e9, rel=2e-3)


class _ReleaseLikeNet(SongUNet):
    """The release's calling convention: net(z, (t, h), aug_cond)."""

    def forward(self, x, times, aug_cond=None):
        return super().forward(x, times[0], times[1], aug_cond)


def sample_two_timesteps(args, num_samples, device):  # replaced by the check
    raise AssertionError("the numerics check must hand the release its (t, r)")


class _ReleaseLikeModel(torch.nn.Module):
    """A stand-in with the release's structure: `.net` and a loss that draws its own noise and times
    from this module's `torch.randn_like` and `sample_two_timesteps`."""

    def __init__(self, config, norm_p=0.75, norm_eps=1e-3):
        super().__init__()
        self.net, self.norm_p, self.norm_eps = _ReleaseLikeNet(**config), norm_p, norm_eps

    def forward_with_loss(self, x, aug_cond):
        e = torch.randn_like(x)
        t, r = sample_two_timesteps(None, x.shape[0], x.device)
        t, r = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
        z, v = (1 - t) * x + t * e, e - x
        u, dudt = torch.func.jvp(lambda z, t, r: self.net(z, (t.view(-1), (t - r).view(-1)), aug_cond),
                                 (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
        err = (u - (v - (t - r) * dudt).detach()).square().sum(dim=(1, 2, 3))
        return (err / (err.detach() + self.norm_eps) ** self.norm_p).mean()


@pytest.mark.parametrize("norm_p, equal", [(0.75, True), (0.5, False)])
def test_numerics_check_feeds_the_release_our_draws(norm_p, equal):
    """Against a model built like the release's, the check finds the same loss and gradients, and
    a different loss (another norm_p) shows up as a difference."""
    import train
    from models.networks import unet_config
    from training.build import build_method

    cfg = train.resolve_config(["--preset", "tiny", "--device", "cpu"])
    config = unet_config((3, 8, 8), model_channels=4, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                         dropout=0.0, use_edm_aug=True)
    gen = torch.Generator().manual_seed(0)
    batch = dict(x=torch.rand(3, 3, 8, 8, generator=gen) * 2 - 1, aug_cond=torch.randn(3, 6, generator=gen),
                 noise=torch.randn(3, 3, 8, 8, generator=gen), t=torch.tensor([0.9, 0.5, 0.3]),
                 r=torch.tensor([0.1, 0.5, 0.0]))
    check = dict(model_config=config, method=build_method(cfg), batch=batch, state=SongUNet(**config).state_dict())
    release = _ReleaseLikeModel(config, norm_p=norm_p)
    result = bench.compare_with_release(check, release, torch.device("cpu"))
    assert result["rows"] == 3
    if equal:
        assert result["loss_relative_error"] < 1e-6 and result["gradient_worst_relative_error"] < 1e-4, result
        # Run again on the same model (bench.py runs the check as run and in float32): no stale gradients.
        assert bench.compare_with_release(check, release, torch.device("cpu")) == result
    else:
        assert result["loss_relative_error"] > 1e-2 and result["gradient_median_relative_error"] > 1e-2, result
    # This module's names are put back.
    assert isinstance(torch, types.ModuleType)
    with pytest.raises(AssertionError, match="hand the release"):
        sample_two_timesteps(None, 1, "cpu")


@pytest.mark.slow
def test_benchmark_script_runs_its_rows_and_summarises(tmp_path):
    """benchmark.sh, with the tiny preset on CPU: each chosen row writes its JSON and log."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, ROWS="joint network_bf16 network_fused_adam", OMP_NUM_THREADS="1",
               BENCH_FLAGS="--preset tiny --device cpu --compile off --steps 2 --warmup 1")
    done = subprocess.run(["bash", str(root / "benchmark.sh"), "unused-release-dir", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for row, jvp_mode, precision, fused_adam in (("joint", "joint", "tf32", False),
                                                 ("network_bf16", "network", "bf16", False),
                                                 ("network_fused_adam", "network", "tf32", True)):
        report = json.loads((tmp_path / f"{row}.json").read_text())
        assert report["jvp_mode"] == jvp_mode and report["precision"] == precision
        assert report["fused_adam"] == fused_adam
        assert f"{row}: exit 0" in done.stdout
        assert any(line.startswith(row) and "img/s" in line for line in done.stdout.splitlines())
    # A row that fails (here: the release is not there, and there is no GPU) sets the exit code.
    env["ROWS"] = "side_by_side"
    failed = subprocess.run(["bash", str(root / "benchmark.sh"), str(tmp_path / "no-release"), str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1 and "side_by_side: exit 2" in failed.stdout
    assert "--baseline" in (tmp_path / "side_by_side.log").read_text()


def test_a_failing_part_is_reported_without_losing_the_rest(tmp_path, monkeypatch, capsys):
    def broken(trainer):
        raise RuntimeError("counter broke")

    monkeypatch.setattr(bench, "model_flops", broken)
    out = tmp_path / "bench.json"
    assert bench.main(["--preset", "tiny", "--steps", "1", "--warmup", "1", "--device", "cpu", "--json", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["errors"] == {"flops": "RuntimeError: counter broke"}
    assert report["flops"] == {} and report["ours"]["images_per_s"] > 0
    assert "FAILED flops: RuntimeError: counter broke" in capsys.readouterr().out


def test_dit_preset_runs_and_counts_its_step_as_run(tmp_path):
    """The DiT has no hand-written tangent path: no "needed" count, and no error for the lack of one."""
    out = tmp_path / "bench.json"
    assert bench.main(["--preset", "digits-dit", "--steps", "1", "--warmup", "1", "--device", "cpu",
                       "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert not report["errors"] and report["ours"]["ms_per_step"] > 0
    flops = report["flops"]
    assert "useful_train_step_per_image" not in flops
    # A guided step: the JVP and the backward (about 5 forwards) and the guidance's two forwards.
    assert 6 * flops["forward_per_image"] < flops["train_step_per_image"] < 8 * flops["forward_per_image"]


def test_synthetic_data_has_at_most_synthetic_rows(monkeypatch):
    """ImageNet-sized datasets (1.28M latents) are stood in for by SYNTHETIC_ROWS rows."""
    large = dataclasses.replace(data_utils.DATASETS["digits"], train_size=10**7, resolution=2)
    monkeypatch.setitem(data_utils.DATASETS, "digits", large)
    assert bench.synthetic_images(TrainConfig(dataset="digits")).shape == (bench.SYNTHETIC_ROWS, 1, 2, 2)
    assert bench.synthetic_images(TrainConfig(dataset="digits"), 8).shape == (8, 1, 2, 2)
