"""Train a MeanFlow model: command line, presets, and the training loop.

    python train.py --preset digits                              # CPU quickstart, a few minutes
    torchrun --nproc_per_node 8 train.py --preset cifar10-v1     # the release's improved CIFAR-10 run
    python train.py --preset digits --max_steps 500 --lr 2e-3    # explicit flags override the preset

This is the only module that reads the command line. It accepts every flag of the authors'
release with the same meaning and default, plus presets and a few flags of its own. Re-running
a command continues from OUTPUT_DIR/checkpoint-last.pth.

No DistributedDataParallel: the loss differentiates the network with torch.func.jvp, which
cannot run through the DDP wrapper (PyTorch issue 102197). Every rank runs the bare network,
gradients are averaged explicitly (utils.distributed.GradSync), and ranks are checked to hold
identical gradients and weights.

Randomness is keyed by (seed, step, purpose) and drawn for the global batch, of which each rank
takes its rows: a resumed run continues exactly, and with dropout 0, N processes with batch B
train the same weights as one process with batch N*B.
"""

import argparse
import contextlib
import json
import math
import os
import resource
import signal
import socket
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import meanflow
from models.augment import AugmentPipe
from models.ema import EMAModel
from models.unet import CIFAR10_CONFIG, SongUNet
from utils import checkpoint as ckpt_io
from utils import data as data_utils
from utils.distributed import DistEnv, GradSync, barrier, check_consistency, cleanup, init_distributed

CHECKPOINT_FORMAT = "meanflow-pytorch/1"
PRECISIONS = ("tf32", "fp32", "bf16")
LAST = "checkpoint-last.pth"
WARMUP_START = 1e-8  # the release's LinearLR starts at lr = 1e-8 (start_factor = 1e-8 / lr)
GRID_SIZE = 64       # samples per grid image

# Defaults of every flag. The first block is the release's argument parser, value for value
# (except `device`, which falls back to the CPU when CUDA is missing).
DEFAULTS = dict(
    batch_size=64, epochs=4000, lr=0.0006, optimizer_betas=[0.9, 0.999], warmup_epochs=200, dropout=0.2,
    ema_decay=0.9999, ema_decays=[0.99995, 0.9996], dataset="cifar10", data_path="./data",
    output_dir="./output_dir", fid_samples=50000, device=None, seed=0, resume="", start_epoch=0,
    eval_only=False, eval_frequency=50, compute_fid=False, save_fid_samples=False, num_workers=10,
    pin_mem=True, log_per_step=100, world_size=1, local_rank=-1, dist_on_itp=False, dist_url="env://",
    ratio=0.75, tr_sampler="v1", P_mean_t=-0.6, P_std_t=1.6, P_mean_r=-4.0, P_std_r=1.6,
    norm_p=0.75, norm_eps=1e-3, arch="unet", use_edm_aug=False, test_run=False, compile=None,
    # Additions of this repository. The network defaults are the release's CIFAR-10 network.
    preset=None, max_steps=None, ckpt_every=1000, snapshot_every=0, check_every=1000,
    model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16],
    ema_period=16, jvp_mode="joint", cpu_threads=0, precision="tf32",
)

_CIFAR10_RELEASE = dict(
    dataset="cifar10", batch_size=128, lr=0.0006, eval_frequency=50, epochs=16000, compute_fid=True,
    log_per_step=100, warmup_epochs=200, norm_p=0.75, ratio=0.75, dropout=0.2, use_edm_aug=True,
    # The release keeps a numbered checkpoint every 1000 epochs: 48,000 steps at 8 x 128.
    snapshot_every=48000,
)
PRESETS = {
    # scripts/cifar10_v0.sh of the release: the paper's (t, r) sampler.
    "cifar10-v0": dict(_CIFAR10_RELEASE, tr_sampler="v0", P_mean_t=-2.0, P_std_t=2.0, P_mean_r=-2.0, P_std_r=2.0,
                       output_dir="./output/cifar10-v0"),
    # scripts/cifar10_v1.sh of the release: the improved sampler (FID ~2.9 at 16000 epochs).
    "cifar10-v1": dict(_CIFAR10_RELEASE, tr_sampler="v1", P_mean_t=-0.6, P_std_t=1.6, P_mean_r=-4.0, P_std_r=1.6,
                       output_dir="./output/cifar10-v1"),
    # CPU quickstart on scikit-learn's 8x8 digits: about 6 minutes on one shared core. One thread:
    # the network's operations are too small to gain from more, and OpenMP threads competing with
    # other work for the same cores ran 30x slower. Short run: short warmup, fast EMAs (net_ema
    # 0.995 averages the last ~200 steps). No flips (a mirrored 2, 3, 4, 7 or 9 is not a digit),
    # no dropout (a 0.19M network does not overfit 1500 digits in 2000 steps).
    "digits": dict(
        dataset="digits", batch_size=64, lr=0.001, epochs=100, max_steps=2000, warmup_epochs=1, dropout=0.0,
        ema_decay=0.995, ema_decays=[0.999, 0.99], ema_period=1, use_edm_aug=False,
        model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], cpu_threads=1,
        eval_frequency=-1, log_per_step=250, ckpt_every=1000, check_every=1000, output_dir="./output/digits",
    ),
    # The smallest network with every block type (down/up-sampling, attention, augmentation labels),
    # for tests: a few CPU steps per second.
    "tiny": dict(
        dataset="digits", batch_size=8, lr=0.001, epochs=10, max_steps=8, warmup_epochs=0, dropout=0.0,
        ema_decay=0.9, ema_decays=[0.95, 0.5], ema_period=2, use_edm_aug=True,
        model_channels=4, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
        eval_frequency=-1, log_per_step=2, ckpt_every=4, check_every=4, fid_samples=64, cpu_threads=1,
        output_dir="./output/tiny",
    ),
}


