"""bench.py keeps working on CPU, and its FLOP count agrees with an independent count."""

import json

import pytest
import torch

import bench


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
    import train
    from models.unet import SongUNet

    cfg = train.resolve_config(["--preset", "tiny", "--device", "cpu"])
    net = SongUNet(**train.unet_config(cfg, (1, 8, 8)))
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


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "0"])
    assert "--steps 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--baseline", "/nonexistent"])
    assert "Gsunshine/py-meanflow" in capsys.readouterr().err


def test_cifar10_forward_flops_equal_the_published_count():
    """42.4 GFLOP per image for the release's CIFAR-10 network (counted independently with the same
    torch counter on the authors' code); on the meta device this costs no compute."""
    from models.unet import CIFAR10_CONFIG, SongUNet

    with torch.device("meta"):
        net = SongUNet(**CIFAR10_CONFIG)
        x, t, aug = torch.randn(2, 3, 32, 32), torch.rand(2), torch.zeros(2, 6)
    per_image = bench.count_flops(lambda: net(x, t, t, aug)) / 2
    assert per_image == pytest.approx(42.4e9, rel=2e-3)
