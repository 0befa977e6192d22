"""The DiT of models/dit.py: the authors' configs and initialisation, their JAX code's outputs, loss and
gradients (tests/fixtures/dit_jax_small.npz), conversion of their checkpoints and loading them, the JVP,
and the DiT presets."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bench
import meanflow
import train
from models.dit import DIT_CONFIGS, DiT
from models.dit_convert import (import_flax_checkpoints, infer_config, read_flax_checkpoint, state_dict_from_flax,
                                torch_name)
from models.networks import DIT_SIZES
from training import config as config_lib
from training.build import build_trainer, checkpoint_from_flax, load_network
from training.resume import checkpoint_state
from training.step import train_step
from utils import data as data_utils
from utils.distributed import init_distributed
from utils.errors import UserFileError, UserValueError
from utils.latents import SD_SCALE, LatentSpace

# Parameters of their JAX DiT (counted with jax.eval_shape on their models_dit.py) and the paper's table.
JAX_PARAMS = {"B/4": 131_165_248, "B/2": 131_091_472, "M/2": 308_019_216, "L/2": 459_137_040, "XL/2": 676_440_592}
PAPER_PARAMS_M = {"B/4": 131.2, "B/2": 131.1, "M/2": 308.0, "L/2": 459.1, "XL/2": 676.4}
# Outputs, loss and gradients of their JAX code (tests/fixtures/README.md).
JAX_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "dit_jax_small.npz"
# Smallest network with every kind of layer: 4 tokens, 2 heads, 3 classes + null.
TINY = dict(img_resolution=4, in_channels=2, patch_size=2, hidden_size=16, depth=1, num_heads=2, num_classes=3,
            frequency_embedding_size=32)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def perturbed(net: DiT, seed: int = 0, scale: float = 0.1) -> DiT:
    """Noise on every parameter, so that the zero-initialised adaLN and final layers do not hide the rest."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return net


def tiny_net(dtype=torch.float32) -> DiT:
    torch.manual_seed(0)
    return perturbed(DiT(**TINY)).to(dtype)


def tiny_inputs(dtype=torch.float32, batch: int = 3):
    gen = torch.Generator().manual_seed(1)
    shape = (batch, TINY["in_channels"], TINY["img_resolution"], TINY["img_resolution"])
    z, v = torch.randn(shape, generator=gen, dtype=dtype), torch.randn(shape, generator=gen, dtype=dtype)
    t = torch.rand(batch, generator=gen, dtype=dtype) * 0.5 + 0.5
    r = t * torch.rand(batch, generator=gen, dtype=dtype)
    labels = torch.tensor([0, 2, TINY["num_classes"]])[:batch]  # the last one is the null class
    return z, v, t, r, labels


@pytest.fixture(scope="module")
def jax_small() -> dict:
    with np.load(JAX_FIXTURE) as data:
        fx = {key: data[key] for key in data.files}
    fx["meta"] = json.loads(str(fx.pop("meta_json")))
    fx["param"] = {k[len("param/"):]: v for k, v in fx.items() if k.startswith("param/")}
    fx["grad"] = {k[len("grad/"):]: v for k, v in fx.items() if k.startswith("grad/")}
    fx["init_std"] = {k[len("init_std/"):]: v for k, v in fx.items() if k.startswith("init_std/")}
    return fx


def flax_to_torch(flat: dict, meta: dict) -> tuple[dict, dict]:
    return state_dict_from_flax(flat, img_resolution=meta["dit"]["input_size"], num_heads=meta["dit"]["num_heads"])


@pytest.fixture(scope="module")
def converted(jax_small) -> DiT:
    config, state_dict = flax_to_torch(jax_small["param"], jax_small["meta"])
    net = DiT(**config)
    net.load_state_dict(state_dict, strict=True)
    return net


# ---------------------------------------------------------------- configs and initialisation

@pytest.mark.parametrize("name", list(DIT_CONFIGS))
def test_parameter_count_matches_their_code_and_the_paper(name):
    with torch.device("meta"):  # shapes only: no memory, no time spent on random init
        net = DiT(**DIT_CONFIGS[name])
    count = sum(p.numel() for p in net.parameters())
    assert count == JAX_PARAMS[name]
    assert abs(count / 1e6 - PAPER_PARAMS_M[name]) <= 0.005 * PAPER_PARAMS_M[name]


