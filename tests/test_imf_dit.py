"""models/imf_dit.py and models/imf_convert.py: sizes, the authors' outputs, derivatives, initialisation.

Reference outputs come from the authors' code (docs/imf.md, "Reference outputs"): imf_torch_small.pt
from their PyTorch inference model, imf_jax_small.npz from their JAX training code.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import FIXTURES, ROOT
from models.imf_convert import from_jax, from_official, infer_config, load_official, to_official
from models.imf_dit import IMF_CONFIGS, ImfDiT, RoPEAttention, rope_angles

# The fixtures' network: 2 shared blocks, one u-head block (and one v-head block).
SMALL = dict(img_resolution=8, in_channels=4, num_classes=10, patch_size=2, hidden_size=32, depth=3,
             num_heads=4, aux_head_depth=1)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def perturbed(net: ImfDiT, scale: float = 0.2) -> ImfDiT:
    """Noise on the parameters that start constant (gates, output layers, norms), so every path counts."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if torch.all(p == p.flatten()[0]):
                p.add_(scale * torch.randn_like(p))
    return net


def small_inputs(batch: int = 4, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    rand = lambda: torch.rand(batch, generator=g, dtype=dtype)  # noqa: E731
    t = rand()
    return dict(z=torch.randn(batch, 4, 8, 8, generator=g, dtype=dtype), t=t, h=t * rand(),
                labels=torch.arange(batch) % 11, omega=1 + 3 * rand(), t_min=0.5 * rand(), t_max=0.5 + 0.5 * rand())


def call(net: ImfDiT, x: dict[str, torch.Tensor]):
    return net(x["z"], x["t"], x["h"], labels=x["labels"], omega=x["omega"], t_min=x["t_min"], t_max=x["t_max"])


# ---------------------------------------------------------------- sizes


# Millions of parameters stated for iMF (without the v-head blocks, with them).
STATED_MILLIONS = {"B/2": (89, 146), "M/2": (174, 231), "L/2": (409, 510), "XL/2": (610, 711)}


@pytest.mark.parametrize("name", list(IMF_CONFIGS))
def test_parameter_counts(name):
    """Built on the meta device (no memory); the stated figures are rounded to millions: within 0.5 M."""
    counts = []
    for v_head in (False, True):
        with torch.device("meta"):
            net = ImfDiT(**IMF_CONFIGS[name], v_head=v_head)
        counts.append(sum(p.numel() for p in net.parameters()))
        assert len(net.shared_blocks) + len(net.u_heads) == IMF_CONFIGS[name]["depth"]
    for count, stated in zip(counts, STATED_MILLIONS[name]):
        assert abs(count - stated * 1e6) < 0.5e6, (name, count)


# ---------------------------------------------------------------- the authors' PyTorch model


@pytest.fixture(scope="module")
def torch_fixture():
    return torch.load(FIXTURES / "imf_torch_small.pt", weights_only=True)


def their_call(net: ImfDiT, inputs: dict[str, torch.Tensor]):
    x = inputs
    return net(x["z"], x["t"], x["h"], x["labels"], x["omega"], x["t_min"], x["t_max"])


def test_official_eval_checkpoint_loads_strict_and_gives_their_u(torch_fixture):
    """Their inference layout (iMF-*.pth): a network without v-head, u equal to theirs.

    Their v in this mode is v_final_layer on the shared trunk, not a trained velocity: not compared.
    """
    net = load_official(torch_fixture["eval"]["state_dict"], img_resolution=8)
    assert not net.has_v_head
    with torch.no_grad():
        u, v = their_call(net, torch_fixture["inputs"])
    assert v is None
    torch.testing.assert_close(u, torch_fixture["eval"]["u"], rtol=0, atol=1e-5)


def test_official_full_network_gives_their_u_and_v(torch_fixture):
    net = load_official(torch_fixture["full"]["state_dict"], img_resolution=8)
    assert net.has_v_head
    with torch.no_grad():
        u, v = their_call(net, torch_fixture["inputs"])
    torch.testing.assert_close(u, torch_fixture["full"]["u"], rtol=0, atol=1e-5)
    torch.testing.assert_close(v, torch_fixture["full"]["v"], rtol=0, atol=1e-5)


def test_infer_config_and_export_round_trip(torch_fixture):
    theirs = torch_fixture["eval"]["state_dict"]
    assert infer_config(theirs, img_resolution=8) == {
        **SMALL, "mlp_ratio": 8 / 3, "v_head": False, "num_class_tokens": 8, "num_time_tokens": 4,
        "num_cfg_tokens": 4, "num_interval_tokens": 2}
    exported = to_official(load_official(theirs, img_resolution=8).state_dict())
    assert exported.keys() == theirs.keys()
    for key, value in exported.items():
        if ".v_final_layer." in key:  # not in our network: written back as their initialisation
            assert torch.equal(value, torch.ones_like(value) if "norm" in key else torch.zeros_like(value))
        else:
            assert torch.equal(value, theirs[key]), key
    full = torch_fixture["full"]["state_dict"]
    exported = to_official(from_official(full), keep_v_heads=True)
    assert exported.keys() == full.keys() and all(torch.equal(exported[k], full[k]) for k in full)


def test_from_official_names_the_expected_layout():
    with pytest.raises(ValueError, match=r"start with 'net\.'"):
        from_official(ImfDiT(**SMALL).state_dict())


# ---------------------------------------------------------------- the authors' JAX model


def test_jax_parameters_convert_to_their_outputs():
    """Their flax parameters, converted, give their u and v (their arrays are NHWC; ours NCHW)."""
    data = np.load(FIXTURES / "imf_jax_small.npz")
    state = from_jax({k.removeprefix("param/"): data[k] for k in data.files if k.startswith("param/")})
    net = ImfDiT(**infer_config(state, img_resolution=8))
    net.load_state_dict(state, strict=True)
    nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)  # noqa: E731
    f = {k.removeprefix("forward/"): torch.from_numpy(data[k]) for k in data.files if k.startswith("forward/")}
    with torch.no_grad():
        u, v = net(nchw(data["input/z"]), f["t"], f["t"] - f["r"], f["labels_dropped"].long(), f["omega"],
                   f["t_min"], f["t_max"])
    torch.testing.assert_close(u, nchw(data["output/u"]), rtol=0, atol=1e-5)
    torch.testing.assert_close(v, nchw(data["output/v"]), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- derivatives


def test_rope_attention_jvp_and_gradient_match_finite_differences():
    """Tangents and gradients flow through the rotated queries and keys (float64 gradcheck, both modes).

    A complex view of the channels (the authors' PyTorch RoPE) is not differentiable: the
    query/key path would get no gradient and a zero tangent.
    """
    torch.manual_seed(0)
    attn = RoPEAttention(8, 2).double()
    angles = rope_angles(4, 3).double()
    cos, sin = angles.cos(), angles.sin()
    x = torch.randn(1, 3, 8, dtype=torch.double, requires_grad=True)
    wq = attn.q_proj.weight.detach().clone().requires_grad_()

    def fn(x_, wq_):
        return torch.func.functional_call(attn, {"q_proj.weight": wq_}, (x_, cos, sin))

    assert torch.autograd.gradcheck(fn, (x, wq), check_forward_ad=True, check_backward_ad=True)
    grad_wq, = torch.autograd.grad(fn(x, wq).square().sum(), wq)
    assert grad_wq.abs().max() > 1e-3


def test_network_jvp_matches_finite_differences():
    """d/dt u(z + t v, t, t - r) at (z, t, r), the tangent the iMF loss uses, against central differences."""
    net = perturbed(ImfDiT(**SMALL)).double()
    x = small_inputs(dtype=torch.double)
    v = torch.randn_like(x["z"])
    r = x["t"] - x["h"]

    def u_of(z, t, r_):
        return net(z, t, t - r_, labels=x["labels"], omega=x["omega"], t_min=x["t_min"], t_max=x["t_max"])[0]

    _, dudt = torch.func.jvp(u_of, (x["z"], x["t"], r), (v, torch.ones_like(r), torch.zeros_like(r)))
    eps = 1e-6
    with torch.no_grad():
        numeric = (u_of(x["z"] + eps * v, x["t"] + eps, r) - u_of(x["z"] - eps * v, x["t"] - eps, r)) / (2 * eps)
    assert rel_err(dudt, numeric) < 1e-7


@pytest.mark.slow
def test_compiled_jvp_and_backward_match_eager():
    """Dynamo + AOTAutograd trace the JVP through the network and its backward as one graph.

    One block in each of trunk, u-head and v-head; "aot_eager" because inductor's code generation
    takes minutes on a CPU. Tracing is where a layer without a compilable forward-AD rule fails.
    """
    net = perturbed(ImfDiT(**{**SMALL, "depth": 2, "hidden_size": 16, "num_heads": 2}))
    x = small_inputs(batch=2)
    v = torch.randn_like(x["z"])

    def loss_fn(z, v_, t, r):
        def u_fn(z_, t_, r_):
            return net(z_, t_, t_ - r_, labels=x["labels"], omega=x["omega"], t_min=x["t_min"], t_max=x["t_max"])

        (u, v_head), (dudt, _) = torch.func.jvp(u_fn, (z, t, r), (v_, torch.ones_like(t), torch.zeros_like(r)))
        V = u + (t - r)[:, None, None, None] * dudt.detach()
        return (V - v_).square().mean() + (v_head - v_).square().mean()

    def loss_and_grads(fn):
        net.zero_grad(set_to_none=True)
        loss = fn(x["z"], v, x["t"], x["t"] - x["h"])
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in net.parameters()]

    eager_loss, eager_grads = loss_and_grads(loss_fn)
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(loss_fn, fullgraph=True, backend="aot_eager"))
    assert rel_err(compiled_loss, eager_loss) < 1e-5
    for got, want in zip(compiled_grads, eager_grads):
        assert rel_err(got, want) < 1e-4