# --------------------------------------------------------------------------- configuration


def build_parser() -> argparse.ArgumentParser:
    """The command line. Unset flags are absent from the namespace so presets can fill them."""
    p = argparse.ArgumentParser(
        description="Train MeanFlow (one-step generative model). Explicit flags override --preset.",
        argument_default=argparse.SUPPRESS, allow_abbrev=False)

    def add(*names, help, **kw):  # adds to the group `g` defined last below
        dest = kw.get("dest", names[0].lstrip("-"))
        if DEFAULTS.get(dest) is not None and kw.get("action") not in ("store_true", "store_false"):
            help += f" (default: {DEFAULTS[dest]})"
        g.add_argument(*names, help=help, **kw)

    ignored = "accepted for compatibility with the release; ignored: "
    g = p.add_argument_group("presets and run length")
    g.add_argument("--preset", choices=sorted(PRESETS), help="named settings: cifar10-v0/-v1 (the release's "
                   "launchers), digits (CPU quickstart), tiny (tests)")
    add("--epochs", type=int, help="training length in epochs of the global batch")
    add("--max_steps", type=int, help="training length in optimizer steps; overrides --epochs")
    add("--test_run", action="store_true", help="one training step, then one batch of evaluation; saves no checkpoint")

    g = p.add_argument_group("optimization")
    add("--batch_size", type=int, help="batch size per process (global batch = batch_size x processes)")
    add("--lr", type=float, help="learning rate (absolute, not scaled by batch size)")
    add("--optimizer_betas", type=float, nargs="+", help="beta1 beta2 of Adam")
    add("--warmup_epochs", type=int, help="epochs of linear lr warmup from 1e-8, then constant")
    add("--dropout", type=float, help="dropout rate of the network")
    add("--ema_decay", type=float, help="EMA decay of net_ema")
    add("--ema_decays", type=float, nargs="+", help="decays of the extra EMA copies net_ema1, net_ema2, ...")
    add("--ema_period", type=int, help="EMA copies are updated every N steps with decay**N")
    add("--seed", type=int, help="seed of initialisation, data order, augmentation, noise, (t, r) and dropout")

    g = p.add_argument_group("MeanFlow")
    add("--ratio", type=float, help="probability of drawing r apart from t")
    add("--tr_sampler", choices=["v0", "v1"], help="joint (t, r) sampler: v0 (paper) or v1 (improved)")
    for name, what in (("P_mean_t", "mean"), ("P_std_t", "std"), ("P_mean_r", "mean"), ("P_std_r", "std")):
        add(f"--{name}", type=float, help=f"{what} of the logit-normal distribution of {name[-1]}")
    add("--norm_p", type=float, help="power of the adaptive loss weight")
    add("--norm_eps", type=float, help="constant added before the adaptive weight's power")
    add("--jvp_mode", choices=list(meanflow.JVP_MODES), help="joint: one jvp gives u and du/dt (best compiled); "
        "split: du/dt from a no-grad jvp plus a forward for u (less memory without compile); network: the "
        "network's hand-written tangent path, without forward AD's convolutions against zero weight tangents")

    g = p.add_argument_group("network")
    add("--arch", choices=["unet"], help="architecture (SongUNet / DDPM++)")
    add("--model_channels", type=int, help="channels of the first level")
    add("--channel_mult", type=int, nargs="+", help="channel multiplier per resolution level")
    add("--num_blocks", type=int, help="residual blocks per level")
    add("--attn_resolutions", type=int, nargs="+", help="resolutions with self-attention")
    add("--use_edm_aug", action="store_true", help="EDM augmentation with its labels as network condition")
    add("--no_edm_aug", action="store_false", dest="use_edm_aug", help="turn off --use_edm_aug set by a preset")

    g = p.add_argument_group("data")
    add("--dataset", choices=list(data_utils.DATASETS), help="cifar10, mnist (3x32x32) or digits (1x8x8)")
    add("--data_path", help="folder with the dataset files (downloaded there when missing and online)")
    add("--num_workers", type=int, help=ignored + "the dataset is held in memory and indexed directly, no DataLoader")
    add("--pin_mem", action="store_true", help=ignored + "the dataset is moved to the device once")
    add("--no_pin_mem", action="store_false", dest="pin_mem", help=ignored + "see --pin_mem")

    g = p.add_argument_group("output, checkpoints, evaluation")
    add("--output_dir", help="folder for checkpoints, logs, TensorBoard, samples; empty for no saving")
    add("--resume", help="checkpoint to start from (ours or the release's); OUTPUT_DIR/checkpoint-last.pth wins, "
                         "except with --eval_only")
    add("--start_epoch", type=int, help=ignored + "the starting point is read from the checkpoint")
    add("--ckpt_every", type=int, help="write checkpoint-last.pth every N steps (0: only at the end and on a signal)")
    add("--snapshot_every", type=int, help="keep checkpoint-STEP.pth every N steps (0: never)")
    add("--check_every", type=int, help="check gradients and weights are equal on all ranks every N steps (0: only "
        "the first two steps and before checkpoints)")
    add("--log_per_step", type=int, help="log training statistics every N steps")
    add("--eval_frequency", type=int,
        help="evaluate (sample grids, FID) every N epochs and at the end; -1: only at the end")
    add("--eval_only", action="store_true",
        help="no training: evaluate the checkpoint given by --resume, else OUTPUT_DIR/checkpoint-last.pth")
    add("--compute_fid", action="store_true", help="compute FID of every network at each evaluation")
    add("--no_compute_fid", action="store_false", dest="compute_fid", help="turn off --compute_fid set by a preset")
    add("--fid_samples", type=int, help="number of generated samples for FID")
    add("--save_fid_samples", action="store_true", help=ignored + "write samples with sample.py --out FILE.npz")

    g = p.add_argument_group("devices and processes")
    add("--device", choices=["cuda", "cpu"], help="default: cuda when available, else cpu")
    add("--cpu_threads", type=int, help="threads for CPU work (torch.set_num_threads); 0: PyTorch's default")
    add("--precision", choices=list(PRECISIONS), help="tf32: float32 with TF32 matmuls and convolutions on CUDA, "
        "as the release runs; fp32: full float32; bf16: the network's forward and JVP under bfloat16 autocast, "
        "the loss arithmetic in float32 (on CPU tf32 is fp32)")
    add("--compile", action="store_true", help="torch.compile the training step (default: on for cuda, off for cpu)")
    add("--not_compile", action="store_false", dest="compile", help="do not torch.compile the training step")
    add("--world_size", type=int, help=ignored + "read from torchrun's or SLURM's environment")
    add("--local_rank", type=int, help=ignored + "read from torchrun's LOCAL_RANK or SLURM_LOCALID")
    add("--dist_on_itp", action="store_true", help="take ranks from OpenMPI's OMPI_COMM_WORLD_* variables")
    add("--dist_url", help="rendezvous: env:// (MASTER_ADDR, MASTER_PORT) or tcp://HOST:PORT")
    return p


