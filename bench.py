"""Benchmark the training step: images/s, ms/step, peak memory, compile time, FLOPs.

    python bench.py --preset cifar10-v1                          # our step on the GPU
    python bench.py --preset cifar10-v1 --baseline third_party/py-meanflow
    python bench.py --preset tiny --steps 5 --warmup 2           # CPU smoke run
    python bench.py --preset imagenet256-b2                      # the DiT on synthetic ImageNet latents

It times training/step.py's train_step, the function the training loop runs (data gather,
flips, augmentation, loss with its JVP, backward, gradient sync, Adam, EMA), built by
training/build.py from the preset, on synthetic images of the training set's shape and number (training holds
them all on the device, so they count in our peak memory), after a warm-up that includes
compilation, over a window timed with CUDA events (wall clock on CPU). `--baseline DIR` times
the authors' release training step the same way in the same process, through tools/release.py:
DIR is a local copy of their repository (keep it in a folder git ignores; it is not part of
this project). Both sides use the same batch, precision settings and card, so the ratio is
like for like (the release has no bf16 path: beside `--precision bf16` it runs TF32, and the
ratio is then not at equal numerics); the release's DataLoader is replaced by 1024 such
images on the device, which only flatters the release.

FLOPs are counted with torch.utils.flop_counter on an eager pass at batch 2: the network's
forward; a training step (JVP + backward) as the chosen JVP path runs it; and the work a step
needs, without forward AD's products with the weights' all-zero tangents (what jvp_mode
"network" runs; a network without a hand-written tangent path, the DiT, has no such count). The
fraction of peak credits both sides with that needed work (else the step as run), over the
card's dense peak for the precision (table below; unknown cards print no fraction).
"""

import argparse
import contextlib
import gc
import importlib.util
import json
import resource
import sys
import time
import traceback
from pathlib import Path

import torch
from torch._inductor import config as inductor_config
from torch.utils.flop_counter import FlopCounterMode

import meanflow
from models.unet import SongUNet
from tools import release
from training import config as config_lib
from training.build import build_trainer, check_buildable
from training.config import PRESETS, TrainConfig
from training.log import memory_gib, quiet_jit_deprecation
from training.precision import PRECISIONS, apply_precision, precision_settings
from training.step import Batch, Trainer, draw_batch, loss_and_backward, train_step
from utils import data as data_utils
from utils.distributed import init_distributed
from utils.errors import USER_ERRORS, exit_on_user_error

CHECK_ROWS = 32  # images in the numerics check against the release
# Synthetic rows at most: CIFAR-10's 50,000. ImageNet's 1.28M latents (5 GiB as uint8) are read from
# memory maps on the host during training, not held on the device, so fewer stand in for them.
SYNTHETIC_ROWS = 50_000

