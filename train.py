"""Train a MeanFlow model: command line, presets, validation, and main.

    python train.py --preset digits                              # CPU quickstart, a few minutes
    torchrun --nproc_per_node 8 train.py --preset cifar10-v1     # the release's improved CIFAR-10 run
    python train.py --preset digits --max_steps 500 --lr 2e-3    # explicit flags override the preset

This is the only module that reads the command line. It accepts every flag of the authors'
release with the same meaning and default, plus presets and a few flags of its own. Re-running
a command continues from OUTPUT_DIR/checkpoint-last.pth. The step is training/step.py, the loop
training/loop.py.
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

import meanflow
from models.unet import CIFAR10_CONFIG
from training.evaluation import Evaluator
from training.loop import training_loop
from training.resume import find_start, load_state
from training.services import (PRECISIONS, Log, apply_precision, check_output_dir, load_training_images,
                               quiet_jit_deprecation)
from utils.errors import UserError, UserFileError, UserValueError, exit_on_user_error
from training.step import Trainer, build_trainer
from utils import data as data_utils
from utils import fid
from utils.distributed import DistEnv, check_consistency, cleanup, init_distributed

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
    max_rollbacks=3, spike_factor=0.0, fault_nan_at=None,
    class_cond=False, cfg_omega=1.0, cfg_kappa=0.0, cfg_t_start=0.0, cfg_t_end=1.0, label_dropout=0.1,
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
# The quickstart, class-conditional with the paper's guidance (omega 1, kappa 0.5: effective scale
# omega / (1 - kappa) = 2, the authors' default); two extra forwards per step.
PRESETS["digits-cond"] = dict(PRESETS["digits"], class_cond=True, cfg_omega=1.0, cfg_kappa=0.5, label_dropout=0.1,
                              output_dir="./output/digits-cond")


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
                   "launchers), digits (CPU quickstart), digits-cond (the same, class-conditional), tiny (tests)")
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

    g = p.add_argument_group("class-conditional training and guidance (docs/guidance.md)")
    add("--class_cond", action="store_true", help="condition the network on the dataset's class labels")
    add("--cfg_omega", type=float, help="guidance: weight of v in the target v_tilde (1 with kappa 0: none)")
    add("--cfg_kappa", type=float, help="guidance: weight of the conditional u(z, t, t | c) in v_tilde")
    add("--cfg_t_start", type=float, help="guidance applies for cfg_t_start <= t <= cfg_t_end")
    add("--cfg_t_end", type=float, help="see --cfg_t_start")
    add("--label_dropout", type=float, help="probability of training a sample with the null class (unconditional)")

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
    for flag in ("warmup_epochs", "ckpt_every", "snapshot_every", "check_every", "cpu_threads", "max_rollbacks"):
        need(cfg[flag] >= 0, flag, "must be >= 0")
    need(cfg["lr"] > 0 and math.isfinite(cfg["lr"]), "lr", "must be a positive number")
    need(cfg["spike_factor"] == 0 or (cfg["spike_factor"] > 1 and math.isfinite(cfg["spike_factor"])),
         "spike_factor", "must be 0 (off) or a number above 1, e.g. 10")
    need(len(cfg["optimizer_betas"]) == 2 and all(0 <= b < 1 for b in cfg["optimizer_betas"]),
         "optimizer_betas", "give two numbers in [0, 1), e.g. 0.9 0.999")
    need(0 <= cfg["dropout"] < 1, "dropout", "must be in [0, 1)")
    need(0 <= cfg["ema_decay"] < 1, "ema_decay", "must be in [0, 1)")
    need(all(0 <= d < 1 for d in cfg["ema_decays"]), "ema_decays", "each must be in [0, 1)")
    need(len(cfg["channel_mult"]) >= 1 and min(cfg["channel_mult"]) >= 1, "channel_mult", "positive integers")
    info = data_utils.dataset_info(cfg["dataset"])
    resolution = info.resolution
    levels = [resolution >> i for i in range(len(cfg["channel_mult"]))]
    need(min(levels) >= 1, "channel_mult", f"{len(levels)} levels halve the {resolution}px image below 1px")
    need(all(r in levels for r in cfg["attn_resolutions"]), "attn_resolutions",
         f"the network's resolutions are {levels}; attention can only go there")
    need(not (cfg["compute_fid"] and info.img_shape != (3, 32, 32)), "compute_fid",
         "Inception FID is for 32x32 RGB data; digits runs report a classifier-based quality figure instead")
    need(cfg["dist_url"] == "env://" or cfg["dist_url"].startswith("tcp://"), "dist_url",
         "use env:// or tcp://HOST:PORT")
    if not cfg["class_cond"]:
        for flag in ("cfg_omega", "cfg_kappa"):
            need(cfg[flag] == DEFAULTS[flag], flag, "guidance needs --class_cond")
    # MeanFlow checks its own arguments (ratio, stds, sampler, guidance); build it once to fail before any work.
    make_method(cfg)


def make_method(cfg: dict) -> meanflow.MeanFlow:
    keys = ("tr_sampler", "P_mean_t", "P_std_t", "P_mean_r", "P_std_r", "ratio", "norm_p", "norm_eps", "jvp_mode")
    autocast = torch.bfloat16 if cfg["precision"] == "bf16" else None
    guidance = {}
    if cfg["class_cond"]:
        guidance = {k: cfg[k] for k in ("cfg_omega", "cfg_kappa", "cfg_t_start", "cfg_t_end", "label_dropout")}
        guidance["num_classes"] = data_utils.dataset_info(cfg["dataset"]).num_classes
    return meanflow.MeanFlow(**{k: cfg[k] for k in keys}, autocast=autocast, **guidance)


def unet_config(cfg: dict, img_shape: tuple[int, int, int]) -> dict:
    """SongUNet kwargs: the release's CIFAR-10 network with this run's size, data shape and dropout."""
    channels, resolution, _ = img_shape
    return dict(CIFAR10_CONFIG, img_resolution=resolution, in_channels=channels, out_channels=channels,
                model_channels=cfg["model_channels"], channel_mult=list(cfg["channel_mult"]),
                num_blocks=cfg["num_blocks"], attn_resolutions=list(cfg["attn_resolutions"]),
                dropout=cfg["dropout"], augment_dim=6 if cfg["use_edm_aug"] else 0,
                label_dim=data_utils.dataset_info(cfg["dataset"]).num_classes if cfg["class_cond"] else 0)


def apply_launcher_env(cfg: dict) -> None:
    """Translate the release's --dist_on_itp / --dist_url tcp:// into the variables torchrun sets."""
    if cfg["dist_on_itp"]:
        for ours, theirs in (("RANK", "RANK"), ("WORLD_SIZE", "SIZE"), ("LOCAL_RANK", "LOCAL_RANK")):
            os.environ[ours] = os.environ[f"OMPI_COMM_WORLD_{theirs}"]
    if cfg["dist_url"].startswith("tcp://"):
        host, _, port = cfg["dist_url"][len("tcp://"):].rpartition(":")
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = host, port




