"""The training loop: steps, logging, checkpoints, evaluation, rollbacks, and stopping on a signal."""

import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from training.resume import LAST, checkpoint_state
from training.rollback import RollbackGuard
from training.services import Log, StopRequest, memory_gib
from training.step import Trainer, check_weights, lr_at, train_step
from utils import checkpoint as ckpt_io
from utils.distributed import barrier


def training_loop(*, trainer: Trainer, start_step: int, total_steps: int, evaluate: Callable[[int], dict],
                  log: Log, config: dict, out: Path | None = None, writer=None, save: bool = True,
                  log_every: int = 100, check_every: int = 1000, ckpt_every: int = 1000, snapshot_every: int = 0,
                  eval_every: int = 50, compiling: bool = False, max_rollbacks: int = 3, spike_factor: float = 0.0,
                  fault_nan_at: Sequence[int] = ()) -> None:
    """Train from step `start_step` to `total_steps`, then save checkpoint-last.pth and evaluate.

    evaluate(step): called at the end and every `eval_every` epochs (-1: only at the end).
    config: recorded in every checkpoint. out: folder of checkpoints (None: none written);
    save=False writes none either. ckpt_every / snapshot_every: steps between checkpoint-last.pth /
    checkpoint-STEP.pth (0: never). check_every: steps between checks that all ranks hold the same
    gradients and weights (also at the first two steps and before each checkpoint). A SIGTERM or
    SIGINT saves checkpoint-last.pth at the next step boundary and returns. max_rollbacks,
    spike_factor, fault_nan_at: see training.rollback.RollbackGuard.
    """
    env, spe = trainer.env, trainer.steps_per_epoch
    step = start_step
    save = save and out is not None
    saved_step = step if out is not None and (out / LAST).exists() else None  # of the checkpoint-last.pth on disk
    loss_sum = torch.zeros((), device=trainer.device)  # losses since the last log, read only when logging
    window, window_start, window_tic = 0, step, time.perf_counter()
    stop = StopRequest(env)
    saver = ckpt_io.BackgroundSaver()
    guard = RollbackGuard(trainer=trainer, out=out if save else None, log=log, writer=writer,
                          max_rollbacks=max_rollbacks, spike_factor=spike_factor, fault_nan_at=fault_nan_at,
                          saver=saver)
    bar = tqdm(total=total_steps, initial=step, disable=None if env.rank == 0 else True, dynamic_ncols=True,
               desc="train", unit="step", file=sys.stderr)
    log(f"training steps {start_step}..{total_steps} ({total_steps / spe:.1f} epochs of {spe} steps, global batch "
        f"{trainer.global_batch} = {trainer.batch} x {env.world_size} processes)"
        + (" ; compiling the training step first, this takes a while" if compiling else ""))
    try:
        while step < total_steps and not stop.requested(step):
            # One step; the ranks' gradients and weights are compared on the first two and every check_every.
            logging_now = (step + 1) % log_every == 0 or step + 1 == total_steps
            checking = step - start_step < 2 or (check_every and (step + 1) % check_every == 0)
            loss, grad_norm = train_step(trainer, step, check=checking,
                                         grad_norm=logging_now or guard.every_grad_norm)
            loss = guard.after_step(step + 1, loss, grad_norm)
            step += 1
            loss_sum += loss
            window += 1
            bar.update(1)

            # The checkpoints due; at an evaluation epoch, like the release, save what is evaluated.
            names = [LAST] if ckpt_every and step % ckpt_every == 0 else []
            if snapshot_every and step % snapshot_every == 0:
                names.append(f"checkpoint-{step}.pth")
            evaluating = step % spe == 0 and step < total_steps and eval_every > 0 and (step // spe) % eval_every == 0
            if evaluating:
                names = list(dict.fromkeys([LAST, *names]))

            # At log lines and before saves (this waits for the device), a non-finite loss, gradient
            # norm or weight, or a gradient spike, sends every rank back to checkpoint-last.pth.
            if logging_now or (names and save):
                loss_total, why = guard.check(loss_sum, grad_norm if logging_now else None)
                if why is not None:
                    step = guard.roll_back(why, first=window_start, last=step, saved_step=saved_step)
                    loss_sum.zero_()
                    window, window_start, window_tic = 0, step, time.perf_counter()
                    bar.n = step
                    continue

            # Log the mean loss since the last log.
            if logging_now:
                mean_loss = loss_total / (window * env.world_size)
                sec = (time.perf_counter() - window_tic) / window
                stats = dict(loss=mean_loss, lr=lr_at(step - 1, lr=trainer.lr, warmup_steps=trainer.warmup_steps),
                             sec_per_iter=sec, images_per_sec=trainer.global_batch / sec,
                             grad_norm=grad_norm.item(), epoch=step / spe, memory_gib=memory_gib(trainer.device))
                log(f"step {step}/{total_steps} | epoch {stats['epoch']:.2f} | loss {mean_loss:.5f} | "
                    f"lr {stats['lr']:.3g} | {sec:.3f} s/it | {stats['images_per_sec']:.0f} img/s | "
                    f"grad {stats['grad_norm']:.3g} | mem {stats['memory_gib']:.2f} GiB")
                if writer is not None:
                    for key, value in stats.items():
                        writer.add_scalar(f"train/{key}", value, step)
                loss_sum.zero_()
                window, window_start, window_tic = 0, step, time.perf_counter()

            # Save and evaluate.
            tic = time.perf_counter()
            if names and save:
                save_checkpoints(trainer, step, names, out=out, config=config, log=log, saver=saver)
                saved_step = step
            if evaluating:
                evaluate(step)
            window_tic += time.perf_counter() - tic  # s/it counts training only

        # Stopped by a signal or done: checkpoint-last.pth holds this step; the end of training is evaluated.
        # The last step is a log step: only a stop leaves steps unchecked here.
        stopped = step < total_steps
        if save and (stopped or saved_step != step):
            why = guard.check(loss_sum, None)[1]
            if why is not None:  # saved again below: with the new attempt, the rerun draws anew
                step = guard.roll_back(why, first=window_start, last=step, saved_step=saved_step)
            save_checkpoints(trainer, step, [LAST], out=out, config=config, log=log, saver=saver)
        if stopped:
            log(f"stopped by {signal.Signals(stop.signum).name} at step {step}"
                + (f"; {LAST} saved: run the same command to continue" if save else ""))
            return
        evaluate(step)
        log(f"done: {step} steps" + (f"; outputs in {out}" if out is not None else ""))
        barrier()
    finally:
        bar.close()
        stop.restore()
        saver.wait()  # the last checkpoint is on disk before the run ends, or its write error is raised


def save_checkpoints(trainer: Trainer, step: int, names: list[str], *, out: Path, config: dict, log: Log,
                     saver: ckpt_io.BackgroundSaver) -> None:
    """Save the checkpoint of `step` under each name in `out` (rank 0), once all ranks hold the same weights.

    The state is copied to the CPU now and written by `saver`'s thread while training goes on."""
    check_weights(trainer.model, step)
    if trainer.env.rank == 0:
        saver.save(checkpoint_state(trainer, step, config=config), [out / name for name in names])
    log(f"saved {', '.join(names)} at step {step}")
