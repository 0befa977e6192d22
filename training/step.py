"""One training step, the function that training, bench.py and the tests all run, and the state it updates.

No DistributedDataParallel: the loss differentiates the network with torch.func.jvp, which
cannot run through the DDP wrapper (PyTorch issue 102197). Every rank runs the bare network,
gradients are averaged explicitly (GradSync), and ranks can be checked to hold identical
gradients and weights.

Randomness is keyed by (seed, step, purpose), plus the attempt after a rollback, and drawn on
the host for the global batch, of which each rank takes its rows: a resumed run continues
exactly, the draws do not depend on the GPU model, and with dropout 0, N processes with batch B
train the same weights as one process with batch N*B.
"""

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import meanflow
from models.augment import AugmentPipe
from models.ema import EMAModel
from models.unet import SongUNet
from utils import data as data_utils
from utils.distributed import DistEnv, GradSync, check_consistency
from utils.errors import UserValueError

WARMUP_START = 1e-8  # the release's LinearLR starts at lr = 1e-8 (start_factor = 1e-8 / lr)


@dataclass
class RollbackState:
    """What training/rollback.py keeps with the trainer; saved in every checkpoint."""
    attempt: int = 0        # rollbacks so far in this run: keys every draw (0: the keys of a run without rollbacks)
    faults_fired: int = 0   # entries of --fault_nan_at that have fired
    grad_norms: list[float] = field(default_factory=list)  # the spike guard's recent largest gradient norms


@dataclass
class Trainer:
    """One process's share of training: its data, EMAModel(SongUNet), Adam, MeanFlow loss, gradient sync."""
    images: torch.Tensor        # uint8 [N, C, H, W], all training images, on the device
    env: DistEnv
    model: EMAModel
    model_config: dict          # SongUNet kwargs of model.net
    optimizer: torch.optim.Adam
    method: meanflow.MeanFlow
    loss_fn: Callable           # loss_and_backward, compiled or not
    grad_sync: GradSync
    augment: AugmentPipe | None
    flip: bool
    seed: int
    batch: int                  # rows per process
    lr: float
    warmup_steps: int
    rollback: RollbackState = field(default_factory=RollbackState)
    labels: torch.Tensor | None = None  # LongTensor [N], the class of each image, on the host; None: unconditional

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def global_batch(self) -> int:
        return self.batch * self.env.world_size

    @property
    def steps_per_epoch(self) -> int:
        return data_utils.steps_per_epoch(len(self.images), self.global_batch)

    @property
    def img_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])


def build_trainer(*, images: torch.Tensor, env: DistEnv, model_config: dict, method: meanflow.MeanFlow,
                  seed: int = 0, batch_size: int = 64, lr: float = 6e-4, betas: Sequence[float] = (0.9, 0.999),
                  warmup_epochs: int = 200, ema_decays: Sequence[float] = (0.9999, 0.99995, 0.9996),
                  ema_period: int = 16, flip: bool = False, augment: bool = False, compile: bool = False,
                  compile_mode: str | None = None, fused_adam: bool = False,
                  labels: torch.Tensor | None = None) -> Trainer:
    """A Trainer with fresh weights drawn from `seed`, the same on every rank.

    images: uint8 [N, C, H, W] (moved to env.device). batch_size: rows per process.
    ema_decays: net_ema's decay first, then the extra copies'. compile_mode: torch.compile's mode
    (None: its default). fused_adam: Adam's fused implementation instead of torch's default.
    labels: LongTensor [N] of the images' classes for a class-conditional network (model_config's label_dim > 0).
    """
    if (labels is not None) != bool(model_config.get("label_dim")):
        raise ValueError("pass labels exactly when the network is class-conditional (label_dim > 0)")
    global_batch = batch_size * env.world_size
    if global_batch > len(images):
        raise UserValueError(f"global batch {global_batch} (--batch_size {batch_size} x {env.world_size} "
                        f"processes) is larger than the {len(images)} training images: lower --batch_size")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(data_utils.fold_seed(seed, "init"))
        net = SongUNet(**model_config)
    net.to(env.device)
    if env.world_size > 1:  # the same seed gives the same weights; broadcasting makes it certain
        for tensor in net.state_dict().values():
            dist.broadcast(tensor, src=0)
    model = EMAModel(net, decays=ema_decays, period=ema_period)
    model.train()
    # Adam, not AdamW, and only the trained network's parameters: the EMA copies are not optimized.
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, betas=tuple(betas), weight_decay=0.0,
                                 **(dict(fused=True) if fused_adam else {}))
    steps_per_epoch = data_utils.steps_per_epoch(len(images), global_batch)
    return Trainer(images=images.to(env.device), env=env, model=model, model_config=model_config,
                   optimizer=optimizer, method=method, grad_sync=GradSync(net.parameters()),
                   loss_fn=torch.compile(loss_and_backward, mode=compile_mode) if compile else loss_and_backward,
                   augment=AugmentPipe() if augment else None, flip=flip, seed=seed, batch=batch_size, lr=lr,
                   warmup_steps=warmup_epochs * steps_per_epoch, labels=labels)