def resolve_config(argv: list[str] | None = None) -> dict:
    """Release defaults, then the preset, then the flags given on the command line; validated.

    Raises SystemExit (argparse) for unknown flags or choices and ValueError for bad values.
    """
    given = vars(build_parser().parse_args(argv))
    cfg = dict(DEFAULTS)
    cfg.update(PRESETS.get(given.get("preset"), {}))
    cfg.update(given)
    if cfg["device"] is None:
        cfg["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg["compile"] is None:
        cfg["compile"] = cfg["device"] == "cuda"
    validate(cfg)
    return cfg


def validate(cfg: dict) -> None:
    """ValueError naming the flag and the value for anything that cannot train."""
    def need(ok, flag, why):
        if not ok:
            raise ValueError(f"--{flag} {cfg[flag]!r}: {why}")

    for flag in ("batch_size", "epochs", "log_per_step", "fid_samples", "model_channels", "num_blocks", "ema_period"):
        need(isinstance(cfg[flag], int) and cfg[flag] >= 1, flag, "must be a positive integer")
    need(cfg["max_steps"] is None or cfg["max_steps"] >= 1, "max_steps", "must be a positive integer")
    for flag in ("warmup_epochs", "ckpt_every", "snapshot_every", "check_every", "cpu_threads"):
        need(cfg[flag] >= 0, flag, "must be >= 0")
    need(cfg["lr"] > 0 and math.isfinite(cfg["lr"]), "lr", "must be a positive number")
    need(len(cfg["optimizer_betas"]) == 2 and all(0 <= b < 1 for b in cfg["optimizer_betas"]),
         "optimizer_betas", "give two numbers in [0, 1), e.g. 0.9 0.999")
    need(0 <= cfg["dropout"] < 1, "dropout", "must be in [0, 1)")
    need(0 <= cfg["ema_decay"] < 1, "ema_decay", "must be in [0, 1)")
    need(all(0 <= d < 1 for d in cfg["ema_decays"]), "ema_decays", "each must be in [0, 1)")
    need(len(cfg["channel_mult"]) >= 1 and min(cfg["channel_mult"]) >= 1, "channel_mult", "positive integers")
    resolution = 8 if cfg["dataset"] == "digits" else 32
    levels = [resolution >> i for i in range(len(cfg["channel_mult"]))]
    need(min(levels) >= 1, "channel_mult", f"{len(levels)} levels halve the {resolution}px image below 1px")
    need(all(r in levels for r in cfg["attn_resolutions"]), "attn_resolutions",
         f"the network's resolutions are {levels}; attention can only go there")
    need(not (cfg["compute_fid"] and cfg["dataset"] == "digits"), "compute_fid",
         "Inception FID is for 32x32 RGB data; digits runs report a classifier-based quality figure instead")
    need(cfg["dist_url"] == "env://" or cfg["dist_url"].startswith("tcp://"), "dist_url",
         "use env:// or tcp://HOST:PORT")
    # MeanFlow checks its own arguments (ratio, stds, sampler); build it once to fail before any work.
    make_method(cfg)


def make_method(cfg: dict) -> meanflow.MeanFlow:
    keys = ("tr_sampler", "P_mean_t", "P_std_t", "P_mean_r", "P_std_r", "ratio", "norm_p", "norm_eps", "jvp_mode")
    autocast = torch.bfloat16 if cfg["precision"] == "bf16" else None
    return meanflow.MeanFlow(**{k: cfg[k] for k in keys}, autocast=autocast)


def apply_precision(precision: str) -> None:
    """CUDA's float32 matmul and convolution settings for --precision (no effect on CPU).

    bf16 keeps TF32 for what runs outside autocast (the loss arithmetic is elementwise).
    """
    tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")


@contextlib.contextmanager
def precision_settings(precision: str):
    """apply_precision(precision) for a block, then the settings that were in force before."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    apply_precision(precision)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def unet_config(cfg: dict, img_shape: tuple[int, int, int]) -> dict:
    """SongUNet kwargs: the release's CIFAR-10 network with this run's size, data shape and dropout."""
    channels, resolution, _ = img_shape
    return dict(CIFAR10_CONFIG, img_resolution=resolution, in_channels=channels, out_channels=channels,
                model_channels=cfg["model_channels"], channel_mult=list(cfg["channel_mult"]),
                num_blocks=cfg["num_blocks"], attn_resolutions=list(cfg["attn_resolutions"]),
                dropout=cfg["dropout"], augment_dim=6 if cfg["use_edm_aug"] else 0)


def lr_at(step: int, *, lr: float, warmup_steps: int) -> float:
    """The release's schedule as a function of the step: LinearLR from 1e-8 to lr, then constant."""
    if step >= warmup_steps:
        return lr
    start = WARMUP_START / lr
    return lr * (start + (1.0 - start) * step / warmup_steps)


def apply_launcher_env(cfg: dict) -> None:
    """Translate the release's --dist_on_itp / --dist_url tcp:// into the variables torchrun sets."""
    if cfg["dist_on_itp"]:
        for ours, theirs in (("RANK", "RANK"), ("WORLD_SIZE", "SIZE"), ("LOCAL_RANK", "LOCAL_RANK")):
            os.environ[ours] = os.environ[f"OMPI_COMM_WORLD_{theirs}"]
    if cfg["dist_url"].startswith("tcp://"):
        host, _, port = cfg["dist_url"][len("tcp://"):].rpartition(":")
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = host, port


# --------------------------------------------------------------------------- the training step


def loss_and_backward(net, method: meanflow.MeanFlow, x, aug_cond, noise, t, r) -> torch.Tensor:
    """MeanFlow loss of one batch and its backward pass (the part that torch.compile speeds up)."""
    loss = method.loss(net, x, aug_cond, noise=noise, t=t, r=r)
    loss.backward()
    return loss.detach()


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device):
    """Seed the global RNG (dropout) for a block and restore the previous state afterwards."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class Trainer:
    """One process's share of training: data, EMAModel(SongUNet), Adam, MeanFlow loss, gradient sync.

    cfg: a dict from resolve_config. env: from utils.distributed.init_distributed.
    images: uint8 [N, C, H, W] training images (loaded from cfg["dataset"] when None).
    train_step(step) runs global batch number `step` (0-based) and leaves the weights after step+1
    optimizer steps; it returns the local loss as a device tensor (no host sync).
    """

    def __init__(self, cfg: dict, env: DistEnv, images: torch.Tensor | None = None):
        self.cfg, self.env, self.device = cfg, env, env.device
        if images is None:
            # One process per node reads (and, online, downloads) first; torchvision writes the
            # archive in place, so concurrent downloads into one folder would corrupt it.
            if env.local_rank != 0:
                barrier()
            images = load_training_images(cfg)
            if env.local_rank == 0:
                barrier()
        self.batch = cfg["batch_size"]
        self.global_batch = self.batch * env.world_size
        if self.global_batch > len(images):
            raise ValueError(f"global batch {self.global_batch} (--batch_size {self.batch} x {env.world_size} "
                             f"processes) is larger than the {len(images)} training images: lower --batch_size")
        self.steps_per_epoch = data_utils.steps_per_epoch(len(images), self.global_batch)
        self.total_steps = cfg["max_steps"] or cfg["epochs"] * self.steps_per_epoch
        self.warmup_steps = cfg["warmup_epochs"] * self.steps_per_epoch
        self.images = images.to(self.device)
        self.img_shape = tuple(images.shape[1:])
        # The release flips CIFAR-10 only: MNIST and digits are not mirror-symmetric.
        self.flip = cfg["dataset"] == "cifar10"
        self.augment = AugmentPipe() if cfg["use_edm_aug"] else None
        self.method = make_method(cfg)
        self.model_config = unet_config(cfg, self.img_shape)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(data_utils.fold_seed(cfg["seed"], "init"))
            net = SongUNet(**self.model_config)
        net.to(self.device)
        if env.world_size > 1:  # the same seed gives the same weights; broadcasting makes it certain
            for tensor in net.state_dict().values():
                dist.broadcast(tensor, src=0)
        self.model = EMAModel(net, decays=(cfg["ema_decay"], *cfg["ema_decays"]), period=cfg["ema_period"])
        self.model.train()
        # Adam, not AdamW, and only the trained network's parameters: the EMA copies are not optimized.
        self.optimizer = torch.optim.Adam(self.model.net.parameters(), lr=cfg["lr"],
                                          betas=tuple(cfg["optimizer_betas"]), weight_decay=0.0)
        self.grad_sync = GradSync(self.model.net.parameters())
        self.step_fn = torch.compile(loss_and_backward) if cfg["compile"] else loss_and_backward

    def generator(self, step: int, purpose: str, device: torch.device | str | None = None) -> torch.Generator:
        return data_utils.make_generator(self.cfg["seed"], "train", step, purpose, device=device or self.device)

    def make_batch(self, step: int):
        """This rank's rows of global batch `step`: (x, aug_cond, noise, t, r).

        Every random draw is made for the whole global batch from a generator keyed by
        (seed, step, purpose), then sliced, so rows do not depend on the number of processes.
        """
        rows = slice(self.env.rank * self.batch, (self.env.rank + 1) * self.batch)
        epoch, k = divmod(step, self.steps_per_epoch)
        idx = data_utils.batch_indices(self.cfg["seed"], epoch, len(self.images), self.global_batch, k)[rows]
        x = data_utils.to_float(self.images[data_utils.to_device(idx, self.device)])
        where = dict(offset=rows.start, total=self.global_batch)
        if self.flip:
            x = data_utils.random_hflip(x, self.generator(step, "flip", "cpu"), **where)
        aug_cond = None
        if self.augment is not None:
            # A CPU generator keeps the augmentation's draws and decisions on the host: no device sync.
            x, aug_cond = self.augment(x, self.generator(step, "augment", "cpu"), **where)
        shape = (self.global_batch, *self.img_shape)
        noise = torch.randn(shape, generator=self.generator(step, "noise"), device=self.device)[rows]
        t, r = self.method.sample_t_r(self.global_batch, device=self.device, generator=self.generator(step, "t_r"))
        return x, aug_cond, noise, t[rows], r[rows]

    def forward_backward(self, step: int) -> torch.Tensor:
        """Loss of this rank's rows of batch `step`; leaves rank-averaged gradients in .grad."""
        x, aug_cond, noise, t, r = self.make_batch(step)
        self.optimizer.zero_grad(set_to_none=True)
        with seeded_global_rng(data_utils.fold_seed(self.cfg["seed"], "dropout", step, self.env.rank), self.device):
            loss = self.step_fn(self.model.net, self.method, x, aug_cond, noise, t, r)
        self.grad_sync()
        return loss

    def optimizer_step(self, step: int) -> None:
        """Adam step at the lr of `step` (a pure function of the step), then the EMA update."""
        lr = lr_at(step, lr=self.cfg["lr"], warmup_steps=self.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.model.update()

    def train_step(self, step: int) -> torch.Tensor:
        """One full optimizer step on global batch `step`; returns the local loss (device tensor)."""
        loss = self.forward_backward(step)
        self.optimizer_step(step)
        return loss

    def grad_norm(self) -> torch.Tensor:
        """L2 norm of all gradients, a device tensor (read it only when logging)."""
        grads = [p.grad for p in self.model.net.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)

    def check_gradients(self, step: int) -> None:
        check_consistency(((n, p.grad) for n, p in self.model.net.named_parameters()), "gradient", step)

    def check_weights(self, step: int) -> None:
        check_consistency(self.model.state_dict().items(), "weight", step)

    def weights_finite(self) -> bool:
        return bool(torch.isfinite(torch.nn.utils.get_total_norm(list(self.model.net.parameters()))))

    def state_dict(self, step: int) -> dict:
        """The checkpoint: release layout under "model" plus what rebuilds and resumes the run."""
        epoch, k = divmod(step, self.steps_per_epoch)
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": {"kind": "linear_warmup_then_constant", "lr": self.cfg["lr"], "start_lr": WARMUP_START,
                            "warmup_steps": self.warmup_steps, "step": step},
            "step": step,
            "epoch": epoch,  # completed epochs
            "data_position": {"epoch": epoch, "step_in_epoch": k, "steps_per_epoch": self.steps_per_epoch,
                              "global_batch": self.global_batch, "world_size": self.env.world_size},
            "config": dict(self.cfg),
            "model_config": self.model_config,
            "ema_decays": dict(self.model.decays),
            "format": CHECKPOINT_FORMAT,
        }

    def load_state(self, ckpt: dict, source: str) -> tuple[int, list[str]]:
        """Load a checkpoint (ours, or the release's: model, optimizer, lr_schedule, epoch, args).

        Returns (step to continue from, notes for the log). The network must match exactly.
        """
        notes = []
        try:
            self.model.load_state_dict(ckpt["model"], strict=True)
        except (KeyError, RuntimeError) as e:
            raise RuntimeError(f"{source} does not fit this run's network {self.model_config} with EMA copies "
                               f"{self.model.ema_names()}: {e}; pass the network flags of the run that wrote it") from e
        if "optimizer" in ckpt:
            try:
                self._load_optimizer(ckpt["optimizer"])
            except (ValueError, KeyError, RuntimeError) as e:
                notes.append(f"optimizer state of {source} not loaded ({e}); Adam starts afresh")
        else:
            notes.append(f"{source} has no optimizer state; Adam starts afresh")
        if ckpt.get("format") == CHECKPOINT_FORMAT:
            step = int(ckpt["step"])
            saved_batch = ckpt.get("data_position", {}).get("global_batch", self.global_batch)
            if saved_batch != self.global_batch:
                notes.append(f"global batch changed from {saved_batch} to {self.global_batch}: the data order "
                             f"differs from the original run's")
        else:  # the release saves after finishing epoch `epoch`
            step = (int(ckpt.get("epoch", -1)) + 1) * self.steps_per_epoch
            notes.append(f"release checkpoint: epoch {ckpt.get('epoch')} -> step {step} at {self.steps_per_epoch} "
                         f"steps per epoch; its lr_schedule is replaced by the schedule's value at that step")
        return step, notes

    def _load_optimizer(self, state: dict) -> None:
        params = list(self.model.net.parameters())
        saved = state["state"]
        for i, p in enumerate(params):
            for key, value in saved.get(i, {}).items():
                if key != "step" and torch.is_tensor(value) and value.shape != p.shape:
                    raise ValueError(f"state '{key}' of parameter {i} has shape {tuple(value.shape)}, "
                                     f"expected {tuple(p.shape)}")
        self.optimizer.load_state_dict(state)
        for group in self.optimizer.param_groups:  # this run's flags decide the hyper-parameters
            group["betas"] = tuple(self.cfg["optimizer_betas"])
            group["weight_decay"] = 0.0


