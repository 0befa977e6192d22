"""The checkpoint a run writes, and where a run starts from: OUTPUT_DIR/checkpoint-last.pth, else --resume."""

from pathlib import Path

import torch

from training.step import WARMUP_START, Trainer
from utils import checkpoint as ckpt_io
from utils import latents
from utils.errors import UserFileError

CHECKPOINT_FORMAT = "meanflow-pytorch/1"
LAST = "checkpoint-last.pth"


def checkpoint_state(trainer: Trainer, step: int, *, config: dict, rollback: dict) -> dict:
    """The checkpoint after `step` steps: the release's layout under "model", plus what rebuilds and
    resumes the run. config: the run's settings under their flag names (sample.py reads them);
    rollback: training/rollback.py's state (the attempt that keys the draws of the steps to come).
    A latent model's checkpoint also holds its LatentSpace under "latent": how its samples become images."""
    epoch, k = divmod(step, trainer.steps_per_epoch)
    state = {
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "lr_schedule": {"kind": "linear_warmup_then_constant", "lr": trainer.lr, "start_lr": WARMUP_START,
                        "warmup_steps": trainer.warmup_steps, "step": step},
        "step": step,
        "epoch": epoch,  # completed epochs
        "data_position": {"epoch": epoch, "step_in_epoch": k, "steps_per_epoch": trainer.steps_per_epoch,
                          "global_batch": trainer.global_batch, "world_size": trainer.env.world_size},
        "config": dict(config),
        "network": trainer.network,
        "model_config": trainer.model_config,
        "ema_decays": dict(trainer.model.decays),
        "rollback": dict(rollback),
        "format": CHECKPOINT_FORMAT,
    }
    if trainer.latent is not None:
        state[latents.CHECKPOINT_KEY] = trainer.latent.to_dict()
    return state


def find_start(*, out: Path | None, resume: str, eval_only: bool) -> tuple[dict | None, str]:
    """The checkpoint to start from and its path: OUTPUT_DIR/checkpoint-last.pth, else `resume`, else (None, "").

    With eval_only, `resume` names the checkpoint to evaluate, e.g. a numbered snapshot of a
    run whose checkpoint-last.pth has moved on.
    """
    if eval_only and resume:
        return _load(resume), resume
    last = out / LAST if out is not None else None
    if last is not None and last.exists():
        return _load(last, ". It is left as it is: move it away to start over, or pass --resume with a "
                           "numbered snapshot and a fresh --output_dir"), str(last)
    if resume:
        return _load(resume), resume
    return None, ""


def _load(path: str | Path, advice: str = "") -> dict:
    try:
        return ckpt_io.load_checkpoint(path)
    except RuntimeError as e:  # damaged or not a checkpoint; a missing file stays a FileNotFoundError
        raise UserFileError(f"{e}{advice}") from e


def load_state(trainer: Trainer, ckpt: dict, source: str) -> tuple[int, list[str]]:
    """Load a checkpoint (ours, or the release's: model, optimizer, lr_schedule, epoch, args) into `trainer`.

    Returns (step to continue from, notes for the log). The network must match exactly.
    """
    notes = []
    try:
        trainer.model.load_state_dict(ckpt["model"], strict=True)
    except (KeyError, RuntimeError) as e:
        # torch lists every mismatching tensor on a line of its own: name the first and count the rest.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        first = lines[1] if len(lines) > 1 else str(e)
        more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
        raise UserFileError(f"{source} does not fit this run's network {trainer.model_config} with EMA copies "
                        f"{trainer.model.ema_names()}: {first}{more}; pass the network flags of the run that "
                        f"wrote it") from e
    if "optimizer" in ckpt:
        try:
            _load_optimizer(trainer.optimizer, ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            notes.append(f"optimizer state of {source} not loaded ({e}); Adam starts afresh")
    else:
        notes.append(f"{source} has no optimizer state; Adam starts afresh")
    trainer.attempt = int(ckpt.get("rollback", {}).get("attempt", 0))
    if trainer.attempt:
        notes.append(f"{source} was written after {trainer.attempt} rollbacks: its draws are keyed "
                     f"by attempt {trainer.attempt}")
    spe, global_batch = trainer.steps_per_epoch, trainer.global_batch
    if ckpt.get("format") == CHECKPOINT_FORMAT:
        step = int(ckpt["step"])
        saved_batch = ckpt.get("data_position", {}).get("global_batch", global_batch)
        if saved_batch != global_batch:
            notes.append(f"global batch changed from {saved_batch} to {global_batch}: the data order "
                         f"differs from the original run's")
    else:  # the release saves after finishing epoch `epoch`
        step = (int(ckpt.get("epoch", -1)) + 1) * spe
        notes.append(f"release checkpoint: epoch {ckpt.get('epoch')} -> step {step} at {spe} "
                     f"steps per epoch; its lr_schedule is replaced by the schedule's value at that step")
    return step, notes


def _load_optimizer(optimizer: torch.optim.Adam, state: dict) -> None:
    params = optimizer.param_groups[0]["params"]
    for i, p in enumerate(params):
        for key, value in state["state"].get(i, {}).items():
            if key != "step" and torch.is_tensor(value) and value.shape != p.shape:
                raise ValueError(f"state '{key}' of parameter {i} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(p.shape)}")
    betas = optimizer.defaults["betas"]
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:  # this run's settings decide the hyper-parameters
        group["betas"] = betas
        group["weight_decay"] = 0.0
