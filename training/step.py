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
from collections.abc import Callable
from dataclasses import dataclass

import torch

import meanflow
from models.ema import EMAModel
from utils import data as data_utils
from utils.augment import AugmentPipe
from utils.distributed import DistEnv, GradSync, check_consistency
from utils.latents import LatentSpace

WARMUP_START = 1e-8  # the release's LinearLR starts at lr = 1e-8 (start_factor = 1e-8 / lr)


@dataclass
class Batch:
    """One step's draws for this rank's rows of the global batch, on the device; the loss takes them by name.

    x: data [b, C, H, W]; noise: e ~ N(0, I) like x; t, r: [b], t >= r. aug_cond: EDM's augmentation
    labels [b, 6] (None without augmentation). labels: class indices [b] and drop: [b] bool, the
    candidates for the null class (both None for an unconditional network). omega, t_min, t_max:
    [b], the guidance scale and interval the iMF objective trains with (None for MeanFlow's).
    """
    x: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    r: torch.Tensor
    aug_cond: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    drop: torch.Tensor | None = None
    omega: torch.Tensor | None = None
    t_min: torch.Tensor | None = None
    t_max: torch.Tensor | None = None

    def loss_inputs(self) -> dict[str, torch.Tensor]:
        """Every draw but x, by name, without the ones this batch has not."""
        return {name: value for name, value in vars(self).items() if name != "x" and value is not None}


@dataclass
class Trainer:
    """One process's share of training: its data, the network with its EMA copies, Adam, the MeanFlow
    loss and the gradient sync. training/build.py makes one from a TrainConfig."""
    data: data_utils.ImageData  # the training split (ImageData, or a latent dataset with the same batch())
    env: DistEnv
    model: EMAModel
    network: str                # the architecture's name in models/networks.py
    model_config: dict          # its keyword arguments
    optimizer: torch.optim.Adam
    method: meanflow.MeanFlow | meanflow.ImprovedMeanFlow  # the objective
    loss_fn: Callable           # loss_and_backward, compiled or not
    grad_sync: GradSync
    augment: AugmentPipe | None
    flip: bool
    class_cond: bool            # the network is given the data's labels
    seed: int
    batch: int                  # rows per process
    lr: float
    warmup_steps: int
    attempt: int = 0            # rollbacks so far (training/rollback.py): keys every draw; 0 adds no key
    latent: LatentSpace | None = None  # latent data: the network's normalization of them, the VAE that decodes

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def global_batch(self) -> int:
        return self.batch * self.env.world_size

    @property
    def steps_per_epoch(self) -> int:
        return data_utils.steps_per_epoch(len(self.data), self.global_batch)

    @property
    def img_shape(self) -> tuple[int, int, int]:
        return self.data.shape


def train_step(trainer: Trainer, step: int, *, check: bool = False,
               grad_norm: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step on global batch `step` (0-based); afterwards the weights are those after step + 1 steps.

    check: raise unless all ranks hold the same gradients, then the same weights.
    grad_norm: also return the L2 norm of the gradients. Returns (this rank's loss, norm or None),
    device tensors: nothing here waits for the device.
    """
    model, optimizer = trainer.model, trainer.optimizer
    # Draw this rank's rows of the batch, keyed by (seed, step, purpose, attempt).
    batch = draw_batch(trainer, step)

    # Loss and gradients; dropout draws from a global RNG seeded by (seed, step, rank, attempt).
    optimizer.zero_grad(set_to_none=True)
    dropout_seed = data_utils.fold_seed(trainer.seed, "dropout", step, trainer.env.rank,
                                        *attempt_keys(trainer.attempt))
    with seeded_global_rng(dropout_seed, trainer.device):
        loss = trainer.loss_fn(model.net, trainer.method, batch)
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


def draw_batch(trainer: Trainer, step: int) -> Batch:
    """This rank's rows of global batch `step`.

    Every random draw is made for the whole global batch from a generator keyed by
    (seed, step, purpose, attempt), then sliced (a latent's noise: from a generator per row, keyed
    by the row too), so rows do not depend on the number of processes.
    The generators are the host's: CUDA's randn depends on the launch grid, i.e. on the GPU model,
    and a CPU generator gives the same numbers on every machine. Draws go to the device pinned,
    without waiting for it.
    """
    device, global_batch = trainer.device, trainer.global_batch
    rows = slice(trainer.env.rank * trainer.batch, (trainer.env.rank + 1) * trainer.batch)

    def generator(purpose: str) -> torch.Generator:
        return data_utils.make_generator(trainer.seed, "train", step, purpose, *attempt_keys(trainer.attempt))

    epoch, k = divmod(step, trainer.steps_per_epoch)
    idx = data_utils.batch_indices(trainer.seed, epoch, len(trainer.data), global_batch, k)[rows]
    if trainer.latent is None:
        x = trainer.data.batch(idx, generator=generator, rows=rows, total=global_batch, flip=trainer.flip,
                               device=device)
    else:  # RAW VAE latents, normalized on the host: on the device, copying the constants there would wait
        x = trainer.data.batch(idx, generator=generator, rows=rows, total=global_batch, flip=trainer.flip,
                               device="cpu")
        x = data_utils.to_device(trainer.latent.norm.normalize(x), device)
    aug_cond = None
    if trainer.augment is not None:
        # The augmentation's draws and decisions stay on the host too: no device sync.
        x, aug_cond = trainer.augment(x, generator("augment"), offset=rows.start, total=global_batch)
    noise = torch.randn((global_batch, *trainer.img_shape), generator=generator("noise"))[rows]
    draws = trainer.method.sample_draws(global_batch, generator, labels=trainer.class_cond)
    labels = trainer.data.labels[idx] if trainer.class_cond else None
    draws = {name: data_utils.to_device(value[rows], device) for name, value in draws.items()}
    return Batch(x=x, noise=data_utils.to_device(noise, device), aug_cond=aug_cond,
                 labels=None if labels is None else data_utils.to_device(labels, device), **draws)


def attempt_keys(attempt: int) -> tuple:
    """Keys appended to every draw of a step after `attempt` rollbacks; none on attempt 0, so a run
    that never rolled back draws what runs drew before rollbacks existed."""
    return ("attempt", attempt) if attempt else ()


def loss_and_backward(net, method: meanflow.MeanFlow | meanflow.ImprovedMeanFlow, batch: Batch) -> torch.Tensor:
    """The objective's loss of one batch and its backward pass (the part that torch.compile speeds up)."""
    loss = method.loss(net, batch.x, **batch.loss_inputs())
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
