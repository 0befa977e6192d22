"""A run's settings: the typed TrainConfig, the command-line defaults and the presets.

The command line (train.py) speaks the flag names of the authors' release; inside the code every
setting has one name that carries its unit (`ckpt_every_steps`, `eval_every_epochs`). FIELD_OF_FLAG
maps the two where they differ. A checkpoint and config.json record the settings under their
flag names (`TrainConfig.flags()`), as every earlier version did, so old and new files read alike.
"""

import dataclasses
import math
from dataclasses import dataclass, field

from utils.errors import UserValueError

# Every flag with its default. The first block is the release's argument parser, value for value
# (except `device`, None: CUDA when available). Flags it accepts that do nothing here are listed
# in IGNORED_FLAGS and kept out of the config.
DEFAULTS = dict(
    batch_size=64, epochs=4000, lr=0.0006, optimizer_betas=[0.9, 0.999], warmup_epochs=200, dropout=0.2,
    ema_decay=0.9999, ema_decays=[0.99995, 0.9996], dataset="cifar10", data_path="./data",
    output_dir="./output_dir", fid_samples=50000, device=None, seed=0, resume="", eval_only=False,
    eval_frequency=50, compute_fid=False, log_per_step=100, dist_on_itp=False, dist_url="env://",
    ratio=0.75, tr_sampler="v1", P_mean_t=-0.6, P_std_t=1.6, P_mean_r=-4.0, P_std_r=1.6,
    norm_p=0.75, norm_eps=1e-3, arch="unet", use_edm_aug=False, test_run=False, compile=None,
    # Additions of this repository. The network defaults are the release's CIFAR-10 network.
    preset=None, max_steps=None, ckpt_every=1000, snapshot_every=0, check_every=1000,
    model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], model_size="B/2",
    ema_period=16, jvp_mode="joint", cpu_threads=0, precision="tf32",
    max_rollbacks=3, spike_factor=0.0, fault_nan_at=None,
    class_cond=False, cfg_omega=1.0, cfg_kappa=0.0, cfg_t_start=0.0, cfg_t_end=1.0, label_dropout=0.1,
    objective="meanflow", omega=None, t_min=None, t_max=None,
    flip=None,
)
# The release's flags that have no effect here (the reason is in train.py's --help).
IGNORED_FLAGS = ("num_workers", "pin_mem", "start_epoch", "save_fid_samples", "world_size", "local_rank")
# The guidance flags: each needs --class_cond. MeanFlow's are in its training target; iMF's are the
# guidance its evaluation samples with (the network takes them as inputs).
GUIDANCE_FLAGS = ("cfg_omega", "cfg_kappa", "cfg_t_start", "cfg_t_end", "label_dropout")
MEANFLOW_GUIDANCE_FLAGS = ("cfg_omega", "cfg_kappa", "cfg_t_start", "cfg_t_end")
IMF_SAMPLING_FLAGS = ("omega", "t_min", "t_max")

# Internal names of the flags whose names do not say their unit or meaning.
FIELD_OF_FLAG = dict(
    batch_size="batch_per_process", optimizer_betas="adam_betas", ema_period="ema_period_steps",
    label_dropout="class_dropout", log_per_step="log_every_steps", ckpt_every="ckpt_every_steps",
    snapshot_every="snapshot_every_steps", check_every="check_every_steps", eval_frequency="eval_every_epochs",
)
FLAG_OF_FIELD = {v: k for k, v in FIELD_OF_FLAG.items()}