# Dense (no sparsity) peak FLOP/s by card name fragment, per precision: vendor data sheets.
PEAKS = {
    "H200": {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "H100 80GB HBM3": {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},  # SXM
    "H100 PCIe": {"bf16": 756.0e12, "tf32": 378.0e12, "fp32": 51.2e12},
    "A100": {"bf16": 312.0e12, "tf32": 156.0e12, "fp32": 19.5e12},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--preset", default="cifar10-v1", choices=sorted(PRESETS), help="network and data settings")
    p.add_argument("--batch_size", type=int, default=None, help="per-process batch (default: the preset's)")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation happens in the first)")
    p.add_argument("--jvp_mode", choices=meanflow.JVP_MODES, default="joint", help="how du/dt is computed")
    p.add_argument("--compile", choices=["on", "off"], default=None, help="torch.compile (default: on for cuda)")
    p.add_argument("--compile_mode", default="default",
                   help="torch.compile mode: default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs")
    p.add_argument("--precision", choices=PRECISIONS, default="tf32",
                   help="as train.py --precision; the release has no bf16 path and runs tf32 beside bf16 "
                        "(the ratio is then not at equal numerics)")
    p.add_argument("--memory_format", choices=["contiguous", "channels_last"], default="contiguous",
                   help="channels_last: weights (and so activations) in NHWC on both sides; compiled, inductor's "
                        "layout optimisation is forced, since its heuristics decline this network (convolutions "
                        "with fewer output than input channels)")
    p.add_argument("--compiled_autograd", action="store_true",
                   help="with --compile on: also trace our backward with compiled autograd "
                        "(torch._dynamo.config.compiled_autograd)")
    p.add_argument("--fused_adam", action="store_true",
                   help="our Adam with fused=True (the whole update in a few multi-tensor kernels) instead of "
                        "torch's default (foreach on CUDA); same hyper-parameters")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--baseline", default=None, metavar="DIR", help="also time the release found in DIR")
    p.add_argument("--no_flops", action="store_true", help="skip the FLOP count")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args(argv)
    for name in ("steps", "warmup"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)}: must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        p.error(f"--batch_size {args.batch_size}: must be >= 1")
    if args.baseline is not None:
        if data_utils.dataset_info(PRESETS[args.preset]["dataset"]).img_shape != (3, 32, 32):
            p.error(f"--baseline needs a 32x32 RGB preset (cifar10-v0 / cifar10-v1), not {args.preset}: the "
                    f"release's network is fixed to CIFAR-10's shape")
        try:
            release.release_code_dir(args.baseline)
        except FileNotFoundError as e:
            p.error(f"--baseline: {e}")
        if importlib.util.find_spec("torchmetrics") is None:
            p.error("--baseline: the release's training loop imports torchmetrics; pip install torchmetrics")
        if not torch.cuda.is_available() or args.device == "cpu":
            p.error("--baseline needs a GPU: the release's random-state handling assumes CUDA")
    return args


