"""SongUNet: layout of the authors' checkpoints, their reference outputs, JVP correctness, the
hand-written tangent path of models/unet_tangent.py, bad inputs."""

import functools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from torch.utils.flop_counter import FlopCounterMode

import meanflow
from models.unet import CIFAR10_CONFIG, SongUNet, UNetBlock, group_norm, self_attention
from models.unet_tangent import Dual, forward_and_tangent, unet_block

RELEASE_PREFIXES = ("net", "net_ema", "net_ema1", "net_ema2")
CIFAR10_NUM_PARAMS = 55_932_419
EDM_DEFAULTS = dict(label_dim=0, num_blocks=4, attn_resolutions=[16], channel_mult_emb=4,
                    embedding_type="positional", label_dropout=0)

# Smallest network that still has every kind of layer: down/up blocks, attention, two levels.
TINY = dict(img_resolution=8, in_channels=2, out_channels=2, model_channels=8, channel_mult=[1, 2],
            num_blocks=1, attn_resolutions=[4], channel_mult_noise=2, resample_filter=[1, 3, 3, 1],
            dropout=0.0, augment_dim=3)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def perturbed(net: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Add noise to every parameter so zero-initialised output layers do not hide the rest."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return net


def tiny_inputs(dtype=torch.float32, batch: int = 2, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    res, ch = TINY["img_resolution"], TINY["in_channels"]
    z = torch.randn(batch, ch, res, res, generator=gen, dtype=dtype)
    v = torch.randn(batch, ch, res, res, generator=gen, dtype=dtype)
    t = torch.rand(batch, generator=gen, dtype=dtype) * 0.5 + 0.5
    r = t * torch.rand(batch, generator=gen, dtype=dtype)
    aug = torch.randn(batch, TINY["augment_dim"], generator=gen, dtype=dtype)
    return z, v, t, r, aug


# ---------------------------------------------------------------- the authors' checkpoint layout

def test_cifar10_state_dict_matches_release_listing(fixtures_dir: Path):
    lines = (fixtures_dir / "official_full_state_dict_shapes.txt").read_text().splitlines()
    assert lines[0].replace(",", "").endswith(str(CIFAR10_NUM_PARAMS))
    expected = [tuple(line.split("\t")) for line in lines[1:]]

    with torch.device("meta"):  # shapes only: no memory, no time spent on random init
        net = SongUNet(**CIFAR10_CONFIG)
    assert sum(p.numel() for p in net.parameters()) == CIFAR10_NUM_PARAMS
    own = net.state_dict()
    got = [("num_updates", "[]")] + [
        (f"{prefix}.{key}", str(list(value.shape))) for prefix in RELEASE_PREFIXES for key, value in own.items()]
    assert got == expected


def test_cifar10_state_dict_in_ema_wrapper(fixtures_dir: Path):
    ema = pytest.importorskip("models.ema")
    lines = (fixtures_dir / "official_full_state_dict_shapes.txt").read_text().splitlines()
    expected = {key: shape for key, shape in (line.split("\t") for line in lines[1:])}
    with torch.device("meta"):
        wrapped = ema.EMAModel(SongUNet(**CIFAR10_CONFIG))
    got = {key: str(list(value.shape)) for key, value in wrapped.state_dict().items()}
    assert got == expected


# ---------------------------------------------------------------- reference outputs of the release

@functools.lru_cache(maxsize=1)
def _reference(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@functools.lru_cache(maxsize=1)
def _reference_nets(path: Path) -> dict:
    ref = _reference(path)
    config = {**EDM_DEFAULTS, **ref["model_config"]}
    nets = {}
    for prefix in RELEASE_PREFIXES:
        net = SongUNet(**config).eval()
        state = {k[len(prefix) + 1:]: v for k, v in ref["model"].items() if k.startswith(prefix + ".")}
        net.load_state_dict(state, strict=True)
        nets[prefix] = net
    return nets


def load_reference(fixtures_dir: Path):
    path = fixtures_dir / "official_unet_small.pt"
    return _reference(path), _reference_nets(path)


@pytest.mark.parametrize("name", RELEASE_PREFIXES)
def test_outputs_match_release(fixtures_dir: Path, name: str):
    ref, nets = load_reference(fixtures_dir)
    inp = ref["inputs"]
    with torch.no_grad():
        out = nets[name](inp["z"], inp["t"], inp["t"] - inp["r"], aug_cond=inp["aug_cond"])
    assert rel_err(out, ref["outputs"][name]) < 1e-4


def test_output_without_augmentation_labels_matches_release(fixtures_dir: Path):
    ref, nets = load_reference(fixtures_dir)
    inp = ref["inputs"]
    with torch.no_grad():
        out = nets["net"](inp["z"], inp["t"], inp["t"] - inp["r"])
    assert rel_err(out, ref["outputs"]["net_no_aug"]) < 1e-4


def test_jvp_matches_release(fixtures_dir: Path):
    ref, nets = load_reference(fixtures_dir)
    inp = ref["inputs"]
    net = nets["net"]
    t, r = inp["t"], inp["r"]
    u, dudt = torch.func.jvp(lambda z_, t_, r_: net(z_, t_, t_ - r_, aug_cond=inp["aug_cond"]),
                             (inp["z"], t, r), (inp["v"], torch.ones_like(t), torch.zeros_like(r)))
    assert rel_err(u, ref["outputs"]["u_pred"]) < 1e-4
    assert rel_err(dudt, ref["outputs"]["dudt"]) < 1e-4


def test_forward_and_tangent_matches_release(fixtures_dir: Path):
    ref, nets = load_reference(fixtures_dir)
    inp = ref["inputs"]
    u, dudt = meanflow.u_and_dudt(nets["net"], inp["z"], inp["t"], inp["r"], inp["v"],
                                  dict(aug_cond=inp["aug_cond"]), jvp_mode="network")
    assert rel_err(u, ref["outputs"]["u_pred"]) < 1e-4
    assert rel_err(dudt, ref["outputs"]["dudt"]) < 1e-4


@pytest.mark.parametrize("jvp_mode", ["joint", "split", "network"])
def test_loss_and_grads_match_release(fixtures_dir: Path, jvp_mode: str):
    ref, nets = load_reference(fixtures_dir)
    inp, settings = ref["inputs"], ref["loss_settings"]
    net = nets["net"]
    net.zero_grad(set_to_none=True)
    method = meanflow.MeanFlow(norm_p=settings["norm_p"], norm_eps=settings["norm_eps"], jvp_mode=jvp_mode)
    loss = method.loss(net, inp["x"], inp["aug_cond"], noise=inp["e"], t=inp["t"], r=inp["r"])
    assert rel_err(loss.detach(), ref["outputs"]["loss"]) < 1e-4
    loss.backward()
    grads = {name: p.grad for name, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    assert set(grads) == set(ref["grads"])
    errors = {name: rel_err(grads[name], g) for name, g in ref["grads"].items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-3, f"{worst}: relative gradient error {errors[worst]:.2e}"


def test_one_step_sample_matches_release(fixtures_dir: Path):
    ref, nets = load_reference(fixtures_dir)
    images = meanflow.sample(nets["net_ema1"], ref["inputs"]["noise"], steps=1)
    assert rel_err(images, ref["outputs"]["sample_1step_net_ema1"]) < 1e-4


# ---------------------------------------------------------------- forward-mode AD

def test_jvp_matches_finite_differences():
    torch.manual_seed(0)
    net = perturbed(SongUNet(**TINY)).double().eval()
    z, v, t, r, aug = tiny_inputs(torch.float64)

    def u_fn(z_, t_, r_):
        return net(z_, t_, t_ - r_, aug_cond=aug)

    u, dudt = torch.func.jvp(u_fn, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    eps = 1e-5
    with torch.no_grad():
        fd = (u_fn(z + eps * v, t + eps, r) - u_fn(z - eps * v, t - eps, r)) / (2 * eps)
        assert torch.equal(u, u_fn(z, t, r))
    assert dudt.abs().max() > 1e-3  # the check below is not vacuous
    assert rel_err(dudt, fd) < 1e-6


def test_gradient_through_jvp_matches_finite_differences():
    """The MeanFlow loss back-propagates through the JVP: check d/dtheta of a functional of (u, du/dt)."""
    torch.manual_seed(0)
    net = perturbed(SongUNet(**TINY)).double().eval()
    z, v, t, r, aug = tiny_inputs(torch.float64)
    gen = torch.Generator().manual_seed(2)
    w_u, w_d = (torch.randn(z.shape, generator=gen, dtype=torch.float64) for _ in range(2))
    params = dict(net.named_parameters())
    direction = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}

    def objective(theta: dict) -> torch.Tensor:
        def u_fn(z_, t_, r_):
            return torch.func.functional_call(net, theta, (z_, t_, t_ - r_), dict(aug_cond=aug))
        u, dudt = torch.func.jvp(u_fn, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
        return (w_u * u).sum() + (w_d * dudt).sum()

    grads = torch.autograd.grad(objective(params), list(params.values()))
    analytic = sum((g * direction[k]).sum() for g, k in zip(grads, params))
    eps = 1e-6
    with torch.no_grad():
        plus = objective({k: p + eps * direction[k] for k, p in params.items()})
        minus = objective({k: p - eps * direction[k] for k, p in params.items()})
    numeric = (plus - minus) / (2 * eps)
    assert abs(analytic - numeric) / abs(numeric) < 1e-6


@pytest.mark.slow
def test_compiled_jvp_and_backward_match_eager():
    """Dynamo + AOTAutograd trace the JVP and its backward as one graph (no graph breaks).

    The "aot_eager" backend keeps this test at ~10 s on one CPU core; inductor code generation
    for the same graph takes minutes on CPU. Tracing is where a layer without a compilable
    forward-AD rule fails (F.group_norm does, pytorch/pytorch#152185).
    """
    torch.manual_seed(0)
    net = perturbed(SongUNet(**{**TINY, "num_blocks": 0})).eval()
    z, v, t, r, aug = tiny_inputs()

    def loss_fn(z_, v_, t_, r_):
        u, dudt = torch.func.jvp(lambda a, b, c: net(a, b, b - c, aug_cond=aug),
                                 (z_, t_, r_), (v_, torch.ones_like(t_), torch.zeros_like(r_)))
        return (u - (v_ - (t_ - r_)[:, None, None, None] * dudt).detach()).square().mean()

    def loss_and_grads(fn):
        net.zero_grad(set_to_none=True)
        loss = fn(z, v, t, r)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in net.parameters()]

    eager_loss, eager_grads = loss_and_grads(loss_fn)
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(loss_fn, fullgraph=True, backend="aot_eager"))
    assert rel_err(compiled_loss, eager_loss) < 1e-5
    for got, want in zip(compiled_grads, eager_grads):
        assert rel_err(got, want) < 1e-4


# ---------------------------------------------------------------- the tangent path of models/unet_tangent.py

VARIANTS = [
    dict(),
    dict(embedding_type="fourier", encoder_type="residual", decoder_type="skip"),
    dict(encoder_type="skip", decoder_type="skip", resample_filter=[1, 1]),
    dict(label_dim=5, label_dropout=0.5),
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_and_tangent_equals_forward_and_jvp(variant: dict):
    """Same seed, dropout active: u is forward's bit for bit (gradients too), u_t is the jvp's."""
    torch.manual_seed(0)
    net = perturbed(SongUNet(**{**TINY, "dropout": 0.3, **variant})).double().train()
    z, v, t, r, aug = tiny_inputs(torch.float64)
    labels = torch.tensor([1, 5]) if variant.get("label_dim") else None  # 5: the null class
    ones = torch.ones_like(t)
    w = torch.randn(z.shape[:1] + (TINY["out_channels"],) + z.shape[2:], generator=torch.Generator().manual_seed(3),
                    dtype=torch.float64)

    def grads(u):
        return torch.autograd.grad((w * u).sum(), list(net.parameters()), allow_unused=True)

    torch.manual_seed(5)
    u_plain = net(z, t, t - r, aug, labels)
    state_plain = torch.get_rng_state()
    torch.manual_seed(5)
    u, u_t = forward_and_tangent(net, z, t, t - r, v, ones, ones, aug_cond=aug, labels=labels)
    state_network = torch.get_rng_state()
    torch.manual_seed(5)
    u_jvp, dudt = torch.func.jvp(lambda a, b, c: net(a, b, b - c, aug, labels),
                                 (z, t, r), (v, ones, torch.zeros_like(r)))

    assert torch.equal(state_plain, state_network)  # same random draws, in the same order
    assert torch.equal(u, u_plain) and torch.equal(u, u_jvp)
    assert not u_t.requires_grad and u.requires_grad
    assert dudt.abs().max() > 1e-3
    assert rel_err(u_t, dudt) < 1e-12
    for got, want in zip(grads(u), grads(u_plain)):
        assert (got is None and want is None) or torch.equal(got, want)


def test_forward_and_tangent_eval_mode_and_float32():
    torch.manual_seed(0)
    net = perturbed(SongUNet(**{**TINY, "dropout": 0.3})).eval()
    z, v, t, r, aug = tiny_inputs()
    ones = torch.ones_like(t)
    u, u_t = forward_and_tangent(net, z, t, t - r, v, ones, ones, aug_cond=aug)
    u_jvp, dudt = torch.func.jvp(lambda a, b, c: net(a, b, b - c, aug), (z, t, r), (v, ones, torch.zeros_like(r)))
    assert u.dtype == u_t.dtype == torch.float32
    assert torch.equal(u, u_jvp)
    assert rel_err(u_t, dudt) < 1e-5


def test_dropout_of_ones_is_the_mask_of_dropout():
    """The tangent path draws its mask as F.dropout(ones): the same draws and the same output."""
    x = torch.randn(4, 8, 5, 5, dtype=torch.float64)
    torch.manual_seed(7)
    want = F.dropout(x, p=0.3, training=True)
    after_want = torch.get_rng_state()
    torch.manual_seed(7)
    mask = F.dropout(torch.ones_like(x), p=0.3, training=True)
    assert torch.equal(torch.get_rng_state(), after_want)
    assert torch.equal(x * mask, want)


@pytest.mark.parametrize("kwargs", [dict(adaptive_scale=True, attention=True, up=True),
                                    dict(adaptive_scale=False, down=True, resample_proj=True)])
def test_block_tangent_matches_jvp(kwargs: dict):
    """Block options SongUNet does not use (adaptive scale) still get the right tangent."""
    torch.manual_seed(0)
    block = perturbed(UNetBlock(8, 16, 12, num_heads=2, dropout=0.2, resample_filter=[1, 3, 3, 1],
                                **kwargs)).double().train()
    gen = torch.Generator().manual_seed(0)
    x, x_t = (torch.randn(2, 8, 6, 6, generator=gen, dtype=torch.float64) for _ in range(2))
    emb, emb_t = (torch.randn(2, 12, generator=gen, dtype=torch.float64) for _ in range(2))
    torch.manual_seed(1)
    y, y_t = unet_block(block, Dual(x, x_t), Dual(emb, emb_t))
    torch.manual_seed(1)
    y_jvp, dy = torch.func.jvp(block, (x, emb), (x_t, emb_t))
    assert torch.equal(y, y_jvp)
    assert rel_err(y_t, dy) < 1e-12


def test_network_mode_needs_a_network_with_a_tangent_path():
    net = SongUNet(**TINY)
    z, v, t, r, aug = tiny_inputs()
    with pytest.raises(ValueError, match="'network' needs a network with a hand-written tangent path.*function"):
        meanflow.u_and_dudt(lambda z_, t_, h_, aug_cond=None: net(z_, t_, h_, aug_cond), z, t, r, v,
                            dict(aug_cond=aug), jvp_mode="network")


def _loss_flops_and_grads(net, jvp_mode: str):
    z, v, t, r, aug = tiny_inputs(batch=4)
    net.zero_grad(set_to_none=True)
    torch.manual_seed(11)
    with FlopCounterMode(display=False) as counter:
        loss = meanflow.MeanFlow(jvp_mode=jvp_mode).loss(net, z, aug, noise=v, t=t, r=r)
        loss.backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops(), loss.detach(), grads


def test_network_mode_saves_flops_and_keeps_loss():
    """Forward AD of a convolution also convolves the input with the weights' zero tangent; the
    network path skips that product and gives the same loss and gradients (dropout included)."""
    torch.manual_seed(0)
    net = perturbed(SongUNet(**{**TINY, "dropout": 0.2})).train()
    joint_flops, joint_loss, joint_grads = _loss_flops_and_grads(net, "joint")
    network_flops, network_loss, network_grads = _loss_flops_and_grads(net, "network")
    assert network_flops < 0.9 * joint_flops, (network_flops, joint_flops)
    assert rel_err(network_loss, joint_loss) < 1e-6
    for got, want in zip(network_grads, joint_grads):
        assert rel_err(got, want) < 1e-5


# ---------------------------------------------------------------- building blocks

def test_group_norm_equals_torch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 5, 5, generator=gen)
    weight, bias = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    torch.testing.assert_close(group_norm(x, 4, weight, bias, 1e-6), F.group_norm(x, 4, weight, bias, 1e-6))


@functools.cache
def traced_silu_backward_is_one_op() -> bool:
    """Whether AOTAutograd keeps silu's backward as the silu_backward kernel, which works in float32
    inside as eager does. torch 2.7 writes it out as its formula in separate elementwise ops, each
    rounded to bf16 under autocast: traced gradients then differ from eager by bf16 rounding."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    ops = []

    def record(gm, inputs):
        ops.extend(str(node.target) for node in gm.graph.nodes)
        return make_boxed_func(gm)

    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm), bw_compiler=record)
    x = torch.ones(2, dtype=torch.bfloat16, requires_grad=True)
    torch.compile(F.silu, backend=backend)(x).sum().backward()
    return "aten.silu_backward.default" in ops


@pytest.mark.parametrize("jvp_mode, autocast", [("joint", torch.bfloat16), ("network", None),
                                                ("network", torch.bfloat16)])
@pytest.mark.slow
def test_loss_and_backward_trace_as_one_graph(jvp_mode: str, autocast):
    """Dynamo and AOTAutograd trace the loss and its backward without a graph break (fullgraph) on
    the paths train.py compiles besides the default one, and give the eager loss and gradients
    (dropout masks included: both draw them after the same seed)."""
    torch.manual_seed(0)
    net = perturbed(SongUNet(**{**TINY, "dropout": 0.1})).train()
    z, v, t, r, aug = tiny_inputs(batch=4)
    method = meanflow.MeanFlow(jvp_mode=jvp_mode, autocast=autocast)

    def loss_and_grads(fn):
        net.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss = fn(z, v, t, r)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in net.parameters()]

    def loss_fn(x, e, t_, r_):
        return method.loss(net, x, aug, noise=e, t=t_, r=r_)

    eager_loss, eager_grads = loss_and_grads(loss_fn)
    traced_loss, traced_grads = loss_and_grads(torch.compile(loss_fn, backend="aot_eager", fullgraph=True))
    assert rel_err(traced_loss, eager_loss) < 1e-5
    if autocast is None or traced_silu_backward_is_one_op():
        for got, want in zip(traced_grads, eager_grads):
            assert rel_err(got, want) < 1e-4
    else:
        # torch 2.7 rounds silu's backward step by step. Compared all together, the gradients stay
        # within bf16 rounding (1.0% measured, both cases); one small bias alone differed by 5.8%.
        flat = [torch.cat([g.flatten() for g in grads]) for grads in (traced_grads, eager_grads)]
        assert rel_err(*flat) < 2e-2


def test_group_norm_of_bf16_keeps_float32_statistics():
    """Under bf16 autocast the convolutions hand over bf16 activations. Their mean and 1 / std
    are taken in float32: rounded to bf16, a mean of about 100 would be off by up to 0.25, a
    quarter of a standard deviation here, where the output's own rounding is below 0.02."""
    gen = torch.Generator().manual_seed(0)
    x = (100 + torch.randn(3, 16, 5, 5, generator=gen)).bfloat16()
    weight, bias = torch.ones(16), torch.zeros(16)
    got = group_norm(x, 4, weight.bfloat16(), bias.bfloat16(), 1e-6)
    assert got.dtype == torch.bfloat16
    want = F.group_norm(x.float(), 4, weight, bias, 1e-6)
    assert (got.float() - want).abs().max() < 0.02


def test_network_and_joint_agree_under_bf16_autocast():
    torch.manual_seed(0)
    net = perturbed(SongUNet(**TINY)).train()
    x, noise, t, r, aug = tiny_inputs(batch=4)
    losses = {mode: meanflow.MeanFlow(jvp_mode=mode, autocast=torch.bfloat16).loss(net, x, aug, noise=noise, t=t, r=r)
              for mode in ("joint", "network")}
    full = meanflow.MeanFlow().loss(net, x, aug, noise=noise, t=t, r=r)
    for loss in losses.values():
        assert loss.dtype == torch.float32 and loss.item() != full.item() and rel_err(loss, full) < 2e-2
    assert rel_err(losses["network"], losses["joint"]) < 2e-2


def test_self_attention_equals_sdpa():
    gen = torch.Generator().manual_seed(0)
    batch, heads, ch, length = 2, 2, 4, 6
    qkv = torch.randn(batch, 3 * heads * ch, length, generator=gen)
    q, k, v = (y.reshape(batch, heads, ch, length).transpose(2, 3) for y in qkv.chunk(3, dim=1))
    want = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(batch, heads * ch, length)
    torch.testing.assert_close(self_attention(qkv, heads), want)


@pytest.mark.parametrize("variant", [
    dict(embedding_type="fourier", encoder_type="residual", decoder_type="skip"),
    dict(encoder_type="skip", decoder_type="skip", resample_filter=[1, 1]),
    dict(label_dim=5, label_dropout=0.5),
])
def test_variants_run(variant: dict):
    torch.manual_seed(0)
    net = SongUNet(**{**TINY, **variant})
    z, v, t, r, aug = tiny_inputs()
    labels = torch.tensor([1, 3]) if variant.get("label_dim") else None
    u, dudt = torch.func.jvp(lambda z_: net(z_, t, t - r, aug_cond=aug, labels=labels), (z,), (v,))
    assert u.shape == dudt.shape == z.shape[:1] + (TINY["out_channels"],) + z.shape[2:]
    assert torch.isfinite(u).all() and torch.isfinite(dudt).all()


def test_scalar_times_broadcast_over_batch():
    torch.manual_seed(0)
    net = perturbed(SongUNet(**TINY)).eval()
    z, _, _, _, _ = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(net(z, torch.tensor(0.7), torch.tensor(0.2)),
                                   net(z, torch.full((2,), 0.7), torch.full((2,), 0.2)))


# ---------------------------------------------------------------- bad arguments and inputs

def test_resolution_not_divisible_by_levels():
    with pytest.raises(ValueError, match=r"img_resolution=36.*2\*\*\(len\(channel_mult\)-1\)=8"):
        SongUNet(img_resolution=36, in_channels=3, out_channels=3, channel_mult=[1, 2, 2, 2])


@pytest.mark.parametrize("kwarg", [dict(embedding_type="sinusoidal"), dict(encoder_type="unet"),
                                   dict(decoder_type="residual")])
def test_unknown_architecture_names(kwarg: dict):
    name, value = next(iter(kwarg.items()))
    with pytest.raises(ValueError, match=f"{name}='{value}'"):
        SongUNet(**{**TINY, **kwarg})


def test_bad_channel_count_for_group_norm():
    with pytest.raises(ValueError, match="GroupNorm"):
        SongUNet(**{**TINY, "model_channels": 2})


@pytest.mark.parametrize("shape", [(2, 2, 16, 16), (2, 3, 8, 8), (2, 2, 8), (2, 2, 8, 4)])
def test_wrong_input_shape(shape: tuple):
    net = SongUNet(**TINY)
    with pytest.raises(ValueError, match=r"expects x of shape \[B, 2, 8, 8\]"):
        net(torch.zeros(shape), torch.ones(2), torch.ones(2))


def test_tangent_shape_must_match_x():
    net = SongUNet(**TINY)
    ones = torch.ones(2)
    with pytest.raises(ValueError, match=r"x_t must have the shape of x, \[2, 2, 8, 8\]"):
        forward_and_tangent(net, torch.zeros(2, 2, 8, 8), ones, ones, torch.zeros(2, 2, 8, 4), ones, ones)


def test_wrong_time_and_label_shapes():
    net = SongUNet(**TINY)
    z = torch.zeros(2, 2, 8, 8)
    with pytest.raises(ValueError, match="t must hold one value per sample"):
        net(z, torch.ones(3), torch.ones(2))
    with pytest.raises(ValueError, match=r"aug_cond must have shape \[2, 3\]"):
        net(z, torch.ones(2), torch.ones(2), aug_cond=torch.zeros(2, 6))
    with pytest.raises(ValueError, match="label_dim=0"):
        net(z, torch.ones(2), torch.ones(2), labels=torch.zeros(2, dtype=torch.long))
    conditional = SongUNet(**{**TINY, "label_dim": 4})
    with pytest.raises(ValueError, match="class-conditional"):
        conditional(z, torch.ones(2), torch.ones(2))


def test_null_label_is_the_all_zero_one_hot_row():
    """labels = label_dim is EDM's all-zero class vector: the label layer then adds only its bias."""
    torch.manual_seed(0)
    net = perturbed(SongUNet(**{**TINY, "label_dim": 4}))
    z, t, h = torch.randn(2, 2, 8, 8), torch.rand(2), torch.rand(2)
    null = net(z, t, h, labels=torch.tensor([4, 4]))
    with torch.no_grad():
        net.map_label.weight.zero_()
    torch.testing.assert_close(null, net(z, t, h, labels=torch.tensor([0, 3])), rtol=0, atol=0)