def test_fresh_network_outputs_zero_and_follows_their_init(jax_small):
    """adaLN and final layer are zero (output exactly 0); the other tensors' spread equals that of their init."""
    meta = jax_small["meta"]["dit"]
    torch.manual_seed(0)
    config = dict(img_resolution=meta["input_size"], in_channels=meta["in_channels"], patch_size=meta["patch_size"],
                  hidden_size=meta["hidden_size"], depth=meta["depth"], num_heads=meta["num_heads"],
                  num_classes=meta["num_classes"])
    net = DiT(**config)
    z = torch.randn(2, meta["in_channels"], meta["input_size"], meta["input_size"])
    u = net(z, torch.rand(2), torch.rand(2), torch.tensor([1, meta["num_classes"]]))
    assert torch.equal(u, torch.zeros_like(u))

    their_std = {torch_name(k): float(v) for k, v in jax_small["init_std"].items()}
    for name, p in net.named_parameters():
        if their_std[name] == 0.0:
            assert torch.count_nonzero(p) == 0, name
        else:  # same distribution: the standard deviations agree to sampling error (>= 352 elements, < 4%)
            assert p.std().item() == pytest.approx(their_std[name], rel=0.15), name


def test_infer_config_rebuilds_every_config():
    for config in DIT_CONFIGS.values():
        with torch.device("meta"):
            state_dict = DiT(**config).state_dict()
        assert infer_config(state_dict) == {**config, "mlp_ratio": 4.0, "frequency_embedding_size": 256}
    assert infer_config(DiT(**TINY).state_dict(), num_heads=2) == {**TINY, "mlp_ratio": 4.0}
    with pytest.raises(ValueError, match="pass num_heads"):
        infer_config(DiT(**TINY).state_dict())


# ---------------------------------------------------------------- forward

def test_forward_shapes_labels_and_bad_inputs():
    net = tiny_net()
    z, _, t, r, labels = tiny_inputs()
    u = net(z, t, t - r, labels)
    assert u.shape == z.shape and u.dtype == z.dtype and torch.isfinite(u).all()
    null = torch.full_like(labels, TINY["num_classes"])
    assert not torch.allclose(net(z, t, t - r, null)[0], u[0])  # the label matters ...
    assert torch.equal(net(z, t, t - r, null)[2], u[2])  # ... and the null class is a label like the others

    uncond = perturbed(DiT(**{**TINY, "num_classes": 0}))
    assert uncond(z, t, t - r).shape == z.shape
    assert torch.equal(uncond(z, t, t - r), uncond(z, t, t - r, torch.zeros_like(labels)))
    with pytest.raises(ValueError, match="class-conditional"):
        net(z, t, t - r)
    with pytest.raises(ValueError, match="one-hot"):
        net(z, t, t - r, torch.nn.functional.one_hot(labels, TINY["num_classes"] + 1).float())
    with pytest.raises(ValueError, match="NCHW"):
        net(z.permute(0, 2, 3, 1), t, t - r, labels)


# ---------------------------------------------------------------- their JAX code

def test_converted_network_reproduces_their_outputs_and_1step_sample(jax_small, converted):
    fx = {k: torch.from_numpy(v) for k, v in jax_small.items() if isinstance(v, np.ndarray)}
    with torch.no_grad():
        u = converted(fx["z"], fx["t"], fx["h"], fx["labels"])
        ones = torch.ones(len(fx["noise"]))
        sample = fx["noise"] - converted(fx["noise"], ones, ones, fx["sample_labels"])
    assert rel_err(u, fx["u"]) < 1e-5
    assert rel_err(sample, fx["sample_1step"]) < 1e-5


def test_state_dict_from_flax_names_the_problem(jax_small):
    flat = dict(jax_small["param"])
    flat.pop("blocks/layers_1/mlp/fc2/_flax_linear/bias")
    with pytest.raises(ValueError, match="missing blocks.1.mlp.fc2.bias"):
        flax_to_torch(flat, jax_small["meta"])
    config, _ = flax_to_torch({f"net/{k}": v for k, v in jax_small["param"].items()}, jax_small["meta"])
    assert config["depth"] == 2 and config["num_classes"] == 10