# ---------------------------------------------------------------- initialisation and conventions


def test_fresh_network_is_zero_at_output_and_identity_in_blocks():
    torch.manual_seed(0)
    net = ImfDiT(**{**SMALL, "hidden_size": 64})
    x = small_inputs()
    u, v = call(net, x)
    assert torch.equal(u, torch.zeros_like(u)) and torch.equal(v, torch.zeros_like(v))
    blocks = [*net.shared_blocks, *net.u_heads, *net.v_heads]
    assert all(torch.equal(b.attn_scale, torch.zeros(64)) and torch.equal(b.mlp_scale, torch.zeros(64)) for b in blocks)
    seq = torch.randn(2, net.rope_cos.shape[0], 64)
    assert torch.equal(blocks[0](seq, net.rope_cos, net.rope_sin), seq)
    for layer in (net.u_final_layer, net.v_final_layer):
        assert not layer.linear.weight.any() and not layer.linear.bias.any()
        assert torch.equal(layer.norm.weight, torch.ones(64))
    # Their initialisation: N(0, (c / sqrt(fan_in))^2) with c = 0.32 in blocks, 1 in embedders and tokens.
    assert net.shared_blocks[0].mlp.w2.weight.std().item() == pytest.approx(0.32 / 170 ** 0.5, rel=0.1)
    assert net.h_embedder.mlp[0].weight.std().item() == pytest.approx(1 / 256 ** 0.5, rel=0.1)
    assert net.class_tokens.std().item() == pytest.approx(1 / 64 ** 0.5, rel=0.3)
    limit = (6 / (2 * 2 * 4 + 64)) ** 0.5
    assert net.x_embedder.proj.weight.abs().max() <= limit and net.x_embedder.proj.weight.abs().max() > 0.9 * limit
    assert not net.h_embedder.mlp[0].bias.any() and not net.x_embedder.proj.bias.any()


