"""Rollback: a run whose loss, gradient norm or weights turn non-finite goes back to its last
checkpoint-last.pth and goes on with fresh draws, instead of stopping (docs/rollback.md).

The state restored is the checkpoint on disk, not a copy in memory: a run without faults pays
nothing (no copy, no memory), and a rollback is the same load a rerun of the command does.
What rollback keeps across restores and in every checkpoint is small: the attempt, which keys
every draw (Trainer.attempt), and the spike guard's recent gradient norms.
"""

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from training.log import Log
from training.resume import LAST, load_state
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
    checks' largest norms, the run also rolls back (0: off). saver: the run's checkpoint writer,
    whose pending write the restore waits for. state: the `state()` a checkpoint recorded.
    """

    def __init__(self, *, trainer: Trainer, out: Path | None, log: Log, writer=None, max_rollbacks: int = 3,
                 spike_factor: float = 0.0, saver: ckpt_io.BackgroundSaver | None = None, state: dict | None = None):
        self.trainer, self.out, self.log, self.writer, self.saver = trainer, out, log, writer, saver
        self.max_rollbacks, self.spike_factor = max_rollbacks, spike_factor
        self.grad_norms = list((state or {}).get("grad_norms", []))  # the spike guard's recent largest norms
        self.window_max = None      # the largest gradient norm since the last check (spike guard only)
        self.restored_step, self.streak = None, 0  # consecutive rollbacks to the checkpoint of restored_step

    def state(self) -> dict:
        """What a checkpoint records: the attempt keying the draws of the steps to come, the recent norms."""
        return {"attempt": self.trainer.attempt, "grad_norms": list(self.grad_norms)}

    @property
    def every_grad_norm(self) -> bool:
        """Whether train_step must return the gradient norm at every step (for the spike guard)."""
        return self.spike_factor > 0

    def record(self, grad_norm: torch.Tensor | None) -> None:
        """Note the gradient norm of a step (spike guard)."""
        if self.every_grad_norm:
            self.window_max = grad_norm if self.window_max is None else torch.maximum(self.window_max, grad_norm)

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
                          f"median {median:.4g} of the last {len(self.grad_norms)} checks")
        if window is not None:
            self.grad_norms = [*self.grad_norms, local_norm][-SPIKE_HISTORY:]
        return loss, None

    def _median(self) -> float | None:
        history = self.grad_norms
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
        trainer = self.trainer
        attempt = trainer.attempt + 1
        if self.saver is not None:
            self.saver.wait()  # rank 0's last checkpoint may still be being written in the background
        barrier()  # no rank reads it back before it is complete
        step, _ = load_state(trainer, ckpt_io.load_checkpoint(self.out / LAST), str(self.out / LAST))
        trainer.attempt = attempt  # the run's count, not the restored state's: the replay draws anew
        check_weights(trainer.model, step)  # every rank restored the same state
        self.log(f"rollback {attempt}: {why} between steps {first} and {last}; restored {LAST} at step {step} "
                 f"({self.streak}/{self.max_rollbacks} to it); steps after {step} now draw with attempt {attempt}")
        if self.writer is not None:
            for key, value in (("count", attempt), ("restored_step", step), ("detected_step", last)):
                self.writer.add_scalar(f"rollback/{key}", value, last)
        return step


def with_faults(step_fn: Callable, fault_nan_at: Sequence[int], start_step: int) -> Callable:
    """`step_fn` (train_step's signature) that makes the loss and weights of the steps in `fault_nan_at`
    (1-based) NaN, as a diverged step would leave them: --fault_nan_at, the way to see a rollback work.

    Entry i fires the first time its step runs after entry i - 1 fired; a run resumed at `start_step`
    counts the entries at or before it as fired.
    """
    pending = [s for s in fault_nan_at if s > start_step]

    def faulty_step(trainer: Trainer, step: int, **kwargs):
        loss, norm = step_fn(trainer, step, **kwargs)
        if pending and pending[0] == step + 1:
            pending.pop(0)
            with torch.no_grad():
                next(trainer.model.net.parameters()).fill_(math.nan)
            loss = loss + math.nan
        return loss, norm

    return faulty_step