def test_meanflow_loss_and_grads_match_jax(jax_small, converted):
    """Their MeanFlow.forward (guidance, label dropout, JVP, adaptive weight) on fixed draws, float32."""
    fx = {k: torch.from_numpy(v) for k, v in jax_small.items() if isinstance(v, np.ndarray)}
    m = jax_small["meta"]["method"]
    method = meanflow.MeanFlow(
        tr_sampler="v0", P_mean_t=m["P_mean"], P_std_t=m["P_std"], P_mean_r=m["P_mean"], P_std_r=m["P_std"],
        ratio=1 - m["data_proportion"], norm_p=m["norm_p"], norm_eps=m["norm_eps"],
        num_classes=jax_small["meta"]["dit"]["num_classes"], cfg_omega=m["omega"], cfg_kappa=m["kappa"],
        cfg_t_start=m["t_start"], cfg_t_end=m["t_end"], label_dropout=m["class_dropout_prob"])
    converted.zero_grad()
    loss = method.loss(converted, fx["loss_x"], labels=fx["loss_labels"], noise=fx["loss_e"], t=fx["loss_t"],
                       r=fx["loss_r"], drop=fx["loss_drop"])
    loss.backward()
    assert loss.item() == pytest.approx(fx["loss"].item(), rel=1e-5)
    _, their_grads = flax_to_torch(jax_small["grad"], jax_small["meta"])
    for name, p in converted.named_parameters():
        assert rel_err(p.grad, their_grads[name]) < 1e-4, name


def write_their_checkpoint(folder: Path, params: dict, ema_params: dict, step: int = 7) -> None:
    """A checkpoint saved as their train.py saves it (TrainState with ema_params, save_checkpoint_multiprocess);
    params and ema_params flat, '/'-joined inside the DiT. Skips the test without jax, flax, orbax-checkpoint."""
    try:
        traverse_util, checkpoints = import_flax_checkpoints()
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    from typing import Any

    import optax
    from flax.training import train_state

    class TrainState(train_state.TrainState):
        ema_params: Any

    state = TrainState.create(apply_fn=None, params={"net": traverse_util.unflatten_dict(params, sep="/")},
                              ema_params={"net": traverse_util.unflatten_dict(ema_params, sep="/")},
                              tx=optax.adamw(1e-4, b2=0.95))
    checkpoints.save_checkpoint_multiprocess(str(folder), state, step, keep=3)


def halved(flat: dict) -> dict:
    return {k: v / 2 for k, v in flat.items()}


def test_read_flax_checkpoint_of_their_train_state(jax_small, tmp_path):
    write_their_checkpoint(tmp_path, jax_small["param"], halved(jax_small["param"]))
    for folder in (tmp_path, tmp_path / "checkpoint_7"):
        read = read_flax_checkpoint(folder)
        assert read["params"].keys() == read["ema_params"].keys() == jax_small["param"].keys()
        for name, value in jax_small["param"].items():
            np.testing.assert_array_equal(read["params"][name], value)
            np.testing.assert_array_equal(read["ema_params"][name], value / 2)
    config, state_dict = flax_to_torch(read["ema_params"], jax_small["meta"])
    DiT(**config).load_state_dict(state_dict, strict=True)
    with pytest.raises(ValueError, match="not a checkpoint"):
        read_flax_checkpoint(tmp_path / "checkpoint_7" / "d")


def their_sample(net: torch.nn.Module, jax_small: dict) -> torch.Tensor:
    """The 1-step sample of meanflow.sample (what sample.py draws) on the noise and labels of their sample."""
    with torch.no_grad():
        return meanflow.sample(net, torch.from_numpy(jax_small["noise"]),
                               labels=torch.from_numpy(jax_small["sample_labels"]))


def test_load_network_of_their_converted_checkpoint_samples_their_sample(jax_small, tmp_path):
    """Their params as "net", their EMA params as "net_ema": from the converted dict and from it saved as a file."""
    meta = jax_small["meta"]["dit"]
    read = {"params": jax_small["param"], "ema_params": halved(jax_small["param"])}
    ckpt = checkpoint_from_flax(read, img_resolution=meta["input_size"], num_heads=meta["num_heads"])
    space = LatentSpace.of_checkpoint(ckpt)  # sample.py decodes their samples: sd-vae-ft-mse after / 0.18215
    assert space.norm == SD_SCALE and space.vae_name == "mse" and space.resolution == 8 * meta["input_size"]
    torch.save(ckpt, tmp_path / "converted.pth")
    for source in (ckpt, tmp_path / "converted.pth"):
        net = load_network(source, ema="net")
        assert rel_err(their_sample(net, jax_small), torch.from_numpy(jax_small["sample_1step"])) < 1e-5
        ema = load_network(source, ema="net_ema")
        for p_ema, p in zip(ema.parameters(), net.parameters()):
            torch.testing.assert_close(p_ema, p / 2)