def load_training_images(cfg: dict) -> torch.Tensor:
    """uint8 [N, C, H, W]; a missing dataset fails within seconds when offline."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # an unreachable mirror must not hang the start of a job
    try:
        return data_utils.load_dataset(cfg["dataset"], data_path=cfg["data_path"], train=True)
    finally:
        socket.setdefaulttimeout(old)


# --------------------------------------------------------------------------- run-time services


class Log:
    """Rank 0 prints (above the progress bar) and appends to OUTPUT_DIR/log.txt; other ranks stay quiet."""

    def __init__(self, enabled: bool, path: Path | None):
        self.enabled, self.path = enabled, path

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(msg + "\n")


class StopRequest:
    """SIGTERM / SIGINT ask the loop to save and stop at the next step boundary.

    The handler only sets a flag. With several processes the flag is combined over ranks through
    a gloo group on CPU tensors every step: no device sync, and every rank stops at the same step
    even if only some received the signal. A second Ctrl-C aborts at once.
    """

    def __init__(self, env: DistEnv):
        self.signum = None
        self.group = dist.new_group(backend="gloo") if env.world_size > 1 else None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self) -> bool:
        if self.group is None:
            return self.signum is not None
        flag = torch.tensor([0 if self.signum is None else int(self.signum)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        signum = int(flag.item())
        if signum and self.signum is None:
            self.signum = signum
        return signum != 0

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def check_output_dir(out: Path) -> None:
    """Create the folder and prove it is writable before any work."""
    probe = out / f".write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RuntimeError(f"cannot write to --output_dir {out} ({type(e).__name__}: {e}); "
                           f"choose a writable folder") from e


def find_start(cfg: dict, out: Path | None) -> tuple[dict | None, str]:
    """The checkpoint to start from: OUTPUT_DIR/checkpoint-last.pth, else --resume, else none.

    With --eval_only, --resume names the checkpoint to evaluate, e.g. a numbered snapshot of a
    run whose checkpoint-last.pth has moved on.
    """
    if cfg["eval_only"] and cfg["resume"]:
        return ckpt_io.load_checkpoint(cfg["resume"]), cfg["resume"]
    last = out / LAST if out is not None else None
    if last is not None and last.exists():
        try:
            return ckpt_io.load_checkpoint(last), str(last)
        except RuntimeError as e:
            raise RuntimeError(f"{e}. It is left as it is: move it away to start over, or pass --resume "
                               f"with a numbered snapshot and a fresh --output_dir") from e
    if cfg["resume"]:
        return ckpt_io.load_checkpoint(cfg["resume"]), cfg["resume"]
    return None, ""


def memory_gib(device: torch.device) -> float:
    """Peak GPU memory, or the process's peak resident memory on CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


