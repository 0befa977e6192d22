"""models/networks.py: every entry builds from a run's options, recognises its own weights, and rebuilds
itself from them; load_network reads each architecture's checkpoints, ours and the authors'."""

import pytest
import torch

from models import dit_convert
from models.networks import NETWORKS, network_spec, spec_of_state_dict
from training.build import load_network

OPTIONS = {
    "unet": dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0,
                 use_edm_aug=False),
    "dit": dict(model_size="XS/2"),
    "imf_dit": dict(model_size="XS/2"),
}


@pytest.mark.parametrize("name", list(NETWORKS))
def test_entry_builds_recognises_and_rebuilds_its_network(name):
    spec = network_spec(name)
    config = spec.make_config((4, 8, 8), 10, **OPTIONS[name])
    assert spec.check((4, 8, 8), **OPTIONS[name]) is None
    torch.manual_seed(0)
    net = spec.build(config)
    assert (net.in_channels, net.img_resolution, net.num_classes) == (4, 8, 10)
    state = net.state_dict()
    assert spec_of_state_dict(state) is spec
    # Not in the weights: DiT's head count for widths other than the papers' (XS/2: 96), iMF's image side.
    if name == "dit":
        inferred = dit_convert.infer_config(state, num_heads=4)
    elif name == "imf_dit":
        inferred = spec.infer_config(state) | dict(img_resolution=8)
    else:
        inferred = spec.infer_config(state)
    rebuilt = spec.build(inferred)
    rebuilt.load_state_dict(state, strict=True)
    z, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    out, again = net(z, t, t / 2, labels=torch.tensor([3, 10])), rebuilt(z, t, t / 2, labels=torch.tensor([3, 10]))
    for a, b in zip(out if isinstance(out, tuple) else [out], again if isinstance(again, tuple) else [again]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sizes_and_patches_are_checked_by_name():
    dit = network_spec("dit")
    assert dit.check((4, 8, 8), model_size="Q/9")[0] == "model_size"
    assert "patch size" in dit.check((4, 6, 6), model_size="B/4")[1]


def test_the_authors_imf_checkpoint_loads_under_net_with_their_u(fixtures_dir):
    """iMF-*.pth is their iMeanFlow's state dict: one network, `net.*`, with their wrapper levels."""
    ref = torch.load(fixtures_dir / "imf_torch_small.pt", weights_only=True)
    config = network_spec("imf_dit").infer_config(network_spec("imf_dit").import_state(
        {k[len("net."):]: v for k, v in ref["eval"]["state_dict"].items()})) | dict(img_resolution=8)
    net = load_network({"model": dict(ref["eval"]["state_dict"])}, ema="net", model_config=config)
    inputs = ref["inputs"]
    u, v = net(inputs["z"], inputs["t"], inputs["h"], labels=inputs["labels"], omega=inputs["omega"],
               t_min=inputs["t_min"], t_max=inputs["t_max"])
    torch.testing.assert_close(u, ref["eval"]["u"], rtol=1e-5, atol=1e-6)
    assert v is None and not net.training
