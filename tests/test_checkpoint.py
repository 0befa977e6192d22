"""utils/checkpoint.py: atomic writes, safe loading; models/networks.py and training/build.py: rebuilding
the authors' networks from weights."""
import argparse
import inspect
import re
import time

import pytest
import torch

import utils.checkpoint as ckpt_io
from models.unet import CIFAR10_CONFIG, SongUNet
from models.networks import infer_unet_config
from training.build import available_networks, load_network
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.errors import UserError, UserFileError


class NotAllowed:
    """A class no checkpoint should need: loading it requires trusted=True."""


def _edm_defaults() -> dict:
    params = inspect.signature(SongUNet.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _plain(config: dict) -> dict:
    """Tuples as lists so that configs compare by value."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def _sub(model: dict, name: str) -> dict:
    return {k[len(name) + 1:]: v for k, v in model.items() if k.startswith(name + ".")}


def test_round_trip(tmp_path):
    state = {"model": {"w": torch.arange(6.0).view(2, 3)}, "step": 12, "config": {"lr": 1e-4, "name": "x"}}
    save_checkpoint(state, tmp_path / "sub" / "ckpt.pth")
    loaded = load_checkpoint(tmp_path / "sub" / "ckpt.pth")
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["step"] == 12
    assert loaded["config"] == state["config"]
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["ckpt.pth"]


def test_crash_mid_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-last.pth"
    save_checkpoint({"step": 1}, path)
    real_save = torch.save

    def half_then_fail(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(RuntimeError, match="No space left.*unchanged"):
        save_checkpoint({"step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-last.pth"]


def test_unwritable_folder(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-last.pth"
    save_checkpoint({"step": 1}, path)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(ckpt_io, "open", denied, raising=False)  # shadows the builtin inside the module only
    with pytest.raises(RuntimeError, match=f"{re.escape(str(tmp_path))} is not writable"):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-last.pth"]


def test_folder_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RuntimeError, match="not writable"):
        save_checkpoint({"step": 1}, tmp_path / "file" / "ckpt.pth")


def test_atomic_write_is_the_writer_of_statistics_and_samples(tmp_path, monkeypatch):
    import numpy as np

    from utils.fid import load_stats, save_stats
    from utils.images import save_npz

    path = tmp_path / "stats.npz"
    save_stats(str(path), np.zeros(3), np.eye(3), key="k")

    def half_then_fail(f, **arrays):
        f.write(b"PK\x03\x04 half a file")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(np, "savez", half_then_fail)
    for write in (lambda: save_stats(str(path), np.ones(3), np.eye(3)),
                  lambda: save_npz(str(path), torch.zeros(1, 1, 2, 2, dtype=torch.uint8))):
        with pytest.raises(UserFileError, match="No space left.*unchanged"):
            write()
    monkeypatch.undo()
    assert np.array_equal(load_stats(str(path))[0], np.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["stats.npz"]


def test_atomic_write_failure_kinds(tmp_path):
    def bug(f):
        raise TypeError("not bytes")
    with pytest.raises(RuntimeError, match="not bytes") as info:  # a programming error: not a user error
        ckpt_io.atomic_write(tmp_path / "x.bin", bug)
    assert not isinstance(info.value, UserError) and list(tmp_path.iterdir()) == []
    ckpt_io.atomic_write(tmp_path / "x.bin", lambda f: f.write(b"abc"))
    assert (tmp_path / "x.bin").read_bytes() == b"abc"


def test_truncated_or_foreign_files(tmp_path):
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"w": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(RuntimeError, match=f"{re.escape(str(path))} is truncated or not a checkpoint.*--resume"):
        load_checkpoint(path)
    path.write_text("hello")
    with pytest.raises(RuntimeError, match="truncated or not a checkpoint"):
        load_checkpoint(path)
    torch.save(torch.zeros(2), path)
    with pytest.raises(RuntimeError, match="not a checkpoint dict"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_checkpoint(tmp_path / "missing.pth")


def test_release_namespace_loads_but_other_objects_need_trust(tmp_path):
    path = tmp_path / "release.pth"
    torch.save({"model": {}, "epoch": 3, "args": argparse.Namespace(lr=6e-4, dataset="cifar10")}, path)
    assert load_checkpoint(path)["args"].dataset == "cifar10"
    torch.save({"args": NotAllowed()}, path)
    with pytest.raises(RuntimeError, match="trusted=True"):
        load_checkpoint(path)
    assert isinstance(load_checkpoint(path, trusted=True)["args"], NotAllowed)


def test_infer_small_fixture_config(fixtures_dir):
    data = torch.load(fixtures_dir / "official_unet_small.pt", weights_only=True)
    inferred = infer_unet_config(_sub(data["model"], "net"))
    assert _plain(inferred) == _plain({**_edm_defaults(), **data["model_config"]})


@pytest.mark.parametrize("config", [
    # NCSN++-style: every structural option away from its default.
    dict(img_resolution=16, in_channels=2, out_channels=1, label_dim=10, augment_dim=9, model_channels=8,
         channel_mult=[1, 2, 3], channel_mult_emb=2, num_blocks=1, attn_resolutions=[8, 4], embedding_type="fourier",
         channel_mult_noise=2, encoder_type="residual", decoder_type="skip", resample_filter=[1, 3, 3, 1]),
    dict(img_resolution=8, in_channels=1, out_channels=1, model_channels=16, channel_mult=[1, 2], num_blocks=2,
         attn_resolutions=[], encoder_type="skip"),
    dict(img_resolution=8, in_channels=1, out_channels=1, model_channels=16, channel_mult=[1], num_blocks=0,
         attn_resolutions=[8]),
])
def test_infer_round_trip(config):
    config = {**_edm_defaults(), **config, "dropout": 0.0}
    torch.manual_seed(0)
    assert _plain(infer_unet_config(SongUNet(**config).state_dict())) == _plain(config)


def _full_release_net(fixtures_dir) -> dict:
    """One network of the authors' CIFAR-10 checkpoint as meta tensors (shapes only), from the key listing.

    The resample filter buffers get real values (those of the small fixture, the same [1,3,3,1] filter).
    """
    small = torch.load(fixtures_dir / "official_unet_small.pt", weights_only=True)["model"]
    filt = small["net.enc.16x16_down.conv0.resample_filter"]
    sd = {}
    for line in (fixtures_dir / "official_full_state_dict_shapes.txt").read_text().splitlines():
        if line.startswith("#") or not line.startswith("net."):
            continue
        key, shape = line.split("\t")
        dims = [int(d) for d in re.findall(r"\d+", shape)]
        sd[key[4:]] = filt.clone() if key.endswith("resample_filter") else torch.empty(dims, device="meta")
    return sd


def test_infer_full_cifar10_config(fixtures_dir):
    inferred = infer_unet_config(_full_release_net(fixtures_dir))
    expected = {**_edm_defaults(), **CIFAR10_CONFIG}
    inferred.pop("dropout"), expected.pop("dropout")
    assert _plain(inferred) == _plain(expected)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in SongUNet(**inferred).parameters())
    assert n_params == 55_932_419


def test_load_network_reproduces_release_outputs(fixtures_dir):
    data = torch.load(fixtures_dir / "official_unet_small.pt", weights_only=True)
    x = data["inputs"]
    h = x["t"] - x["r"]
    from_file = load_network(fixtures_dir / "official_unet_small.pt", ema="net_ema1")
    inferred = load_network({"model": data["model"]}, ema="net_ema1")  # no model_config: rebuilt from weights
    for net in (from_file, inferred):
        assert not net.training
        with torch.no_grad():
            out = net(x["z"], x["t"], h, aug_cond=x["aug_cond"])
        torch.testing.assert_close(out, data["outputs"]["net_ema1"], rtol=1e-5, atol=1e-6)


def test_load_network_from_our_checkpoint(tmp_path):
    from models.ema import EMAModel
    config = {"img_resolution": 8, "in_channels": 1, "out_channels": 1, "model_channels": 16, "channel_mult": [1, 2],
              "num_blocks": 1, "attn_resolutions": [4], "dropout": 0.1}
    torch.manual_seed(0)
    model = EMAModel(SongUNet(**config), decays=(0.99, 0.999))
    with torch.no_grad():
        for p in model.net_ema1.parameters():  # make the copies differ
            p.add_(0.01)
    save_checkpoint({"model": model.state_dict(), "model_config": config, "step": 5}, tmp_path / "ckpt.pth")
    net = load_network(tmp_path / "ckpt.pth", ema="net_ema1")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.9])
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, t / 2), model.net_ema1.eval()(x, t, t / 2), rtol=0, atol=0)


def test_load_network_bad_name_lists_available(fixtures_dir):
    data = torch.load(fixtures_dir / "official_unet_small.pt", weights_only=True)
    assert available_networks(data) == ["net", "net_ema", "net_ema1", "net_ema2"]
    with pytest.raises(ValueError, match=r"'net_ema9'.*\['net', 'net_ema', 'net_ema1', 'net_ema2'\]"):
        load_network(data, ema="net_ema9")


# --------------------------------------------------------------------------- background writes


def _slow_torch_save(monkeypatch, seconds: float, order: list):
    """torch.save that takes `seconds` and records the step of each state it writes."""
    real = torch.save

    def slow(obj, f, *args, **kwargs):
        time.sleep(seconds)
        real(obj, f, *args, **kwargs)
        order.append(obj["step"])

    monkeypatch.setattr(ckpt_io.torch, "save", slow)


def test_background_save_returns_before_the_write_and_keeps_that_moments_state(tmp_path, monkeypatch):
    order = []
    _slow_torch_save(monkeypatch, 0.5, order)
    saver = ckpt_io.BackgroundSaver()
    weights = torch.zeros(3)
    path = tmp_path / "ckpt.pth"
    tic = time.perf_counter()
    saver.save({"w": weights, "step": 1}, [path, tmp_path / "copy.pth"])
    assert time.perf_counter() - tic < 0.4 and not path.exists()
    weights.add_(5)  # training goes on: the file must hold the state at save time
    saver.wait()
    for name in ("ckpt.pth", "copy.pth"):
        loaded = load_checkpoint(tmp_path / name)
        assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth", "copy.pth"]  # no temporary file left


def test_background_saves_in_a_row_are_ordered_and_the_old_file_stays_until_replaced(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"step": 0}, path)
    order = []
    _slow_torch_save(monkeypatch, 0.3, order)
    saver = ckpt_io.BackgroundSaver()
    saver.save({"step": 1}, [path])
    assert load_checkpoint(path)["step"] == 0  # being written: the old file is whole
    saver.save({"step": 2}, [path])  # waits for the first write
    assert order == [1]
    saver.wait()
    assert order == [1, 2] and load_checkpoint(path)["step"] == 2


def test_background_write_error_is_raised_at_the_next_save_and_at_wait(tmp_path, monkeypatch):
    def failing(obj, f, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_io.torch, "save", failing)
    saver = ckpt_io.BackgroundSaver()
    saver.save({"step": 1}, [tmp_path / "a.pth"])
    with pytest.raises(UserFileError, match="a.pth.*No space left on device"):
        saver.save({"step": 2}, [tmp_path / "a.pth"])
    saver.save({"step": 3}, [tmp_path / "b.pth"])
    with pytest.raises(UserFileError, match="b.pth.*No space left on device"):
        saver.wait()
    saver.wait()  # each error is reported once
    assert not list(tmp_path.iterdir())