# --------------------------------------------------------------------------- evaluation


class Evaluator:
    """Sample grids of every network, FID (cifar10, mnist) or the digits quality figure."""

    def __init__(self, trainer: Trainer, out: Path | None, writer, log: Log):
        self.t, self.out, self.writer, self.log = trainer, out, writer, log
        self.main = trainer.env.rank == 0
        self.fid_setup = None
        self.digits = None

    @torch.no_grad()
    def __call__(self, step: int) -> dict:
        cfg, trainer = self.t.cfg, self.t
        results = {}
        grid_noise = torch.randn((GRID_SIZE, *trainer.img_shape),
                                 generator=data_utils.make_generator(cfg["seed"], "grid")).to(trainer.device)
        was_training = trainer.model.net.training
        trainer.model.net.eval()
        try:
            for name, net in trainer.model.networks().items():
                if self.main:
                    self._grid(name, meanflow.sample(net, grid_noise), step)
                if cfg["dataset"] == "digits" and self.main:
                    results[name] = self._digits(name, net, step)
                if cfg["compute_fid"]:
                    results[name] = self._fid(name, net, step)
        finally:
            trainer.model.net.train(was_training)
        return results

    def _grid(self, name: str, samples: torch.Tensor, step: int) -> None:
        import torchvision.utils as vutils
        grid = vutils.make_grid(((samples.float().cpu() + 1) / 2).clamp(0, 1), nrow=8, padding=1, pad_value=1.0)
        if samples.shape[-1] < 16:  # 8x8 digits: enlarge, keeping the pixels sharp
            grid = torch.nn.functional.interpolate(grid[None], scale_factor=4, mode="nearest")[0]
        if self.out is not None:
            folder = self.out / "samples"
            folder.mkdir(exist_ok=True)
            vutils.save_image(grid, folder / f"step{step:08d}_{name}.png")
        if self.writer is not None:
            self.writer.add_image(f"samples/{name}", grid, step)

    def _digits(self, name: str, net, step: int) -> dict:
        from utils.digits_quality import DigitsQuality
        if self.digits is None:
            self.digits = DigitsQuality(seed=self.t.cfg["seed"])
            real = self.digits.real_score()
            self.log(f"digits quality of {real['count']} held-out real digits: FD {real['fd']:.2f}, "
                     f"confidence {real['confidence']:.3f}, classes {real['classes']:.2f}/10")
        noise = torch.randn((self.digits.count, *self.t.img_shape),
                            generator=data_utils.make_generator(self.t.cfg["seed"], "quality")).to(self.t.device)
        score = self.digits.score(meanflow.sample(net, noise))
        self.log(f"digits quality of {name} at step {step}, 1-step samples: FD {score['fd']:.2f}, "
                 f"confidence {score['confidence']:.3f}, classes {score['classes']:.2f}/10")
        if self.writer is not None:
            for key in ("fd", "confidence", "classes"):
                self.writer.add_scalar(f"digits_{key}/{name}", score[key], step)
        return score

    def _fid(self, name: str, net, step: int) -> float:
        from utils import fid
        cfg, trainer = self.t.cfg, self.t
        env = trainer.env if trainer.env.world_size > 1 else None
        if self.fid_setup is None:
            extractor = fid.InceptionFeatures(device=trainer.device)
            ref = fid.reference_stats(cfg["dataset"], data_path=cfg["data_path"], split="train",
                                      extractor=extractor, dist=env, progress=self.main)
            self.fid_setup = extractor, ref
        extractor, ref = self.fid_setup
        num = min(cfg["fid_samples"], max(2, trainer.global_batch)) if cfg["test_run"] else cfg["fid_samples"]
        value = fid.fid_of_network(net, ref=ref, num_samples=num, batch_size=cfg["batch_size"],
                                   img_shape=trainer.img_shape, seed=cfg["seed"], steps=1, extractor=extractor,
                                   device=trainer.device, dist=env, progress=self.main)
        self.log(f"FID of {name} at step {step} (1 step, {num} samples): {value:.3f}")
        if self.writer is not None:
            self.writer.add_scalar(f"fid/{name}", value, step)
        return value