def test_defaults_are_null_label_omega_1_full_interval_and_t_is_ignored():
    net = perturbed(ImfDiT(**SMALL, v_head=False))
    x = small_inputs()
    with torch.no_grad():
        u, v = net(x["z"], x["t"], x["h"])
        batch = len(x["t"])
        explicit, _ = net(x["z"], 1 - x["t"], x["h"], labels=torch.full((batch,), 10), omega=torch.ones(batch),
                          t_min=torch.zeros(batch), t_max=torch.ones(batch))
    assert v is None
    torch.testing.assert_close(u, explicit, rtol=0, atol=0)
    assert ImfDiT.takes_guidance and (net.in_channels, net.img_resolution, net.num_classes) == (4, 8, 10)


def test_wrong_input_shape_is_named():
    with pytest.raises(ValueError, match=r"z of shape \[B, 4, 8, 8\].*got \[2, 4, 16, 16\]"):
        ImfDiT(**SMALL)(torch.zeros(2, 4, 16, 16), torch.zeros(2), torch.zeros(2))


@pytest.mark.slow
def test_fixture_script_names_a_missing_copy(tmp_path):
    missing = tmp_path / "imeanflow-torch"
    script = FIXTURES / "make_imf_fixtures.py"
    result = subprocess.run([sys.executable, str(script), str(missing), "--out", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0]
    assert "git clone -b torch https://github.com/Lyy-iiis/imeanflow" in lines[0]


# ---------------------------------------------------------------- the objective against their JAX loss


def test_improved_meanflow_loss_and_gradients_match_their_jax_code():
    """Their forward's draws (t, r, noise, omega, interval, dropped rows) given explicitly; loss and its
    parts to 1e-5 relative, the gradient of every parameter to 1e-4 relative (norm of the difference / norm).

    With p = 1 each weighted term is close to 1, so the loss alone says little: the parts and the
    gradients carry the comparison.
    """
    from meanflow import ImprovedMeanFlow

    data = np.load(FIXTURES / "imf_jax_small.npz")
    state = from_jax({k.removeprefix("param/"): data[k] for k in data.files if k.startswith("param/")})
    net = ImfDiT(**infer_config(state, img_resolution=8))
    net.load_state_dict(state, strict=True)
    nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    f = {k.removeprefix("forward/"): torch.from_numpy(data[k]) for k in data.files if k.startswith("forward/")}
    # The interval as drawn (their uniforms mapped to [0, 0.5], [0.5, 1]): the loss sets (0, 1) on the tied rows.
    t_min, t_max = 0.5 * torch.from_numpy(data["draw/3_uniform"]), 0.5 + 0.5 * torch.from_numpy(data["draw/4_uniform"])
    t_min, t_max = t_min.flatten(), t_max.flatten()
    tied = f["fm_mask"]
    assert torch.equal(t_min[~tied], f["t_min"][~tied]) and not torch.equal(t_min[tied], f["t_min"][tied])
    method = ImprovedMeanFlow(num_classes=10)
    terms = method.loss_terms(net, nchw(data["input/x"]), labels=torch.from_numpy(data["input/labels"]).long(),
                              noise=nchw(data["draw/2_normal"]), t=f["t"], r=f["r"], omega=f["omega"],
                              t_min=t_min, t_max=t_max, drop=f["labels_dropped"] == 10)
    for name in ("loss", "loss_u", "loss_v"):
        assert abs(terms[name].item() / data[name].item() - 1) < 1e-5, name
    terms["loss"].backward()
    grads = from_jax({k.removeprefix("grad/"): data[k] for k in data.files if k.startswith("grad/")})
    assert grads.keys() == dict(net.named_parameters()).keys()
    for name, p in net.named_parameters():
        assert rel_err(p.grad, grads[name]) < 1e-4, name


class ToyGuided(torch.nn.Module):
    """(u, v) = (z s, -z s), s = w (1 + h + label / 10): records the labels of each call."""

    takes_guidance = True

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.labels_seen = []

    def forward(self, z, t, h, labels, omega, t_min, t_max):
        self.labels_seen.append(labels)
        s = (self.w * (1 + h + labels / 10)).view(-1, 1, 1, 1)
        return z * s, -z * s


def test_improved_meanflow_draws():
    from meanflow import ImprovedMeanFlow

    method = ImprovedMeanFlow(num_classes=10)
    g = torch.Generator().manual_seed(0)
    n = 20000
    t, r = method.sample_t_r(n, generator=g)
    assert torch.all(t >= r) and abs((t == r).float().mean().item() - 0.5) < 0.02
    omega, t_min, t_max = method.sample_guidance(n, generator=g)
    assert omega.min() >= 1 and omega.max() <= 8 and t_min.max() <= 0.5 and t_max.min() >= 0.5
    assert abs((omega.log() / np.log(8)).mean().item() - 0.5) < 0.01  # log_8 omega ~ U[0, 1]
    assert abs(method.sample_drop(n, generator=g).float().mean().item() - 0.2) < 0.02  # 0.1 of the batch / 0.5 tied

    net = ToyGuided()
    x, labels = torch.randn(64, 1, 2, 2), torch.arange(64) % 10
    loss = method.loss(net, x, labels=labels, generator=torch.Generator().manual_seed(1))
    assert loss == method.loss(net, x, labels=labels, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    torch.randn(x.shape, generator=g)
    t, r = method.sample_t_r(64, generator=g)
    method.sample_guidance(64, generator=g)
    drop = method.sample_drop(64, generator=g)
    dropped = net.labels_seen[-1] == 10  # the JVP call's labels
    assert torch.equal(dropped, drop & (t == r)) and dropped.any()


def test_improved_meanflow_errors_name_the_fix():
    from meanflow import ImprovedMeanFlow

    with pytest.raises(ValueError, match="class-conditional"):
        ImprovedMeanFlow(num_classes=0)
    with pytest.raises(ValueError, match=r"among the r = t rows.*\[0, data_proportion=0.5\]"):
        ImprovedMeanFlow(num_classes=10, class_dropout_prob=0.6)
    method, x = ImprovedMeanFlow(num_classes=10), torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="omega, t_min and t_max together"):
        method.loss(ToyGuided(), x, labels=torch.zeros(2, dtype=torch.long), omega=torch.ones(2))
    with pytest.raises(ValueError, match=r"class indices of shape \[2\]"):
        method.loss(ToyGuided(), x, labels=torch.zeros(2, 10))


# ---------------------------------------------------------------- their checkpoints here, ours in their layout


def test_their_imf_file_reads_as_theirs_with_their_latent_space_for_their_sizes(torch_fixture, tmp_path):
    """iMF-*.pth is their iMeanFlow's state dict: read_checkpoint recognises it and load_network gives their u. One
    of their four configurations gets their latent space (sd-vae-ft-mse after iMF's normalization, 256 px);
    another network in their layout (the small fixture) is a model of images of the --model_config side, and
    samples without guidance by default."""
    from training.build import checkpoint_from_imf, is_imf_release, load_network, read_checkpoint, sampling_guidance
    from training.sampling import Guidance
    from utils.latents import NORMS, LatentSpace

    path = tmp_path / "iMF-small.pth"
    torch.save(dict(torch_fixture["eval"]["state_dict"]), path)
    ckpt = read_checkpoint(path, model_config={"img_resolution": 8})
    assert LatentSpace.of_checkpoint(ckpt) is None and ckpt["model_config"]["img_resolution"] == 8
    net = load_network(ckpt, ema="net")
    with torch.no_grad():
        u, _ = their_call(net, torch_fixture["inputs"])
    torch.testing.assert_close(u, torch_fixture["eval"]["u"], rtol=0, atol=1e-5)
    assert sampling_guidance(ckpt, net, 1) == [Guidance(1.0, 0.0, 1.0)]

    with torch.device("meta"):
        theirs = to_official(ImfDiT(**IMF_CONFIGS["B/2"], v_head=False).state_dict())
    assert is_imf_release(theirs)
    latent = LatentSpace.of_checkpoint(checkpoint_from_imf(theirs))
    assert (latent.norm, latent.vae_name, latent.resolution) == (NORMS["imf"], "mse", 256)


@pytest.mark.parametrize("size, steps, recorded, expected", [
    ("B/2", 1, {}, (8.0, 0.4, 0.65)),
    ("M/2", 1, {}, (10.5, 0.4, 0.6)),
    ("L/2", 1, {}, (10.5, 0.4, 0.6)),
    ("XL/2", 1, {}, (8.0, 0.42, 0.62)),
    ("XL/2", 2, {}, (4.0, 0.36, 0.64)),
    ("XL/2", 2, dict(omega=6.0), (4.0, 0.36, 0.64)),   # their 2-step setting over the recorded 1-step one
    ("XL/2", 4, {}, (8.0, 0.42, 0.62)),                # no 4-step setting: the 1-step one
    ("B/2", 1, dict(omega=3.0, t_max=0.9), (3.0, 0.4, 0.9)),
    ("XS/2", 2, dict(omega=4.0), (4.0, 0.0, 1.0)),
    (None, 1, {}, (1.0, 0.0, 1.0)),
])
def test_default_guidance_is_the_authors_eval_config_or_what_the_run_recorded(size, steps, recorded, expected):
    from training.sampling import Guidance, default_guidance
    assert default_guidance(steps, size=size, **recorded) == Guidance(*expected)


def test_guidance_defaults_come_from_the_size_the_weights_have():
    """Their iMF-*.pth record no size: it is recognised from the config their weights give."""
    from models.imf_convert import config_name
    for name, size in IMF_CONFIGS.items():
        with torch.device("meta"):
            state = ImfDiT(**size, v_head=False).state_dict()
        assert config_name(infer_config(state)) == name
    assert config_name(dict(IMF_CONFIGS["B/2"], num_classes=10)) is None


def test_export_to_their_layout_loads_back_with_the_same_u(torch_fixture, tmp_path, capsys):
    """A network of ours (with its v-head) exports to the keys of their inference iMeanFlow (the fixture's eval
    state dict) and reads back through load_network with the same u; export_imf.py writes that file."""
    import export_imf
    from training.build import export_imf as export, load_network

    net = load_official(torch_fixture["full"]["state_dict"], img_resolution=8)
    assert net.has_v_head
    config = infer_config(net.state_dict(), img_resolution=8)
    ckpt = {"model": {f"net_ema.{k}": v for k, v in net.state_dict().items()}, "network": "imf_dit",
            "model_config": config, "config": dict(arch="imf_dit", omega=4.0, t_min=0.3, t_max=0.7)}
    exported = export(load_network(ckpt))
    assert exported.keys() == torch_fixture["eval"]["state_dict"].keys()
    torch.save(ckpt, tmp_path / "ours.pth")
    export_imf.main(["--ckpt", str(tmp_path / "ours.pth"), "--out", str(tmp_path / "theirs.pth")])
    assert "not one of their four configurations" in capsys.readouterr().out
    back = load_network(str(tmp_path / "theirs.pth"), ema="net", model_config={"img_resolution": 8})
    assert torch.load(tmp_path / "theirs.pth", weights_only=True).keys() == exported.keys()
    with torch.no_grad():
        want, _ = their_call(net, torch_fixture["inputs"])
        got, _ = their_call(back, torch_fixture["inputs"])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # sample.py reads it back as an image model of the side --model_config gives (the layout does not tell it)
    import sample
    sample.main(["--ckpt", str(tmp_path / "theirs.pth"), "--ema", "net", "--model_config", '{"img_resolution": 8}',
                 "--num_samples", "3", "--out", str(tmp_path / "s.npz"), "--device", "cpu"])
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (3, 8, 8, 4)


# ---------------------------------------------------------------- presets

# Their JAX configs/train_config.yml over configs/default.py (docs/imf.md); batch 128 per process x 8 = their 1024.
IMF_RECIPE = dict(
    dataset="imagenet256-latent", arch="imf_dit", objective="imf", batch_per_process=128, epochs=640, lr=1e-4,
    warmup_epochs=10, adam_betas=[0.9, 0.95], ema_decay=0.9999, ema_decays=[], ema_period_steps=1, tr_sampler="v0",
    P_mean_t=-0.4, P_std_t=1.0, P_mean_r=-0.4, P_std_r=1.0, ratio=0.5, norm_p=1.0, norm_eps=0.01, class_cond=True,
    class_dropout=0.1, dropout=0.0, use_edm_aug=False, compute_fid=False, eval_every_epochs=20)
# model_size and the guidance of their eval config (configs/eval_config.yml) for the size.
IMF_PRESETS = {"imagenet256-imf-b2": ("B/2", 8.0, 0.4, 0.65), "imagenet256-imf-m2": ("M/2", 10.5, 0.4, 0.6),
               "imagenet256-imf-l2": ("L/2", 10.5, 0.4, 0.6), "imagenet256-imf-xl2": ("XL/2", 8.0, 0.42, 0.62)}


@pytest.mark.parametrize("preset", list(IMF_PRESETS))
def test_imagenet_imf_presets_are_the_authors_recipe(preset):
    from training import config as config_lib
    from training.build import build_method, check_buildable

    cfg = config_lib.resolve(dict(preset=preset), cuda_available=True)
    assert {k: getattr(cfg, k) for k in IMF_RECIPE} == IMF_RECIPE
    assert (cfg.model_size, cfg.omega, cfg.t_min, cfg.t_max) == IMF_PRESETS[preset]
    assert cfg.output_dir == f"./output/{preset}" and cfg.device == "cuda" and cfg.compile
    check_buildable(cfg)
    method = build_method(cfg)
    assert (method.data_proportion, method.class_dropout_prob, method.omega_max) == (0.5, 0.1, 8.0)


class RecordingQuality:
    """Stands in for utils.digits_quality.DigitsQuality (whose classifier takes seconds to fit): scores nothing,
    records the images it is given."""
    count = 6
    scored = []

    def __init__(self, seed: int = 0):
        pass

    def real_score(self) -> dict:
        return dict(count=self.count, fd=0.0, confidence=1.0, classes=10.0)

    def score(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        self.scored.append(images)
        return dict(fd=0.0, confidence=1.0, classes=10.0, label_accuracy=1.0)


@pytest.mark.slow
def test_digits_imf_evaluates_with_its_guidance_and_evaluate_py_sweeps(tmp_path, monkeypatch, capsys):
    """Two steps of the preset: evaluation during training samples with its omega and interval; evaluate.py's digits
    figure takes a sweep, a row per omega."""
    import evaluate
    import train
    from training.build import load_network
    from training.sampling import Guidance, sample_images
    from utils import data as data_utils
    from utils import digits_quality

    monkeypatch.setattr(digits_quality, "DigitsQuality", RecordingQuality)
    RecordingQuality.scored.clear()
    out = tmp_path / "run"
    argv = ["--preset", "digits-imf", "--max_steps", "2", "--output_dir", str(out), "--device", "cpu", "--not_compile"]
    assert train.main(argv) == 0
    cfg = train.resolve_config(argv)
    assert (cfg.arch, cfg.objective, cfg.omega, cfg.t_min, cfg.t_max) == ("imf_dit", "imf", 4.0, 0.4, 0.65)
    assert "net_ema2 at step 2, 1-step samples with omega 4, interval [0.4, 0.65]: FD" in (out / "log.txt").read_text()
    net = load_network(str(out / "checkpoint-last.pth"), ema="net")  # the first network evaluated
    noise = torch.randn((6, 1, 8, 8), generator=data_utils.make_generator(cfg.seed, "quality"))
    expected = net(noise, torch.ones(6), torch.ones(6), labels=torch.arange(6), omega=torch.full((6,), 4.0),
                   t_min=torch.full((6,), 0.4), t_max=torch.full((6,), 0.65))[0]
    torch.testing.assert_close(RecordingQuality.scored[0], noise - expected, rtol=0, atol=1e-6)

    rows = evaluate.main(["--ckpt", str(out / "checkpoint-last.pth"), "--ema", "net", "--omega", "1", "8",
                          "--device", "cpu"])
    assert [(r["omega"], r["t_min"], r["t_max"]) for r in rows] == [(1.0, 0.4, 0.65), (8.0, 0.4, 0.65)]
    guided = sample_images(net, num_samples=297, img_shape=(1, 8, 8), guidance=Guidance(8.0, 0.4, 0.65))
    assert torch.equal(RecordingQuality.scored[-1], guided)
    assert "omega  t_min  t_max" in capsys.readouterr().out


def test_a_run_whose_interval_ends_before_it_starts_is_one_user_error():
    """--t_min alone against the size's default t_max (B/2: 0.65) cannot be checked with the flags: the run says it
    in one line before training."""
    from types import SimpleNamespace

    from training.run import evaluation_guidance
    from utils.errors import UserValueError

    with torch.device("meta"):
        net = ImfDiT(**IMF_CONFIGS["B/2"])
    trainer = SimpleNamespace(model=SimpleNamespace(net=net))
    assert evaluation_guidance(SimpleNamespace(omega=None, t_min=0.5, t_max=None), trainer).t_max == 0.65
    with pytest.raises(UserValueError, match=r"--omega, --t_min, --t_max: interval \[0.7, 0.65\]"):
        evaluation_guidance(SimpleNamespace(omega=None, t_min=0.7, t_max=None), trainer)