def resolve_fid_weights(env: DistEnv) -> str:
    """The Inception weights file for --compute_fid on every rank (rank 0 downloads it if missing and online)."""
    try:
        return fid.inception_weights(env=env if env.world_size > 1 else None)
    except (OSError, UserError) as e:
        raise UserFileError(f"--compute_fid needs the Inception weights: {e}; or pass --no_compute_fid") from e


def make_trainer(cfg: dict, env: DistEnv, images: torch.Tensor | None = None, **options) -> Trainer:
    """The Trainer these settings describe. images: uint8 [N, C, H, W], else cfg's dataset is loaded.
    options: build_trainer's benchmark switches (compile_mode, fused_adam)."""
    if images is None:
        images = load_training_images(cfg["dataset"], data_path=cfg["data_path"], env=env)
    labels = None
    if cfg["class_cond"]:  # read after the images, which downloaded the dataset if needed
        labels = data_utils.load_labels(cfg["dataset"], data_path=cfg["data_path"], download=False)
    return build_trainer(
        images=images, env=env, model_config=unet_config(cfg, tuple(images.shape[1:])), method=make_method(cfg),
        seed=cfg["seed"], batch_size=cfg["batch_size"], lr=cfg["lr"], betas=cfg["optimizer_betas"],
        warmup_epochs=cfg["warmup_epochs"], ema_decays=(cfg["ema_decay"], *cfg["ema_decays"]),
        ema_period=cfg["ema_period"], flip=data_utils.dataset_info(cfg["dataset"]).flip,
        augment=cfg["use_edm_aug"], compile=cfg["compile"], labels=labels, **options)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Train (or evaluate) as the command line says; returns the exit code. A bad flag exits through
    argparse; other user errors raise (utils.errors), and exit_on_user_error prints them."""
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
    # Output folder, log and device settings.
    main_rank = env.rank == 0
    out = Path(cfg["output_dir"]) if cfg["output_dir"] else None
    if out is not None and main_rank:
        check_output_dir(out)
    log = Log(main_rank, out / "log.txt" if out is not None and main_rank else None)
    log("config:\n" + json.dumps(cfg, indent=2, sort_keys=True))
    if cfg["device"] == "cuda":
        torch.backends.cudnn.benchmark = True
        apply_precision(cfg["precision"])

    # FID's Inception weights: fetched now by rank 0 (or found missing), not at the first evaluation.
    inception_weights = resolve_fid_weights(env) if cfg["compute_fid"] else None

    # Build the trainer and continue from the last checkpoint or --resume.
    ckpt, source = find_start(out=out, resume=cfg["resume"], eval_only=cfg["eval_only"])
    if cfg["eval_only"] and ckpt is None:
        raise UserValueError("--eval_only needs a checkpoint: pass --resume PATH or an --output_dir "
                        "that holds checkpoint-last.pth")
    trainer = make_trainer(cfg, env)
    step = 0
    if ckpt is not None:
        step, notes = load_state(trainer, ckpt, source)
        del ckpt
        for note in notes:
            log(f"note: {note}")
        log(f"resumed from {source} at step {step}")
        if cfg["resume"] and source != cfg["resume"]:
            log(f"note: --resume {cfg['resume']} not used: {source} continues this run")
    # Every rank reads its own copy of the checkpoint: they must all have found the same one.
    check_consistency([("starting step (is OUTPUT_DIR on a shared filesystem?)", torch.tensor(step))],
                      "resume point", step)
    total_steps = cfg["max_steps"] or cfg["epochs"] * trainer.steps_per_epoch
    derived = dict(world_size=env.world_size, global_batch=trainer.global_batch,
                   steps_per_epoch=trainer.steps_per_epoch, total_steps=total_steps,
                   warmup_steps=trainer.warmup_steps, model_config=trainer.model_config,
                   parameters=sum(p.numel() for p in trainer.model.net.parameters()))
    log("run: " + json.dumps(derived))

    # Outputs: config.json, TensorBoard, evaluation.
    writer = None
    if out is not None and main_rank:
        (out / "config.json").write_text(json.dumps(dict(cfg, derived=derived), indent=2, sort_keys=True) + "\n")
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=str(out))
    fid_samples = min(cfg["fid_samples"], max(2, trainer.global_batch)) if cfg["test_run"] else cfg["fid_samples"]
    evaluate = Evaluator(model=trainer.model, env=env, img_shape=trainer.img_shape, dataset=cfg["dataset"],
                         data_path=cfg["data_path"], seed=cfg["seed"], compute_fid=cfg["compute_fid"],
                         fid_samples=fid_samples, batch_size=cfg["batch_size"], inception_weights=inception_weights,
                         out=out, writer=writer, log=log)
    try:
        if cfg["eval_only"]:
            evaluate(step)
            return 0
        if cfg["test_run"]:  # one step, evaluated, nothing saved
            total_steps = step + 1
        if step >= total_steps:
            log(f"already trained {step} of {total_steps} steps; nothing to do "
                f"(raise --max_steps or --epochs to continue)")
            return 0
        training_loop(trainer=trainer, start_step=step, total_steps=total_steps, evaluate=evaluate, log=log,
                      config=cfg, out=out, writer=writer, save=not cfg["test_run"], log_every=cfg["log_per_step"],
                      check_every=cfg["check_every"], ckpt_every=cfg["ckpt_every"],
                      snapshot_every=cfg["snapshot_every"], eval_every=cfg["eval_frequency"],
                      compiling=cfg["compile"], max_rollbacks=cfg["max_rollbacks"],
                      spike_factor=cfg["spike_factor"], fault_nan_at=cfg["fault_nan_at"] or ())
        return 0
    finally:
        if writer is not None:
            writer.close()


if __name__ == "__main__":
    with exit_on_user_error():
        sys.exit(main())