def test_load_network_of_their_checkpoint_folder_samples_their_sample(jax_small, tmp_path):
    """sample.py --ckpt FOLDER: their checkpoint folder read by load_network (jax, flax, orbax-checkpoint)."""
    write_their_checkpoint(tmp_path, jax_small["param"], halved(jax_small["param"]))
    meta = jax_small["meta"]["dit"]
    given = dict(img_resolution=meta["input_size"], num_heads=meta["num_heads"])  # not in their weights
    net = load_network(tmp_path / "checkpoint_7", ema="net", model_config=given)
    assert rel_err(their_sample(net, jax_small), torch.from_numpy(jax_small["sample_1step"])) < 1e-5
    ema = load_network(tmp_path, ema="net_ema", model_config=given)
    torch.testing.assert_close(ema.blocks[0].attn.qkv.weight, net.blocks[0].attn.qkv.weight / 2)
    with pytest.raises(UserValueError, match=r"no network 'net_ema1'.*\['net', 'net_ema'\]"):
        load_network(tmp_path, ema="net_ema1", model_config=given)


def test_load_network_of_a_folder_without_flax_names_the_packages(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "flax", None)
    with pytest.raises(UserFileError, match="is a folder.*pip install jax flax orbax-checkpoint"):
        load_network(tmp_path)


def test_read_flax_checkpoint_without_flax_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "flax", None)  # makes `import flax` fail as if it were not installed
    with pytest.raises(ModuleNotFoundError, match="needs the package 'flax'.*pip install jax flax orbax-checkpoint"):
        read_flax_checkpoint(tmp_path)


# ---------------------------------------------------------------- forward-mode AD

def test_jvp_matches_central_differences():
    """du/dt of (z, t, r) -> u(z, t, t - r) along (v, 1, 0), float64."""
    net = tiny_net(torch.float64)
    z, v, t, r, labels = tiny_inputs(torch.float64)

    def u_of(z_, t_, r_):
        return net(z_, t_, t_ - r_, labels)

    _, dudt = torch.func.jvp(u_of, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    eps = 1e-6
    fd = (u_of(z + eps * v, t + eps, r) - u_of(z - eps * v, t - eps, r)) / (2 * eps)
    assert rel_err(dudt, fd) < 1e-7


def _jvp_objective(net: DiT, params: dict, z, v, t, r, labels) -> torch.Tensor:
    """A scalar of u and du/dt whose parameter gradient goes through the JVP (as MeanFlow's would, undetached)."""
    def u_of(z_, t_, r_):
        return torch.func.functional_call(net, params, (z_, t_, t_ - r_, labels))

    u, dudt = torch.func.jvp(u_of, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    return (u * z).sum() + (dudt * torch.cos(z)).sum()


def test_gradient_through_jvp_matches_central_differences():
    net = tiny_net(torch.float64)
    z, v, t, r, labels = tiny_inputs(torch.float64)
    params = {k: p.detach().requires_grad_() for k, p in net.named_parameters()}
    grads = torch.autograd.grad(_jvp_objective(net, params, z, v, t, r, labels), list(params.values()))
    gen = torch.Generator().manual_seed(2)
    direction = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}
    eps = 1e-6
    with torch.no_grad():
        shifted = [_jvp_objective(net, {k: p + s * eps * direction[k] for k, p in params.items()}, z, v, t, r, labels)
                   for s in (1, -1)]
    fd = (shifted[0] - shifted[1]) / (2 * eps)
    analytic = sum((g * d).sum() for g, d in zip(grads, direction.values()))
    assert analytic.item() == pytest.approx(fd.item(), rel=1e-7)


@pytest.mark.slow
def test_compiled_jvp_and_backward_match_eager():
    """The training pattern (jvp, detached target, backward) under torch.compile equals eager, float32.

    backend aot_eager: it traces the same joint forward/JVP/backward graph as inductor, whose CPU
    code generation takes minutes on two cores.
    """
    net = tiny_net()
    z, v, t, r, labels = tiny_inputs()

    def step(z, v, t, r):
        u, dudt = torch.func.jvp(lambda z_, t_, r_: net(z_, t_, t_ - r_, labels), (z, t, r),
                                 (v, torch.ones_like(t), torch.zeros_like(r)))
        u_tgt = (v - (t - r)[:, None, None, None] * dudt).detach()
        return (u - u_tgt).square().sum()

    results = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        net.zero_grad()
        loss = fn(z, v, t, r)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in net.parameters()]))
    (loss_eager, grads_eager), (loss_compiled, grads_compiled) = results
    assert rel_err(loss_compiled, loss_eager) < 1e-6
    for g_compiled, g_eager in zip(grads_compiled, grads_eager):
        assert rel_err(g_compiled, g_eager) < 1e-5