def train_step(trainer: Trainer, step: int, *, check: bool = False,
               grad_norm: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step on global batch `step` (0-based); afterwards the weights are those after step + 1 steps.

    check: raise unless all ranks hold the same gradients, then the same weights.
    grad_norm: also return the L2 norm of the gradients. Returns (this rank's loss, norm or None),
    device tensors: nothing here waits for the device.
    """
    model, optimizer = trainer.model, trainer.optimizer
    # Draw this rank's rows of the batch, keyed by (seed, step, purpose, attempt).
    x, aug_cond, noise, t, r, class_labels, drop = draw_batch(trainer, step)

    # Loss and gradients; dropout draws from a global RNG seeded by (seed, step, rank, attempt).
    optimizer.zero_grad(set_to_none=True)
    dropout_seed = data_utils.fold_seed(trainer.seed, "dropout", step, trainer.env.rank,
                                        *attempt_keys(trainer.rollback.attempt))
    with seeded_global_rng(dropout_seed, trainer.device):
        loss = trainer.loss_fn(model.net, trainer.method, x, aug_cond, noise, t, r, class_labels, drop)
    trainer.grad_sync()  # average over ranks
    if check:
        check_gradients(model.net, step)
    norm = None
    if grad_norm:
        grads = [p.grad for p in model.net.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=trainer.device)

    # Update the weights at the lr of this step (a pure function of the step), then the EMA copies.
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, lr=trainer.lr, warmup_steps=trainer.warmup_steps)
    optimizer.step()
    model.update()
    if check:
        check_weights(model, step + 1)
    return loss, norm


def draw_batch(trainer: Trainer, step: int):
    """This rank's rows of global batch `step`: (x, aug_cond, noise, t, r, class_labels, drop).

    Every random draw is made for the whole global batch from a generator keyed by
    (seed, step, purpose, attempt), then sliced, so rows do not depend on the number of processes.
    The generators are the host's: CUDA's randn depends on the launch grid, i.e. on the GPU model,
    and a CPU generator gives the same numbers on every machine. Draws go to the device pinned,
    without waiting for it.
    class_labels (class indices [B]) and drop ([B] bool, the labels to replace by the null
    class) are None for an unconditional network.
    """
    device, global_batch = trainer.device, trainer.global_batch
    rows = slice(trainer.env.rank * trainer.batch, (trainer.env.rank + 1) * trainer.batch)

    def generator(purpose: str) -> torch.Generator:
        return data_utils.make_generator(trainer.seed, "train", step, purpose, *attempt_keys(trainer.rollback.attempt))

    epoch, k = divmod(step, trainer.steps_per_epoch)
    idx = data_utils.batch_indices(trainer.seed, epoch, len(trainer.images), global_batch, k)[rows]
    x = data_utils.to_float(trainer.images[data_utils.to_device(idx, device)])
    where = dict(offset=rows.start, total=global_batch)
    if trainer.flip:
        x = data_utils.random_hflip(x, generator("flip"), **where)
    aug_cond = None
    if trainer.augment is not None:
        # The augmentation's draws and decisions stay on the host too: no device sync.
        x, aug_cond = trainer.augment(x, generator("augment"), **where)
    noise = torch.randn((global_batch, *trainer.img_shape), generator=generator("noise"))[rows]
    t, r = trainer.method.sample_t_r(global_batch, generator=generator("t_r"))
    noise, t, r = (data_utils.to_device(v, device) for v in (noise, t[rows], r[rows]))
    class_labels = drop = None
    if trainer.labels is not None:
        class_labels = trainer.labels[idx]
        drop = trainer.method.sample_drop(global_batch, generator=generator("label_drop"))[rows]
        class_labels, drop = data_utils.to_device(class_labels, device), data_utils.to_device(drop, device)
    return x, aug_cond, noise, t, r, class_labels, drop


def attempt_keys(attempt: int) -> tuple:
    """Keys appended to every draw of a step after `attempt` rollbacks; none on attempt 0, so a run
    that never rolled back draws what runs drew before rollbacks existed."""
    return ("attempt", attempt) if attempt else ()


def loss_and_backward(net, method: meanflow.MeanFlow, x, aug_cond, noise, t, r, class_labels=None,
                      drop=None) -> torch.Tensor:
    """MeanFlow loss of one batch and its backward pass (the part that torch.compile speeds up)."""
    loss = method.loss(net, x, aug_cond, labels=class_labels, noise=noise, t=t, r=r, drop=drop)
    loss.backward()
    return loss.detach()


def check_gradients(net: torch.nn.Module, step: int) -> None:
    """Raise on every rank unless all ranks hold the same gradients at `step`."""
    check_consistency(((n, p.grad) for n, p in net.named_parameters()), "gradient", step)


def check_weights(model: EMAModel, step: int) -> None:
    """Raise on every rank unless all ranks hold the same weights (all networks) after `step` steps."""
    check_consistency(model.state_dict().items(), "weight", step)


def lr_at(step: int, *, lr: float, warmup_steps: int) -> float:
    """The release's schedule as a function of the step: LinearLR from 1e-8 to lr, then constant."""
    if step >= warmup_steps:
        return lr
    start = WARMUP_START / lr
    return lr * (start + (1.0 - start) * step / warmup_steps)


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device):
    """Seed the global RNG (dropout) for a block and restore the previous state afterwards."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
