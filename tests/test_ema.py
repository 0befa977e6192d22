import copy

import pytest
import torch
from torch import nn

from models.ema import EMAModel


class TinyNet(nn.Module):
    """Parameters of several shapes plus a constant buffer, like the UNet's resample filter."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4, 5, bias=False)
        self.register_buffer("filt", torch.tensor([1.0, 3.0, 3.0, 1.0]))

    def forward(self, x):
        return self.fc(self.norm(self.conv(x)).mean(dim=(2, 3)))


def make(period=16, decays=(0.9999, 0.99995, 0.9996), seed=0):
    torch.manual_seed(seed)
    return EMAModel(TinyNet(), decays=decays, period=period)


def fake_optimizer_step(net, gen):
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def reference_update(ema_nets, decays, net, count, period):
    """The plain per-tensor formula, float64 then rounded back."""
    if count % period != 0:
        return
    with torch.no_grad():
        for ema, decay in zip(ema_nets, decays):
            for p, e in zip(net.parameters(), ema.parameters()):
                e64 = e.double()
                e.copy_((e64 + (1 - decay**period) * (p.double() - e64)).to(e.dtype))


def test_state_dict_layout():
    model = make()
    sd = model.state_dict()
    prefixes = {k.split(".")[0] for k in sd}
    assert prefixes == {"net", "net_ema", "net_ema1", "net_ema2", "num_updates"}
    assert sd["num_updates"].dtype == torch.int64 and sd["num_updates"].dim() == 0
    net_keys = sorted(k[len("net."):] for k in sd if k.startswith("net."))
    for name in ("net_ema", "net_ema1", "net_ema2"):
        assert sorted(k[len(name) + 1:] for k in sd if k.startswith(name + ".")) == net_keys
    assert model.ema_names() == ["net_ema", "net_ema1", "net_ema2"]
    assert model.decays == {"net_ema": 0.9999, "net_ema1": 0.99995, "net_ema2": 0.9996}
    assert list(model.networks()) == ["net", "net_ema", "net_ema1", "net_ema2"]


def test_copies_start_equal_and_frozen():
    model = make()
    for name in model.ema_names():
        ema = getattr(model, name)
        for (k, p), (k2, e) in zip(model.net.named_parameters(), ema.named_parameters()):
            assert k == k2 and torch.equal(p, e) and p.data_ptr() != e.data_ptr()
            assert p.requires_grad and not e.requires_grad
    model.train()
    assert model.net.training and not any(getattr(model, n).training for n in model.ema_names())
    model.eval()
    assert not model.net.training


@pytest.mark.parametrize("period, bucket", [(16, None), (1, None), (16, 40)])
def test_update_matches_per_tensor_reference_exactly(period, bucket):
    model = make(period=period)
    ref = make(period=period)  # same seed -> same initial weights
    if bucket is not None:
        # Small flat vectors: tensors spread over many of them, and larger ones on their own.
        model.BUCKET_NUMEL = model.BUCKET_NUMEL_CPU = bucket
    decays = list(model.decays.values())
    ref_emas = [getattr(ref, n) for n in ref.ema_names()]
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for step in range(1, 41):
        fake_optimizer_step(model.net, gen_a)
        fake_optimizer_step(ref.net, gen_b)
        model.update()
        reference_update(ref_emas, decays, ref.net, step, period)
        if step % period == 0 or step == 40:
            for name, ref_ema in zip(model.ema_names(), ref_emas):
                for e, r in zip(getattr(model, name).parameters(), ref_ema.parameters()):
                    assert torch.equal(e, r), (name, step)
    assert int(model.num_updates) == 40
    # The averages did move away from their start and differ between decays.
    assert not torch.equal(model.net_ema.fc.weight, model.net_ema2.fc.weight)


def test_nothing_changes_between_period_boundaries():
    model = make(period=16)
    gen = torch.Generator().manual_seed(2)
    for step in range(1, 34):
        before = [e.clone() for n in model.ema_names() for e in getattr(model, n).parameters()]
        fake_optimizer_step(model.net, gen)
        model.update()
        after = [e for n in model.ema_names() for e in getattr(model, n).parameters()]
        changed = any(not torch.equal(a, b) for a, b in zip(after, before))
        assert changed == (step % 16 == 0), step


def test_buffers_are_not_averaged():
    model = make(period=1)
    with torch.no_grad():
        model.net.filt.mul_(2)
    model.update()
    assert torch.equal(model.net_ema.filt, torch.tensor([1.0, 3.0, 3.0, 1.0]))


def test_period_one_is_plain_ema():
    model = make(period=1, decays=(0.5,))
    with torch.no_grad():
        model.net.fc.weight.fill_(1.0)
        model.net_ema.fc.weight.fill_(0.0)
    model.update()
    model.update()
    assert torch.allclose(model.net_ema.fc.weight, torch.full_like(model.net_ema.fc.weight, 0.75))


def test_strict_round_trip_and_period_phase_restored():
    gen = torch.Generator().manual_seed(3)
    model = make(period=16)
    for _ in range(10):
        fake_optimizer_step(model.net, gen)
        model.update()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert int(sd["num_updates"]) == 10

    resumed = make(period=16, seed=123)
    resumed.load_state_dict(sd, strict=True)
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # Both continue: the next boundary is step 16 for both, with identical results.
    gen_a, gen_b = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for step in range(11, 20):
        fake_optimizer_step(model.net, gen_a)
        fake_optimizer_step(resumed.net, gen_b)
        before = resumed.net_ema.fc.weight.clone()
        model.update()
        resumed.update()
        assert torch.equal(resumed.net_ema.fc.weight, before) == (step != 16), step
    for (k, v), (k2, v2) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "0.9"])
def test_decay_validation(bad):
    with pytest.raises(ValueError, match=r"decays\[1\]"):
        EMAModel(TinyNet(), decays=(0.999, bad))


def test_period_and_empty_decays_validation():
    with pytest.raises(ValueError, match="period"):
        EMAModel(TinyNet(), period=0)
    with pytest.raises(ValueError, match="at least one decay"):
        EMAModel(TinyNet(), decays=())


def test_mixed_dtypes_are_averaged_in_their_own_dtype():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2).double())
    model, ref = EMAModel(net, decays=(0.9,), period=2), EMAModel(copy.deepcopy(net), decays=(0.9,), period=2)
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for step in range(1, 7):
        fake_optimizer_step(model.net, gen_a)
        fake_optimizer_step(ref.net, gen_b)
        model.update()
        reference_update([ref.net_ema], [0.9], ref.net, step, 2)
    for e, r in zip(model.net_ema.parameters(), ref.net_ema.parameters()):
        assert e.dtype == r.dtype and torch.equal(e, r)


def test_loads_authors_checkpoint_layout(fixtures_dir):
    unet = pytest.importorskip("models.unet", reason="models/unet.py not available")
    blob = torch.load(fixtures_dir / "official_unet_small.pt", weights_only=True)
    model = EMAModel(unet.SongUNet(**blob["model_config"]))
    model.load_state_dict(blob["model"], strict=True)
    assert model._count == int(blob["model"]["num_updates"])
    for name in ("net", "net_ema", "net_ema1", "net_ema2"):
        for k, v in model.networks()[name].state_dict().items():
            assert torch.equal(v, blob["model"][f"{name}.{k}"]), (name, k)
