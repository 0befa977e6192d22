"""What a run is made of, built from its TrainConfig: the data, the network, the method, the Trainer;
and a network rebuilt from a checkpoint (ours or the authors')."""

import socket
from pathlib import Path

import torch
import torch.distributed as dist

import meanflow
from models import dit_convert, imf_convert
from models.ema import EMAModel
from models.imf_dit import ImfDiT
from models.networks import NetworkSpec, network_spec, spec_of_state_dict
from training.config import FLAG_OF_FIELD, PRESETS, TrainConfig
from training.precision import autocast_dtype
from training.sampling import Guidance, default_guidance
from training.step import Trainer, loss_and_backward
from utils import data as data_utils
from utils.augment import AugmentPipe
from utils.checkpoint import available_networks, load_checkpoint, model_state
from utils.distributed import DistEnv, GradSync, barrier
from utils.errors import UserFileError, UserValueError
from utils.latents import CHECKPOINT_KEY, NORMS, LatentDataset, LatentSpace
from utils.vae import vae_source


def build_method(cfg: TrainConfig) -> meanflow.MeanFlow | meanflow.ImprovedMeanFlow:
    """The objective of these settings: MeanFlow's (a class-conditional run gets the guidance settings) or iMF's."""
    if cfg.objective == "imf":
        return meanflow.ImprovedMeanFlow(
            num_classes=data_utils.dataset_info(cfg.dataset).num_classes, P_mean=cfg.P_mean_t, P_std=cfg.P_std_t,
            data_proportion=1.0 - cfg.ratio, class_dropout_prob=cfg.class_dropout, norm_p=cfg.norm_p,
            norm_eps=cfg.norm_eps, autocast=autocast_dtype(cfg.precision))
    guidance = {}
    if cfg.class_cond:
        guidance = dict(num_classes=data_utils.dataset_info(cfg.dataset).num_classes, cfg_omega=cfg.cfg_omega,
                        cfg_kappa=cfg.cfg_kappa, cfg_t_start=cfg.cfg_t_start, cfg_t_end=cfg.cfg_t_end,
                        label_dropout=cfg.class_dropout)
    return meanflow.MeanFlow(tr_sampler=cfg.tr_sampler, P_mean_t=cfg.P_mean_t, P_std_t=cfg.P_std_t,
                             P_mean_r=cfg.P_mean_r, P_std_r=cfg.P_std_r, ratio=cfg.ratio, norm_p=cfg.norm_p,
                             norm_eps=cfg.norm_eps, jvp_mode=cfg.jvp_mode, autocast=autocast_dtype(cfg.precision),
                             **guidance)


def network_config(cfg: TrainConfig) -> tuple[NetworkSpec, dict]:
    """The architecture of these settings and its keyword arguments for the dataset's shape and classes."""
    spec = network_spec(cfg.arch)
    info = data_utils.dataset_info(cfg.dataset)
    options = {name: getattr(cfg, name) for name in spec.options}
    num_classes = info.num_classes if cfg.class_cond else 0
    return spec, spec.make_config(info.img_shape, num_classes, **options)


def check_buildable(cfg: TrainConfig) -> None:
    """UserValueError naming the flag when the network, the method or the evaluation cannot be built."""
    spec = network_spec(cfg.arch)
    if cfg.dataset not in data_utils.DATASETS and cfg.preset and PRESETS[cfg.preset].get("dataset") == cfg.dataset:
        raise UserValueError(f"--preset {cfg.preset} trains on the dataset {cfg.dataset!r}, which is not in this "
                             f"version's table of datasets ({', '.join(data_utils.DATASETS)})")
    info = data_utils.dataset_info(cfg.dataset)
    problem = spec.check(info.img_shape, **{name: getattr(cfg, name) for name in spec.options})
    if problem is not None:
        name, why = problem
        raise UserValueError(f"--{FLAG_OF_FIELD.get(name, name)} {getattr(cfg, name)!r}: {why}")
    if cfg.use_edm_aug and not spec.augments:
        raise UserValueError(f"--use_edm_aug: the {spec.name} network takes no augmentation labels")
    if spec.guidance_inputs != (cfg.objective == "imf"):
        raise UserValueError(f"--objective {cfg.objective} with --arch {spec.name}: iMF's objective trains a network "
                             f"that takes the guidance as inputs and has a v-head (imf_dit), MeanFlow's one that "
                             f"does not")
    if cfg.compute_fid and info.quality != "inception":
        raise UserValueError(f"--compute_fid True: Inception FID is not the figure of {cfg.dataset} (its samples "
                             f"are scored by the {info.quality} quality figure instead)")
    if cfg.compute_fid and info.latent:
        raise UserValueError(f"--compute_fid True: {cfg.dataset} is scored against {info.reference} by evaluate.py "
                             f"--ref, not during training (docs/imagenet.md)")
    if cfg.use_edm_aug and info.latent:
        raise UserValueError(f"--use_edm_aug: EDM's augmentation transforms images, and {cfg.dataset} holds latents")
    try:
        build_method(cfg)  # MeanFlow checks its own arguments (ratio, stds, sampler, guidance)
    except ValueError as e:
        raise UserValueError(str(e)) from e