_CIFAR10_RELEASE = dict(
    dataset="cifar10", batch_size=128, lr=0.0006, eval_frequency=50, epochs=16000, compute_fid=True,
    log_per_step=100, warmup_epochs=200, norm_p=0.75, ratio=0.75, dropout=0.2, use_edm_aug=True,
    # The release keeps a numbered checkpoint every 1000 epochs: 48,000 steps at 8 x 128.
    snapshot_every=48000,
)
# Named settings, in flag names; flags given on the command line override them.
PRESETS = {
    # scripts/cifar10_v0.sh of the release: the paper's (t, r) sampler.
    "cifar10-v0": dict(_CIFAR10_RELEASE, tr_sampler="v0", P_mean_t=-2.0, P_std_t=2.0, P_mean_r=-2.0, P_std_r=2.0,
                       output_dir="./output/cifar10-v0"),
    # scripts/cifar10_v1.sh of the release: the improved sampler (FID ~2.9 at 16000 epochs).
    "cifar10-v1": dict(_CIFAR10_RELEASE, tr_sampler="v1", P_mean_t=-0.6, P_std_t=1.6, P_mean_r=-4.0, P_std_r=1.6,
                       output_dir="./output/cifar10-v1"),
    # CPU quickstart on scikit-learn's 8x8 digits. One thread: the network's operations are too
    # small to gain from more, and OpenMP threads competing with other work for the same cores ran
    # 30x slower. Short run: short warmup, fast EMAs (net_ema 0.995 averages the last ~200 steps).
    # No flips (a mirrored 2, 3, 4, 7 or 9 is not a digit), no dropout (a 0.19M network does not
    # overfit 1500 digits in 2000 steps).
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

# digits-cond with a small DiT: XS/2 of models/networks.py, patch 2 (16 tokens of 2 x 2 pixels), 0.35M
# parameters. The U-Net's lr 1e-3 suits it: at 3e-4 it had learnt no labels by step 500, at 2e-3 it
# learnt them sooner and ended as at 1e-3 (docs/dit.md).
PRESETS["digits-dit"] = dict(PRESETS["digits-cond"], arch="dit", model_size="XS/2", lr=0.001,
                             output_dir="./output/digits-dit")

# digits-cond with improved MeanFlow and a small imfDiT (XS/2 of models/networks.py). iMF's objective and draws
# as the authors' (docs/imf.md); MeanFlow's guidance of the target is off (iMF refuses it): the guidance is
# the network's input, and evaluation samples with omega and interval below. 1500 steps, not 2000, to stay
# within ten minutes on one core (docs/imf.md); its guided samples are right from step 1000 on.
PRESETS["digits-imf"] = dict(
    PRESETS["digits-cond"], objective="imf", arch="imf_dit", model_size="XS/2", cfg_omega=1.0, cfg_kappa=0.0,
    tr_sampler="v0", P_mean_t=-0.4, P_std_t=1.0, P_mean_r=-0.4, P_std_r=1.0, ratio=0.5, norm_p=1.0, norm_eps=0.01,
    omega=4.0, t_min=0.4, t_max=0.65, max_steps=1500, output_dir="./output/digits-imf")

# ImageNet 256 in the SD VAE's latents with the authors' DiT (docs/dit.md gives each value's source): their
# JAX code's configs/default.py and run_b4.yml, and per size the guidance of the public PyTorch configs.
# batch_size is per process: 32 x 8 processes is their global batch of 256; on N processes pass
# --batch_size 256/N. One EMA, updated every step, as theirs. No flips: the dataset entry decides them
# (its latents, like theirs, are not mirrored). FID stays off until evaluation decodes latents.
_IMAGENET256 = dict(
    dataset="imagenet256-latent", arch="dit", batch_size=32, epochs=240, lr=0.0001, warmup_epochs=0,
    optimizer_betas=[0.9, 0.95], ema_decay=0.9999, ema_decays=[], ema_period=1,
    tr_sampler="v0", P_mean_t=-0.4, P_std_t=1.0, P_mean_r=-0.4, P_std_r=1.0, ratio=0.25, norm_p=1.0, norm_eps=0.01,
    class_cond=True, label_dropout=0.1, cfg_t_start=0.0, dropout=0.0, use_edm_aug=False,
    eval_frequency=10, compute_fid=False, log_per_step=100, ckpt_every=1000,
)
PRESETS["imagenet256-b4"] = dict(_IMAGENET256, model_size="B/4", cfg_omega=1.0, cfg_kappa=0.5, cfg_t_end=1.0,
                                 output_dir="./output/imagenet256-b4")
PRESETS["imagenet256-b2"] = dict(_IMAGENET256, model_size="B/2", cfg_omega=1.0, cfg_kappa=0.5, cfg_t_end=1.0,
                                 output_dir="./output/imagenet256-b2")
PRESETS["imagenet256-m2"] = dict(_IMAGENET256, model_size="M/2", cfg_omega=1.0, cfg_kappa=0.5, cfg_t_end=1.0,
                                 output_dir="./output/imagenet256-m2")
PRESETS["imagenet256-l2"] = dict(_IMAGENET256, model_size="L/2", cfg_omega=0.2, cfg_kappa=0.92, cfg_t_end=0.8,
                                 output_dir="./output/imagenet256-l2")
PRESETS["imagenet256-xl2"] = dict(_IMAGENET256, model_size="XL/2", cfg_omega=0.2, cfg_kappa=0.92, cfg_t_end=0.75,
                                  output_dir="./output/imagenet256-xl2")

# iMF's sampling guidance for the authors' checkpoints, (omega, t_min, t_max) by model size and number of
# steps: their configs/eval_config.yml (torch branch README alike). Only XL/2 has a 2-step setting.
IMF_EVAL_GUIDANCE = {
    ("B/2", 1): (8.0, 0.4, 0.65),
    ("M/2", 1): (10.5, 0.4, 0.6),
    ("L/2", 1): (10.5, 0.4, 0.6),
    ("XL/2", 1): (8.0, 0.42, 0.62),
    ("XL/2", 2): (4.0, 0.36, 0.64),
}

# ImageNet 256 with improved MeanFlow and its DiT (docs/imf.md gives each value's source): the authors' JAX
# configs/train_config.yml over configs/default.py, whose only training config is B/2's; the other sizes take
# it too. batch_size is per process: 128 x 8 processes is their global batch of 1024; on N processes pass
# --batch_size 1024/N. One EMA (0.9999, every step), as theirs. The guidance evaluation samples with, and
# sample.py's default, is their eval config's for the size.
_IMAGENET256_IMF = dict(
    dataset="imagenet256-latent", arch="imf_dit", objective="imf", batch_size=128, epochs=640, lr=0.0001,
    warmup_epochs=10, optimizer_betas=[0.9, 0.95], ema_decay=0.9999, ema_decays=[], ema_period=1,
    tr_sampler="v0", P_mean_t=-0.4, P_std_t=1.0, P_mean_r=-0.4, P_std_r=1.0, ratio=0.5, norm_p=1.0, norm_eps=0.01,
    class_cond=True, label_dropout=0.1, dropout=0.0, use_edm_aug=False,
    eval_frequency=20, compute_fid=False, log_per_step=100, ckpt_every=1000,
)


def _imf_preset(size: str) -> dict:
    omega, t_min, t_max = IMF_EVAL_GUIDANCE[(size, 1)]
    return dict(_IMAGENET256_IMF, model_size=size, omega=omega, t_min=t_min, t_max=t_max,
                output_dir=f"./output/imagenet256-imf-{size.replace('/', '').lower()}")


PRESETS["imagenet256-imf-b2"] = _imf_preset("B/2")
PRESETS["imagenet256-imf-m2"] = _imf_preset("M/2")
PRESETS["imagenet256-imf-l2"] = _imf_preset("L/2")
PRESETS["imagenet256-imf-xl2"] = _imf_preset("XL/2")


@dataclass
class TrainConfig:
    """Every setting of a run. Defaults are DEFAULTS' (the release's); see train.py --help for each."""

    # Run length.
    preset: str | None = None
    epochs: int = 4000
    max_steps: int | None = None          # overrides epochs
    test_run: bool = False                # one step, evaluated, nothing saved
    # Optimisation.
    batch_per_process: int = 64
    lr: float = 0.0006
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_epochs: int = 200
    ema_decay: float = 0.9999             # net_ema
    ema_decays: list[float] = field(default_factory=lambda: [0.99995, 0.9996])  # net_ema1, net_ema2, ...
    ema_period_steps: int = 16
    seed: int = 0
    # The objective: MeanFlow's, or improved MeanFlow's (iMF).
    objective: str = "meanflow"
    tr_sampler: str = "v1"
    P_mean_t: float = -0.6
    P_std_t: float = 1.6
    P_mean_r: float = -4.0
    P_std_r: float = 1.6
    ratio: float = 0.75
    norm_p: float = 0.75
    norm_eps: float = 1e-3
    jvp_mode: str = "joint"
    # Class labels and guidance.
    class_cond: bool = False
    cfg_omega: float = 1.0
    cfg_kappa: float = 0.0
    cfg_t_start: float = 0.0
    cfg_t_end: float = 1.0
    class_dropout: float = 0.1            # the method's label dropout, not the network's
    omega: float | None = None            # iMF: the guidance scale and interval evaluation samples with
    t_min: float | None = None
    t_max: float | None = None
    # The network (models/networks.py reads the options of its architecture).
    arch: str = "unet"
    model_size: str = "B/2"               # the transformers' named size (dit, imf_dit)
    model_channels: int = 128
    channel_mult: list[int] = field(default_factory=lambda: [2, 2, 2])
    num_blocks: int = 4
    attn_resolutions: list[int] = field(default_factory=lambda: [16])
    dropout: float = 0.2
    use_edm_aug: bool = False
    # Data.
    dataset: str = "cifar10"
    data_path: str = "./data"
    flip: bool | None = None              # horizontal flips; None: the dataset's (utils/data.py: cifar10 only)
    # Output, checkpoints, evaluation.
    output_dir: str = "./output_dir"
    resume: str = ""
    ckpt_every_steps: int = 1000          # 0: only at the end and on a signal
    snapshot_every_steps: int = 0         # 0: never
    check_every_steps: int = 1000         # 0: only the first two steps and before checkpoints
    log_every_steps: int = 100
    eval_every_epochs: int = 50           # -1: only at the end
    eval_only: bool = False
    compute_fid: bool = False
    fid_samples: int = 50000
    # Rollback.
    max_rollbacks: int = 3
    spike_factor: float = 0.0
    fault_nan_at: list[int] | None = None
    # Devices and processes.
    device: str = "cpu"
    compile: bool = False
    cpu_threads: int = 0
    precision: str = "tf32"
    dist_on_itp: bool = False
    dist_url: str = "env://"

    def flags(self) -> dict:
        """The settings under their command-line names (config.json, checkpoints)."""
        return {FLAG_OF_FIELD.get(k, k): v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_flags(cls, flags: dict) -> "TrainConfig":
        """From settings under their command-line names; flags of older versions that no field holds are
        ignored (the release's no-op flags, for one)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {FIELD_OF_FLAG.get(k, k): v for k, v in flags.items()}
        return cls(**{k: v for k, v in values.items() if k in names})


def resolve(given: dict, *, cuda_available: bool) -> TrainConfig:
    """DEFAULTS, then the preset, then the flags `given` (flag names); device and compile decided."""
    if given.get("preset") is not None and given["preset"] not in PRESETS:
        raise UserValueError(f"--preset {given['preset']!r}: choose one of {', '.join(sorted(PRESETS))}")
    flags = dict(DEFAULTS)
    flags.update(PRESETS.get(given.get("preset"), {}))
    flags.update({k: v for k, v in given.items() if k not in IGNORED_FLAGS})
    if flags["device"] is None:
        flags["device"] = "cuda" if cuda_available else "cpu"
    if flags["compile"] is None:
        flags["compile"] = flags["device"] == "cuda"
    cfg = TrainConfig.from_flags(flags)
    validate(cfg, given)
    return cfg


def validate(cfg: TrainConfig, given: dict = ()) -> None:
    """UserValueError naming the flag and its value for anything that cannot train. given: the flags
    the user gave (names), for the checks of what was given rather than of values."""
    def need(ok, name, why):
        if not ok:
            flag = FLAG_OF_FIELD.get(name, name)
            raise UserValueError(f"--{flag} {getattr(cfg, name)!r}: {why}")

    for name in ("batch_per_process", "epochs", "log_every_steps", "fid_samples", "model_channels", "num_blocks",
                 "ema_period_steps"):
        need(isinstance(getattr(cfg, name), int) and getattr(cfg, name) >= 1, name, "must be a positive integer")
    need(cfg.max_steps is None or cfg.max_steps >= 1, "max_steps", "must be a positive integer")
    for name in ("warmup_epochs", "ckpt_every_steps", "snapshot_every_steps", "check_every_steps", "cpu_threads",
                 "max_rollbacks"):
        need(getattr(cfg, name) >= 0, name, "must be >= 0")
    need(cfg.lr > 0 and math.isfinite(cfg.lr), "lr", "must be a positive number")
    need(cfg.spike_factor == 0 or (cfg.spike_factor > 1 and math.isfinite(cfg.spike_factor)),
         "spike_factor", "must be 0 (off) or a number above 1, e.g. 10")
    need(len(cfg.adam_betas) == 2 and all(0 <= b < 1 for b in cfg.adam_betas),
         "adam_betas", "give two numbers in [0, 1), e.g. 0.9 0.999")
    need(0 <= cfg.dropout < 1, "dropout", "must be in [0, 1)")
    need(0 <= cfg.ema_decay < 1, "ema_decay", "must be in [0, 1)")
    need(all(0 <= d < 1 for d in cfg.ema_decays), "ema_decays", "each must be in [0, 1)")
    need(cfg.dist_url == "env://" or cfg.dist_url.startswith("tcp://"), "dist_url", "use env:// or tcp://HOST:PORT")
    if not cfg.class_cond:
        for flag in GUIDANCE_FLAGS + IMF_SAMPLING_FLAGS:
            if flag in given:
                need(False, FIELD_OF_FLAG.get(flag, flag), "guidance needs --class_cond")
    need(cfg.objective in ("meanflow", "imf"), "objective", "use meanflow or imf")
    if cfg.objective == "imf":
        for flag in MEANFLOW_GUIDANCE_FLAGS:
            if flag in given or getattr(cfg, flag) != DEFAULTS[flag]:
                need(False, flag, "MeanFlow's guidance in the target; iMF's network takes the guidance as inputs, "
                                  "chosen at sampling time (--omega, --t_min, --t_max)")
        need(cfg.class_cond, "objective", "iMF is class-conditional: add --class_cond")
        need(cfg.tr_sampler == "v0" and (cfg.P_mean_t, cfg.P_std_t) == (cfg.P_mean_r, cfg.P_std_r), "objective",
             "iMF draws t and r from one logit-normal and ties a fraction 1 - ratio of them: use --tr_sampler v0 "
             "with equal --P_mean_t/--P_mean_r and --P_std_t/--P_std_r")
    else:
        for flag in IMF_SAMPLING_FLAGS:
            if flag in given:
                need(False, flag, "the guidance inputs of iMF's network: only with --objective imf")
    for flag in ("t_min", "t_max"):
        value = getattr(cfg, flag)
        need(value is None or 0 <= value <= 1, flag, "a time in [0, 1]")
    need(cfg.t_min is None or cfg.t_max is None or cfg.t_min <= cfg.t_max, "t_min", f"at most --t_max {cfg.t_max}")
    need(cfg.omega is None or cfg.omega >= 1, "omega", "a guidance scale >= 1")
