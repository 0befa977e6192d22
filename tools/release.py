"""The authors' release (Gsunshine/py-meanflow) beside this repository: its modules imported without
clobbering ours, its command line for our settings, its training step, and its loss on our draws.

Nothing here is used for training; bench.py times and checks the release with it, and
tests/fixtures/make_fixtures.py computes the parity tests' reference outputs with it.
"""

import contextlib
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch

RELEASE_URL = "https://github.com/Gsunshine/py-meanflow"
RELEASE_FILES = ("models/unet.py", "train_arg_parser.py", "scripts/cifar10_v1.sh")

# Our settings that the release takes as flags of the same name (those of its cifar10 launchers).
SETTINGS = ("batch_size", "lr", "tr_sampler", "P_mean_t", "P_std_t", "P_mean_r", "P_std_r", "norm_p", "norm_eps",
            "ratio", "dropout", "ema_decay", "ema_decays", "use_edm_aug", "compile")


def release_code_dir(path: str | Path) -> Path:
    """The release's `meanflow/` folder (models/, train_arg_parser.py, scripts/), given a clone or that folder.

    FileNotFoundError naming the folder when it is not a copy of the release.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"release folder {path} does not exist: clone {RELEASE_URL} and pass its folder")
    for candidate in (path / "meanflow", path):
        if all((candidate / name).is_file() for name in RELEASE_FILES):
            return candidate
    raise FileNotFoundError(f"{path} is not a copy of the authors' release (missing one of "
                            f"{', '.join('meanflow/' + name for name in RELEASE_FILES)}): "
                            f"clone {RELEASE_URL} and pass its folder")


@contextlib.contextmanager
def release_modules(root: str | Path):
    """Import the release's top-level modules (`models`, `training`, ...) from a clone (or its `meanflow/`
    folder) without clobbering ours.

    Its `models/` and `training/` folders have no `__init__.py`: as namespace packages they would
    lose to our regular packages of the same names whatever the order of sys.path, so they are
    registered by hand. Our modules are put back afterwards; objects already built keep working.
    """
    names = ("models", "training", "train_arg_parser")
    src = release_code_dir(root)
    ours_saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] in names}
    sys.path.insert(0, str(src))
    for pkg in ("models", "training"):
        module = types.ModuleType(pkg)
        module.__path__ = [str(src / pkg)]
        sys.modules[pkg] = module
    try:
        yield
    finally:
        sys.path.remove(str(src))
        for k in [k for k in sys.modules if k.split(".")[0] in names]:
            del sys.modules[k]
        sys.modules.update(ours_saved)


def release_flags(*, ema_decays: list[float], use_edm_aug: bool, compile: bool, **scalars) -> list[str]:
    """The release's command line for our settings; scalars: the other SETTINGS, each given as --name=value."""
    flags = [f"--{k}={v}" for k, v in scalars.items()] + ["--ema_decays", *map(str, ema_decays)]
    return flags + (["--use_edm_aug"] if use_edm_aug else []) + ([] if compile else ["--not_compile"])


def release_step(*, flags: list[str], images: torch.Tensor, batch: int, device: torch.device,
                 channels_last: bool = False) -> tuple[torch.nn.Module, torch.optim.Adam, Callable[[int], None]]:
    """(model, optimizer, step(i)): the release's model and Adam built from `flags`, and the body of its
    train_one_epoch on `batch` random rows of `images` (uint8 [N, C, H, W] on `device`), in place of its
    DataLoader. Call inside release_modules."""
    from models.model_configs import instantiate_model
    from train_arg_parser import get_args_parser
    import models.rng as rng
    from training import train_loop

    rargs = get_args_parser().parse_args(flags)
    model = instantiate_model(rargs).to(device)
    model.train(True)
    optimizer = torch.optim.Adam(model.net.parameters(), lr=rargs.lr, betas=rargs.optimizer_betas, weight_decay=0.0)
    step_fn = torch.compile(train_loop.train_step, disable=not rargs.compile)
    if channels_last:
        model.to(memory_format=torch.channels_last)

    def step(i: int) -> None:
        optimizer.zero_grad()
        rows = torch.randint(0, len(images), (batch,), device=device)
        samples = images[rows].float() / 255.0 * 2.0 - 1.0  # what its loader and loop produce
        samples, aug_cond = (rng.augment_with_rng_control(train_loop.augment_pipe, samples, rargs.seed, i)
                             if rargs.use_edm_aug else (samples, None))
        loss = rng.train_step_with_rng_control(step_fn, model, i, rargs.seed, samples, aug_cond)
        train_loop.synchronize_gradients(model)  # a no-op without its DDP wrapper, as on one GPU
        loss.item()  # its loop reads the loss every step
        optimizer.step()
        model.update_ema()

    return model, optimizer, step


def release_loss_and_backward(model: torch.nn.Module, x: torch.Tensor, aug_cond: torch.Tensor | None, *,
                              noise: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The release's loss of `model` on our draws, and its backward pass. Its forward_with_loss draws
    noise and (t, r) itself, from its module's `torch.randn_like` and `sample_two_timesteps`: they
    are handed ours for the call (in the globals its method runs in, which outlive release_modules)."""
    names = type(model).forward_with_loss.__globals__
    saved = names["sample_two_timesteps"], names["torch"]
    names["sample_two_timesteps"] = lambda *args, **kwargs: (t, r)
    names["torch"] = types.SimpleNamespace(**{**vars(torch), "randn_like": lambda like: noise.clone()})
    try:
        loss = model.forward_with_loss(x, aug_cond)
        loss.backward()
    finally:
        names["sample_two_timesteps"], names["torch"] = saved
    return loss.detach()
