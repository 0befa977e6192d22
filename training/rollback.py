"""Rollback: a run whose loss, gradient norm or weights turn non-finite goes back to its newest saved
state and goes on with fresh draws, instead of stopping (docs/rollback.md).

The state restored is what is on disk: the newest checkpoint this run wrote (checkpoint-last.pth or a
numbered snapshot), the checkpoint it started from, or, before any, the state at step 0, which the
seed alone determines. Not a copy in memory: a run without faults pays nothing (no copy, no memory),
and a rollback is the same load a rerun of the command does. What rollback keeps across restores
and in every checkpoint is small: the attempt, which keys every draw (Trainer.attempt), and the
spike guard's recent gradient norms. When the rollbacks run out, the attempt is also written to
OUTPUT_DIR/rollback.json, so that rerunning the command draws anew.
"""

import json
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from training.log import Log
from training.resume import load_state
from training.step import Trainer, check_weights
from utils import checkpoint as ckpt_io
from utils.distributed import barrier
from utils.errors import UserRunError

ATTEMPT_FILE = "rollback.json"  # {"step", "attempt"}: what a rerun after the rollbacks ran out continues with

SPIKE_HISTORY = 50      # the spike guard's median is over this many recent checks
SPIKE_MIN_HISTORY = 5   # checks seen before the spike guard acts


class RollbackGuard:
    """Checks the run at log lines and before saves, and rolls every rank back together.

    restore_point: (step, checkpoint path) of the state the run starts from; path None for step 0
    of a fresh run, which `initial_state()` rebuilds. `saved(step, path)` moves it on. out: the
    output folder (for rollback.json; None: none). max_rollbacks: rollbacks to the same state
    before the run stops. spike_factor: when the largest gradient norm since the last check exceeds
    spike_factor x the median of the recent checks' largest norms, the run also rolls back (0: off).
    saver: the run's checkpoint writer, whose pending write the restore waits for. state: the
    `state()` a checkpoint recorded.
    """

    def __init__(self, *, trainer: Trainer, restore_point: tuple[int, Path | None],
                 initial_state: Callable[[], dict], out: Path | None, log: Log, writer=None, max_rollbacks: int = 3,
                 spike_factor: float = 0.0, saver: ckpt_io.BackgroundSaver | None = None, state: dict | None = None):
        self.trainer, self.out, self.log, self.writer, self.saver = trainer, out, log, writer, saver
        self.restore_point, self.initial_state = restore_point, initial_state
        self.max_rollbacks, self.spike_factor = max_rollbacks, spike_factor
        self.grad_norms = list((state or {}).get("grad_norms", []))  # the spike guard's recent largest norms
        self.window_max = None      # the largest gradient norm since the last check (spike guard only)
        self.restored_step, self.streak = None, 0  # consecutive rollbacks to the state of restored_step

    def saved(self, step: int, path: Path) -> None:
        """A checkpoint of `step` is on disk (or being written) at `path`: the newest state to roll back to."""
        self.restore_point = (step, path)

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

    def roll_back(self, why: str, *, first: int, last: int) -> int:
        """All ranks: restore the newest saved state after `why` was found in steps first..last, and count
        the attempt; returns the step to continue from. Raises UserRunError when that state was restored
        max_rollbacks times already (and records the attempt for a rerun in rollback.json)."""
        step, path = self.restore_point
        self.streak = self.streak + 1 if step == self.restored_step else 1
        self.restored_step = step
        trainer = self.trainer
        attempt = trainer.attempt + 1
        what = path.name if path is not None else "the initial state (drawn from --seed)"
        if self.streak > self.max_rollbacks:
            raise UserRunError(f"{why} between steps {first} and {last} after {self.streak - 1} rollbacks to step "
                               f"{step} (--max_rollbacks {self.max_rollbacks}); stopping without saving: "
                               f"{what} (step {step}) is left untouched. {self._record_for_rerun(step, attempt)}")
        if self.saver is not None:
            self.saver.wait()  # rank 0's last checkpoint may still be being written in the background
        barrier()  # no rank reads it back before it is complete
        if path is None:
            trainer.model.load_state_dict(self.initial_state())
            trainer.optimizer.state.clear()
        else:
            load_state(trainer, ckpt_io.load_checkpoint(path), str(path))
        trainer.attempt = attempt  # the run's count, not the restored state's: the replay draws anew
        check_weights(trainer.model, step)  # every rank restored the same state
        self.log(f"rollback {attempt}: {why} between steps {first} and {last}; restored {what} at step {step} "
                 f"({self.streak}/{self.max_rollbacks} to it); steps after {step} now draw with attempt {attempt}")
        if self.writer is not None:
            for key, value in (("count", attempt), ("restored_step", step), ("detected_step", last)):
                self.writer.add_scalar(f"rollback/{key}", value, last)
        return step

    def _record_for_rerun(self, step: int, attempt: int) -> str:
        """Write rollback.json so that a rerun starting at `step` draws with `attempt`; say what a rerun does."""
        if self.out is None:
            return "Without an output folder a rerun replays the same draws; lower --lr or check the data."
        if self.trainer.env.rank == 0:
            ckpt_io.atomic_write(self.out / ATTEMPT_FILE, lambda f: f.write(json.dumps(
                {"step": step, "attempt": attempt}).encode()), what="rollback record")
        return (f"Running the same command again continues from its last checkpoint with fresh draws (attempt "
                f"{attempt}); if it fails again, lower --lr or check the data.")


def attempt_for_rerun(out: Path | None, step: int) -> int | None:
    """The attempt rollback.json records for a run that starts at `step` or before the state whose
    rollbacks ran out, if any: such a rerun replays those steps and must draw anew."""
    path = None if out is None else out / ATTEMPT_FILE
    if path is None or not path.is_file():
        return None
    record = json.loads(path.read_text())
    return int(record["attempt"]) if step <= record.get("step", -1) else None


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