def open_training_data(cfg: TrainConfig, env: DistEnv) -> data_utils.ImageData:
    """The training split; a missing dataset fails within seconds when offline (FileNotFoundError).

    One process per node reads (and, online, downloads) first: torchvision writes the archive in
    place, so concurrent downloads into one folder would corrupt it.
    """
    if env.local_rank != 0:
        barrier()
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # an unreachable mirror must not hang the start of a job
    try:
        data = data_utils.open_dataset(cfg.dataset, data_path=cfg.data_path, train=True)
    finally:
        socket.setdefaulttimeout(old)
    if env.local_rank == 0:
        barrier()
    return data


def build_trainer(cfg: TrainConfig, env: DistEnv, data: data_utils.ImageData | None = None, *,
                  compile_mode: str | None = None, fused_adam: bool = False) -> Trainer:
    """A Trainer with fresh weights drawn from cfg.seed, the same on every rank.

    data: the training split (default: cfg.dataset, loaded). compile_mode: torch.compile's mode (None:
    its default). fused_adam: Adam's fused implementation instead of torch's default (benchmarks).
    """
    data = open_training_data(cfg, env) if data is None else data
    global_batch = cfg.batch_per_process * env.world_size
    if global_batch > len(data):
        raise UserValueError(f"global batch {global_batch} (--batch_size {cfg.batch_per_process} x {env.world_size} "
                             f"processes) is larger than the {len(data)} training images: lower --batch_size")
    spec, model_config = network_config(cfg)
    info = data_utils.dataset_info(cfg.dataset)
    latent = None
    # The network's own normalization, and what decodes its samples (recorded in checkpoints). bench.py's
    # synthetic latents (an ImageData, no VAE) train as plain arrays: the normalization costs nothing to time.
    if isinstance(data, LatentDataset):
        latent = LatentSpace(norm=NORMS[spec.latent_norm], vae=data.description["vae"],
                             resolution=data.description["resolution"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(data_utils.fold_seed(cfg.seed, "init"))
        net = spec.build(model_config)
    net.to(env.device)
    if env.world_size > 1:  # the same seed gives the same weights; broadcasting makes it certain
        for tensor in net.state_dict().values():
            dist.broadcast(tensor, src=0)
    model = EMAModel(net, decays=(cfg.ema_decay, *cfg.ema_decays), period=cfg.ema_period_steps)
    model.train()
    # Adam, not AdamW, and only the trained network's parameters: the EMA copies are not optimized.
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=0.0,
                                 **(dict(fused=True) if fused_adam else {}))
    steps_per_epoch = data_utils.steps_per_epoch(len(data), global_batch)
    return Trainer(
        data=data.to(env.device), env=env, model=model, network=spec.name, model_config=model_config,
        optimizer=optimizer, method=build_method(cfg), grad_sync=GradSync(net.parameters()),
        loss_fn=torch.compile(loss_and_backward, mode=compile_mode) if cfg.compile else loss_and_backward,
        augment=AugmentPipe() if cfg.use_edm_aug else None, flip=info.flip if cfg.flip is None else cfg.flip,
        class_cond=cfg.class_cond, seed=cfg.seed, batch=cfg.batch_per_process, lr=cfg.lr,
        warmup_steps=cfg.warmup_epochs * steps_per_epoch, latent=latent)


def _sd_vae_mse() -> dict:
    """The VAE record of sd-vae-ft-mse, the VAE of both papers (as prepare_latents.py records it)."""
    return {**vae_source("mse"), "scaling_factor": 0.18215}


# The networks of the authors' JAX train state under our names: their trained and EMA parameters.
FLAX_NETWORKS = {"net": "params", "net_ema": "ema_params"}


def checkpoint_from_flax(read: dict[str, dict], *, img_resolution: int = 32, num_heads: int | None = None) -> dict:
    """The authors' JAX DiT checkpoint, as models.dit_convert.read_flax_checkpoint returns it, as a
    checkpoint of ours: the DiT's config, their params as network "net", their ema_params as "net_ema".
    img_resolution, num_heads: what their weights do not tell (state_dict_from_flax). Their DiT trains on
    sd-vae-ft-mse's latents times 0.18215 (their vae_util.py), which the "latent" entry records, so that
    sample.py and evaluate.py decode its samples to images of 8 x img_resolution pixels."""
    model = {}
    for name, key in FLAX_NETWORKS.items():
        config, state_dict = dit_convert.state_dict_from_flax(read[key], img_resolution=img_resolution,
                                                              num_heads=num_heads)
        model.update({f"{name}.{k}": v for k, v in state_dict.items()})
    latent = LatentSpace(norm=NORMS["sd-scale"], vae=_sd_vae_mse(), resolution=8 * img_resolution)
    return {"model": model, "network": "dit", "model_config": config, CHECKPOINT_KEY: latent.to_dict()}


def is_imf_release(ckpt: dict) -> bool:
    """Whether a loaded file is the authors' iMF-*.pth: their iMeanFlow's bare state dict, every key under net."""
    return ("model" not in ckpt and bool(ckpt) and all(k.startswith("net.") and torch.is_tensor(v)
                                                          for k, v in ckpt.items())
            and network_spec("imf_dit").owns({k[len("net."):]: v for k, v in ckpt.items()}))


def imf_release_latent(img_resolution: int = 32) -> LatentSpace:
    """The latent space of the authors' iMF networks, as their PyTorch evaluation decodes them (utils/vae_util.py):
    sd-vae-ft-mse, after undoing iMF's per-channel normalization; images of 8 x img_resolution pixels."""
    return LatentSpace(norm=NORMS["imf"], vae=_sd_vae_mse(), resolution=8 * img_resolution)


def checkpoint_from_imf(state_dict: dict, *, img_resolution: int = 32) -> dict:
    """The authors' iMF-*.pth (is_imf_release) as a checkpoint of ours: their network as "net", its config (read
    from the weights; the input side, which they do not tell, is img_resolution) and, for one of their
    configurations, their latent space (imf_release_latent), so that sample.py and evaluate.py decode its
    samples to images. Another network in their layout (export_imf of a digits run, say) is taken as a model
    of images: the layout records neither its data nor its guidance."""
    config = imf_convert.infer_config(state_dict, img_resolution=img_resolution)
    ckpt = {"model": dict(state_dict), "network": "imf_dit", "model_config": config}
    if imf_convert.config_name(config) is not None:
        ckpt[CHECKPOINT_KEY] = imf_release_latent(img_resolution).to_dict()
    return ckpt


def read_checkpoint(path: str | Path, model_config: dict | None = None) -> dict:
    """A checkpoint dict from a file (ours, the authors' PyTorch release, or iMF's iMF-*.pth, converted by
    checkpoint_from_imf), or from a folder: the authors' JAX DiT checkpoint (checkpoint_<step> or the work dir
    holding it), read with jax, flax and orbax-checkpoint and converted by checkpoint_from_flax. Their weights
    do not tell the input size and head count: model_config's img_resolution and num_heads, when given, set
    them."""
    if not Path(path).is_dir():
        ckpt = load_checkpoint(path)
        if is_imf_release(ckpt):
            return checkpoint_from_imf(ckpt, img_resolution=(model_config or {}).get("img_resolution", 32))
        return ckpt
    given = {k: v for k, v in (model_config or {}).items() if k in ("img_resolution", "num_heads")}
    try:
        return checkpoint_from_flax(dit_convert.read_flax_checkpoint(path), **given)
    except ModuleNotFoundError as e:
        raise UserFileError(f"{path} is a folder, read as the authors' JAX DiT checkpoint: {e}") from e
    except ValueError as e:
        raise UserFileError(f"{path} is a folder but not the authors' JAX DiT checkpoint: {e}") from e


def load_network(path_or_ckpt, ema: str = "net_ema", model_config: dict | None = None,
                 device: str | torch.device = "cpu") -> torch.nn.Module:
    """A network in eval mode from one network of a checkpoint: ours, or the authors' (PyTorch or JAX).

    path_or_ckpt: a path (read_checkpoint: a file, or the authors' JAX checkpoint folder) or an
    already loaded checkpoint dict. ema: "net", "net_ema", "net_ema1", ... (a JAX checkpoint: "net"
    is their params, "net_ema" their ema_params). The architecture is the checkpoint's `network`
    entry, else recognised from the weights (the authors' iMF checkpoints hold one network, "net");
    the config is ckpt["model_config"] if the file has one, else `model_config`, else inferred from
    the weights (a JAX checkpoint: with model_config's img_resolution and num_heads, read_checkpoint).
    """
    ckpt = path_or_ckpt if isinstance(path_or_ckpt, dict) else read_checkpoint(path_or_ckpt, model_config)
    where = "the given checkpoint" if isinstance(path_or_ckpt, dict) else str(path_or_ckpt)
    prefix = ema + "."
    state = {k[len(prefix):]: v for k, v in model_state(ckpt).items() if k.startswith(prefix)}
    if not state:
        raise UserValueError(f"no network {ema!r} in {where}; available: {available_networks(ckpt)}")
    try:
        spec = network_spec(ckpt["network"]) if "network" in ckpt else spec_of_state_dict(state)
        state = spec.import_state(state)
        config = ckpt.get("model_config") or model_config or spec.infer_config(state)
    except ValueError as e:
        raise UserFileError(f"{where}: {e}") from e
    try:
        net = spec.build(config)
    except (TypeError, ValueError) as e:
        raise UserValueError(f"model config {config} does not fit {spec.cls.__name__} ({e}); fix --model_config") from e
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserFileError(f"weights of {ema!r} in {where} do not fit {spec.cls.__name__}({config}): {e}") from e
    return net.to(device).eval()


def network_guidance(net: torch.nn.Module, steps: int, *, omega: float | None = None, t_min: float | None = None,
                     t_max: float | None = None) -> Guidance:
    """training.sampling.default_guidance of an iMF network sampled in `steps` steps, given the settings its run
    recorded (None: not recorded); its size is the authors' configuration its weights have, if any."""
    return default_guidance(steps, size=imf_size(net), omega=omega, t_min=t_min, t_max=t_max)


def imf_size(net: torch.nn.Module) -> str | None:
    """The authors' configuration (B/2, M/2, L/2, XL/2) that an iMF network has, or None (another network)."""
    if not isinstance(net, ImfDiT):
        return None
    return imf_convert.config_name(imf_convert.infer_config(net.state_dict(), img_resolution=net.img_resolution))


def sampling_guidance(ckpt: dict, net: torch.nn.Module, steps: int, *, omega: list[float] | None = None,
                      t_min: list[float] | None = None, t_max: list[float] | None = None) -> list[Guidance | None]:
    """The guidance settings to sample `net`, a network of `ckpt`, with in `steps` steps: every combination of
    the values given (omega x t_min x t_max), each one not given from default_guidance: what the run recorded
    (its --omega, --t_min, --t_max), or the authors' setting for the network's size, recognised from its
    config (their iMF-*.pth record none). [None] for a network without guidance inputs; given values are
    then a UserValueError, as are values no network was trained on."""
    given = {"omega": omega, "t_min": t_min, "t_max": t_max}
    if not getattr(net, "takes_guidance", False):
        named = " ".join(f"--{name}" for name, values in given.items() if values)
        if named:
            raise UserValueError(f"{named}: guidance at sampling time is an input of iMF's network (imf_dit) only; "
                                 f"this network's guidance, if any, was fixed by its training (docs/guidance.md)")
        return [None]
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    default = network_guidance(net, steps, **{name: config.get(name) for name in given})
    values = [list(dict.fromkeys(given[name] or [getattr(default, name)])) for name in given]  # each value once
    try:
        return [Guidance(w, lo, hi) for w in values[0] for lo in values[1] for hi in values[2]]
    except ValueError as e:
        raise UserValueError(f"--omega, --t_min, --t_max: {e}") from e


def export_imf(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An iMF network (load_network's) in the authors' layout: the state dict that their PyTorch iMeanFlow, built
    for inference, loads with strict=True (models.imf_convert.to_official), so that their evaluate.py runs on
    it. The v-head is left out, as in their iMF-*.pth."""
    if not isinstance(net, ImfDiT):
        raise UserValueError(f"the network is a {type(net).__name__}: only iMF's network (imf_dit) has the "
                             f"authors' iMF layout")
    return imf_convert.to_official(net.state_dict())


def initial_model_state(trainer: Trainer, seed: int) -> dict:
    """The state dict of trainer.model at step 0: the weights build_trainer draws from `seed`, in the
    network and every EMA copy, and no EMA update counted. A rollback before any checkpoint restores it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(data_utils.fold_seed(seed, "init"))
        net = network_spec(trainer.network).build(trainer.model_config)
    weights = {k: v.to(trainer.device) for k, v in net.state_dict().items()}
    state = {f"{name}.{k}": v for name in trainer.model.networks() for k, v in weights.items()}
    state["num_updates"] = torch.zeros((), dtype=torch.int64, device=trainer.device)
    return state
