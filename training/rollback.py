"""Rollback: a run whose loss, gradient norm or weights turn non-finite goes back to its last
checkpoint-last.pth and goes on with fresh draws, instead of stopping (docs/rollback.md).

The state restored is the checkpoint on disk, not a copy in memory: a run without faults pays
nothing (no copy, no memory), and a rollback is the same load a rerun of the command does.
"""

import math
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from training.resume import LAST, load_state
from training.services import Log
from training.step import Trainer, check_weights
from utils import checkpoint as ckpt_io
from utils.distributed import barrier
from utils.errors import UserRunError

SPIKE_HISTORY = 50      # the spike guard's median is over this many recent checks
SPIKE_MIN_HISTORY = 5   # checks seen before the spike guard acts


class RollbackGuard:
    """Checks the run at log lines and before saves, and rolls every rank back together.

    max_rollbacks: rollbacks to the same checkpoint before the run stops. spike_factor: when
    the largest gradient norm since the last check exceeds spike_factor x the median of the recent
    checks' largest norms, the run also rolls back (0: off). fault_nan_at: 1-based steps whose loss and weights are made NaN, in order
    (a testing aid): entry i fires the first time its step runs after entry i - 1 fired. saver: the
    loop's checkpoint writer, whose pending write the restore waits for.
    """

    def __init__(self, *, trainer: Trainer, out: Path | None, log: Log, writer=None, max_rollbacks: int = 3,
                 spike_factor: float = 0.0, fault_nan_at: Sequence[int] = (),
                 saver: ckpt_io.BackgroundSaver | None = None):
        self.trainer, self.out, self.log, self.writer, self.saver = trainer, out, log, writer, saver
        self.max_rollbacks, self.spike_factor, self.fault_nan_at = max_rollbacks, spike_factor, list(fault_nan_at)
        self.window_max = None      # the largest gradient norm since the last check (spike guard only)
        self.restored_step, self.streak = None, 0  # consecutive rollbacks to the checkpoint of restored_step

    @property
    def every_grad_norm(self) -> bool:
        """Whether train_step must return the gradient norm at every step (for the spike guard)."""
        return self.spike_factor > 0

    def after_step(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> torch.Tensor:
        """Record the gradient norm of the step that ends at `step` (1-based), inject a due fault; returns the loss."""
        if self.every_grad_norm:
            self.window_max = grad_norm if self.window_max is None else torch.maximum(self.window_max, grad_norm)
        state = self.trainer.rollback
        if state.faults_fired < len(self.fault_nan_at) and self.fault_nan_at[state.faults_fired] == step:
            state.faults_fired += 1
            with torch.no_grad():  # as a diverged step would leave them
                next(self.trainer.model.net.parameters()).fill_(math.nan)
            loss = loss + math.nan
        return loss

    def check(self, loss_sum: torch.Tensor, grad_norm: torch.Tensor | None) -> tuple[float, str | None]:
        """All ranks: (loss_sum summed over ranks, None), or (that sum, why to roll back) when it, the
        gradient norm or a weight is non-finite, or the gradient norm spiked. Waits for the device."""
        trainer = self.trainer
        weights = torch.nn.utils.get_total_norm(list(trainer.model.net.parameters()))
        window, self.window_max = self.window_max, None
        norm = window if window is not None else grad_norm
        norm = torch.zeros_like(weights) if norm is None else norm.to(weights.dtype)
        median = self._median()
        spiked = (norm > self.spike_factor * median) if median is not None else torch.zeros_like(weights, dtype=bool)
        local = torch.stack([loss_sum.to(weights.dtype), weights, norm, spiked.to(weights.dtype)])
        # One all-reduce: a non-finite value on any rank makes the sum non-finite on all of them.
        total = local.clone()
        if trainer.env.world_size > 1:
            dist.all_reduce(total)
        (loss, weights, norms, spikes), local_norm = total.tolist(), local[2].item()
        if not math.isfinite(loss):
            return loss, f"loss became non-finite ({loss})"
        if not math.isfinite(norms):
            return loss, f"gradient norm became non-finite ({norms})"
        if not math.isfinite(weights):
            return loss, "weights became non-finite"
        if spikes:
            return loss, (f"gradient norm {local_norm:.4g} exceeded --spike_factor {self.spike_factor:g} x the "
                          f"median {median:.4g} of the last {len(trainer.rollback.grad_norms)} checks")
        if window is not None:
            trainer.rollback.grad_norms = [*trainer.rollback.grad_norms, local_norm][-SPIKE_HISTORY:]
        return loss, None

    def _median(self) -> float | None:
        history = self.trainer.rollback.grad_norms
        return statistics.median(history) if self.every_grad_norm and len(history) >= SPIKE_MIN_HISTORY else None

    def roll_back(self, why: str, *, first: int, last: int, saved_step: int | None) -> int:
        """All ranks: restore checkpoint-last.pth (written at `saved_step`) after `why` was found in steps
        first..last, and count the attempt; returns the step to continue from. Raises UserRunError when
        there is no checkpoint or this checkpoint was restored max_rollbacks times already."""
        saved_step = saved_step if self.out is not None else None  # a run that saves nothing has nothing to restore
        self.streak = self.streak + 1 if saved_step is not None and saved_step == self.restored_step else 1
        self.restored_step = saved_step
        if saved_step is None or self.streak > self.max_rollbacks:
            kept = f"{self.out / LAST} (step {saved_step}) is left untouched" if saved_step is not None \
                else "no checkpoint was written to roll back to"
            tried = f" after {self.streak - 1} rollbacks to step {saved_step} (--max_rollbacks " \
                    f"{self.max_rollbacks})" if self.streak > 1 else ""
            raise UserRunError(f"{why} between steps {first} and {last}{tried}; stopping without saving: {kept}. "
                               f"Lower --lr or check the data.")
        trainer, state = self.trainer, self.trainer.rollback
        attempt, faults_fired = state.attempt + 1, state.faults_fired
        if self.saver is not None:
            self.saver.wait()  # rank 0's last checkpoint may still be being written in the background
        barrier()  # no rank reads it back before it is complete
        step, _ = load_state(trainer, ckpt_io.load_checkpoint(self.out / LAST), str(self.out / LAST))
        # The counters are the run's, not the restored state's: the replay draws anew, faults stay fired.
        trainer.rollback.attempt, trainer.rollback.faults_fired = attempt, faults_fired
        check_weights(trainer.model, step)  # every rank restored the same state
        self.log(f"rollback {attempt}: {why} between steps {first} and {last}; restored {LAST} at step {step} "
                 f"({self.streak}/{self.max_rollbacks} to it); steps after {step} now draw with attempt {attempt}")
        if self.writer is not None:
            for key, value in (("count", attempt), ("restored_step", step), ("detected_step", last)):
                self.writer.add_scalar(f"rollback/{key}", value, last)
        return step