def synthetic_images(cfg: TrainConfig, count: int | None = None) -> torch.Tensor:
    """uint8 images of the dataset's shape: speed does not depend on their content. count: default the
    training set's size (training keeps images on the device, so they count in our peak memory), at most
    SYNTHETIC_ROWS."""
    info = data_utils.dataset_info(cfg.dataset)
    rows = count or min(info.train_size, SYNTHETIC_ROWS)
    return torch.randint(0, 256, (rows, *info.img_shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def synthetic_data(cfg: TrainConfig) -> data_utils.ImageData:
    """synthetic_images with labels, as the training step reads a dataset."""
    images = synthetic_images(cfg)
    labels = torch.arange(len(images)) % data_utils.dataset_info(cfg.dataset).num_classes
    return data_utils.ImageData(images, labels)


class Timer:
    """Elapsed seconds of a block: CUDA events on the GPU, wall clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    @contextlib.contextmanager
    def __call__(self):
        box = {}
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield box
            end.record()
            end.synchronize()
            box["s"] = start.elapsed_time(end) / 1e3
        else:
            tic = time.perf_counter()
            yield box
            box["s"] = time.perf_counter() - tic


def measure(step_fn, device: torch.device, warmup: int, steps: int, batch: int) -> dict:
    """Time `step_fn(i)` for warmup then `steps` calls; the first call's excess is compile time."""
    timer = Timer(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    with timer() as first:
        step_fn(0)
    for i in range(1, warmup):
        step_fn(i)
    with timer() as window:
        for i in range(warmup, warmup + steps):
            step_fn(i)
    sec = window["s"] / steps
    out = dict(ms_per_step=sec * 1e3, images_per_s=batch / sec, first_step_s=first["s"],
               compile_s=max(first["s"] - sec, 0.0))
    # On CPU: growth of the process's peak resident memory over the steps. Run with
    # MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors leave RSS, and one case per process.
    out["peak_memory_gib"] = memory_gib(device) - (0.0 if device.type == "cuda" else rss_before / 2**20)
    return out


def compare_with_release(check: dict, release_model, device: torch.device) -> dict:
    """Loss and gradients of our loss and the release's on the same weights and the same draws.

    Both run eagerly under the precision settings in force, in eval mode (no dropout). The
    weights are perturbed first, so that the near-zero output layers do not make u vanish.
    """
    net = SongUNet(**check["model_config"])
    net.load_state_dict(check["state"])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    net.to(device).eval()
    if check.get("memory_format") == "channels_last":
        net.to(memory_format=torch.channels_last)
    release_model.net.load_state_dict(net.state_dict())
    release_model.net.eval()
    release_model.net.zero_grad(set_to_none=True)
    batch = Batch(**{k: None if v is None else v.to(device) for k, v in check["batch"].items()})

    ours_loss = loss_and_backward(net, check["method"], batch)
    release_loss = release.release_loss_and_backward(release_model, batch.x, batch.aug_cond, noise=batch.noise,
                                                     t=batch.t, r=batch.r)
    release_grads = dict(release_model.net.named_parameters())
    errors = {name: (p.grad - release_grads[name].grad).norm().item()
              / max(release_grads[name].grad.norm().item(), 1e-30) for name, p in net.named_parameters()}
    worst = max(errors, key=errors.get)
    return dict(rows=len(batch.x), loss_ours=ours_loss.item(), loss_release=release_loss.item(),
                loss_relative_error=abs(ours_loss.item() - release_loss.item()) / abs(release_loss.item()),
                gradient_worst_relative_error=errors[worst], gradient_worst_parameter=worst,
                gradient_median_relative_error=sorted(errors.values())[len(errors) // 2])


def attempt(errors: dict, what: str, fn):
    """fn(), or None with the error printed and recorded under `what`: in a side-by-side run
    one side failing must not lose the other's figures. A user's mistake ends the run."""
    try:
        return fn()
    except USER_ERRORS:
        raise
    except Exception as e:  # noqa: BLE001 (printed, recorded in the report, and the exit code says so)
        traceback.print_exc()
        errors[what] = f"{type(e).__name__}: {e}"
        return None


def count_flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def first_rows(batch: Batch, count: int, device: str | torch.device | None = None) -> Batch:
    """The first `count` rows of every draw of a batch (on `device`, default where they are)."""
    return Batch(**{k: None if v is None else v[:count].to(device or v.device) for k, v in vars(batch).items()})


def model_flops(trainer: Trainer) -> dict:
    """FLOPs per image of the forward, of the training step as run, and of the step's needed work (counted by
    running jvp_mode "network", so only for a network with a hand-written tangent path)."""
    net, method = trainer.model.net, trainer.method
    batch = first_rows(draw_batch(trainer, 0), 2)
    cond = meanflow.conditions(batch.labels, batch.aug_cond)
    flops = dict(forward_per_image=count_flops(lambda: net(batch.x, batch.t, batch.t - batch.r, **cond)) / 2)
    flops["train_step_per_image"] = count_flops(lambda: loss_and_backward(net, method, batch)) / 2
    if hasattr(net, "forward_and_tangent"):
        needed = meanflow.MeanFlow(**{**vars(method), "jvp_mode": "network"})
        flops["useful_train_step_per_image"] = count_flops(lambda: loss_and_backward(net, needed, batch)) / 2
    trainer.optimizer.zero_grad(set_to_none=True)
    return flops


def ours(args, cfg: TrainConfig, env, errors: dict) -> tuple[dict | None, dict, dict]:
    """Figures of this repository's training step, FLOPs per image, and what compare_with_release
    needs; a failed FLOP count or timing is recorded in `errors` (and gives {} or None)."""
    # torch.compile reads this setting when it wraps the step, which building the trainer does.
    torch._dynamo.config.compiled_autograd = args.compiled_autograd
    try:
        trainer = build_trainer(cfg, env, data=synthetic_data(cfg), fused_adam=args.fused_adam,
                                compile_mode=None if args.compile_mode == "default" else args.compile_mode)
        if args.memory_format == "channels_last":
            trainer.model.to(memory_format=torch.channels_last)
        # What the numerics check against the release needs, kept on the host so that it does not
        # count towards our peak memory: the network's config and first weights, a batch of draws.
        check = dict(model_config=trainer.model_config, method=trainer.method, memory_format=args.memory_format,
                     state={k: v.detach().cpu().clone() for k, v in trainer.model.net.state_dict().items()},
                     batch=vars(first_rows(draw_batch(trainer, 0), CHECK_ROWS, "cpu")))
        flops = {} if args.no_flops else attempt(errors, "flops", lambda: model_flops(trainer)) or {}
        figures = attempt(errors, "ours", lambda: measure(lambda i: train_step(trainer, i), trainer.device,
                                                          args.warmup, args.steps, cfg.batch_per_process))
    finally:
        torch._dynamo.config.compiled_autograd = False
    return figures, flops, check


def baseline(args, cfg: TrainConfig, device: torch.device, check: dict | None, errors: dict) -> tuple[dict, dict | None]:
    """Figures of the release's training step (the body of its train_one_epoch) on the same data,
    and the comparison of its loss and gradients with ours (compare_with_release; None without
    `check` or when it fails, which is recorded in `errors`)."""
    with release.release_modules(Path(args.baseline)):
        flags = release.release_flags(**{k: cfg.flags()[k] for k in release.SETTINGS})
        images = synthetic_images(cfg, max(4 * cfg.batch_per_process, 1024)).to(device)
        model, optimizer, one_step = release.release_step(flags=flags, images=images, batch=cfg.batch_per_process,
                                                          device=device,
                                                          channels_last=args.memory_format == "channels_last")
        figures = attempt(errors, "release", lambda: measure(one_step, device, args.warmup, args.steps,
                                                             cfg.batch_per_process))
        optimizer.zero_grad(set_to_none=True)
        if check is None:
            return figures, None
        # Inside this block: the comparison reaches into the release's modules. As run, TF32
        # rounding on a GPU can hide a real difference of 1e-3, so the check is also run in full
        # float32 (and, for a bf16 run, without autocast).
        numerics = dict(as_run=attempt(errors, "numerics", lambda: compare_with_release(check, model, device)))
        exact = dict(check, method=meanflow.MeanFlow(**{**vars(check["method"]), "autocast": None}))
        with precision_settings("fp32"):
            numerics["fp32"] = attempt(errors, "numerics (fp32)", lambda: compare_with_release(exact, model, device))
        return figures, numerics


def main(argv=None) -> int:
    args = parse_args(argv)
    dataset = PRESETS[args.preset].get("dataset", config_lib.DEFAULTS["dataset"])
    if dataset not in data_utils.DATASETS:
        print(f"skipped --preset {args.preset}: its dataset {dataset!r} is not in this version's table of datasets "
              f"({', '.join(data_utils.DATASETS)})")
        return 0
    quiet_jit_deprecation()
    given = dict(preset=args.preset, jvp_mode=args.jvp_mode, precision=args.precision)
    given.update({k: v for k, v in dict(batch_size=args.batch_size, device=args.device).items() if v is not None})
    if args.compile is not None:
        given["compile"] = args.compile == "on"
    cfg = config_lib.resolve(given, cuda_available=torch.cuda.is_available())
    check_buildable(cfg)
    if cfg.cpu_threads:  # as train.py: the digits presets' one thread
        torch.set_num_threads(cfg.cpu_threads)
    env = init_distributed(cfg.device)
    device = env.device
    apply_precision(args.precision)
    if args.memory_format == "channels_last":
        inductor_config.force_layout_optimization = True
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peaks = next((p for k, p in PEAKS.items() if k in name), {}) if device.type == "cuda" else {}
    # The release has no low-precision path: beside our bf16 it runs (and is measured against) TF32.
    precisions = dict(ours=args.precision, release="fp32" if args.precision == "fp32" else "tf32")

    report = dict(device=name, torch=torch.__version__, preset=args.preset, batch_size=cfg.batch_per_process,
                  jvp_mode=args.jvp_mode, compile=cfg.compile, compile_mode=args.compile_mode,
                  precision=args.precision, memory_format=args.memory_format, fused_adam=args.fused_adam,
                  date=time.strftime("%Y-%m-%d"))
    errors = report["errors"] = {}

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")

    report["ours"], report["flops"], check = (attempt(errors, "ours (set-up)", lambda: ours(args, cfg, env, errors))
                                              or (None, {}, None))
    save()  # a side-by-side run cut short still leaves our figures
    if args.baseline:
        # Free our trainer and compiled graphs so that the release's peak memory is its own.
        gc.collect()
        torch._dynamo.reset()
        gc.collect()  # what the reset released
        if device.type == "cuda":
            torch.cuda.empty_cache()
        apply_precision(precisions["release"])
        report["release"], report["numerics"] = (attempt(errors, "release (set-up)",
                                                         lambda: baseline(args, cfg, device, check, errors))
                                                 or (None, None))
        if report["release"] is not None:
            report["release"]["precision"] = precisions["release"]
        if report["ours"] is not None and report["release"] is not None:
            report["speedup"] = report["ours"]["images_per_s"] / report["release"]["images_per_s"]

    print(f"device {name} | torch {torch.__version__} | preset {args.preset} | batch {cfg.batch_per_process} | "
          f"jvp {args.jvp_mode} | compile {cfg.compile} ({args.compile_mode}) | {args.precision} | "
          f"{args.memory_format}" + (" | fused Adam" if args.fused_adam else ""))
    if report["flops"]:
        f = report["flops"]
        print(f"model FLOPs per image: forward {f['forward_per_image'] / 1e9:.4g} G, training step "
              f"{f['train_step_per_image'] / 1e9:.4g} G as run ({args.jvp_mode} JVP)"
              + (f", of which {f['useful_train_step_per_image'] / 1e9:.4g} G are needed (no zero-tangent products)"
                 if "useful_train_step_per_image" in f else ""))
    for side in ("ours", "release"):
        if report.get(side) is None:
            continue
        r = report[side]
        line = (f"{side:8s} {r['images_per_s']:9.1f} images/s | {r['ms_per_step']:8.2f} ms/step | "
                f"compile {r['compile_s']:6.1f} s")
        line += f" | peak {r['peak_memory_gib']:.2f} GiB" + ("" if device.type == "cuda" else " (RSS growth)")
        peak = peaks.get(precisions[side])
        if peak and report["flops"]:
            # Both sides are credited with the same, needed, work per image (without a tangent path to count
            # it, the work as run).
            f = report["flops"]
            achieved = r["images_per_s"] * f.get("useful_train_step_per_image", f["train_step_per_image"])
            r["fraction_of_peak"] = achieved / peak
            line += (f" | {achieved / 1e12:.1f} TFLOP/s = {100 * achieved / peak:.1f}% of {peak / 1e12:.0f} "
                     f"({precisions[side]} dense)")
        print(line)
    if "speedup" in report:
        print(f"ratio ours / release: {report['speedup']:.2f}x images/s")
    for kind, n in (report.get("numerics") or {}).items():
        if n is not None:
            print(f"numerics {kind} on {n['rows']} images, same weights and draws: loss {n['loss_ours']:.6g} ours, "
                  f"{n['loss_release']:.6g} release (relative difference {n['loss_relative_error']:.2g}); "
                  f"gradients' relative difference median {n['gradient_median_relative_error']:.2g}, worst "
                  f"{n['gradient_worst_relative_error']:.2g} ({n['gradient_worst_parameter']})")
    for what, error in errors.items():
        print(f"FAILED {what}: {error}")
    save()
    return 1 if errors else 0


if __name__ == "__main__":
    with exit_on_user_error():
        sys.exit(main())
