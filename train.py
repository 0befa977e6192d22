"""Train a MeanFlow model: the command line -> a validated TrainConfig -> training.run.run.

    python train.py --preset digits                              # CPU quickstart, a few minutes
    torchrun --nproc_per_node 8 train.py --preset cifar10-v1     # the release's improved CIFAR-10 run
    python train.py --preset digits --max_steps 500 --lr 2e-3    # explicit flags override the preset

This is the only module that reads the command line. It accepts every flag of the authors'
release with the same meaning and default, plus presets (training/config.py) and a few flags of
its own. Re-running a command continues from OUTPUT_DIR/checkpoint-last.pth. The run is
training/run.py, one step training/step.py.
"""

import argparse
import os
import sys

import torch

import meanflow
from models.networks import NETWORKS
from training import config as config_lib
from training.build import check_buildable
from training.config import DEFAULTS, PRESETS, TrainConfig
from training.log import quiet_jit_deprecation
from training.precision import PRECISIONS
from training.run import run
from utils import data as data_utils
from utils.distributed import cleanup, init_distributed
from utils.errors import UserValueError, exit_on_user_error


# --------------------------------------------------------------------------- configuration


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem and a pointer to --help, not the usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see python train.py --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line. Unset flags are absent from the namespace so presets can fill them."""
    p = Parser(
        prog="train.py", description="Train MeanFlow (one-step generative model). Explicit flags override --preset.",
        argument_default=argparse.SUPPRESS, allow_abbrev=False)

    def add(*names, help, **kw):  # adds to the group `g` defined last below
        dest = kw.get("dest", names[0].lstrip("-"))
        if DEFAULTS.get(dest) is not None and kw.get("action") not in ("store_true", "store_false"):
            help += f" (default: {DEFAULTS[dest]})"
        g.add_argument(*names, help=help, **kw)

    ignored = "accepted for compatibility with the release; ignored: "
    g = p.add_argument_group("presets and run length")
    g.add_argument("--preset", choices=sorted(PRESETS), help="named settings: cifar10-v0/-v1 (the release's "
                   "launchers), digits (CPU quickstart), digits-cond (the same, class-conditional), digits-dit (the same "
                   "with a DiT), tiny (tests), "
                   "imagenet256-b4/-b2/-m2/-l2/-xl2 (the authors' ImageNet recipe, docs/dit.md)")
    add("--epochs", type=int, help="training length in epochs of the global batch")
    add("--max_steps", type=int, help="training length in optimizer steps; overrides --epochs")
    add("--test_run", action="store_true", help="one training step, then one batch of evaluation; saves no checkpoint")

    g = p.add_argument_group("optimization")
    add("--batch_size", type=int, help="batch size per process (global batch = batch_size x processes)")
    add("--lr", type=float, help="learning rate (absolute, not scaled by batch size)")
    add("--optimizer_betas", type=float, nargs="+", help="beta1 beta2 of Adam")
    add("--warmup_epochs", type=int, help="epochs of linear lr warmup from 1e-8, then constant")
    add("--dropout", type=float, help="unet: dropout rate of the network")
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

    g = p.add_argument_group("class-conditional training and guidance (docs/guidance.md)")
    add("--class_cond", action="store_true", help="condition the network on the dataset's class labels")
    add("--cfg_omega", type=float, help="guidance: weight of v in the target v_tilde (1 with kappa 0: none)")
    add("--cfg_kappa", type=float, help="guidance: weight of the conditional u(z, t, t | c) in v_tilde")
    add("--cfg_t_start", type=float, help="guidance applies for cfg_t_start <= t <= cfg_t_end")
    add("--cfg_t_end", type=float, help="see --cfg_t_start")
    add("--label_dropout", type=float, help="probability of training a sample with the null class (unconditional)")

    g = p.add_argument_group("improved MeanFlow (docs/imf.md)")
    add("--objective", choices=["meanflow", "imf"], help="the training objective: MeanFlow's, or improved MeanFlow's "
        "(iMF: the guidance scale and interval are inputs of the network, --arch imf_dit)")
    add("--omega", type=float, help="iMF: the guidance scale evaluation during training samples with "
        "(sample.py and evaluate.py default to the checkpoint's)")
    add("--t_min", type=float, help="iMF: start of the guidance interval evaluation samples with")
    add("--t_max", type=float, help="iMF: end of the guidance interval evaluation samples with")

    g = p.add_argument_group("network")
    add("--arch", choices=list(NETWORKS), help="network architecture (models/networks.py): unet (SongUNet / DDPM++), "
        "dit (the MeanFlow authors' DiT), imf_dit (improved MeanFlow's DiT)")
    add("--model_size", help="dit and imf_dit: the papers' B/4 (dit only), B/2, M/2, L/2, XL/2, or XS/2 for CPU "
        "demonstrations")
    add("--model_channels", type=int, help="unet: channels of the first level")
    add("--channel_mult", type=int, nargs="+", help="unet: channel multiplier per resolution level")
    add("--num_blocks", type=int, help="unet: residual blocks per level")
    add("--attn_resolutions", type=int, nargs="+", help="unet: resolutions with self-attention")
    add("--use_edm_aug", action="store_true", help="EDM augmentation with its labels as network condition")
    add("--no_edm_aug", action="store_false", dest="use_edm_aug", help="turn off --use_edm_aug set by a preset")

    g = p.add_argument_group("data")
    add("--dataset", choices=list(data_utils.DATASETS), help="cifar10, mnist (3x32x32), digits (1x8x8), "
        "imagenet256-latent or imagenet512-latent (SD VAE latents 4x32x32, 4x64x64; docs/imagenet.md)")
    add("--data_path", help="folder with the dataset files (downloaded there when missing and online); for "
        "latents the folder prepare_latents.py wrote")
    add("--flip", action="store_true", help="mirror each training image with probability 1/2 (latents: draw the "
        "encoded mirror); default: the dataset's, on for cifar10 only")
    add("--no_flip", action="store_false", dest="flip", help="never mirror (cifar10 without its flips)")
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

    g = p.add_argument_group("rollback (docs/rollback.md)")
    add("--max_rollbacks", type=int, help="a non-finite loss, gradient norm or weight restores checkpoint-last.pth "
        "and training goes on with fresh draws; the run stops after this many rollbacks to the same checkpoint")
    add("--spike_factor", type=float, help="also roll back when the gradient norm exceeds this multiple of its "
        "recent median (0: off)")
    add("--fault_nan_at", type=step_list, metavar="STEP[,STEP...]", help="testing aid: make the loss and weights "
        "of these steps NaN; each entry fires once, the first time its step runs after the previous entry fired")

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


def step_list(text: str) -> list[int]:
    """'9,9,12' -> [9, 9, 12] (argparse type of --fault_nan_at)."""
    try:
        steps = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of steps, e.g. 9,9,12") from None
    if min(steps) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: steps count from 1")
    return steps


def resolve_config(argv: list[str] | None = None) -> TrainConfig:
    """Release defaults, then the preset, then the flags given on the command line; validated.

    Raises SystemExit (argparse) for unknown flags or choices and UserValueError for bad values.
    """
    given = vars(build_parser().parse_args(argv))
    cfg = config_lib.resolve(given, cuda_available=torch.cuda.is_available())
    check_buildable(cfg)
    return cfg


def apply_launcher_env(cfg: TrainConfig) -> None:
    """Translate the release's --dist_on_itp / --dist_url tcp:// into the variables torchrun sets."""
    if cfg.dist_on_itp:
        for ours, theirs in (("RANK", "RANK"), ("WORLD_SIZE", "SIZE"), ("LOCAL_RANK", "LOCAL_RANK")):
            os.environ[ours] = os.environ[f"OMPI_COMM_WORLD_{theirs}"]
    if cfg.dist_url.startswith("tcp://"):
        host, _, port = cfg.dist_url[len("tcp://"):].rpartition(":")
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = host, port




# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Train (or evaluate) as the command line says; returns the exit code. A bad flag exits through
    the parser (one line, status 2); other user errors raise (utils.errors), and exit_on_user_error
    prints them."""
    parser = build_parser()
    try:
        cfg = resolve_config(argv)
    except UserValueError as e:
        parser.error(str(e))
    apply_launcher_env(cfg)
    quiet_jit_deprecation()
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    env = init_distributed(cfg.device)
    try:
        return run(cfg, env)
    finally:
        cleanup()


if __name__ == "__main__":
    with exit_on_user_error():
        sys.exit(main())