# --------------------------------------------------------------------------- the loop


def quiet_jit_deprecation() -> None:
    """Hide torch's warning that torch.jit.script is deprecated: its forward-mode AD builds its own
    decompositions with it, which no user can act on. Any category: torch 2.11 raises it as a
    DeprecationWarning, 2.14 as a FutureWarning."""
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated")


def main(argv: list[str] | None = None) -> int:
    """Train (or evaluate) as the command line says; returns the process exit code."""
    parser = build_parser()
    try:
        cfg = resolve_config(argv)
    except ValueError as e:
        parser.error(str(e))
    apply_launcher_env(cfg)
    quiet_jit_deprecation()
    if cfg["cpu_threads"]:
        torch.set_num_threads(cfg["cpu_threads"])
    env = init_distributed(cfg["device"])
    try:
        return run(cfg, env)
    finally:
        cleanup()


def run(cfg: dict, env: DistEnv) -> int:
    main_rank = env.rank == 0
    out = Path(cfg["output_dir"]) if cfg["output_dir"] else None
    if out is not None and main_rank:
        check_output_dir(out)
    log = Log(main_rank, out / "log.txt" if out is not None and main_rank else None)
    log("config:\n" + json.dumps(cfg, indent=2, sort_keys=True))
    if cfg["device"] == "cuda":
        torch.backends.cudnn.benchmark = True
        apply_precision(cfg["precision"])

    ckpt, source = find_start(cfg, out)
    if cfg["eval_only"] and ckpt is None:
        raise ValueError("--eval_only needs a checkpoint: pass --resume PATH or an --output_dir "
                         "that holds checkpoint-last.pth")
    trainer = Trainer(cfg, env)
    step = 0
    if ckpt is not None:
        step, notes = trainer.load_state(ckpt, source)
        del ckpt
        for note in notes:
            log(f"note: {note}")
        log(f"resumed from {source} at step {step}")
        if cfg["resume"] and source != cfg["resume"]:
            log(f"note: --resume {cfg['resume']} not used: {source} continues this run")
    # Every rank reads its own copy of the checkpoint: they must all have found the same one.
    check_consistency([("starting step (is OUTPUT_DIR on a shared filesystem?)", torch.tensor(step))],
                      "resume point", step)
    derived = dict(world_size=env.world_size, global_batch=trainer.global_batch,
                   steps_per_epoch=trainer.steps_per_epoch, total_steps=trainer.total_steps,
                   warmup_steps=trainer.warmup_steps, model_config=trainer.model_config,
                   parameters=sum(p.numel() for p in trainer.model.net.parameters()))
    log("run: " + json.dumps(derived))
    writer = None
    if out is not None and main_rank:
        (out / "config.json").write_text(json.dumps(dict(cfg, derived=derived), indent=2, sort_keys=True) + "\n")
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=str(out))
    evaluate = Evaluator(trainer, out, writer, log)
    try:
        if cfg["eval_only"]:
            evaluate(step)
            return 0
        if cfg["test_run"]:
            trainer.total_steps = step + 1
        if step >= trainer.total_steps:
            log(f"already trained {step} of {trainer.total_steps} steps; nothing to do "
                f"(raise --max_steps or --epochs to continue)")
            return 0
        return train_loop(trainer, step, out, writer, log, evaluate)
    finally:
        if writer is not None:
            writer.close()