# ---------------------------------------------------------------- presets

# Their JAX code's configs/default.py and configs/run_b4.yml (docs/dit.md); batch 32 per process x 8 = their 256.
IMAGENET_RECIPE = dict(
    dataset="imagenet256-latent", arch="dit", batch_per_process=32, epochs=240, lr=1e-4, warmup_epochs=0,
    adam_betas=[0.9, 0.95], ema_decay=0.9999, ema_decays=[], ema_period_steps=1, tr_sampler="v0", P_mean_t=-0.4,
    P_std_t=1.0, P_mean_r=-0.4, P_std_r=1.0, ratio=0.25, norm_p=1.0, norm_eps=0.01, class_cond=True,
    class_dropout=0.1, cfg_t_start=0.0, dropout=0.0, use_edm_aug=False, compute_fid=False)
# model_size, omega, kappa, end of the guidance interval: B/4 and M/2 their JAX default, the others the
# public PyTorch configs' (docs/dit.md).
IMAGENET_SIZES = {"imagenet256-b4": ("B/4", 1.0, 0.5, 1.0), "imagenet256-b2": ("B/2", 1.0, 0.5, 1.0),
                  "imagenet256-m2": ("M/2", 1.0, 0.5, 1.0), "imagenet256-l2": ("L/2", 0.2, 0.92, 0.8),
                  "imagenet256-xl2": ("XL/2", 0.2, 0.92, 0.75)}


@pytest.mark.parametrize("preset", list(IMAGENET_SIZES))
def test_imagenet_presets_are_the_authors_recipe(preset):
    cfg = config_lib.resolve(dict(preset=preset), cuda_available=True)
    assert {k: getattr(cfg, k) for k in IMAGENET_RECIPE} == IMAGENET_RECIPE
    size, omega, kappa, t_end = IMAGENET_SIZES[preset]
    assert (cfg.model_size, cfg.cfg_omega, cfg.cfg_kappa, cfg.cfg_t_end) == (size, omega, kappa, t_end)
    assert cfg.output_dir == f"./output/{preset}" and cfg.device == "cuda" and cfg.compile


def test_a_preset_whose_dataset_is_missing_fails_in_one_line(monkeypatch, capsys):
    monkeypatch.delitem(data_utils.DATASETS, "imagenet256-latent", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--preset", "imagenet256-b4", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err
    assert err.startswith("error: --preset imagenet256-b4 trains on the dataset 'imagenet256-latent', which is not")
    assert bench.main(["--preset", "imagenet256-b4", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("skipped --preset imagenet256-b4: its dataset 'imagenet256-latent'")


def test_digits_dit_preset_trains_and_its_checkpoint_rebuilds_the_network():
    """Two steps of the preset; the checkpoint's model_config carries the head count, which the weights do not."""
    cfg = train.resolve_config(["--preset", "digits-dit", "--device", "cpu"])
    assert (cfg.arch, cfg.model_size, cfg.class_cond, cfg.cfg_omega, cfg.cfg_kappa) == ("dit", "XS/2", True, 1.0, 0.5)
    trainer = build_trainer(cfg, init_distributed("cpu"))
    losses = [train_step(trainer, step)[0].item() for step in range(2)]
    assert all(np.isfinite(losses))
    ckpt = checkpoint_state(trainer, 2, config=cfg.flags(), rollback={})
    assert ckpt["network"] == "dit" and ckpt["model_config"]["num_heads"] == DIT_SIZES["XS/2"]["num_heads"]
    net = load_network(ckpt, ema="net")
    for p, q in zip(net.parameters(), trainer.model.net.parameters()):
        assert torch.equal(p, q)