def train_loop(trainer: Trainer, step: int, out: Path | None, writer, log: Log, evaluate: Evaluator) -> int:
    cfg, env, device = trainer.cfg, trainer.env, trainer.device
    first, total, spe = step, trainer.total_steps, trainer.steps_per_epoch
    saved_step = first if out is not None and (out / LAST).exists() else None
    save_allowed = out is not None and not cfg["test_run"]
    loss_sum = torch.zeros((), device=device)  # summed on the device, read only when logging
    window, window_start, window_tic = 0, step, time.perf_counter()

    def finite_or_stop() -> float:
        """All ranks: raise if any loss since the last check, or any weight, is not finite; else return
        the losses since the last log summed over steps and ranks."""
        total_loss = loss_sum.clone()
        if env.world_size > 1:
            dist.all_reduce(total_loss)
        total_loss = total_loss.item()
        if not math.isfinite(total_loss) or not trainer.weights_finite():
            kept = f"{out / LAST} (step {saved_step}) is left untouched" if saved_step is not None \
                else "no checkpoint was written"
            raise RuntimeError(f"loss became non-finite ({total_loss}) between steps {window_start} and "
                               f"{step}; stopping without saving: {kept}. Lower --lr or check the data.")
        return total_loss

    def save(*names: str) -> None:
        nonlocal saved_step
        if not save_allowed:
            return
        finite_or_stop()
        trainer.check_weights(step)
        if env.rank == 0:
            state = trainer.state_dict(step)
            for name in names:
                ckpt_io.save_checkpoint(state, out / name)
        saved_step = step
        log(f"saved {', '.join(names)} at step {step}")

    stop = StopRequest(env)
    bar = tqdm(total=total, initial=step, disable=None if env.rank == 0 else True, dynamic_ncols=True,
               desc="train", unit="step", file=sys.stderr)
    log(f"training steps {first}..{total} ({total / spe:.1f} epochs of {spe} steps, global batch "
        f"{trainer.global_batch} = {trainer.batch} x {env.world_size} processes)"
        + (" ; compiling the training step first, this takes a while" if cfg["compile"] else ""))
    try:
        while step < total:
            if stop.requested():
                name = signal.Signals(stop.signum).name
                save(LAST)
                log(f"stopped by {name} at step {step}" + (f"; {LAST} saved: run the same command to continue"
                                                           if save_allowed else ""))
                return 0
            logging_now = (step + 1) % cfg["log_per_step"] == 0 or step + 1 == total
            checking = step - first < 2 or (cfg["check_every"] and (step + 1) % cfg["check_every"] == 0)
            loss = trainer.forward_backward(step)
            if checking:
                trainer.check_gradients(step)
            grad_norm = trainer.grad_norm() if logging_now else None
            trainer.optimizer_step(step)
            step += 1
            if checking:
                trainer.check_weights(step)
            loss_sum += loss
            window += 1
            bar.update(1)

            if logging_now:
                mean_loss = finite_or_stop() / (window * env.world_size)
                sec = (time.perf_counter() - window_tic) / window
                stats = dict(loss=mean_loss, lr=lr_at(step - 1, lr=cfg["lr"], warmup_steps=trainer.warmup_steps),
                             sec_per_iter=sec, images_per_sec=trainer.global_batch / sec,
                             grad_norm=grad_norm.item(), epoch=step / spe, memory_gib=memory_gib(device))
                log(f"step {step}/{total} | epoch {stats['epoch']:.2f} | loss {mean_loss:.5f} | lr {stats['lr']:.3g} | "
                    f"{sec:.3f} s/it | {stats['images_per_sec']:.0f} img/s | grad {stats['grad_norm']:.3g} | "
                    f"mem {stats['memory_gib']:.2f} GiB")
                if writer is not None:
                    for key, value in stats.items():
                        writer.add_scalar(f"train/{key}", value, step)
                loss_sum.zero_()
                window, window_start, window_tic = 0, step, time.perf_counter()

            due = [LAST] if cfg["ckpt_every"] and step % cfg["ckpt_every"] == 0 else []
            if cfg["snapshot_every"] and step % cfg["snapshot_every"] == 0:
                due.append(f"checkpoint-{step}.pth")
            epoch_done = step % spe == 0 and step < total
            tic = time.perf_counter()
            if epoch_done and cfg["eval_frequency"] > 0 and (step // spe) % cfg["eval_frequency"] == 0:
                save(*dict.fromkeys([LAST, *due]))  # like the release: save what is evaluated
                evaluate(step)
            elif due:
                save(*due)
            window_tic += time.perf_counter() - tic  # s/it counts training only
        if saved_step != step:
            save(LAST)
        evaluate(step)
        log(f"done: {step} steps" + (f"; outputs in {out}" if out is not None else ""))
        barrier()
        return 0
    finally:
        bar.close()
        stop.restore()


if __name__ == "__main__":
    sys.exit(main())
